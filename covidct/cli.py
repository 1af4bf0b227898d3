"""The ``covidct`` command: train, pretrain, evaluate, predict, synth, describe, viz, export, serve.

User mistakes (missing path, bad option value, wrong checkpoint) end with one
line ``error: ...`` and exit status 2, never a traceback. So do the OS errors a
user can fix (USER_OS_ERRORS: a missing file or folder, no permission, a file
where a folder should be, a full disk). Any other exception is a bug and keeps
its traceback.
"""
from __future__ import annotations

import argparse
import errno
import sys
import warnings
from pathlib import Path

from .errors import CovidCTError
from .paths import cache_root, image_cache_dir, writable_dir, writable_file  # noqa: F401  (cache_root: public)

SYNTHETIC_DEFAULTS = dict(n=800, seed=0, difficulty=0.3)


def synthetic_dataset(n: int = SYNTHETIC_DEFAULTS["n"], seed: int = SYNTHETIC_DEFAULTS["seed"],
                      difficulty: float = SYNTHETIC_DEFAULTS["difficulty"], log=print) -> Path:
    """The embedded default dataset: generated once into the cache, then reused."""
    from .synthetic import write_dataset

    out = cache_root() / f"synthetic-n{n}-seed{seed}-d{difficulty:g}"
    if not (out / "synthetic.json").exists():
        log(f"generating the synthetic CT phantom dataset ({n} slices) in {out}")
    return Path(write_dataset(out, n=n, seed=seed, difficulty=difficulty))


# -- train and pretrain: flags from the config dataclasses --------------------------------------
def add_run_arguments(parser: argparse.ArgumentParser, config_class,
                      resume_help: str = "continue a stopped run from RUN_DIR/last.npz (with a larger --epochs: "
                                         "extend a finished one)") -> None:
    """--resume and one flag per config field (covidct.options)."""
    from .options import add_config_arguments

    parser.add_argument("--resume", metavar="RUN_DIR", help=resume_help)
    add_config_arguments(parser, config_class)


def add_cv_arguments(parser: argparse.ArgumentParser) -> None:
    """covidct train's flags, and how the folds are made and run."""
    from .train import TrainConfig

    add_run_arguments(parser, TrainConfig, resume_help="continue a stopped cross-validation in RUN_DIR with its "
                      "saved options (finished folds are kept, a stopped fold continues from its last.npz)")
    parser.add_argument("--folds", type=int, default=None, help="number of folds (grouped by source; default 5)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="draw the folds this many times (seeds; default 1); the metrics pool every draw's "
                             "out-of-fold predictions")
    parser.add_argument("--jobs", type=int, default=1, help="fold models trained at once, in worker processes")


def run_config_from_args(config_class, args, out_prefix: str = ""):
    """The run's config: typed options over the defaults (or the run's own with --resume), checked paths."""
    from .options import config_from_args

    config = config_from_args(config_class, args)
    if not args.resume:
        config.data = config.data or str(synthetic_dataset())
        if not Path(config.data).exists():
            raise CovidCTError(f"--data {config.data}: no such file or directory")
        if args.out is None:
            first_model = config.model.split(",")[0].split(":")[0]
            config.out = str(Path("runs") / f"{out_prefix}{first_model}-{Path(config.data).resolve().name}")
    config.cache_dir = image_cache_dir(config.cache_dir)
    return config


def run_interruptible(command: str, config, work):
    """work() with Ctrl-C turned into a note on how to continue (exit 130)."""
    try:
        return work()
    except KeyboardInterrupt:
        saved = "finished folds and each fold's completed epochs are saved in" if command == "cv" else \
            "completed epochs are saved in"
        print(f"\ninterrupted: {saved} {config.out}; continue with: covidct {command} --resume {config.out}",
              file=sys.stderr)
        return None


