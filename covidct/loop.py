"""The epoch loop every covidct training task shares: checkpoints, resume, history, divergence, early stop.

A task (``covidct.train.Trainer``, ``covidct.pretrain.Pretrainer``) subclasses
``EpochLoop`` and supplies what differs:

    batches(epoch)         -> iterable of (x, y) device batches
    forward(x) / backward(grad)      the part of the network that learns (default: the whole model)
    evaluate(epoch)        -> dict of validation columns for the history
    selection_key(row)     -> list (larger is better: best.npz, early stopping) or None (no selection)
    metadata(epoch)        -> task-specific checkpoint metadata (model config, normalisation, ...)
    epoch_line(row, improved) and finish()

The loop owns the rest, once for every task:

    for epoch in start .. epochs-1:
        lr = learning_rate(config, epoch)
        train columns = mean loss / accuracy over batches (stop on a NaN/inf loss)
        row = epoch, lr, train columns, evaluate(epoch), seconds -> history.csv
        best.npz when selection_key improves; last.npz (weights + optimizer + RNG) every epoch
        early stop after config.patience epochs without improvement

``resume()`` restores last.npz so that the resumed run is bit-identical to an
uninterrupted one (same weights, optimizer state and RNG streams). A larger
``config.epochs`` than the run was started with extends it, and says so: the
learning-rate schedule is then laid out over the new number of epochs. The run
directory is locked (``covidct.runlock``) while the loop writes to it.

Cross-validation folds, ensembles and distributed training build on this loop
(e.g. ``Trainer(config, data=TrainData(...))`` per fold) instead of copying it.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import minicnn as mc

from .checkpoint import checkpoint_task, read_checkpoint, save_checkpoint
from .errors import CovidCTError
from .runlock import RunLock


def learning_rate(config, epoch: int) -> float:
    """Linear warm-up over warmup_epochs, then constant, step (x0.1 every step_epochs) or cosine decay to 1%.

    cosine: lr * (0.01 + 0.99 * (1 + cos(pi * (epoch - warmup) / (epochs - warmup))) / 2)
    """
    if epoch < config.warmup_epochs:
        return config.lr * (epoch + 1) / (config.warmup_epochs + 1)
    if config.schedule == "step":
        return config.lr * 0.1 ** ((epoch - config.warmup_epochs) // config.step_epochs)
    if config.schedule == "cosine":
        span = max(1, config.epochs - config.warmup_epochs)
        progress = (epoch - config.warmup_epochs) / span
        return config.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))
    return config.lr


def run_ended(meta: dict, config) -> str | None:
    """Why a run whose last.npz holds ``meta`` cannot go on under ``config``: "stopped early" (patience
    epochs without improvement), "completed" (all config.epochs done), or None (it can continue)."""
    patience = getattr(config, "patience", None)
    if meta.get("best_key") is not None and patience is not None and meta.get("stale_epochs", 0) >= patience:
        return "stopped early"
    if meta["epoch"] + 1 >= config.epochs:
        return "completed"
    return None


def dropout_rngs(model):
    return [layer.rng for layer in model.modules() if isinstance(layer, mc.Dropout)]


def write_run_config(run_dir: Path, config) -> None:
    """Create the run directory and save the config there (what --resume reads back)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")


