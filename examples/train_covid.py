"""The main job: train a COVID-19 CT classifier, evaluate it, make plots, predict.

    python examples/train_covid.py                          # synthetic phantom data, no download
    python examples/train_covid.py --data ../shared/covid-ct  # real UCSD COVID-CT (train/val)

With no arguments it generates the synthetic CT phantom dataset once (into
~/.cache/covidct, or $COVIDCT_CACHE), trains the `default` model on its train
split for the recipe's epochs (val only reports), evaluates on the test split and prints
the 2020 report's metric block, then predicts a few test images. Everything
lands in the run directory (default runs/example-<data>).

On real data it trains covidct train's default recipe: three CNNs, the `default` preset on the
window-calibrated whole slice and on its lung crop and `deep-small` on the equalised whole slice,
and two logistic regressions on the lungs' texture (calibrated and equalised), joined as one
checkpoint, the two whole-slice CNNs trained to keep their attention inside the lungs
(--lung-attention; ensemble.npz; about 5 min on 2 cores for COVID-CT, the models trained side by side in
one worker process per core: --jobs). Without a test split (like
../shared/covid-ct) the evaluation is the validation split's, and it is labelled as such.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from covidct.cli import run_reporting_errors, synthetic_dataset  # noqa: E402
from covidct.data import list_splits, read_dataset  # noqa: E402
from covidct.errors import CovidCTError  # noqa: E402
from covidct.paths import image_cache_dir  # noqa: E402
from covidct.train import TrainConfig, train  # noqa: E402

# The phantom's recipe: one `default` model on the whole slice, with flips and rotations, and a higher
# learning rate (the real-data default, three CNNs: `default` on the whole slice and on the lung crop,
# `deep-small` on the equalised whole slice, flips only, and two lung-texture models, was chosen by
# cross-validation on real slices and takes several times as long).
SYNTHETIC_RECIPE = dict(epochs=40, lr=3e-3, lungs="none", model="default", augment="flip,rotate:10")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="", help="dataset root (default: generated synthetic phantom data)")
    parser.add_argument("--out", default=None, help="run directory")
    parser.add_argument("--epochs", type=int, default=None, help="default: 40 on synthetic data, 40 on real data")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--members", type=int, default=None, metavar="M",
                        help="train an ensemble of this many seeds (default: covidct train's)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="an ensemble's models trained at once in worker processes (default: one per core)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    return run_reporting_errors(run, args)


def run(args) -> int:
    synthetic = not args.data
    data = str(synthetic_dataset()) if synthetic else args.data
    if not Path(data).exists():
        raise CovidCTError(f"--data {data}: no such file or directory")
    config = TrainConfig(data=data, seed=args.seed, device=args.device, progress=not args.no_progress,
                         out=args.out or f"runs/example-{'synthetic' if synthetic else Path(data).resolve().name}",
                         cache_dir=image_cache_dir(), **(SYNTHETIC_RECIPE if synthetic else {}))
    if args.epochs:
        config.epochs = args.epochs
    if args.members:
        config.members = args.members
    summary = train(config, jobs=1 if args.device != "cpu" else args.jobs)

    from covidct.cli import main as covidct  # the same code paths a user gets from the command line

    checkpoint = summary["checkpoint"]                    # best.npz, or ensemble.npz with --members
    if "test" in list_splits(data):
        print("\n### Test split (never used for training or selection)")
        status = covidct(["evaluate", "--checkpoint", str(checkpoint), "--data", data, "--split", "test",
                          "--out", str(Path(config.out) / "eval-test"), "--cache-dir", config.cache_dir])
        if status != 0:
            return status                                 # covidct printed why
        test_paths = read_dataset(data, split="test").paths
        print("\n### Predictions for a few test images")
        status = covidct(["predict", "--checkpoint", str(checkpoint), *map(str, test_paths[:2] + test_paths[-2:])])
        if status != 0:
            return status
    else:
        print("\n(no test split in this dataset: the figures above are validation figures)")
    if "best_epoch" in summary:
        print(f"\n{summary['kept']} epoch {summary['best_epoch']}; run directory {config.out}/ holds best.npz, history.csv, "
              "curves.png, roc.png, confusion.png, predictions.csv")
    else:
        print(f"\nan ensemble of {summary['members']} models; run directory {config.out}/ holds ensemble.npz, "
              "member0*/ (one run per model), roc.png, confusion.png, predictions.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
