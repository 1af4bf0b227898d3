"""What a picture test checks (imported explicitly): a PNG that shows something, at about the expected size.

A blank, one-colour or tiny image fails, whatever its file size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_picture(path, size=None, tolerance: float = 0.3, min_drawn: float = 0.02) -> np.ndarray:
    """Check ``path`` and return its pixels (H, W, 3) uint8.

    size:      (width, height) in pixels the figure should have (figsize * dpi), within ``tolerance``
               (a tight bounding box trims margins or makes room for labels)
    min_drawn: fraction of pixels that must differ from the most common colour (the background)
    """
    path = Path(path)
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE, f"{path}: not a PNG file"
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    assert min(width, height) >= 32, f"{path}: only {width}x{height} px"
    if size is not None:
        for got, expected, name in ((width, size[0], "width"), (height, size[1], "height")):
            assert abs(got - expected) <= tolerance * expected, f"{path}: {name} {got} px, expected ~{expected}"
    flat = pixels.reshape(-1, 3)
    colours, counts = np.unique(flat, axis=0, return_counts=True)
    assert len(colours) >= 8, f"{path}: only {len(colours)} colours: a blank picture"
    drawn = 1 - counts.max() / len(flat)
    assert drawn >= min_drawn, f"{path}: {drawn:.1%} of the pixels differ from the background"
    return pixels
