"""Shared helpers for the data-pipeline tests (imported explicitly, not a conftest).

Everything here writes tiny images into a pytest tmp_path.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Where the real COVID-CT train/val data lives: ../shared/covid-ct beside the repo,
# or the folder named by the environment variable COVIDCT_DATA.
REAL_DATA = Path(os.environ.get("COVIDCT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "covid-ct")


def gradient(width: int = 24, height: int = 20) -> np.ndarray:
    """A uint8 (height, width) test pattern: a horizontal ramp plus a bright square."""
    ramp = np.tile(np.linspace(0, 200, width), (height, 1))
    ramp[height // 4: height // 2, width // 4: width // 2] = 255
    return ramp.astype(np.uint8)


def write_image(path, mode: str = "L", size=(24, 20), fmt: str | None = None, value: np.ndarray | None = None) -> Path:
    """Write a small image of `mode` (L, RGB, RGBA, P, LA, 1, I;16, CMYK, F) -> path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gray = gradient(*size) if value is None else value
    if mode == "L":
        image = Image.fromarray(gray)
    elif mode == "RGB":
        image = Image.fromarray(np.stack([gray] * 3, axis=-1))
    elif mode == "RGBA":
        image = Image.fromarray(np.dstack([gray, gray, gray, np.full_like(gray, 255)]))
    elif mode == "LA":
        image = Image.fromarray(np.dstack([gray, np.full_like(gray, 255)]))
    elif mode == "P":
        image = Image.fromarray(gray).convert("P")
    elif mode == "1":
        image = Image.fromarray(gray > 127)
    elif mode == "I;16":
        image = Image.fromarray(gray.astype(np.uint16) * 257)          # same values on a 16-bit scale
    elif mode == "CMYK":
        image = Image.fromarray(np.stack([gray] * 3, axis=-1)).convert("CMYK")
    elif mode == "F":
        image = Image.fromarray(gray.astype(np.float32) / 255)
    else:
        raise ValueError(mode)
    image.save(path, format=fmt)
    return path


def zero_size_png(path) -> Path:
    """A syntactically valid PNG header that says 0 x 0 pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 0, 0, 8, 0, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                           + chunk(b"IEND", b""))
    return Path(path)


def make_ucsd(root, n_covid: int = 3, n_non_covid: int = 3, splits=("train", "val"), images_processed: bool = True):
    """A tiny UCSD COVID-CT tree; every split lists the same files. -> root."""
    root = Path(root)
    base = root / "Images-processed" if images_processed else root
    covid = [write_image(base / "CT_COVID" / f"c{i}.png", "RGBA" if i % 2 else "RGB") for i in range(n_covid)]
    non = [write_image(base / "CT_NonCOVID" / f"n{i}.jpg", "L" if i % 2 else "RGB") for i in range(n_non_covid)]
    (root / "Data-split" / "COVID").mkdir(parents=True, exist_ok=True)
    (root / "Data-split" / "NonCOVID").mkdir(parents=True, exist_ok=True)
    for split in splits:
        (root / "Data-split" / "COVID" / f"{split}CT_COVID.txt").write_text("".join(p.name + "\n" for p in covid))
        (root / "Data-split" / "NonCOVID" / f"{split}CT_NonCOVID.txt").write_text("".join(p.name + "\n" for p in non))
    return root


def make_folders(root, n: int = 2, covid_dir: str = "covid", non_covid_dir: str = "non-covid"):
    """ROOT/covid/*.png and ROOT/non-covid/*.jpg -> root."""
    root = Path(root)
    for i in range(n):
        write_image(root / covid_dir / f"a{i}.png", "RGB")
        write_image(root / non_covid_dir / f"b{i}.jpg", "L")
    return root
