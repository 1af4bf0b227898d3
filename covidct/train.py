"""Training: epochs of mini-batch gradient descent, validation, checkpoints, resume.

A run directory holds everything a run produces:

    config.json      the TrainConfig used
    last.npz         resumable checkpoint of the last completed epoch (weights, optimizer, RNG)
    best.npz         the best epoch by the selection metric (default: validation AUC)
    history.csv      per-epoch train/val loss, accuracy, AUC, sensitivity, specificity, lr
    curves.png       training curves
    metrics.json, predictions.csv, roc.png, confusion.png   best model on the validation split

``--resume RUN_DIR`` continues from last.npz; Ctrl-C or ``kill -9`` lose at most
the epoch in progress. A NaN/inf loss stops the run with a clear message and
leaves the last good checkpoint in place.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

import minicnn as mc

from .augment import parse_augment
from .checkpoint import read_checkpoint, save_checkpoint
from .data import read_dataset
from .errors import CovidCTError
from .evaluate import choose_threshold, predict_proba, report_text, softmax, write_evaluation
from .loader import DataLoader
from .metrics import classification_metrics
from .model import ModelConfig, build_model, count_parameters, preset, split_backbone_head
from .preprocess import Preprocess, compute_normalization, load_images, normalize

SELECT_METRICS = ("auc", "accuracy", "balanced_accuracy", "loss")


@dataclass
class TrainConfig:
    data: str = ""                      # dataset root / CSV / class folders
    out: str = "runs/covidct"           # run directory
    model: str = "default"              # preset name (covidct.model.PRESETS)
    image_size: int | None = None       # None: the preset's input size
    epochs: int = 40
    batch_size: int = 32
    optimizer: str = "adam"             # sgd | adam | adamw
    lr: float = 1e-3
    momentum: float = 0.9               # SGD only
    weight_decay: float = 1e-4
    schedule: str = "cosine"            # none | step | cosine
    warmup_epochs: int = 2
    step_epochs: int = 15               # step schedule: lr *= 0.1 every step_epochs
    class_weights: str = "balanced"     # balanced | none | "w0,w1"
    augment: str = "flip,rotate:10,translate:0.06,contrast:0.15,crop:0.85"
    seed: int = 0
    device: str = "cpu"
    select: str = "auc"                 # selection metric on the validation split
    patience: int = 15                  # early stopping: epochs without improvement
    target_sensitivity: float | None = None  # choose the threshold on val to reach this sensitivity
    train_split: str = "train"
    val_split: str = "val"
    cache_dir: str | None = None
    skip_bad: bool = False
    progress: bool = True
    pretrained: str | None = None       # weights to start from: torch .pth, minicnn .npz, covidct checkpoint
    freeze_backbone: bool = False       # train only the head (covidct.model.split_backbone_head)
    unfreeze_after: int = 0             # with freeze_backbone: train everything from epoch N+1 (0: never)
    backbone_lr_scale: float = 1.0      # backbone lr = lr * this (discriminative fine-tuning)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.optimizer in ("sgd", "adam", "adamw"), f"--optimizer must be sgd, adam or adamw, got {self.optimizer!r}"),
            (self.schedule in ("none", "step", "cosine"), f"--schedule must be none, step or cosine, got {self.schedule!r}"),
            (self.select in SELECT_METRICS, f"--select must be one of {SELECT_METRICS}, got {self.select!r}"),
            (self.device in ("cpu", "gpu"), f"--device must be cpu or gpu, got {self.device!r}"),
            (self.target_sensitivity is None or 0 < self.target_sensitivity <= 1,
             f"--target-sensitivity must be in (0, 1], got {self.target_sensitivity}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CovidCTError(message)
        if self.unfreeze_after < 0 or (self.unfreeze_after and not self.freeze_backbone):
            raise CovidCTError(f"--unfreeze-after {self.unfreeze_after}: expected a number of epochs >= 1, "
                               f"used together with --freeze-backbone")
        if not self.backbone_lr_scale > 0:
            raise CovidCTError(f"--backbone-lr-scale must be > 0, got {self.backbone_lr_scale}")
        if self.pretrained and not Path(self.pretrained).is_file():
            raise CovidCTError(f"--pretrained {self.pretrained}: no such file")
        if self.device == "gpu" and not mc.gpu_available():
            raise CovidCTError(f"--device gpu: {mc.backend.gpu_status()[1]}")


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """Linear warm-up over warmup_epochs, then constant, step (x0.1) or cosine decay to 1% of lr."""
    if epoch < config.warmup_epochs:
        return config.lr * (epoch + 1) / (config.warmup_epochs + 1)
    if config.schedule == "step":
        return config.lr * 0.1 ** ((epoch - config.warmup_epochs) // config.step_epochs)
    if config.schedule == "cosine":
        span = max(1, config.epochs - config.warmup_epochs)
        progress = (epoch - config.warmup_epochs) / span
        return config.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))
    return config.lr


def class_weights(spec: str, labels: np.ndarray) -> list[float] | None:
    """'balanced' -> N / (2 * n_k) per class; 'none' -> None; 'w0,w1' -> as given."""
    if spec == "none":
        return None
    if spec == "balanced":
        counts = np.bincount(labels, minlength=2)
        if counts.min() == 0:
            raise CovidCTError(f"the training split has an empty class (counts {counts.tolist()})")
        return [len(labels) / (2.0 * c) for c in counts]
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        weights = []
    if len(weights) != 2 or min(weights) <= 0:
        raise CovidCTError(f"--class-weights must be 'balanced', 'none' or two positive numbers 'w0,w1', got {spec!r}")
    return weights


def make_optimizer(config: TrainConfig, params):
    if config.optimizer == "sgd":
        return mc.optim.SGD(params, config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
                            weight_decay=config.weight_decay)
    optimizer_cls = mc.optim.Adam if config.optimizer == "adam" else mc.optim.AdamW
    return optimizer_cls(params, config.lr, weight_decay=config.weight_decay)


def model_config_for(config: TrainConfig) -> ModelConfig:
    model_config = preset(config.model)
    if config.image_size:
        model_config.input_size = config.image_size
    model_config.feature_shape()  # fails early, with a sentence, if the size is too small
    return model_config


def load_split(config: TrainConfig, split: str, preprocess: Preprocess):
    """-> images (N, 1, H, W) float32 in [0, 1], labels (N,), paths."""
    dataset = read_dataset(config.data, split=split)
    return load_images(dataset, preprocess, cache_dir=config.cache_dir, skip_bad=config.skip_bad,
                       progress=config.progress)


IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD = 0.449, 0.226   # ImageNet's RGB statistics, averaged


def load_pretrained_weights(model, path, log=print) -> int:
    """Copy every tensor of ``path`` whose name and shape fit ``model``; returns how many.

    A 3-channel conv1 (ImageNet) is summed over RGB to fit a 1-channel model; tensors that
    do not fit (the 1000-way ImageNet fc) keep their fresh initialisation.
    """
    from minicnn.torch_load import load_state_dict_file

    try:
        state = load_state_dict_file(path)
    except Exception as error:  # pickle refusals, bad zips, ...: one line for the user
        raise CovidCTError(f"--pretrained {path}: cannot read weights ({error})") from None
    if any(key.startswith("model.") for key in state):  # a covidct checkpoint
        state = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
    own = model.state_dict()
    fitting = {}
    for key, value in state.items():
        if key == "conv1.weight" and value.ndim == 4 and value.shape[1] == 3 and own.get(key) is not None \
                and own[key].shape[1] == 1:
            value = value.sum(axis=1, keepdims=True)             # RGB filters -> one gray filter
        if key in own and tuple(value.shape) == tuple(own[key].shape):
            fitting[key] = value
    if not fitting:
        raise CovidCTError(f"--pretrained {path}: no tensor matches the model's names and shapes")
    model.load_state_dict(fitting, strict=False)
    # BatchNorm's num_batches_tracked is a counter, not a weight (torchvision's older files lack it)
    fresh = [key for key in own if key not in fitting and not key.endswith("num_batches_tracked")]
    log(f"loaded {len(fitting)} pretrained tensors from {path}; freshly initialised: {fresh or 'none'}")
    return len(fitting)


def write_run_config(run_dir: Path, config) -> None:
    """Create the run directory and save the config there (what --resume reads back)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")


