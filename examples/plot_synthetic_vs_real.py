"""Show synthetic phantom slices next to real COVID-CT slices.

    python examples/plot_synthetic_vs_real.py [REAL_ROOT] [--out docs/images/synthetic_vs_real.png]

REAL_ROOT defaults to ../shared/covid-ct beside the repository (or $COVIDCT_DATA);
when it is absent only the synthetic rows are drawn.
Rows: synthetic COVID, synthetic non-COVID, real COVID, real non-COVID.
"""
import argparse
import io
import os
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from covidct import COVID, NON_COVID  # noqa: E402
from covidct.data import read_dataset  # noqa: E402
from covidct.preprocess import Preprocess, load_image  # noqa: E402
from covidct.synthetic import DEFAULT_DIFFICULTY, DEFAULT_SIZE, make_slice  # noqa: E402

COLUMNS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("real_root", nargs="?",
                        default=os.environ.get("COVIDCT_DATA") or REPO.parent / "shared" / "covid-ct")
    parser.add_argument("--out", default=REPO / "docs" / "images" / "synthetic_vs_real.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = []
    for label, name in ((COVID, "synthetic COVID"), (NON_COVID, "synthetic non-COVID")):
        slices = [make_slice(label, np.random.default_rng([args.seed, label, j]), DEFAULT_SIZE, DEFAULT_DIFFICULTY)
                  for j in range(COLUMNS)]
        rows.append((name, slices))
    real_root = Path(args.real_root)
    if real_root.is_dir():
        dataset = read_dataset(real_root, "train")
        rng = np.random.default_rng(args.seed)
        pre = Preprocess(size=DEFAULT_SIZE)            # the same conversion the classifier sees
        for label, name in ((COVID, "real COVID"), (NON_COVID, "real non-COVID")):
            chosen = rng.choice(np.flatnonzero(dataset.labels == label), COLUMNS, replace=False)
            rows.append((name, [load_image(dataset.paths[i], pre)[0] for i in chosen]))
    else:
        print(f"note: no real data at {real_root}; drawing synthetic slices only")

    fig, axes = plt.subplots(len(rows), COLUMNS, figsize=(1.9 * COLUMNS, 2.0 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows):
        for c, image in enumerate(images):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle(f"Synthetic phantom ({DEFAULT_SIZE}x{DEFAULT_SIZE}, difficulty {DEFAULT_DIFFICULTY}) "
                 f"vs real COVID-CT (pad-resized to {DEFAULT_SIZE})", fontsize=10)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80, format="png")
    buffer.seek(0)
    Image.open(buffer).convert("L").save(out, optimize=True)      # grayscale PNG: keeps the file small
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