def run_cv(args) -> int:
    from .cv import cross_validate, format_cv_table, load_plan
    from .train import TrainConfig

    config = run_config_from_args(TrainConfig, args, out_prefix="cv-")
    plan = {"folds": 5 if args.folds is None else args.folds, "repeats": 1 if args.repeats is None else args.repeats}
    if args.resume:                                     # the saved plan; only --jobs may change
        plan, epochs = load_plan(args.resume)
        if "tta" in plan:                               # a run from before --tta became a recipe option
            config.tta = bool(plan.pop("tta"))
        typed = {"folds": args.folds, "repeats": args.repeats}
        changed = [f"--{name}" for name, value in typed.items() if value is not None and value != plan.get(name)]
        if changed:
            raise CovidCTError(f"--resume {args.resume} continues the run with its saved folds and repeats; "
                               f"{', '.join(changed)} cannot change")
        if config.epochs != epochs:
            raise CovidCTError(f"--resume {args.resume}: the folds train for {epochs} epochs; --epochs cannot "
                               f"change in a cross-validation (start a new run to compare)")
    result = run_interruptible("cv", config, lambda: cross_validate(config, jobs=args.jobs, resume=bool(args.resume),
                                                                    **plan))
    if result is None:
        return 130
    print(format_cv_table(result))
    print(f"\nwrote oof.csv, cv.json, cv.md and the fold ensemble ensemble.npz to {config.out}/ "
          f"({result['seconds'] / 60:.1f} min)")
    return 0


def run_cv_join(args) -> int:
    from .cv import format_cv_table, join_runs

    print(format_cv_table(join_runs(args.runs, args.target_sensitivity)))
    return 0


def run_train(args, comm=None) -> int:
    from .train import TrainConfig, train

    if getattr(args, "distributed", None) and comm is None:     # mpiexec -n N covidct train --distributed
        from .distributed import run_on_ranks
        return run_on_ranks(args.distributed, getattr(args, "device", None), lambda comm: run_train(args, comm))
    if comm is None:
        config = run_config_from_args(TrainConfig, args)
    else:
        from .distributed import root_first, use_device
        config = root_first(comm, lambda: run_config_from_args(TrainConfig, args))
        use_device(comm, config.device)
    ranks = {} if comm is None else {"comm": comm}                # a distributed run
    summary = run_interruptible("train", config, lambda: train(config, resume=bool(args.resume), jobs=args.jobs,
                                                               **ranks))
    if summary is None:
        return 130
    if "checkpoint" in summary:                                  # rank 0 of a distributed run
        trained = f"{summary['kept']} epoch {summary['best_epoch']}" if "best_epoch" in summary else \
            f"an ensemble of {summary['members']} models"
        print(f"{trained}; checkpoint {summary['checkpoint']}; plots and predictions in {config.out}/")
    return 0


def run_pretrain(args) -> int:
    from .pretrain import PretrainConfig, pretrain

    config = run_config_from_args(PretrainConfig, args, out_prefix="pretrain-")
    return 0 if run_interruptible("pretrain", config, lambda: pretrain(config, resume=bool(args.resume))) else 130


# -- evaluate ------------------------------------------------------------------------------
def run_evaluate(args) -> int:
    from .checkpoint import load_checkpoint
    from .data import read_dataset
    from .evaluate import predict_proba, report_text, write_evaluation
    from .preprocess import Preprocess, load_images
    from .texture import texture_inputs

    model, meta = load_checkpoint(args.checkpoint, args.device)
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise CovidCTError(f"--threshold must be in [0, 1], got {args.threshold}")
    threshold = args.threshold if args.threshold is not None else float(meta.get("threshold", 0.5))
    out = writable_dir(args.out or Path(args.checkpoint).parent / f"eval-{args.split}", "--out")
    cache_dir = writable_dir(image_cache_dir(args.cache_dir), "--cache-dir")
    dataset = read_dataset(args.data, split=args.split, check_files=not args.skip_bad)
    images, labels, paths = load_images(dataset, Preprocess.from_dict(meta["preprocess"]), cache_dir=cache_dir,
                                        skip_bad=args.skip_bad, skipped_log=out / "skipped_files.txt")
    scores = predict_proba(model, images, meta["normalization"]["mean"], meta["normalization"]["std"],
                           device=args.device, features=texture_inputs(model, paths))
    write_evaluation(out, labels, scores, paths, threshold, title=f"{args.split} split")
    print(report_text(labels, scores, threshold, f"{args.split} split of {args.data}"))
    print(f"\nwrote metrics.json, predictions.csv, roc.png, confusion.png to {out}/")
    return 0


# -- predict -------------------------------------------------------------------------------
def run_predict(args) -> int:
    from .predict import format_table, predict_files, write_rows
    from .scan import is_scan_path

    if args.output:
        writable_file(args.output, "--output")
    if args.gradcam:
        writable_dir(args.gradcam, "--gradcam")
    scans = [path for path in args.paths if is_scan_path(path)]
    if scans:
        return run_predict_scans(args, scans)
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


