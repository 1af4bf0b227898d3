"""From scratch vs. self-supervised pretraining vs. ImageNet weights, side by side on the validation split.

    python examples/transfer_report.py --data ../shared/covid-ct                      # default model rows
    python examples/transfer_report.py --data ../shared/covid-ct --models default,resnet18
    python examples/transfer_report.py --data ../shared/covid-ct --models resnet18 \\
        --imagenet resnet18-f37072fd.pth                                              # + ImageNet row

Each row is one recipe of the ``covidct`` command, trained on the training split and
measured on the validation split (the official test split stays unseen), with its
wall-clock time on this machine:

  scratch      covidct train --model M
  rotation     covidct pretrain --model M (rotation prediction on the training images, no labels),
               then covidct train --model M --pretrained .../pretrained.npz
  imagenet     covidct train --model resnet18 --pretrained resnet18-f37072fd.pth
               --freeze-backbone --unfreeze-after N --backbone-lr-scale S (torchvision's weights,
               read without torch; https://download.pytorch.org/models/resnet18-f37072fd.pth)

The table is printed as markdown (AUC with its 95 % bootstrap interval) and written to
OUT/report.md; each run's directory under OUT keeps its curves, ROC and predictions.
"""
import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covidct.paths import image_cache_dir  # noqa: E402
from covidct.metrics import bootstrap_ci, roc_auc  # noqa: E402
from covidct.pretrain import PretrainConfig, pretrain  # noqa: E402
from covidct.train import TrainConfig, train  # noqa: E402

# Per model: the input size, and the options of its scratch / fine-tuning runs (the CLI's flags).
RECIPES = {
    "default": dict(image_size=None, train=dict(epochs=40), pretrain=dict(epochs=30),
                    fine_tune=dict(epochs=40)),
    "resnet18": dict(image_size=112, train=dict(epochs=15), pretrain=dict(epochs=15),
                     fine_tune=dict(epochs=15)),
}
IMAGENET = dict(image_size=224, epochs=12, batch_size=32, freeze_backbone=True, unfreeze_after=4,
                backbone_lr_scale=0.1, lr=1e-3, augment="none")


def validation_row(run_dir: Path) -> dict:
    """AUC (with bootstrap CI), accuracy, sensitivity, specificity at 0.5 from a run's predictions.csv."""
    with open(run_dir / "predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["p_covid"]) for r in rows])
    predicted = scores >= 0.5
    low, high = bootstrap_ci(labels, scores, roc_auc)
    return {"auc": roc_auc(labels, scores), "auc_low": low, "auc_high": high,
            "accuracy": float((predicted == labels).mean()),
            "sensitivity": float(predicted[labels == 1].mean()), "specificity": float((~predicted[labels == 0]).mean())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="COVID-CT root with train and val splits")
    parser.add_argument("--models", default="default", help="comma list from: " + ", ".join(RECIPES))
    parser.add_argument("--imagenet", default=None, metavar="PTH",
                        help="torchvision's resnet18-f37072fd.pth: adds the ImageNet fine-tuning row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="cap every run at N epochs (smoke runs)")
    parser.add_argument("--out", default="runs/transfer")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    common = dict(data=args.data, seed=args.seed, cache_dir=image_cache_dir(),
                  progress=not args.no_progress)
    log = (lambda *a: None) if args.no_progress else print
    by_val_auc = dict(select="auc", lungs="none")   # this report's figures: one model, best epoch by val AUC

    def capped(options: dict) -> dict:
        return dict(options, epochs=min(options["epochs"], args.epochs)) if args.epochs else options

    rows = []
    for model in args.models.split(","):
        if model not in RECIPES:
            parser.error(f"--models: unknown model {model!r}; choose from {', '.join(RECIPES)}")
        recipe = RECIPES[model]
        size = dict(image_size=recipe["image_size"]) if recipe["image_size"] else {}

        print(f"\n=== {model}: from scratch ===")
        started = time.perf_counter()
        train(TrainConfig(model=model, out=str(out / f"{model}-scratch"), **size, **capped(recipe["train"]),
                          **common, **by_val_auc), log=log)
        rows.append((model, "from scratch", 0.0, time.perf_counter() - started, out / f"{model}-scratch"))

        print(f"\n=== {model}: rotation pretraining, then fine-tuning ===")
        started = time.perf_counter()
        weights = pretrain(PretrainConfig(model=model, out=str(out / f"{model}-rotation-pretrain"), **size,
                                          **capped(recipe["pretrain"]), **common), log=log)
        pretrain_seconds = time.perf_counter() - started
        started = time.perf_counter()
        train(TrainConfig(model=model, out=str(out / f"{model}-rotation"), pretrained=str(weights), **size,
                          **capped(recipe["fine_tune"]), **common, **by_val_auc), log=log)
        rows.append((model, "rotation-pretrained", pretrain_seconds, time.perf_counter() - started,
                     out / f"{model}-rotation"))

    if args.imagenet:
        print("\n=== resnet18: ImageNet weights, frozen backbone then unfrozen ===")
        started = time.perf_counter()
        train(TrainConfig(model="resnet18", out=str(out / "resnet18-imagenet"), pretrained=args.imagenet,
                          **capped(IMAGENET), **common, **by_val_auc), log=log)
        rows.append(("resnet18", "ImageNet-pretrained", 0.0, time.perf_counter() - started, out / "resnet18-imagenet"))

    lines = ["| model | start | val AUC (95 % CI) | accuracy | sensitivity | specificity | pretrain | fine-tune/train |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for model, start, pretrain_seconds, train_seconds, run_dir in rows:
        m = validation_row(run_dir)
        lines.append(f"| {model} | {start} | {m['auc']:.3f} ({m['auc_low']:.3f}–{m['auc_high']:.3f}) | "
                     f"{m['accuracy']:.3f} | {m['sensitivity']:.3f} | {m['specificity']:.3f} | "
                     f"{pretrain_seconds / 60:.1f} min | {train_seconds / 60:.1f} min |")
    lines.append("\nValidation split, threshold 0.5, best epoch by validation AUC; times are wall-clock on this machine.")
    report = "\n".join(lines)
    print("\n" + report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
