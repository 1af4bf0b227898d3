"""Loss functions."""
from __future__ import annotations

from .backend import as_numpy, get_array_module
from .module import Module


class SoftmaxCrossEntropy(Module):
    """Mean cross-entropy of softmax(logits) against integer labels.

    forward(logits (N, K), labels int (N,)) -> scalar (0-d array on logits' device)

        log p[n, k] = z[n, k] - logsumexp_j z[n, j]          (z shifted by its row max: stable)
        loss = sum_n w[y_n] * (-log p[n, y_n]) / sum_n w[y_n]

    ``weight`` (K,) weights the classes like torch.nn.CrossEntropyLoss(weight=...);
    without it every w is 1 and the loss is the plain mean.
    """

    def __init__(self, weight=None):
        self.weight = None if weight is None else [float(w) for w in as_numpy(weight).ravel()]

    def extra_repr(self):
        return "" if self.weight is None else f"weight={self.weight}"

    def forward(self, logits, labels):
        xp = get_array_module(logits)
        check_labels(logits, labels, self.weight)
        num_classes = logits.shape[1]
        one_hot = labels[:, None] == xp.arange(num_classes)                     # (N, K) bool

        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))  # (N, K)
        nll = -(log_probs * one_hot).sum(axis=1)                                # (N,)

        if self.weight is None:
            sample_weight = xp.full(nll.shape, 1.0 / nll.shape[0], dtype=logits.dtype)
        else:
            class_weight = xp.asarray(self.weight, dtype=logits.dtype)
            sample_weight = (one_hot * class_weight).sum(axis=1)                # w[y_n]
            sample_weight = sample_weight / sample_weight.sum()
        self.save_for_backward(xp.exp(log_probs), one_hot, sample_weight)
        return xp.asarray((sample_weight * nll).sum())  # 0-d array, as CuPy gives

    # Backward: d(-log p[n, y_n]) / dz[n, k] = p[n, k] - [k == y_n], so with the
    # normalised sample weights a_n = w[y_n] / sum_m w[y_m]:
    #   dL/dz[n, k] = a_n * (p[n, k] - onehot[n, k])
    def backward(self, grad_output=1.0):
        probs, one_hot, sample_weight = self.saved_for_backward()
        return (probs - one_hot) * (sample_weight[:, None] * grad_output)


def check_labels(logits, labels, weight) -> None:
    if getattr(logits, "ndim", None) != 2:
        raise ValueError(f"SoftmaxCrossEntropy: logits must have shape (N, K), got {getattr(logits, 'shape', type(logits))}")
    n, k = logits.shape
    if getattr(labels, "shape", None) != (n,):
        raise ValueError(f"SoftmaxCrossEntropy: labels must have shape ({n},) to match logits {tuple(logits.shape)}, "
                         f"got {getattr(labels, 'shape', type(labels))}")
    if n == 0:
        raise ValueError("SoftmaxCrossEntropy: empty batch (N = 0)")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"SoftmaxCrossEntropy: labels must be integers, got dtype {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= k:
        raise ValueError(f"SoftmaxCrossEntropy: labels must be in [0, {k - 1}], got values in [{low}, {high}]")
    if weight is not None and len(weight) != k:
        raise ValueError(f"SoftmaxCrossEntropy: weight has {len(weight)} entries for {k} classes")
