"""Self-supervised pretraining by rotation prediction, on the training images alone.

Every image is turned by 0, 90, 180 or 270 degrees and the network learns which
turn it was (Gidaris et al., "Unsupervised representation learning by predicting
image rotations", ICLR 2018). To answer, it has to find the anatomy (spine and
table at the bottom, the two lungs left and right, the body outline), which is
what a COVID classifier must look at too. No COVID labels are used: this is the
idea of the UCSD "Self-Trans" baseline (self-supervised pretraining, then
transfer), done with no external data.

    covidct pretrain --data ../shared/covid-ct --model default --epochs 30 --out runs/ssl-default
    covidct train --data ../shared/covid-ct --model default --pretrained runs/ssl-default/pretrained.npz

The result is a covidct checkpoint of the same architecture with a 4-way output
layer; ``covidct train --pretrained`` loads every tensor that fits (all but that
last layer) and starts a fresh 2-way one. The pretext task's accuracy on the
validation images (rotated, their labels unused) is logged as a health check.

Augmentation: no flips by default. A mirror image turned by 90 degrees looks
exactly like the original turned by 270 degrees and mirrored, so flips would make
the 90/270 answers ambiguous.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

import minicnn as mc

from .augment import parse_augment
from .checkpoint import TASK_ROTATION, save_checkpoint
from .errors import CovidCTError
from .evaluate import predict_logits
from .loader import DataLoader
from .loop import EpochLoop
from .model import build_model, count_parameters, preset
from .options import option
from .paths import writable_dir
from .runlock import RunLock
from .preprocess import RESIZE_MODES, Preprocess, compute_normalization
from .train import DEVICES, SCHEDULES, load_split

ROTATIONS = 4          # 0, 90, 180, 270 degrees: the pretext task's classes


@dataclass
class PretrainConfig:
    data: str = option("", "dataset (default: the synthetic phantom); only its training images are learned "
                           "from, without their labels")
    out: str = option("runs/pretrain", "run directory (default: runs/pretrain-<model>-<data name>)")
    model: str = option("default", "architecture to pretrain: default, wide, deep, resnet18, tiny, seed")
    image_size: int | None = option(None, "input size (default: the preset's; fine-tune at the same size)")
    resize: str = option("stretch", "stretch: fill the square; pad: keep the aspect ratio on a black square "
                                    "(pretrain as you fine-tune)", choices=RESIZE_MODES)
    epochs: int = option(30, "number of epochs (with --resume: a larger number extends the run)")
    batch_size: int = option(32, "images per batch")
    lr: float = option(1e-3, "Adam learning rate")
    weight_decay: float = option(1e-4, "weight decay")
    schedule: str = option("cosine", "learning-rate schedule after the warm-up", choices=SCHEDULES)
    warmup_epochs: int = option(2, "epochs of linear learning-rate warm-up")
    step_epochs: int = option(15, "step schedule: lr *= 0.1 every this many epochs")
    augment: str = option("translate:0.06,contrast:0.15,crop:0.85",
                          "augmentation before the rotation (no flips: see covidct.pretrain)")
    seed: int = option(0, "random seed")
    device: str = option("cpu", "where to train", choices=DEVICES)
    train_split: str = option("train", "split whose images are learned from (labels unused)")
    val_split: str = option("val", "split whose images monitor the rotation accuracy ('' for none)")
    cache_dir: str | None = option(None, "decoded-image cache (default: $COVIDCT_CACHE/images)")
    skip_bad: bool = option(False, "skip unreadable images (listed per split in the run directory)")
    progress: bool = option(True, "no per-batch progress bar")

    @classmethod
    def from_dict(cls, data: dict) -> "PretrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise CovidCTError(f"pretrain: --epochs, --batch-size and --lr must be positive, got "
                               f"{self.epochs}, {self.batch_size}, {self.lr}")
        if self.schedule not in SCHEDULES or self.step_epochs < 1:
            raise CovidCTError(f"pretrain: --schedule must be one of {SCHEDULES} and --step-epochs >= 1, got "
                               f"{self.schedule!r}, {self.step_epochs}")
        if self.resize not in RESIZE_MODES:
            raise CovidCTError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.device == "gpu" and not mc.gpu_available():
            raise CovidCTError(f"--device gpu: {mc.backend.gpu_status()[1]}")
        if any(transform.name in ("hflip", "vflip") for transform in parse_augment(self.augment).transforms):
            raise CovidCTError(f"--augment {self.augment!r}: flips make rotation prediction ambiguous "
                               "(a mirrored 90-degree turn is a 270-degree one); leave them out")


def rotate_batch(x, turns):
    """x (B, C, H, W) square images, turns (B,) in {0, 1, 2, 3} -> each image turned by 90 * turns degrees
    counter-clockwise (numpy.rot90's direction); NumPy or CuPy."""
    xp = mc.get_array_module(x)
    turns = mc.as_numpy(turns)
    rotated = xp.empty_like(x)
    for k in range(ROTATIONS):
        index = np.flatnonzero(turns == k)
        if len(index):
            index = xp.asarray(index)
            rotated[index] = xp.rot90(x[index], k, axes=(2, 3))
    return rotated


def all_rotations(images):
    """(N, C, H, W) -> (4N, C, H, W) and turns (4N,): every image in each of the four orientations."""
    turned = np.concatenate([np.rot90(images, k, axes=(2, 3)) for k in range(ROTATIONS)])
    return np.ascontiguousarray(turned), np.repeat(np.arange(ROTATIONS), len(images))


class Pretrainer(EpochLoop):
    """One pretraining run: data, 4-way model, Adam, history, last.npz (resumable) and pretrained.npz."""
    command, task, config_key = "pretrain", TASK_ROTATION, "pretrain_config"
    train_columns = ("loss", "rotation_accuracy")

    def __init__(self, config: PretrainConfig, log=print):
        config.validate()
        self.config, self.log = config, log
        self.run_dir = Path(config.out)
        self.model_config = preset(config.model)
        if config.image_size:
            self.model_config.input_size = config.image_size
        self.model_config.num_classes = ROTATIONS
        self.model_config.feature_shape()
        self.preprocess = Preprocess(size=self.model_config.input_size, resize=config.resize)

        writable_dir(self.run_dir, "--out")
        if config.cache_dir:
            writable_dir(config.cache_dir, "--cache-dir")
        images, _, _ = load_split(config, config.train_split, self.preprocess, self.run_dir)  # labels unused
        self.images = images
        self.mean, self.std = compute_normalization(images)
        self.val_images = None
        if config.val_split:
            self.val_images, _, _ = load_split(config, config.val_split, self.preprocess, self.run_dir)

        self.model = build_model(self.model_config, seed=config.seed).to(config.device)
        self.optimizer = mc.optim.Adam(self.model.parameters(), config.lr, weight_decay=config.weight_decay)
        self.criterion = mc.SoftmaxCrossEntropy()
        self.loader = DataLoader(images, np.zeros(len(images), np.int64), config.batch_size, shuffle=True,
                                 drop_last=len(images) > config.batch_size, seed=config.seed,
                                 augment=parse_augment(config.augment), device=config.device,
                                 normalize=(self.mean, self.std))
        self.init_loop()

    def metadata(self, epoch: int) -> dict:
        return {"model_config": self.model_config.to_dict(), "preprocess": self.preprocess.to_dict(),
                "normalization": {"mean": self.mean, "std": self.std}, "pretext": "rotation"}

    def batches(self, epoch: int):
        """The loader's batches, each image turned by a random multiple of 90 degrees; y = the turns."""
        self.loader.set_epoch(epoch)
        for batch_index, (x, _) in enumerate(self.loader):
            turns = np.random.default_rng([self.config.seed, epoch, 2, batch_index]).integers(0, ROTATIONS, len(x))
            yield rotate_batch(x, turns), mc.to_device(turns.astype(np.int64), self.config.device)

    def evaluate(self, epoch: int) -> dict:
        return {"val_rotation_accuracy": self.val_rotation_accuracy()}

    def val_rotation_accuracy(self) -> float | None:
        """Pretext accuracy on the validation images in all four orientations (no COVID labels used)."""
        if self.val_images is None:
            return None
        images, turns = all_rotations(self.val_images)
        logits = predict_logits(self.model, images, self.mean, self.std, device=self.config.device)
        return float((logits.argmax(axis=1) == turns).mean())

    def describe(self) -> str:
        return (f"rotation pretraining on {len(self.images)} {self.config.train_split} images at "
                f"{self.preprocess.size}x{self.preprocess.size}; model '{self.config.model}' "
                f"({count_parameters(self.model):,} parameters, 4-way head); device {self.config.device}")

    def epoch_line(self, row: dict, improved: bool) -> str:
        val = row["val_rotation_accuracy"]
        return (f"epoch {row['epoch']:3d}/{self.config.epochs}  loss {row['loss']:.4f}  rotation acc "
                f"{row['rotation_accuracy']:.3f}" + (f" | val rotation acc {val:.3f}" if val is not None else "")
                + f"  ({row['seconds']:.1f}s)")

    def finish(self) -> Path:
        config = self.config
        path = save_checkpoint(self.run_dir / "pretrained.npz", self.model,
                               self.checkpoint_metadata(config.epochs - 1))
        self.log(f"wrote {path}; fine-tune with: covidct train --data {config.data} --model {config.model}"
                 + (f" --image-size {config.image_size}" if config.image_size else "") + f" --pretrained {path}")
        return path


def pretrain(config: PretrainConfig, resume: bool = False, log=print) -> Path:
    """Run (or resume) rotation pretraining; returns the path of pretrained.npz."""
    config.validate()                                   # a bad option leaves no run directory behind
    with RunLock(config.out, log):                      # before any work: a second writer is refused at once
        trainer = Pretrainer(config, log=log)
        if resume:
            trainer.resume()
        return trainer.fit()
