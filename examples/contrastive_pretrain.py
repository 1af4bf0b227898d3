"""Contrastive (SimCLR) pretraining of a covidct network on unlabelled CT slices.

    python examples/contrastive_pretrain.py --data ../shared/sars-cov-2-ct --epochs 40 --out runs/simclr.npz
    covidct train --data ../shared/covid-ct --pretrained runs/simclr.npz        # fine-tune on COVID-CT
    covidct cv --data ../shared/covid-ct --pretrained runs/simclr.npz --jobs 2  # judge it

Every batch of B slices is augmented twice (strong random crops, flips, turns, contrast,
blur); the network maps the 2B views to embeddings, and minicnn.NTXentLoss pulls the two views
of each slice together and pushes the other 2B - 2 apart (Chen et al., "A simple framework for
contrastive learning of visual representations", 2020). No labels are read. The network is
the chosen preset with a DIM-way last layer as the projection; ``covidct train --pretrained``
loads every tensor but that layer and starts a fresh 2-way one.

Measured (README, "Cross-validated results"; with this script's prototype, whose cosine schedule
decayed to 0 rather than covidct's 1 %): 40 epochs on the 2481 SARS-CoV-2 CT slices, then the
default recipe of the time fine-tuned per fold, cross-validated 0.780 AUC against 0.799 without it, and
with session 6's default 0.810 against 0.834: it did not transfer to COVID-CT. Kept as the tool to try
it on other data.
"""
import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import minicnn as mc  # noqa: E402
from covidct.augment import parse_augment  # noqa: E402
from covidct.checkpoint import TASK_CONTRASTIVE, save_checkpoint  # noqa: E402
from covidct.cli import run_reporting_errors, synthetic_dataset  # noqa: E402
from covidct.data import list_splits, read_dataset  # noqa: E402
from covidct.errors import CovidCTError  # noqa: E402
from covidct.loop import learning_rate  # noqa: E402
from covidct.model import build_model, preset  # noqa: E402
from covidct.paths import image_cache_dir  # noqa: E402
from covidct.preprocess import RESIZE_MODES, Preprocess, compute_normalization, load_images, normalize  # noqa: E402

VIEWS = "flip,rotate:20,translate:0.1,contrast:0.4,crop:0.5,blur:1.0"   # SimCLR wants strong views
DIM = 64                                                                # embedding (projection) size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", default=[],
                        help="dataset whose images (all splits, labels unused) are learned from; repeatable "
                             "(default: the synthetic phantom)")
    parser.add_argument("--out", default="runs/contrastive.npz", help="checkpoint to write")
    parser.add_argument("--model", default="default", help="preset: default, wide, deep, tiny, ...")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128, help="slices per batch (2x as many views)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine schedule, as covidct train)")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--resize", default="stretch", choices=RESIZE_MODES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return run_reporting_errors(run, args)


def run(args) -> int:
    if args.epochs < 1 or args.batch_size < 2 or not args.lr > 0 or not args.temperature > 0:
        raise CovidCTError(f"--epochs, --lr and --temperature must be positive and --batch-size >= 2, got "
                           f"{args.epochs}, {args.lr}, {args.temperature}, {args.batch_size}")
    config = preset(args.model)
    config.num_classes = DIM
    pre = Preprocess(size=config.input_size, resize=args.resize)
    sources = args.data or [str(synthetic_dataset())]
    images = np.concatenate([load_images(read_dataset(source, split=split), pre, cache_dir=image_cache_dir())[0]
                             for source in sources for split in (list_splits(source) or [None])])
    if len(images) < args.batch_size:
        raise CovidCTError(f"{len(images)} images is fewer than one batch (--batch-size {args.batch_size})")
    mean, std = compute_normalization(images)
    print(f"contrastive pretraining of {args.model} on {len(images)} slices from {', '.join(sources)}")

    views = parse_augment(VIEWS)
    model = build_model(config, seed=args.seed)
    optimizer = mc.optim.Adam(model.parameters(), args.lr, weight_decay=1e-4)
    criterion = mc.NTXentLoss(args.temperature)
    schedule = SimpleNamespace(lr=args.lr, epochs=args.epochs, schedule="cosine", warmup_epochs=0, step_epochs=1)
    rng = np.random.default_rng(args.seed)
    steps = len(images) // args.batch_size
    for epoch in range(args.epochs):
        started, total = time.perf_counter(), 0.0
        optimizer.lr = learning_rate(schedule, epoch)
        order = rng.permutation(len(images))
        for step in range(steps):
            batch = images[order[step * args.batch_size:(step + 1) * args.batch_size]]
            pair = normalize(np.concatenate([views(batch, rng), views(batch, rng)]), mean, std)  # (2B, 1, H, W)
            optimizer.zero_grad()
            loss = criterion(model(pair))
            model.backward(criterion.backward())
            optimizer.step()
            total += float(loss)
        print(f"epoch {epoch + 1}/{args.epochs}  contrastive loss {total / steps:.4f}  "
              f"({time.perf_counter() - started:.1f}s)")

    metadata = {"task": TASK_CONTRASTIVE, "pretext": "contrastive", "model_config": config.to_dict(),
                "preprocess": pre.to_dict(), "normalization": {"mean": mean, "std": std},
                "epoch": args.epochs - 1, "contrastive": {"views": VIEWS, "temperature": args.temperature}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(args.out, model, metadata)
    print(f"wrote {path}; fine-tune with: covidct train --data DATA --model {args.model} --pretrained {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
