"""The ``covidct`` command: train, evaluate, predict, synth, describe.

User mistakes (missing path, bad option value, wrong checkpoint) end with one
line ``error: ...`` and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from .errors import CovidCTError

SYNTHETIC_DEFAULTS = dict(n=600, seed=0, difficulty=0.5)


def cache_root() -> Path:
    """Where generated data and decoded-image caches live ($COVIDCT_CACHE or ~/.cache/covidct)."""
    return Path(os.environ.get("COVIDCT_CACHE", Path.home() / ".cache" / "covidct"))


def synthetic_dataset(n: int = SYNTHETIC_DEFAULTS["n"], seed: int = SYNTHETIC_DEFAULTS["seed"],
                      difficulty: float = SYNTHETIC_DEFAULTS["difficulty"], log=print) -> Path:
    """The embedded default dataset: generated once into the cache, then reused."""
    from .synthetic import write_dataset

    out = cache_root() / f"synthetic-n{n}-seed{seed}-d{difficulty:g}"
    if not (out / "synthetic.json").exists():
        log(f"generating the synthetic CT phantom dataset ({n} slices) in {out}")
    return Path(write_dataset(out, n=n, seed=seed, difficulty=difficulty))


# -- train ---------------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    defaults = TrainConfig()
    parser.add_argument("--data", default="", help="dataset: UCSD COVID-CT root, CSV manifest or class folders "
                        "(default: the generated synthetic phantom dataset)")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<model>-<data name>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from RUN_DIR/last.npz")
    parser.add_argument("--model", default=defaults.model, help="model preset: default, seed (the 2020 CNNv3), tiny")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the preset's)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--optimizer", default=defaults.optimizer, choices=["sgd", "adam", "adamw"])
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--momentum", type=float, default=defaults.momentum, help="SGD momentum (Nesterov)")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--schedule", default=defaults.schedule, choices=["none", "step", "cosine"])
    parser.add_argument("--warmup-epochs", type=int, default=defaults.warmup_epochs)
    parser.add_argument("--class-weights", default=defaults.class_weights, help="balanced, none, or 'w0,w1'")
    parser.add_argument("--augment", default=defaults.augment,
                        help="e.g. 'flip,rotate:15,translate:0.1,blur:1.0' or the report's codes '1,2,3,5'; 'none'")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device, choices=["cpu", "gpu"])
    parser.add_argument("--select", default=defaults.select, help="validation metric for the best epoch: "
                        "auc, accuracy, balanced_accuracy, loss")
    parser.add_argument("--patience", type=int, default=defaults.patience, help="early-stopping patience (epochs)")
    parser.add_argument("--target-sensitivity", type=float, default=defaults.target_sensitivity,
                        help="choose the decision threshold on val to reach this COVID sensitivity (e.g. 0.9)")
    parser.add_argument("--train-split", default=defaults.train_split)
    parser.add_argument("--val-split", default=defaults.val_split)
    parser.add_argument("--cache-dir", default=None, help="decoded-image cache (default: under $COVIDCT_CACHE)")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed in a file)")
    parser.add_argument("--no-progress", action="store_true", help="no per-batch progress bar")


def config_from_args(args) -> "TrainConfig":
    from .train import TrainConfig

    if args.resume:
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise CovidCTError(f"--resume {args.resume}: no config.json there; is it a covidct run directory?")
        config = TrainConfig.from_dict(json.loads(saved.read_text()))
        config.out = args.resume
        config.progress = not args.no_progress
        return config
    data = args.data or str(synthetic_dataset())
    if not Path(data).exists():
        raise CovidCTError(f"--data {data}: no such file or directory")
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values.update(data=data, progress=not args.no_progress,
                  cache_dir=args.cache_dir or str(cache_root() / "images"))
    values["out"] = args.out or str(Path("runs") / f"{args.model}-{Path(data).resolve().name}")
    return TrainConfig(**values)


def run_train(args) -> int:
    from .train import train

    config = config_from_args(args)
    try:
        summary = train(config, resume=bool(args.resume))
    except KeyboardInterrupt:
        print(f"\ninterrupted: completed epochs are saved in {config.out}/last.npz; "
              f"continue with: covidct train --resume {config.out}", file=sys.stderr)
        return 130
    print(f"best epoch {summary['best_epoch']}; checkpoint {config.out}/best.npz; "
          f"plots and predictions in {config.out}/")
    return 0


# -- evaluate ------------------------------------------------------------------------------
def run_evaluate(args) -> int:
    from .checkpoint import load_checkpoint
    from .data import read_dataset
    from .evaluate import predict_proba, report_text, write_evaluation
    from .preprocess import Preprocess, load_images

    model, meta = load_checkpoint(args.checkpoint, args.device)
    threshold = args.threshold if args.threshold is not None else float(meta.get("threshold", 0.5))
    dataset = read_dataset(args.data, split=args.split)
    images, labels, paths = load_images(dataset, Preprocess.from_dict(meta["preprocess"]),
                                        cache_dir=args.cache_dir or str(cache_root() / "images"),
                                        skip_bad=args.skip_bad)
    scores = predict_proba(model, images, meta["normalization"]["mean"], meta["normalization"]["std"],
                           device=args.device)
    out = Path(args.out or Path(args.checkpoint).parent / f"eval-{args.split}")
    write_evaluation(out, labels, scores, paths, threshold, title=f"{args.split} split")
    print(report_text(labels, scores, threshold, f"{args.split} split of {args.data}"))
    print(f"\nwrote metrics.json, predictions.csv, roc.png, confusion.png to {out}/")
    return 0


# -- predict -------------------------------------------------------------------------------
def run_predict(args) -> int:
    from .predict import format_table, predict_files, write_rows

    rows, failures, threshold = predict_files(args.checkpoint, args.paths, device=args.device)
    if rows:
        print(format_table(rows))
        print(f"(label COVID when P(COVID) >= {threshold:.4g})")
    if args.output:
        write_rows(rows, args.output)
        print(f"wrote {len(rows)} predictions to {args.output}")
    for path, reason in failures:
        print(f"skipped: {reason}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} of {len(rows) + len(failures)} files could not be read", file=sys.stderr)
    return 1 if failures else 0


# -- synth / describe -------------------------------------------------------------------------
def run_synth(args) -> int:
    from .synthetic import write_dataset

    path = write_dataset(args.out, n=args.n, seed=args.seed, difficulty=args.difficulty)
    print(f"wrote {args.n} synthetic CT slices in the UCSD COVID-CT layout to {path}")
    return 0


def run_describe(args) -> int:
    from .data import describe, format_description

    print(format_description(describe(args.data)))
    return 0


# -- parser ----------------------------------------------------------------------------------
EXAMPLES = {
    "train": "examples:\n  covidct train                                   # synthetic phantom data\n"
             "  covidct train --data ../shared/covid-ct --epochs 60\n"
             "  covidct train --resume runs/default-covid-ct",
    "evaluate": "example:\n  covidct evaluate --checkpoint runs/default-covid-ct/best.npz --data ../shared/covid-ct --split val",
    "predict": "example:\n  covidct predict --checkpoint runs/default-covid-ct/best.npz scans/ slice1.png --output preds.csv",
    "synth": "example:\n  covidct synth --out data/phantom --n 600 --seed 1",
    "describe": "example:\n  covidct describe ../shared/covid-ct",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covidct", description="COVID-19 lung-CT classifier built on minicnn "
                                     "(COVID = positive class).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_text):
        return commands.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    add_train_arguments(command("train", "train a classifier; keeps the best epoch by validation AUC"))

    evaluate = command("evaluate", "evaluate a checkpoint on a split: the report's metrics, ROC and confusion plots")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--threshold", type=float, default=None, help="override the checkpoint's threshold")
    evaluate.add_argument("--out", default=None, help="output folder (default: next to the checkpoint)")
    evaluate.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    evaluate.add_argument("--cache-dir", default=None)
    evaluate.add_argument("--skip-bad", action="store_true")

    predict = command("predict", "P(COVID) for image files and folders (recursive)")
    predict.add_argument("--checkpoint", required=True)
    predict.add_argument("paths", nargs="+", metavar="PATH")
    predict.add_argument("--output", default=None, help="also write the table as .csv or .json")
    predict.add_argument("--device", default="cpu", choices=["cpu", "gpu"])

    synth = command("synth", "write a synthetic CT phantom dataset in the UCSD COVID-CT layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--n", type=int, default=SYNTHETIC_DEFAULTS["n"])
    synth.add_argument("--seed", type=int, default=SYNTHETIC_DEFAULTS["seed"])
    synth.add_argument("--difficulty", type=float, default=SYNTHETIC_DEFAULTS["difficulty"])

    describe = command("describe", "dataset statistics: counts per class and split, sizes, modes, formats")
    describe.add_argument("data")
    return parser


RUNNERS = {"train": run_train, "evaluate": run_evaluate, "predict": run_predict, "synth": run_synth,
           "describe": run_describe}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return RUNNERS[args.command](args)
    except CovidCTError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
