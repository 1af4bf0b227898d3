"""Make the pictures of docs/visualize.md from a trained checkpoint.

    python examples/explain.py --checkpoint runs/default-covid-ct/ensemble.npz [--data ../shared/covid-ct] [--split val]

Writes, in --out (default docs/images/):
    gradcam_grid.png   Grad-CAM (COVID logit) on correct and wrong predictions of the split
    hand_kernels.png   the 2020 report's edge and sharpen kernels on a real slice (minicnn Conv2d)
    filters.png        the checkpoint's first-layer filters
    feature_maps.png   one slice after each conv and pool layer
Each PNG is kept under 400 KB (a grid is redrawn at a lower resolution if needed).
"""
import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from covidct import COVID  # noqa: E402
from covidct import viz  # noqa: E402
from covidct.checkpoint import load_checkpoint  # noqa: E402
from covidct.data import read_dataset  # noqa: E402
from covidct.preprocess import Preprocess, load_image  # noqa: E402

MAX_BYTES = 400_000


def small_enough(path) -> Path:
    size = Path(path).stat().st_size
    print(f"wrote {path} ({size / 1000:.0f} KB)")
    if size >= MAX_BYTES:
        raise SystemExit(f"{path} is {size / 1000:.0f} KB, over the {MAX_BYTES // 1000} KB limit")
    return Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default=os.environ.get("COVIDCT_DATA") or REPO.parent / "shared" / "covid-ct")
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", default=REPO / "docs" / "images")
    parser.add_argument("--n", type=int, default=16, help="images in the Grad-CAM grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    out = Path(args.out)

    for dpi in (100, 80, 64):                          # the grid is the one picture that can grow large
        viz.DPI = dpi
        grid = viz.gradcam_grid(args.checkpoint, args.data, args.split, out / "gradcam_grid.png", n=args.n,
                                cache_dir=args.cache_dir, seed=args.seed)
        if grid.stat().st_size < MAX_BYTES:
            break
    viz.DPI = 100
    small_enough(grid)

    model, meta = load_checkpoint(args.checkpoint)
    dataset = read_dataset(args.data, args.split)
    # One COVID slice, the same for every picture: the first of the split in sorted order.
    path = sorted(p for p, label in zip(dataset.paths, dataset.labels) if label == COVID)[0]
    print(f"example slice: {path}")
    small_enough(viz.plot_hand_kernels(load_image(path, Preprocess(size=256)), out / "hand_kernels.png"))
    small_enough(viz.plot_filters(model, out / "filters.png"))
    image = load_image(path, Preprocess.from_dict(meta["preprocess"]))
    small_enough(viz.plot_feature_maps(model, image, out / "feature_maps.png",
                                       mean=meta["normalization"]["mean"], std=meta["normalization"]["std"]))


if __name__ == "__main__":
    main()