def run_predict_scans(args, scans) -> int:
    """predict on DICOM/NIfTI scans: a per-slice table and a per-scan score for each."""
    from .checkpoint import load_checkpoint
    from .predict_scan import format_scan, predict_scan, write_slice_rows
    from .scan import CTWindow

    images = [path for path in args.paths if path not in scans]
    if images:
        raise CovidCTError(f"{images[0]}: an image file among CT scans (DICOM/NIfTI); predict scans and "
                           "image files in separate calls")
    if args.gradcam:
        raise CovidCTError("--gradcam works on image files; for scans use 'covidct serve' to look at a slice")
    window = CTWindow.parse(args.window) if args.window else None
    model, meta = load_checkpoint(args.checkpoint, args.device)
    predictions = []
    for path in scans:
        predictions.append(predict_scan(model, meta, path, window=window, top_k=args.top_k,
                                        series=args.series, device=args.device))
        print(format_scan(predictions[-1]) + "\n")
    if args.output:
        print(f"wrote {sum(len(p.rows) for p in predictions)} slice predictions to "
              f"{write_slice_rows(predictions, args.output)}")
    return 0


# -- export / serve ------------------------------------------------------------------------
def run_export(args) -> int:
    from .export import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.format, args.out)
    print(f"wrote {path} ({args.format}, {path.stat().st_size / 1e6:.2f} MB)")
    return 0


def run_serve(args) -> int:
    from .serve import serve

    return serve(args.checkpoint, host=args.host, port=args.port, device=args.device)


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
                                      cache_dir=image_cache_dir(args.cache_dir), seed=args.seed))
    if args.action == "lungs":
        path, counts = viz.lung_sheet(args.data, args.split or None, args.out, n=args.n, seed=args.seed)
        print(f"{counts['fallbacks']} of {counts['shown']} slices fall back to the whole slice")
        return wrote(path)
    if args.action == "shortcut":
        viz.shortcut_check(args.checkpoint, args.data, args.split, args.out,
                           cache_dir=image_cache_dir(args.cache_dir), cam_target=args.target)
        print((Path(args.out) / "shortcut.md").read_text())
        print(f"wrote shortcut.json and shortcut.md to {args.out}/")
        return 0
    if args.action == "cv-gradcam":
        viz.cv_gradcam(args.run, cam_target=args.target)
        print((Path(args.run) / "gradcam.md").read_text())
        print(f"wrote gradcam.json and gradcam.md to {args.run}/")
        return 0

    from .checkpoint import load_checkpoint

    model, meta = load_checkpoint(args.checkpoint, task=None)   # filters and feature maps: any task's network
    if args.action == "filters":
        return wrote(viz.plot_filters(model, args.out))
    from .preprocess import Preprocess, load_image

    image = load_image(args.image, Preprocess.from_dict(meta["preprocess"]))
    return wrote(viz.plot_feature_maps(model, image, args.out, mean=meta["normalization"]["mean"],
                                       std=meta["normalization"]["std"]))


# -- synth / describe -------------------------------------------------------------------------
def run_synth(args) -> int:
    from .synthetic import write_dataset

    writable_dir(args.out, "--out")
    path = write_dataset(args.out, n=args.n, seed=args.seed, difficulty=args.difficulty)
    print(f"wrote {args.n} synthetic CT slices in the UCSD COVID-CT layout to {path}")
    return 0


def run_describe(args) -> int:
    from .data import describe, format_description

    print(format_description(describe(args.data)))
    return 0


