"""Mini-batches for training and evaluation.

    loader = DataLoader(images, labels, batch_size=32, seed=0, augment=parse_augment("flip,rotate:15"),
                        normalize=(mean, std), device="cpu")
    for epoch in range(start, epochs):
        loader.set_epoch(epoch)                # epoch e's order and augmentation depend only on (seed, e)
        for x, y in loader:                    # x float32 (B, 1, H, W), y int64 (B,)
            ...

Randomness: the shuffle order of epoch e comes from default_rng([seed, e, 0]) (with
``weights``: N draws with replacement, sample i with probability weights[i] / sum); the
augmentation of batch b of epoch e from default_rng([seed, e, 1, b]). A resumed
run therefore sees exactly the batches an uninterrupted run would, and a
background prefetch thread gives the same batches as no thread.

Pass `augment` for the training loader only; evaluation loaders use shuffle=False.

Data-parallel training (covidct train --distributed): ``shard=(rank, size)`` gives rank r the
samples order[r::size] of the shared epoch order, cut to n // size so every rank runs the same
number of batches; with batch_size = global batch / size, step b of all ranks together covers
exactly the single-process batch b. Augmentation draws from default_rng([seed, e, 1, b, rank]).
"""
from __future__ import annotations

import queue
import threading

import numpy as np

from covidct.errors import DataError
from minicnn.backend import to_device

__all__ = ["DataLoader"]

_DONE = object()


class DataLoader:
    """Iterate (x (B, 1, H, W) float32, y (B,) int64) batches over in-memory images.

    images:     float32 (N, C, H, W) host array, values in [0, 1]
    labels:     (N,) 0/1
    batch_size: images per batch; the last batch is smaller unless drop_last
    shuffle:    new random order every epoch (seeded)
    seed:       int; with the epoch number it fixes order and augmentation
    augment:    callable augment(batch, rng) -> batch (e.g. covidct.augment.parse_augment(...)), or None
    device:     "cpu" or "gpu" (batches moved with minicnn.backend.to_device)
    prefetch:   prepare the next batch in a background thread (same results either way)
    normalize:  (mean, std) applied after augmentation, or None
    shard:      (rank, size): iterate only this rank's share of every epoch (see the module docstring)
    weights:    (N,) >= 0 or None; each epoch draws N samples with replacement in proportion to them
                (e.g. covidct.sources.source_weights) instead of visiting every sample once
    """

    def __init__(self, images, labels, batch_size: int = 32, shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0, augment=None, device: str = "cpu", prefetch: bool = True, normalize=None,
                 shard: tuple[int, int] = (0, 1), weights=None):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim != 4:
            raise DataError(f"DataLoader: images must be (N, C, H, W), got shape {images.shape}")
        if labels.shape != (len(images),):
            raise DataError(f"DataLoader: labels must be ({len(images)},) to match the images, got {labels.shape}")
        if len(images) == 0:
            raise DataError("DataLoader: no images (empty dataset)")
        rank, size = (int(v) for v in shard)
        if not 0 <= rank < size or len(images) < size:
            raise DataError(f"DataLoader: shard={shard!r} of {len(images)} images, expected (rank, size) "
                            f"with 0 <= rank < size <= number of images")
        self.rank, self.size = rank, size
        self.count = len(images) // size                  # samples per shard (all of them when size == 1)
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise DataError(f"DataLoader: batch_size={batch_size!r}, expected a positive integer")
        if drop_last and len(images) // size < batch_size:
            raise DataError(f"DataLoader: drop_last with {len(images) // size} images < batch_size={batch_size} "
                            f"gives no batches")
        if device not in ("cpu", "gpu"):
            raise DataError(f"DataLoader: device={device!r}, expected 'cpu' or 'gpu'")
        if normalize is not None:
            mean, std = (float(v) for v in normalize)
            if not std > 0:
                raise DataError(f"DataLoader: normalize std={std}, expected > 0")
            normalize = (mean, std)
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != (len(images),) or not np.all(np.isfinite(weights)) or weights.min() < 0 \
                    or weights.sum() <= 0:
                raise DataError(f"DataLoader: weights must be ({len(images)},) finite, >= 0 and not all 0")
            weights = weights / weights.sum()
        self.weights = weights
        self.images = images.astype(np.float32, copy=False)
        self.labels = labels.astype(np.int64, copy=False)
        self.batch_size = int(batch_size)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed = int(seed)
        self.augment = augment if augment else None      # Compose([]) counts as none
        self.device, self.prefetch, self.normalize = device, prefetch, normalize
        self.epoch = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        n = self.count
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The next iteration uses epoch `epoch` (then the counter goes on from there)."""
        self.epoch = int(epoch)

    def order(self, epoch: int) -> np.ndarray:
        """Sample indices in the order epoch `epoch` visits them (this rank's share of them)."""
        n = len(self.images)
        rng = np.random.default_rng([self.seed, epoch, 0])
        if self.weights is not None:
            order = rng.choice(n, size=n, replace=True, p=self.weights)
        else:
            order = rng.permutation(n) if self.shuffle else np.arange(n)
        return order[self.rank::self.size][:self.count] if self.size > 1 else order

    def make_batch(self, epoch: int, index: int, order=None):
        """Batch `index` of epoch `epoch` as host arrays (x float32, y int64)."""
        order = self.order(epoch) if order is None else order
        chosen = order[index * self.batch_size:(index + 1) * self.batch_size]
        x = self.images[chosen]                           # fancy indexing copies
        y = self.labels[chosen]
        if self.augment is not None:
            key = [self.seed, epoch, 1, index] + ([self.rank] if self.size > 1 else [])
            x = self.augment(x, np.random.default_rng(key))
        if self.normalize is not None:
            mean, std = self.normalize
            x = (x - np.float32(mean)) / np.float32(std)
        return np.ascontiguousarray(x, dtype=np.float32), y

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        order = self.order(epoch)
        if self.prefetch:
            batches = self._threaded(epoch, order)
        else:
            batches = (self.make_batch(epoch, b, order) for b in range(len(self)))
        for x, y in batches:
            if self.device == "gpu":
                x, y = to_device(x, "gpu"), to_device(y, "gpu")
            yield x, y

    def _threaded(self, epoch: int, order):
        """make_batch(epoch, b) for every b, computed one batch ahead in a background thread."""
        ready: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def work():
            try:
                for b in range(len(self)):
                    if stop.is_set():
                        return
                    item = self.make_batch(epoch, b, order)
                    while not stop.is_set():
                        try:
                            ready.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                ready.put(_DONE)
            except BaseException as error:              # hand the error to the consumer
                ready.put(error)

        thread = threading.Thread(target=work, name="covidct-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:                                        # also on break / exception in the loop body
            stop.set()
            while thread.is_alive():
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass
            thread.join()

    def __repr__(self) -> str:
        augment = str(self.augment) if self.augment is not None else "none"
        return (f"DataLoader({len(self.images)} images, batch_size={self.batch_size}, {len(self)} batches, "
                f"shuffle={self.shuffle}, seed={self.seed}, augment={augment!r}, device={self.device!r})")
