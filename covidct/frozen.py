"""Which part of a classifier learns in an epoch, and what it is fed: one small strategy per case.

    WholeModel       every layer learns; batches of (augmented, normalised) images
    LungAttention    the same, with a penalty on attention outside the lungs (covidct.attention,
                     --lung-attention)
    FrozenBackbone   only the head learns; the backbone runs forward in eval mode on every batch
                     (needed when images are augmented: each batch looks different)
    CachedFeatures   only the head learns, images are not augmented: the backbone's features
                     of every image are computed once, and an epoch is one pass of the small head

``strategy_for(trainer, epoch, current)`` picks one (``--freeze-backbone`` until
``--unfreeze-after``); a ``CachedFeatures`` is kept across epochs. Each offers
``batches(epoch)``, ``forward(x)``, ``backward(grad)`` and ``val_scores()``.
"""
from __future__ import annotations

import time

import numpy as np

import minicnn as mc

from .evaluate import predict_proba, softmax
from .preprocess import normalize


class WholeModel:
    """Every layer learns: the loader's batches through model forward and backward."""

    def __init__(self, trainer):
        self.trainer = trainer

    def batches(self, epoch: int):
        self.trainer.loader.set_epoch(epoch)
        return self.trainer.loader

    def forward(self, x):
        return self.trainer.model(x)

    def backward(self, grad_logits) -> None:
        self.trainer.model.backward(grad_logits)

    def val_scores(self) -> np.ndarray:
        """P(COVID) (N,) for the validation images, whole model in eval mode."""
        t = self.trainer
        return predict_proba(t.model, t.data.val_images, t.mean, t.std, device=t.config.device)


class FrozenBackbone(WholeModel):
    """Only the head learns; the backbone sees each (augmented) batch in eval mode, keeping nothing."""

    def forward(self, x):
        return self.trainer.head(self.features_of_batch(x))

    def backward(self, grad_logits) -> None:
        self.trainer.head.backward(grad_logits)               # the backbone gets no gradient

    def features_of_batch(self, x):
        """(B, C, H, W) normalised images -> (B, F) backbone features (BatchNorm uses running statistics)."""
        backbone = self.trainer.backbone
        backbone.eval()
        with mc.no_grad():                                     # nothing kept for a backward
            return backbone(x)


class CachedFeatures(FrozenBackbone):
    """Frozen backbone, no augmentation: (N, F) features of the train and val images, computed once."""

    def __init__(self, trainer):
        super().__init__(trainer)
        data, started = trainer.data, time.perf_counter()
        self.train_features = self.features(data.train_images)
        self.val_features = self.features(data.val_images)
        trainer.log(f"frozen backbone: cached {self.train_features.shape[1]} features of "
                    f"{len(data.train_images)} + {len(data.val_images)} images in {time.perf_counter() - started:.1f}s")

    def features(self, images: np.ndarray):
        """(N, 1, H, W) images in [0, 1] -> (N, F) features on the training device, batch by batch."""
        t = self.trainer
        chunks = [self.features_of_batch(mc.to_device(normalize(images[start:start + t.config.batch_size],
                                                                 t.mean, t.std), t.config.device))
                  for start in range(0, len(images), t.config.batch_size)]
        return mc.get_array_module(chunks[0]).concatenate(chunks)

    def batches(self, epoch: int):
        """The loader's shuffled order and batch sizes (same seed), over the cached features."""
        t = self.trainer
        order = t.loader.order(epoch)
        labels = mc.to_device(t.data.train_labels.astype(np.int64), t.config.device)
        xp = mc.get_array_module(self.train_features)
        for batch in range(len(t.loader)):
            index = xp.asarray(order[batch * t.loader.batch_size:(batch + 1) * t.loader.batch_size])
            yield self.train_features[index], labels[index]

    def forward(self, x):
        return self.trainer.head(x)

    def val_scores(self) -> np.ndarray:
        head = self.trainer.head
        head.eval()
        with mc.no_grad():
            return softmax(mc.as_numpy(head(self.val_features)).astype(np.float64))[:, 1]


def strategy_for(trainer, epoch: int, current=None):
    """The strategy for ``epoch``: reuse ``current`` when it still applies (its cached features)."""
    config = trainer.config
    frozen = config.freeze_backbone and not (config.unfreeze_after and epoch >= config.unfreeze_after)
    if not frozen:
        from .attention import LungAttention

        kind = LungAttention if config.attention_strength else WholeModel
    elif trainer.augment or not trainer.cache_features:
        kind = FrozenBackbone
    else:
        kind = CachedFeatures
    return current if type(current) is kind else kind(trainer)