def dropout_rngs(model):
    return [layer.rng for layer in model.modules() if isinstance(layer, mc.Dropout)]


class Trainer:
    """Owns one run: data, model, optimizer, history, and the run directory."""

    def __init__(self, config: TrainConfig, log=print, comm=None):
        config.validate()
        # data-parallel ranks (covidct train --distributed; docs/distributed.md): rank 0 alone logs and writes
        self.comm = comm or mc.distributed.SingleProcessCommunicator()
        self.is_root = self.comm.rank == 0
        if not self.is_root:
            log, config.progress = (lambda *args, **kwargs: None), False
        if config.batch_size % self.comm.size:
            raise CovidCTError(f"--batch-size {config.batch_size} (the global batch) must be a multiple of "
                               f"the number of ranks, {self.comm.size}")
        self.config, self.log = config, log
        self.run_dir = Path(config.out)
        self.model_config = model_config_for(config)
        self.preprocess = Preprocess(size=self.model_config.input_size)

        self.train_images, self.train_labels, self.train_paths = load_split(config, config.train_split, self.preprocess)
        self.val_images, self.val_labels, self.val_paths = load_split(config, config.val_split, self.preprocess)
        self.mean, self.std = compute_normalization(self.train_images)  # training split only

        self.model = build_model(self.model_config, seed=config.seed)
        if config.pretrained:
            load_pretrained_weights(self.model, config.pretrained, log)
            if Path(config.pretrained).suffix in (".pth", ".pt"):  # ImageNet weights: ImageNet's statistics
                self.mean, self.std = IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD
        self.model.to(config.device)
        self.backbone, self.head = split_backbone_head(self.model)
        head_ids = {id(param) for param in self.head.parameters()}
        self.optimizer = make_optimizer(config, [
            {"params": [p for p in self.model.parameters() if id(p) not in head_ids],
             "lr_scale": config.backbone_lr_scale},
            {"params": self.head.parameters()}])
        if self.comm.size > 1:                                   # average gradients over the ranks
            self.optimizer = mc.distributed.DataParallelOptimizer(self.optimizer, self.comm)
        self.feature_cache = None   # (train features, val features) while a frozen backbone allows it
        self.criterion = mc.SoftmaxCrossEntropy(class_weights(config.class_weights, self.train_labels))
        self.augment = parse_augment(config.augment)
        self.loader = DataLoader(self.train_images, self.train_labels, config.batch_size // self.comm.size,
                                 shuffle=True, shard=(self.comm.rank, self.comm.size),
                                 drop_last=len(self.train_images) > config.batch_size, seed=config.seed,
                                 augment=self.augment, device=config.device, normalize=(self.mean, self.std))
        self.history: list[dict] = []
        self.start_epoch = 0
        self.best_key = None
        self.stale_epochs = 0

    # -- checkpoints ---------------------------------------------------------------
    def metadata(self, epoch: int, threshold: float = 0.5, metrics=None) -> dict:
        return {
            "model_config": self.model_config.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "normalization": {"mean": self.mean, "std": self.std},
            "threshold": threshold,
            "train_config": asdict(self.config),
            "augment": str(self.augment),
            "epoch": epoch,
            "history": self.history,
            "best_key": self.best_key,
            "stale_epochs": self.stale_epochs,
            "metrics": metrics or {},
            "rng_states": [rng.bit_generator.state for rng in dropout_rngs(self.model)],
        }

    def resume(self) -> None:
        last = self.run_dir / "last.npz"
        model_arrays, optimizer_arrays, meta = read_checkpoint(last)
        if meta["model_config"] != json.loads(json.dumps(self.model_config.to_dict())):
            raise CovidCTError(f"{last}: saved with a different model config; resume with the run's own options")
        self.model.load_state_dict(model_arrays)
        self.optimizer.load_state_dict(optimizer_arrays)
        for rng, state in zip(dropout_rngs(self.model), meta["rng_states"]):
            rng.bit_generator.state = state
        self.history, self.best_key = meta["history"], meta["best_key"]
        self.stale_epochs, self.start_epoch = meta["stale_epochs"], meta["epoch"] + 1
        self.log(f"resuming {self.run_dir} after epoch {meta['epoch'] + 1}")

    # -- frozen backbone ------------------------------------------------------------------
    def frozen(self, epoch: int) -> bool:
        """Is the backbone frozen in this epoch (--freeze-backbone until --unfreeze-after)?"""
        return self.config.freeze_backbone and not (self.config.unfreeze_after and epoch >= self.config.unfreeze_after)

    def backbone_features(self, images: np.ndarray):
        """(N, F) features of the images (normalised here), backbone in eval mode, nothing kept for backward."""
        chunks = []
        for start in range(0, len(images), self.config.batch_size):
            batch = normalize(images[start:start + self.config.batch_size], self.mean, self.std)
            chunks.append(self.backbone_features_of_batch(mc.to_device(batch, self.config.device)))
        return mc.get_array_module(chunks[0]).concatenate(chunks)

    def cached_features(self, epoch: int):
        """(train, val) features computed once, when the backbone is frozen and images are not augmented:
        an epoch then costs one pass of the small head. None otherwise."""
        if not self.frozen(epoch) or self.augment:
            self.feature_cache = None
            return None
        if self.feature_cache is None:
            started = time.perf_counter()
            self.feature_cache = (self.backbone_features(self.train_images), self.backbone_features(self.val_images))
            self.log(f"frozen backbone: cached {self.feature_cache[0].shape[1]} features of "
                     f"{len(self.train_images)} + {len(self.val_images)} images "
                     f"in {time.perf_counter() - started:.1f}s")
        return self.feature_cache

    def feature_batches(self, features, epoch: int):
        """The loader's shuffled order and batch sizes, over cached features instead of images."""
        order, size = self.loader.order(epoch), self.loader.batch_size
        labels = mc.to_device(self.train_labels.astype(np.int64), self.config.device)
        xp = mc.get_array_module(features)
        for batch in range(len(self.loader)):
            index = xp.asarray(order[batch * size:(batch + 1) * size])
            yield features[index], labels[index]

    # -- one epoch ---------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        frozen, cache = self.frozen(epoch), self.cached_features(epoch)
        self.model.train()
        self.loader.set_epoch(epoch)
        total_loss, correct, seen = 0.0, 0, 0
        batches = self.loader if cache is None else self.feature_batches(cache[0], epoch)
        if self.config.progress:
            from tqdm import tqdm
            batches = tqdm(batches, desc=f"epoch {epoch + 1}/{self.config.epochs}", leave=False, unit="batch",
                           total=len(self.loader))
        for batch_index, (x, y) in enumerate(batches):
            self.optimizer.zero_grad()
            if cache is not None:                                # x: cached backbone features
                logits = self.head(x)
            elif frozen:
                logits = self.head(self.backbone_features_of_batch(x))
            else:
                logits = self.model(x)
            loss = float(self.criterion(logits, y))
            if not math.isfinite(loss):
                raise CovidCTError(
                    f"training diverged at epoch {epoch + 1}, batch {batch_index + 1}: loss is {loss}; "
                    f"the last good checkpoint is {self.run_dir / 'last.npz'}; try a lower --lr")
            grad_logits = self.criterion.backward()
            if frozen:
                self.head.backward(grad_logits)                  # only the head learns
            else:
                self.model.backward(grad_logits)
            self.optimizer.step()                                # skips parameters without a gradient
            batch_correct = int((mc.as_numpy(logits).argmax(axis=1) == mc.as_numpy(y)).sum())
            total_loss, correct, seen = total_loss + loss * len(y), correct + batch_correct, seen + len(y)
            if self.config.progress:
                batches.set_postfix(loss=f"{loss:.3f}", acc=f"{batch_correct / len(y):.2f}")
        return {"train_loss": total_loss / seen, "train_accuracy": correct / seen}

    def backbone_features_of_batch(self, x):
        """A frozen backbone on one (normalised, augmented) batch: eval mode, nothing kept for backward."""
        self.backbone.eval()                                     # BatchNorm uses its running statistics
        features = self.backbone(x)
        self.backbone.release_saved()
        return features

    def validate(self, epoch: int) -> tuple[dict, np.ndarray]:
        cache = self.feature_cache if self.frozen(epoch) else None
        if cache is not None:
            self.head.eval()
            scores = softmax(mc.as_numpy(self.head(cache[1])).astype(np.float64))[:, 1]
            self.head.release_saved()
        else:
            scores = predict_proba(self.model, self.val_images, self.mean, self.std, device=self.config.device)
        metrics = classification_metrics(self.val_labels, scores, 0.5)
        eps = 1e-7
        p_true = np.where(self.val_labels == 1, scores, 1 - scores)
        val_loss = float(-np.mean(np.log(np.clip(p_true, eps, 1.0))))
        return {"val_loss": val_loss, "val_accuracy": metrics["accuracy"], "val_auc": metrics["auc"],
                "val_sensitivity": metrics["sensitivity"], "val_specificity": metrics["specificity"],
                "val_balanced_accuracy": metrics["balanced_accuracy"]}, scores

    def selection_key(self, row: dict) -> list[float]:
        """Larger is better; ties on the metric are broken by the lower validation loss."""
        value = -row["val_loss"] if self.config.select == "loss" else row[f"val_{self.config.select}"]
        value = -math.inf if value is None or not math.isfinite(value) else value
        return [value, -row["val_loss"]]

    # -- the whole run --------------------------------------------------------------------
    def fit(self) -> dict:
        config = self.config
        if self.is_root:
            write_run_config(self.run_dir, config)
        self.log(f"{len(self.train_images)} training / {len(self.val_images)} validation images at "
                 f"{self.preprocess.size}x{self.preprocess.size}; model '{config.model}' with "
                 f"{count_parameters(self.model):,} parameters; device {config.device}")
        for epoch in range(self.start_epoch, config.epochs):
            if self.stale_epochs >= config.patience:
                self.log(f"early stop: no improvement in {config.patience} epochs")
                break
            self.optimizer.lr = learning_rate(config, epoch)
            started = time.perf_counter()
            row = {"epoch": epoch + 1, "lr": self.optimizer.lr, **self.comm.average_metrics(self.train_epoch(epoch))}
            self.comm.average_buffers(self.model)                # one set of BatchNorm statistics
            val_row, _ = self.validate(epoch)
            val_row = self.comm.broadcast_object(val_row)        # every rank takes rank 0's decisions
            row.update(val_row, seconds=time.perf_counter() - started)
            self.history.append(row)
            key = self.selection_key(row)
            improved = self.best_key is None or key > self.best_key
            if improved:
                self.best_key, self.stale_epochs = key, 0
                if self.is_root:
                    save_checkpoint(self.run_dir / "best.npz", self.model, self.metadata(epoch))
            else:
                self.stale_epochs += 1
            if self.is_root:
                save_checkpoint(self.run_dir / "last.npz", self.model, self.metadata(epoch), self.optimizer)
                self.write_history()
            self.log(f"epoch {epoch + 1:3d}/{config.epochs}  loss {row['train_loss']:.4f}  "
                     f"acc {row['train_accuracy']:.3f} | val loss {row['val_loss']:.4f}  "
                     f"acc {row['val_accuracy']:.3f}  AUC {_fmt(row['val_auc'])}  "
                     f"sens {_fmt(row['val_sensitivity'])}  spec {_fmt(row['val_specificity'])}  "
                     f"({row['seconds']:.1f}s){'  *' if improved else ''}")
        return self.finish() if self.is_root else {"run_dir": str(self.run_dir)}

    def finish(self) -> dict:
        """Reload the best epoch, choose its threshold on val, write the evaluation files."""
        from .checkpoint import load_checkpoint

        best_path = self.run_dir / "best.npz"
        model, meta = load_checkpoint(best_path, self.config.device)
        scores = predict_proba(model, self.val_images, self.mean, self.std, device=self.config.device)
        threshold = choose_threshold(self.val_labels, scores, self.config.target_sensitivity)
        metrics = write_evaluation(self.run_dir, self.val_labels, scores, self.val_paths, threshold,
                                   title=f"validation, best epoch {meta['epoch'] + 1}")
        meta.update(threshold=threshold, metrics={"val": metrics["threshold"]})
        save_checkpoint(best_path, model, meta)
        self.log(report_text(self.val_labels, scores, threshold, f"validation split, best epoch {meta['epoch'] + 1}"))
        return {"best_epoch": meta["epoch"] + 1, "threshold": threshold, "val": metrics["threshold"],
                "val_at_0.5": metrics["threshold_0.5"], "run_dir": str(self.run_dir)}

    def write_history(self) -> None:
        import pandas as pd

        from .plots import plot_history

        frame = pd.DataFrame(self.history)
        frame.to_csv(self.run_dir / "history.csv", index=False)
        plot_history(frame[[c for c in frame.columns if c not in ("lr", "seconds")]], self.run_dir / "curves.png")


def train(config: TrainConfig, resume: bool = False, log=print, comm=None) -> dict:
    """Train (or resume) a run; returns the best epoch's validation summary (on rank 0 of ``comm``)."""
    trainer = Trainer(config, log=log, comm=comm)
    if resume:
        trainer.resume()
    return trainer.fit()


def _fmt(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"
