"""Loss functions: SoftmaxCrossEntropy (classification), NTXentLoss (contrastive pretraining)."""
from __future__ import annotations

from .backend import as_numpy, get_array_module, is_gpu_array
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
        if is_gpu_array(labels):   # range not checked on the host (that waits for the GPU every step):
            nll = xp.where((labels >= 0) & (labels < num_classes), nll, xp.nan)  # a bad label -> NaN loss

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
    if not is_gpu_array(labels):       # on the GPU, forward makes a bad label's loss NaN instead
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= k:
            raise ValueError(f"SoftmaxCrossEntropy: labels must be in [0, {k - 1}], got values in [{low}, {high}]")
    if weight is not None and len(weight) != k:
        raise ValueError(f"SoftmaxCrossEntropy: weight has {len(weight)} entries for {k} classes")


class NTXentLoss(Module):
    """SimCLR's contrastive loss (normalised temperature-scaled cross-entropy, Chen et al. 2020).

    forward(h (2B, D)) -> scalar: rows i and i + B are embeddings of two augmented views of
    one image (a positive pair); every other row is a negative for both.

        z_i  = h_i / |h_i|                                   (unit length)
        s_ij = z_i . z_j / temperature                       (cosine similarity, scaled)
        loss = mean_i [ -s_{i,p(i)} + log sum_{j != i} exp s_ij ],   p(i) = (i + B) mod 2B

    i.e. a (2B - 1)-way softmax cross-entropy per row whose right answer is the other view.
    """

    def __init__(self, temperature: float = 0.2):
        if not temperature > 0:
            raise ValueError(f"NTXentLoss: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def extra_repr(self):
        return f"temperature={self.temperature}"

    def forward(self, h):
        xp = get_array_module(h)
        if getattr(h, "ndim", None) != 2 or h.shape[0] < 2 or h.shape[0] % 2:
            raise ValueError(f"NTXentLoss: expected embeddings of shape (2B, D) with B >= 1 (two views per "
                             f"image), got shape {getattr(h, 'shape', type(h))}")
        n = h.shape[0]
        rows = xp.arange(n)
        norm = xp.sqrt((h * h).sum(axis=1, keepdims=True)) + 1e-12                # (2B, 1)
        z = h / norm                                                                # (2B, D)
        sim = (z @ z.T) / self.temperature                                          # (2B, 2B)
        sim[rows, rows] = -xp.inf                                                   # a row is not its own negative
        shifted = sim - sim.max(axis=1, keepdims=True)
        log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))    # (2B, 2B), row softmax
        positive = (rows + n // 2) % n
        self.save_for_backward(z, norm, xp.exp(log_probs), positive)
        return xp.asarray(-log_probs[rows, positive].mean())

    # Backward, with G = dL/ds (the cross-entropy gradient of each row, divided by 2B):
    #   G_ij   = (softmax_ij - [j == p(i)]) / 2B
    #   dL/dz  = (G + G^T) z / temperature         (s is symmetric in z_i and z_j)
    #   dL/dh_i = (dz_i - z_i (z_i . dz_i)) / |h_i|  (the normalisation's Jacobian: drop the radial part)
    def backward(self, grad_output=1.0):
        z, norm, probs, positive = self.saved_for_backward()
        xp = get_array_module(z)
        n = z.shape[0]
        grad_sim = probs.copy()
        grad_sim[xp.arange(n), positive] -= 1
        grad_sim *= grad_output / n
        grad_z = (grad_sim + grad_sim.T) @ z / self.temperature
        return ((grad_z - z * (z * grad_z).sum(axis=1, keepdims=True)) / norm).astype(z.dtype, copy=False)
