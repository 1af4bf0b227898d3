"""The ``covidct`` command: train, pretrain, evaluate, predict, synth, describe, viz.

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

SYNTHETIC_DEFAULTS = dict(n=800, seed=0, difficulty=0.3)


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
    parser.add_argument("--model", default=defaults.model,
                        help="model preset: default, seed (the 2020 CNNv3), deep, resnet18, tiny")
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
    parser.add_argument("--pretrained", default=None, metavar="PATH",
                        help="start from these weights: torchvision's resnet18-f37072fd.pth (read without torch), "
                             "a minicnn .npz or a covidct checkpoint; tensors that do not fit stay fresh")
    parser.add_argument("--freeze-backbone", action="store_true",
                        help="train only the head (ResNet-18: fc; other models: the FC block); the backbone "
                             "runs forward only, and with --augment none its features are computed once")
    parser.add_argument("--unfreeze-after", type=int, default=defaults.unfreeze_after, metavar="N",
                        help="with --freeze-backbone: train the whole network from epoch N+1")
    parser.add_argument("--backbone-lr-scale", type=float, default=defaults.backbone_lr_scale, metavar="S",
                        help="the backbone learns at lr * S (e.g. 0.1 for gentle fine-tuning; default 1)")
    parser.add_argument("--distributed", nargs="?", const="mpi", default=None, choices=["mpi", "nccl"],
                        help="data-parallel over the ranks of 'mpiexec -n N': gradients averaged over MPI "
                             "(default) or NCCL (--device gpu, one GPU per rank); --batch-size is the global batch")


def resumed_config(config_class, args):
    """The config saved in the --resume run directory (TrainConfig or PretrainConfig), pointed at it."""
    saved = Path(args.resume) / "config.json"
    if not saved.is_file():
        raise CovidCTError(f"--resume {args.resume}: no config.json there; is it a covidct run directory?")
    config = config_class.from_dict(json.loads(saved.read_text()))
    config.out, config.progress = args.resume, not args.no_progress
    return config


def config_from_args(args) -> "TrainConfig":
    from .train import TrainConfig

    if args.resume:
        return resumed_config(TrainConfig, args)
    data = args.data or str(synthetic_dataset())
    if not Path(data).exists():
        raise CovidCTError(f"--data {data}: no such file or directory")
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values.update(data=data, progress=not args.no_progress,
                  cache_dir=args.cache_dir or str(cache_root() / "images"))
    values["out"] = args.out or str(Path("runs") / f"{args.model}-{Path(data).resolve().name}")
    return TrainConfig(**values)


def run_train(args, comm=None) -> int:
    from .train import train

    if getattr(args, "distributed", None) and comm is None:     # mpiexec -n N covidct train --distributed
        from .distributed import run_on_ranks
        return run_on_ranks(args.distributed, args.device, lambda comm: run_train(args, comm))
    if comm is None:
        config = config_from_args(args)
    else:
        from .distributed import root_first
        config = root_first(comm, lambda: config_from_args(args))
    try:
        summary = train(config, resume=bool(args.resume), comm=comm)
    except KeyboardInterrupt:
        print(f"\ninterrupted: completed epochs are saved in {config.out}/last.npz; "
              f"continue with: covidct train --resume {config.out}", file=sys.stderr)
        return 130
    if "best_epoch" in summary:                                  # rank 0 of a distributed run
        print(f"best epoch {summary['best_epoch']}; checkpoint {config.out}/best.npz; "
              f"plots and predictions in {config.out}/")
    return 0


# -- pretrain ------------------------------------------------------------------------------
def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    from .pretrain import PretrainConfig

    defaults = PretrainConfig()
    parser.add_argument("--data", default="", help="dataset (default: the synthetic phantom); only its "
                        "training images are learned from, without their labels")
    parser.add_argument("--out", default=None, help="run directory (default: runs/pretrain-<model>-<data name>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from RUN_DIR/last.npz")
    parser.add_argument("--model", default=defaults.model, help="architecture: default, deep, resnet18, tiny, seed")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the preset's; "
                        "fine-tune at the same size)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--augment", default=defaults.augment, help="augmentation before the rotation (no flips)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device, choices=["cpu", "gpu"])
    parser.add_argument("--val-split", default=defaults.val_split,
                        help="split whose images monitor the rotation accuracy ('' for none)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--skip-bad", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def run_pretrain(args) -> int:
    from .pretrain import PretrainConfig, pretrain

    if args.resume:
        config = resumed_config(PretrainConfig, args)
    else:
        data = args.data or str(synthetic_dataset())
        if not Path(data).exists():
            raise CovidCTError(f"--data {data}: no such file or directory")
        values = {f.name: getattr(args, f.name) for f in fields(PretrainConfig) if hasattr(args, f.name)}
        values.update(data=data, progress=not args.no_progress,
                      cache_dir=args.cache_dir or str(cache_root() / "images"),
                      out=args.out or str(Path("runs") / f"pretrain-{args.model}-{Path(data).resolve().name}"))
        config = PretrainConfig(**values)
    try:
        pretrain(config, resume=bool(args.resume))
    except KeyboardInterrupt:
        print(f"\ninterrupted: completed epochs are saved in {config.out}/last.npz; "
              f"continue with: covidct pretrain --resume {config.out}", file=sys.stderr)
        return 130
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
    if args.gradcam:
        from .predict import write_gradcam_overlays

        written = write_gradcam_overlays(args.checkpoint, [row["file"] for row in rows], args.gradcam,
                                         device=args.device)
        print(f"wrote {len(written)} Grad-CAM overlays to {args.gradcam}/")
    for path, reason in failures:
        print(f"skipped: {reason}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} of {len(rows) + len(failures)} files could not be read", file=sys.stderr)
    return 1 if failures else 0


# -- viz -------------------------------------------------------------------------------------
def run_viz(args) -> int:
    from . import viz

    def wrote(path):
        print(f"wrote {path}")
        return 0

    if args.action == "kernels":
        from .preprocess import Preprocess, load_image

        return wrote(viz.plot_hand_kernels(load_image(args.image, Preprocess(args.size)), args.out))
    if args.action == "gradcam":
        if args.n < 1:
            raise CovidCTError(f"--n must be >= 1, got {args.n}")
        return wrote(viz.gradcam_grid(args.checkpoint, args.data, args.split, args.out, n=args.n,
                                      cache_dir=args.cache_dir or str(cache_root() / "images"), seed=args.seed))
    if args.action == "shortcut":
        viz.shortcut_check(args.checkpoint, args.data, args.split, args.out,
                           cache_dir=args.cache_dir or str(cache_root() / "images"), cam_target=args.target)
        print((Path(args.out) / "shortcut.md").read_text())
        print(f"wrote shortcut.json and shortcut.md to {args.out}/")
        return 0

    from .checkpoint import load_checkpoint

    model, meta = load_checkpoint(args.checkpoint)
    if args.action == "filters":
        return wrote(viz.plot_filters(model, args.out))
    from .preprocess import Preprocess, load_image

    image = load_image(args.image, Preprocess.from_dict(meta["preprocess"]))
    return wrote(viz.plot_feature_maps(model, image, args.out, mean=meta["normalization"]["mean"],
                                       std=meta["normalization"]["std"]))


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
             "  covidct train --resume runs/default-covid-ct\n"
             "  mpiexec -n 2 covidct train --distributed --data ../shared/covid-ct   # 2 processes",
    "pretrain": "examples:\n  covidct pretrain --data ../shared/covid-ct --model default --epochs 30 "
                "--out runs/ssl-default\n"
                "  covidct train --data ../shared/covid-ct --model default --pretrained runs/ssl-default/pretrained.npz",
    "evaluate": "example:\n  covidct evaluate --checkpoint runs/default-covid-ct/best.npz --data ../shared/covid-ct --split val",
    "predict": "example:\n  covidct predict --checkpoint runs/default-covid-ct/best.npz scans/ slice1.png --output preds.csv",
    "synth": "example:\n  covidct synth --out data/phantom --n 600 --seed 1",
    "describe": "example:\n  covidct describe ../shared/covid-ct",
    "viz": "examples:\n  covidct viz filters --checkpoint runs/default-covid-ct/best.npz --out filters.png\n"
           "  covidct viz features --checkpoint runs/default-covid-ct/best.npz --image slice.png --out features.png\n"
           "  covidct viz kernels --image slice.png --out kernels.png\n"
           "  covidct viz gradcam --checkpoint runs/default-covid-ct/best.npz --data ../shared/covid-ct --split val "
           "--out gradcam.png --n 16\n"
           "  covidct viz shortcut --checkpoint runs/default-covid-ct/best.npz --data ../shared/covid-ct --split val "
           "--out shortcut/",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covidct", description="COVID-19 lung-CT classifier built on minicnn "
                                     "(COVID = positive class).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_text):
        return commands.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    add_train_arguments(command("train", "train a classifier; keeps the best epoch by validation AUC"))
    add_pretrain_arguments(command("pretrain", "self-supervised pretraining (rotation prediction) on the "
                                   "training images, for covidct train --pretrained"))

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
    predict.add_argument("--gradcam", metavar="OUT_DIR", default=None,
                         help="also write one Grad-CAM overlay PNG (COVID logit) per image to OUT_DIR")

    synth = command("synth", "write a synthetic CT phantom dataset in the UCSD COVID-CT layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--n", type=int, default=SYNTHETIC_DEFAULTS["n"])
    synth.add_argument("--seed", type=int, default=SYNTHETIC_DEFAULTS["seed"])
    synth.add_argument("--difficulty", type=float, default=SYNTHETIC_DEFAULTS["difficulty"])

    describe = command("describe", "dataset statistics: counts per class and split, sizes, modes, formats")
    describe.add_argument("data")

    viz = command("viz", "pictures of the network: filters, feature maps, hand-made kernels, Grad-CAM, "
                  "and a shortcut check")
    actions = viz.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name, help_text):
        return actions.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES["viz"],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)

    filters = action("filters", "first-layer filters of a checkpoint")
    filters.add_argument("--checkpoint", required=True)
    filters.add_argument("--out", required=True, help="PNG file")
    features = action("features", "one image after each conv and pool layer")
    features.add_argument("--checkpoint", required=True)
    features.add_argument("--image", required=True)
    features.add_argument("--out", required=True, help="PNG file")
    kernels = action("kernels", "the 2020 report's hand-made edge and sharpen kernels applied to an image")
    kernels.add_argument("--image", required=True)
    kernels.add_argument("--out", required=True, help="PNG file")
    kernels.add_argument("--size", type=int, default=256, help="image size after preprocessing (default 256)")
    grid = action("gradcam", "Grad-CAM grid of correct and wrong predictions on a split")
    grid.add_argument("--checkpoint", required=True)
    grid.add_argument("--data", required=True)
    grid.add_argument("--split", default="val")
    grid.add_argument("--out", required=True, help="PNG file")
    grid.add_argument("--n", type=int, default=16, help="number of images (half correct, half wrong)")
    grid.add_argument("--seed", type=int, default=0, help="which images are drawn")
    grid.add_argument("--cache-dir", default=None)
    shortcut = action("shortcut", "shortcut check: Grad-CAM mass in the lungs, and metrics with the file "
                      "formats swapped between classes")
    shortcut.add_argument("--checkpoint", required=True)
    shortcut.add_argument("--data", required=True)
    shortcut.add_argument("--split", default="val")
    shortcut.add_argument("--out", required=True, help="output folder for shortcut.json and shortcut.md")
    shortcut.add_argument("--target", default="predicted", choices=["predicted", "covid"],
                          help="class whose Grad-CAM is measured (default: each image's predicted class)")
    shortcut.add_argument("--cache-dir", default=None)
    return parser


RUNNERS = {"train": run_train, "pretrain": run_pretrain, "evaluate": run_evaluate, "predict": run_predict, "synth": run_synth,
           "describe": run_describe, "viz": run_viz}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors(RUNNERS[args.command], args)


def run_reporting_errors(runner, args) -> int:
    """runner(args), with user mistakes as one line 'error: ...' (exit 2) and Ctrl-C as exit 130."""
    try:
        return runner(args)
    except CovidCTError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