# -- parser ----------------------------------------------------------------------------------
CHECKPOINT = "runs/default-covid-ct/ensemble.npz"   # what `covidct train --data ../shared/covid-ct` writes
EXAMPLES = {
    "train": "examples:\n  covidct train                                   # synthetic phantom data\n"
             "  covidct train --data ../shared/covid-ct --jobs 2     # the real-data recipe, 2 cores\n"
             "  covidct train --data ../shared/covid-ct --epochs 60\n"
             "  covidct train --resume runs/default-covid-ct\n"
             "  mpiexec -n 2 covidct train --distributed --data ../shared/covid-ct   # 2 processes",
    "cv": "examples:\n  covidct cv --data ../shared/covid-ct --folds 5 --jobs 2\n"
          "  covidct cv --data ../shared/covid-ct --lungs crop --model default --jobs 2   # one model per fold\n"
          "  covidct cv --resume runs/cv-default-covid-ct --jobs 2     # continue a stopped run\n"
          "  covidct evaluate --checkpoint runs/cv-default-covid-ct/ensemble.npz --data ../shared/covid-ct --split val",
    "cv-join": "examples:\n  covidct cv --data ../shared/covid-ct --lungs none-window --model default --out runs/cv-w\n"
               "  covidct cv --data ../shared/covid-ct --lungs crop --model default --out runs/cv-c\n"
               "  covidct cv-join runs/cv-w runs/cv-c     # both models per fold, as one ensemble would score\n"
               "  covidct cv-join runs/cv-default-covid-ct:none-window-default runs/cv-c   # one model of a run's five",
    "pretrain": "examples:\n  covidct pretrain --data ../shared/covid-ct --model default --epochs 30 "
                "--out runs/ssl-default\n"
                "  covidct train --data ../shared/covid-ct --model default --pretrained runs/ssl-default/pretrained.npz",
    "evaluate": "example:\n"
                f"  covidct evaluate --checkpoint {CHECKPOINT} --data ../shared/covid-ct --split val",
    "predict": "examples:\n"
               f"  covidct predict --checkpoint {CHECKPOINT} scans/ slice1.png --output preds.csv\n"
               f"  covidct predict --checkpoint {CHECKPOINT} scan.nii.gz --output slices.csv\n"
               f"  covidct predict --checkpoint {CHECKPOINT} dicom_series_dir/ --window 1500,-600",
    "export": "examples:\n"
              f"  covidct export --checkpoint {CHECKPOINT} --format onnx --out covidct.onnx\n"
              f"  covidct export --checkpoint {CHECKPOINT} --format safetensors --out covidct.safetensors",
    "serve": "example:\n"
             f"  covidct serve --checkpoint {CHECKPOINT} --port 8000   # then open http://127.0.0.1:8000",
    "synth": "example:\n  covidct synth --out data/phantom --n 600 --seed 1",
    "describe": "example:\n  covidct describe ../shared/covid-ct",
    "viz": "examples:\n"
           f"  covidct viz filters --checkpoint {CHECKPOINT} --out filters.png\n"
           f"  covidct viz features --checkpoint {CHECKPOINT} --image slice.png --out features.png\n"
           "  covidct viz kernels --image slice.png --out kernels.png\n"
           f"  covidct viz gradcam --checkpoint {CHECKPOINT} --data ../shared/covid-ct --split val "
           "--out gradcam.png --n 16\n"
           "  covidct viz lungs --data ../shared/covid-ct --out lungs.png --n 24\n"
           f"  covidct viz shortcut --checkpoint {CHECKPOINT} --data ../shared/covid-ct --split val "
           "--out shortcut/\n"
           "  covidct viz cv-gradcam runs/cv-default-covid-ct      # after covidct cv: RUN/gradcam.md",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covidct", description="COVID-19 lung-CT classifier built on minicnn "
                                     "(COVID = positive class).")
    parser.add_argument("--max-pixels", type=int, default=None, metavar="N",
                        help="refuse images with more than N pixels before decoding them (default: "
                             "covidct.preprocess.MAX_PIXELS = 50 million)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_text):
        return commands.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    from .pretrain import PretrainConfig
    from .train import TrainConfig

    train = command("train", "train a classifier for the recipe's epochs (or keep the best by --select)")
    add_run_arguments(train, TrainConfig)
    train.add_argument("--distributed", nargs="?", const="mpi", default=None, choices=["mpi", "nccl"],
                       help="data-parallel over the ranks of 'mpiexec -n N': gradients averaged over MPI "
                            "(default) or NCCL (--device gpu, one GPU per rank); --batch-size is the global batch")
    train.add_argument("--jobs", type=int, default=1, help="an ensemble's models trained at once, in worker "
                       "processes, with the texture features beside them (the same models as --jobs 1, bit for "
                       "bit; on 2 cores use 2)")
    add_run_arguments(command("pretrain", "self-supervised pretraining (rotation prediction) on the "
                              "training images, for covidct train --pretrained"), PretrainConfig)
    add_cv_arguments(command("cv", "k-fold cross-validation over train + val (folds grouped by source): "
                             "out-of-fold metrics and a fold-ensemble checkpoint"))

    join = command("cv-join", "the OOF metrics of finished cross-validations joined as one ensemble (mean of "
                   "their log-odds), without retraining: choose members by cross-validation")
    join.add_argument("runs", nargs="+", metavar="RUN", help="covidct cv run folders of one fold draw (the same "
                      "--data, --seed, --folds and --repeats); RUN:MODEL takes one model of a run of several (MODEL: "
                      "what follows r0-fold0- in its fold folders, e.g. crop-deep-small)")
    join.add_argument("--target-sensitivity", type=float, default=None, metavar="S",
                      help="choose the threshold on the joined OOF predictions to reach this COVID sensitivity "
                           "(default: Youden's J)")

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
    predict.add_argument("--window", metavar="WIDTH,LEVEL", default=None,
                         help="CT scans: lung window in HU (default: the checkpoint's, else 1500,-600)")
    predict.add_argument("--top-k", type=int, default=None, metavar="K", help="CT scans: the scan's "
                         "P(COVID) is the mean of its K highest slice probabilities (default: 10%% of the slices)")
    predict.add_argument("--series", metavar="UID", default=None,
                         help="CT scans: the SeriesInstanceUID to use from a folder holding several series")

    export = command("export", "write a checkpoint as ONNX (for ONNX Runtime) or safetensors (for PyTorch)")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--format", required=True, choices=["onnx", "safetensors"])
    export.add_argument("--out", required=True, help="output file (.onnx / .safetensors)")

    serve = command("serve", "a local web page: upload a slice, see P(COVID), Grad-CAM, lung mask and feature maps")
    serve.add_argument("--checkpoint", required=True)
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    serve.add_argument("--device", default="cpu", choices=["cpu", "gpu"])

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
    lungs = action("lungs", "contact sheet of lung masks and crop boxes (covidct.lungs) on a dataset")
    lungs.add_argument("--data", required=True)
    lungs.add_argument("--split", default="train", help="split to draw from ('' for every image)")
    lungs.add_argument("--out", required=True, help="PNG file")
    lungs.add_argument("--n", type=int, default=24, help="number of slices")
    lungs.add_argument("--seed", type=int, default=0, help="which slices are drawn")
    shortcut = action("shortcut", "shortcut check: Grad-CAM mass in the lungs, and metrics with the file "
                      "formats swapped between classes")
    shortcut.add_argument("--checkpoint", required=True)
    shortcut.add_argument("--data", required=True)
    shortcut.add_argument("--split", default="val")
    shortcut.add_argument("--out", required=True, help="output folder for shortcut.json and shortcut.md")
    shortcut.add_argument("--target", default="predicted", choices=["predicted", "covid"],
                          help="class whose Grad-CAM is measured (default: each image's predicted class)")
    shortcut.add_argument("--cache-dir", default=None)
    cv_cam = action("cv-gradcam", "Grad-CAM mass in the lungs on a cross-validation's held-out slices, each "
                    "explained by its fold's models")
    cv_cam.add_argument("run", metavar="RUN_DIR", help="a finished covidct cv run folder")
    cv_cam.add_argument("--target", default="predicted", choices=["predicted", "covid"],
                        help="class whose Grad-CAM is measured (default: the class the recipe predicts out of fold)")
    return parser


RUNNERS = {"train": run_train, "cv": run_cv, "cv-join": run_cv_join, "pretrain": run_pretrain, "evaluate": run_evaluate, "predict": run_predict, "synth": run_synth,
           "describe": run_describe, "viz": run_viz}
RUNNERS.update(export=run_export, serve=run_serve)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_pixels is not None:
        from . import preprocess

        if args.max_pixels < 1:
            print(f"error: --max-pixels must be >= 1, got {args.max_pixels}", file=sys.stderr)
            return 2
        preprocess.MAX_PIXELS = args.max_pixels
    return run_reporting_errors(RUNNERS[args.command], args)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line 'warning: ...' (no source path, no category name)."""
    print(f"warning: {message}", file=sys.stderr)


USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def run_reporting_errors(runner, args) -> int:
    """runner(args), with user mistakes as one line 'error: ...' (exit 2), warnings as one line
    'warning: ...' and Ctrl-C as exit 130."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            return runner(args)
    except CovidCTError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if not isinstance(error, USER_OS_ERRORS) and error.errno not in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