class EpochLoop:
    """Epochs of mini-batch training over ``self.model`` with ``self.optimizer`` and ``self.criterion``.

    Subclasses set, before using the loop: config (epochs, seed, progress, lr schedule fields,
    optionally patience), run_dir, log, model, model_config, optimizer, criterion, and the class
    attributes below.
    """
    command = "train"                   # the covidct command, for messages ("covidct train --resume ...")
    task = "covid"                      # checkpoint task (covidct.checkpoint.TASK_*)
    config_key = "train_config"         # metadata key holding the config
    train_columns = ("train_loss", "train_accuracy")
    comm = mc.distributed.SingleProcessCommunicator()   # data-parallel ranks (covidct.distributed); rank 0 writes

    @property
    def is_root(self) -> bool:
        return self.comm.rank == 0

    def init_loop(self) -> None:
        self.history: list[dict] = []
        self.start_epoch = 0
        self.best_key = None
        self.stale_epochs = 0

    # -- what a task supplies -------------------------------------------------------------
    def batches(self, epoch: int):
        raise NotImplementedError

    def batches_per_epoch(self) -> int:
        return len(self.loader)

    def forward(self, x, epoch: int):
        return self.model(x)

    def backward(self, grad_logits, epoch: int) -> None:
        self.model.backward(grad_logits)

    def evaluate(self, epoch: int) -> dict:
        return {}

    def selection_key(self, row: dict):
        return None

    def metadata(self, epoch: int) -> dict:
        return {}

    def epoch_line(self, row: dict, improved: bool) -> str:
        return f"epoch {row['epoch']:3d}/{self.config.epochs}"

    def describe(self) -> str:
        return f"{self.command}: {self.run_dir}"

    def finish(self):
        return None

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoint_metadata(self, epoch: int) -> dict:
        return {"task": self.task, self.config_key: asdict(self.config), "epoch": epoch, "history": self.history,
                "best_key": self.best_key, "stale_epochs": self.stale_epochs,
                "rng_states": [rng.bit_generator.state for rng in dropout_rngs(self.model)],
                **self.metadata(epoch)}

    def resume(self) -> None:
        """Continue from run_dir/last.npz (same weights, optimizer state, RNG streams and history)."""
        last = self.run_dir / "last.npz"
        if not last.exists():
            raise CovidCTError(f"--resume {self.run_dir}: no epoch was completed, so nothing was saved yet "
                               f"(no last.npz); start the run again: covidct {self.command} "
                               f"--data {self.config.data} --out {self.run_dir} (and its other options)")
        model_arrays, optimizer_arrays, meta = read_checkpoint(last)
        if checkpoint_task(meta) != self.task:
            raise CovidCTError(f"{last}: a checkpoint of another task ({checkpoint_task(meta)}); "
                               f"resume it with the command that wrote it")
        if meta.get("model_config") != json.loads(json.dumps(self.model_config.to_dict())):
            raise CovidCTError(f"{last}: saved with a different model config; resume with the run's own options")
        self.model.load_state_dict(model_arrays)
        self.optimizer.load_state_dict(optimizer_arrays)
        for rng, state in zip(dropout_rngs(self.model), meta["rng_states"]):
            rng.bit_generator.state = state
        self.history, self.best_key = meta["history"], meta.get("best_key")
        self.stale_epochs, self.start_epoch = meta.get("stale_epochs", 0), meta["epoch"] + 1
        planned = meta.get(self.config_key, {}).get("epochs", self.config.epochs)
        ended = run_ended(meta, self.config)
        if ended == "stopped early":
            raise CovidCTError(f"--resume {self.run_dir}: the run stopped early after epoch {self.start_epoch} "
                               f"({self.config.patience} epochs without improvement); its best epoch is in best.npz")
        if ended == "completed":
            raise CovidCTError(f"--resume {self.run_dir}: the run already completed {self.start_epoch} of "
                               f"{self.config.epochs} epochs; to train longer pass --epochs N with N > "
                               f"{self.start_epoch}")
        self.log(f"resuming {self.run_dir} after epoch {self.start_epoch}")
        if self.config.epochs != planned:
            rest = (f"epoch {self.config.epochs} follows" if self.start_epoch + 1 == self.config.epochs
                    else f"epochs {self.start_epoch + 1}-{self.config.epochs} follow")
            self.log(f"extending the run from {planned} to {self.config.epochs} epochs: {rest} the "
                     f"'{self.config.schedule}' learning-rate schedule laid out over {self.config.epochs} epochs")

    # -- one epoch -------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        """One pass over the batches -> {train loss, train accuracy}; CovidCTError on a NaN/inf loss."""
        self.model.train()
        batches = self.batches(epoch)
        if self.config.progress:
            from tqdm import tqdm
            batches = tqdm(batches, desc=f"{self.command} {epoch + 1}/{self.config.epochs}", leave=False,
                           unit="batch", total=self.batches_per_epoch())
        total_loss, correct, seen = 0.0, 0, 0
        for batch_index, (x, y) in enumerate(batches):
            self.optimizer.zero_grad()
            logits = self.forward(x, epoch)
            loss = float(self.criterion(logits, y))
            if not math.isfinite(loss):
                raise CovidCTError(
                    f"{self.command}ing diverged at epoch {epoch + 1}, batch {batch_index + 1}: loss is {loss}; "
                    f"the last good checkpoint is {self.run_dir / 'last.npz'}; try a lower --lr")
            self.backward(self.criterion.backward(), epoch)
            self.optimizer.step()                                # skips parameters without a gradient
            batch_correct = int((mc.as_numpy(logits).argmax(axis=1) == mc.as_numpy(y)).sum())
            total_loss, correct, seen = total_loss + loss * len(y), correct + batch_correct, seen + len(y)
            if self.config.progress:
                batches.set_postfix(loss=f"{loss:.3f}", acc=f"{batch_correct / len(y):.2f}")
        loss_column, accuracy_column = self.train_columns
        return {loss_column: total_loss / seen, accuracy_column: correct / seen}

    # -- the whole run -----------------------------------------------------------------------
    def fit(self):
        config = self.config
        # BLAS on one thread: the same weights on any machine and with any --jobs (minicnn.fast)
        with RunLock(self.run_dir, self.log) if self.is_root else contextlib.nullcontext(), \
                mc.fast.one_blas_thread():
            if self.is_root:
                write_run_config(self.run_dir, config)
            self.log(self.describe())
            patience = getattr(config, "patience", None)
            for epoch in range(self.start_epoch, config.epochs):
                if patience is not None and self.stale_epochs >= patience:
                    self.log(f"early stop: no improvement in {patience} epochs")
                    break
                self.optimizer.lr = learning_rate(config, epoch)
                started = time.perf_counter()
                row = {"epoch": epoch + 1, "lr": self.optimizer.lr, **self.comm.average_metrics(self.train_epoch(epoch))}
                self.comm.average_buffers(self.model)            # one set of BatchNorm statistics
                evaluation = self.comm.broadcast_object(self.evaluate(epoch))   # every rank decides as rank 0
                row.update(evaluation, seconds=time.perf_counter() - started)
                self.history.append(row)
                key = self.selection_key(row)
                improved = key is not None and (self.best_key is None or key > self.best_key)
                if improved:
                    self.best_key, self.stale_epochs = key, 0
                    if self.is_root:
                        save_checkpoint(self.run_dir / "best.npz", self.model, self.checkpoint_metadata(epoch))
                elif key is not None:
                    self.stale_epochs += 1
                if self.is_root:
                    save_checkpoint(self.run_dir / "last.npz", self.model, self.checkpoint_metadata(epoch),
                                    self.optimizer)
                    self.write_history()
                self.log(self.epoch_line(row, improved))
            return self.finish() if self.is_root else {"run_dir": str(self.run_dir)}

    def write_history(self) -> None:
        import pandas as pd

        pd.DataFrame(self.history).to_csv(self.run_dir / "history.csv", index=False)
