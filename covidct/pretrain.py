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

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

import minicnn as mc

from .augment import parse_augment
from .checkpoint import read_checkpoint, save_checkpoint
from .errors import CovidCTError
from .loader import DataLoader
from .model import build_model, count_parameters, preset
from .evaluate import predict_logits
from .preprocess import Preprocess, compute_normalization
from .train import dropout_rngs, learning_rate, load_split, write_run_config

ROTATIONS = 4          # 0, 90, 180, 270 degrees: the pretext task's classes


@dataclass
class PretrainConfig:
    data: str = ""
    out: str = "runs/pretrain"
    model: str = "default"              # the architecture to pretrain (covidct.model presets)
    image_size: int | None = None       # None: the preset's input size (use the same for fine-tuning)
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3                    # Adam
    weight_decay: float = 1e-4
    schedule: str = "cosine"            # learning_rate() of covidct.train: none | step | cosine
    warmup_epochs: int = 2
    step_epochs: int = 15
    augment: str = "translate:0.06,contrast:0.15,crop:0.85"   # no flips: see the module docstring
    seed: int = 0
    device: str = "cpu"
    train_split: str = "train"
    val_split: str = "val"              # its images only monitor the pretext accuracy; "" to skip
    cache_dir: str | None = None
    skip_bad: bool = False
    progress: bool = True

    @classmethod
    def from_dict(cls, data: dict) -> "PretrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise CovidCTError(f"pretrain: --epochs, --batch-size and --lr must be positive, got "
                               f"{self.epochs}, {self.batch_size}, {self.lr}")
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


class Pretrainer:
    """One pretraining run: data, 4-way model, Adam, history, last.npz (resumable) and pretrained.npz."""

    def __init__(self, config: PretrainConfig, log=print):
        config.validate()
        self.config, self.log = config, log
        self.run_dir = Path(config.out)
        self.model_config = preset(config.model)
        if config.image_size:
            self.model_config.input_size = config.image_size
        self.model_config.num_classes = ROTATIONS
        self.model_config.feature_shape()
        self.preprocess = Preprocess(size=self.model_config.input_size)

        images, _, _ = load_split(config, config.train_split, self.preprocess)   # COVID labels are not used
        self.images = images
        self.mean, self.std = compute_normalization(images)
        self.val_images = None
        if config.val_split:
            self.val_images, _, _ = load_split(config, config.val_split, self.preprocess)

        self.model = build_model(self.model_config, seed=config.seed).to(config.device)
        self.optimizer = mc.optim.Adam(self.model.parameters(), config.lr, weight_decay=config.weight_decay)
        self.criterion = mc.SoftmaxCrossEntropy()
        self.loader = DataLoader(images, np.zeros(len(images), np.int64), config.batch_size, shuffle=True,
                                 drop_last=len(images) > config.batch_size, seed=config.seed,
                                 augment=parse_augment(config.augment), device=config.device,
                                 normalize=(self.mean, self.std))
        self.history: list[dict] = []
        self.start_epoch = 0

    def metadata(self, epoch: int) -> dict:
        return {"model_config": self.model_config.to_dict(), "preprocess": self.preprocess.to_dict(),
                "normalization": {"mean": self.mean, "std": self.std}, "pretext": "rotation",
                "pretrain_config": asdict(self.config), "epoch": epoch, "history": self.history,
                "rng_states": [rng.bit_generator.state for rng in dropout_rngs(self.model)]}

    def resume(self) -> None:
        model_arrays, optimizer_arrays, meta = read_checkpoint(self.run_dir / "last.npz")
        if meta.get("pretext") != "rotation":
            raise CovidCTError(f"{self.run_dir / 'last.npz'}: not a pretraining checkpoint")
        self.model.load_state_dict(model_arrays)
        self.optimizer.load_state_dict(optimizer_arrays)
        for rng, state in zip(dropout_rngs(self.model), meta["rng_states"]):
            rng.bit_generator.state = state
        self.history, self.start_epoch = meta["history"], meta["epoch"] + 1
        self.log(f"resuming {self.run_dir} after epoch {self.start_epoch}")

    def train_epoch(self, epoch: int) -> dict:
        self.model.train()
        self.loader.set_epoch(epoch)
        batches = self.loader
        if self.config.progress:
            from tqdm import tqdm
            batches = tqdm(self.loader, desc=f"pretrain {epoch + 1}/{self.config.epochs}", leave=False, unit="batch")
        total_loss, correct, seen = 0.0, 0, 0
        for batch_index, (x, _) in enumerate(batches):
            turns = np.random.default_rng([self.config.seed, epoch, 2, batch_index]).integers(0, ROTATIONS, len(x))
            x, y = rotate_batch(x, turns), mc.to_device(turns.astype(np.int64), self.config.device)
            self.optimizer.zero_grad()
            logits = self.model(x)
            loss = float(self.criterion(logits, y))
            if not math.isfinite(loss):
                raise CovidCTError(f"pretraining diverged at epoch {epoch + 1}: loss is {loss}; try a lower --lr")
            self.model.backward(self.criterion.backward())
            self.optimizer.step()
            total_loss += loss * len(turns)
            correct += int((mc.as_numpy(logits).argmax(axis=1) == turns).sum())
            seen += len(turns)
        return {"loss": total_loss / seen, "rotation_accuracy": correct / seen}

    def val_rotation_accuracy(self) -> float | None:
        """Pretext accuracy on the validation images in all four orientations (no COVID labels used)."""
        if self.val_images is None:
            return None
        images, turns = all_rotations(self.val_images)
        logits = predict_logits(self.model, images, self.mean, self.std, device=self.config.device)
        return float((logits.argmax(axis=1) == turns).mean())

    def fit(self) -> Path:
        config = self.config
        write_run_config(self.run_dir, config)
        self.log(f"rotation pretraining on {len(self.images)} {config.train_split} images at "
                 f"{self.preprocess.size}x{self.preprocess.size}; model '{config.model}' "
                 f"({count_parameters(self.model):,} parameters, 4-way head); device {config.device}")
        for epoch in range(self.start_epoch, config.epochs):
            self.optimizer.lr = learning_rate(config, epoch)
            started = time.perf_counter()
            row = {"epoch": epoch + 1, "lr": self.optimizer.lr, **self.train_epoch(epoch),
                   "val_rotation_accuracy": self.val_rotation_accuracy()}
            row["seconds"] = time.perf_counter() - started
            self.history.append(row)
            save_checkpoint(self.run_dir / "last.npz", self.model, self.metadata(epoch), self.optimizer)
            val = row["val_rotation_accuracy"]
            self.log(f"epoch {epoch + 1:3d}/{config.epochs}  loss {row['loss']:.4f}  rotation acc "
                     f"{row['rotation_accuracy']:.3f}" + (f" | val rotation acc {val:.3f}" if val is not None else "")
                     + f"  ({row['seconds']:.1f}s)")
        self.write_history()
        path = save_checkpoint(self.run_dir / "pretrained.npz", self.model, self.metadata(config.epochs - 1))
        self.log(f"wrote {path}; fine-tune with: covidct train --data {config.data} --model {config.model}"
                 + (f" --image-size {config.image_size}" if config.image_size else "") + f" --pretrained {path}")
        return path

    def write_history(self) -> None:
        import pandas as pd

        pd.DataFrame(self.history).to_csv(self.run_dir / "history.csv", index=False)


def pretrain(config: PretrainConfig, resume: bool = False, log=print) -> Path:
    """Run (or resume) rotation pretraining; returns the path of pretrained.npz."""
    trainer = Pretrainer(config, log=log)
    if resume:
        trainer.resume()
    return trainer.fit()
