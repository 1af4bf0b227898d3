"""A tour of gradient checks: every minicnn layer's backward against finite differences.

    python examples/gradcheck_tour.py

For each layer, ``minicnn.gradcheck.check_module`` runs the layer in float64
on the CPU, differentiates a random projection of its output by central
differences, and compares that with the hand-written backward, for the input
and every parameter. The inputs are chosen so that finite differences are
valid: all values distinct (max-pool has no ties) and none near zero (ReLU's
kink is never crossed by the +-1e-6 perturbation).

Prints one row per check and exits with status 1 if any check fails.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

try:
    import minicnn
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import minicnn

from minicnn.gradcheck import check_module

RTOL = 1e-6
F64 = np.float64


def distinct_values(shape, seed, low=-2.0, high=2.0):
    """Shuffled, evenly spaced values kept at least ~1e-2 away from each other and from 0."""
    size = math.prod(shape)
    magnitudes = np.linspace(0.1, max(abs(low), abs(high)), size)
    signs = np.where(np.arange(size) % 2 == 0, 1.0, -1.0)
    values = magnitudes * signs
    np.random.default_rng(seed).shuffle(values)
    return values.reshape(shape).astype(F64)


def rng(seed):
    return np.random.default_rng(seed)


def small_net():
    r = rng(10)
    return minicnn.Sequential(
        minicnn.Conv2d(1, 2, 3, padding=1, rng=r, dtype=F64), minicnn.ReLU(), minicnn.MaxPool2d(2),
        minicnn.Conv2d(2, 3, (2, 3), stride=(1, 2), rng=r, dtype=F64), minicnn.ReLU(),
        minicnn.Flatten(),
        minicnn.Linear(3 * 2 * 1, 4, rng=r, dtype=F64), minicnn.ReLU(),
        minicnn.Linear(4, 3, rng=r, dtype=F64))


# (layer name, config, module, input, extra forward args)
CHECKS = [
    ("Conv2d", "k=3 s=1 p=0", minicnn.Conv2d(2, 3, 3, rng=rng(0), dtype=F64), distinct_values((2, 2, 5, 6), 0), ()),
    ("Conv2d", "k=3 s=2 p=1", minicnn.Conv2d(2, 3, 3, stride=2, padding=1, rng=rng(1), dtype=F64),
     distinct_values((2, 2, 7, 6), 1), ()),
    ("Conv2d", "k=(2,3) s=(1,2) p=(1,0)", minicnn.Conv2d(2, 2, (2, 3), stride=(1, 2), padding=(1, 0), rng=rng(2),
                                                         dtype=F64), distinct_values((1, 2, 4, 7), 2), ()),
    ("Conv2d", "k=1 s=1 p=0", minicnn.Conv2d(3, 2, 1, rng=rng(3), dtype=F64), distinct_values((2, 3, 3, 4), 3), ()),
    ("Conv2d", "k=5 s=3 p=2 no bias", minicnn.Conv2d(1, 2, 5, stride=3, padding=2, bias=False, rng=rng(4), dtype=F64),
     distinct_values((1, 1, 7, 8), 4), ()),
    ("MaxPool2d", "k=2 s=2", minicnn.MaxPool2d(2), distinct_values((2, 2, 6, 5), 5), ()),
    ("MaxPool2d", "k=3 s=1 (overlap)", minicnn.MaxPool2d(3, stride=1), distinct_values((1, 2, 5, 6), 6), ()),
    ("MaxPool2d", "k=3 s=2 p=1 (overlap)", minicnn.MaxPool2d(3, stride=2, padding=1), distinct_values((2, 1, 7, 6), 7),
     ()),
    ("MaxPool2d", "k=(2,3) s=(2,3)", minicnn.MaxPool2d((2, 3)), distinct_values((1, 2, 4, 9), 8), ()),
    ("ReLU", "max(x, 0)", minicnn.ReLU(), distinct_values((2, 3, 4, 4), 9), ()),
    ("Linear", "7 -> 4", minicnn.Linear(7, 4, rng=rng(11), dtype=F64), distinct_values((5, 7), 11), ()),
    ("Linear", "3 -> 2 no bias", minicnn.Linear(3, 2, bias=False, rng=rng(12), dtype=F64), distinct_values((4, 3), 12),
     ()),
    ("Flatten", "(N,C,H,W) -> (N,C*H*W)", minicnn.Flatten(), distinct_values((2, 3, 2, 4), 13), ()),
    ("Dropout", "p=0.4", minicnn.Dropout(0.4, rng=rng(14)), distinct_values((3, 4, 5), 14), ()),
    ("SoftmaxCrossEntropy", "plain", minicnn.SoftmaxCrossEntropy(), distinct_values((6, 4), 15),
     (np.array([0, 3, 1, 2, 3, 0]),)),
    ("SoftmaxCrossEntropy", "class weights", minicnn.SoftmaxCrossEntropy(weight=[0.5, 2.0, 1.0, 3.0]), distinct_values((6, 4), 16),
     (np.array([1, 3, 1, 2, 0, 0]),)),
    ("Sequential", "conv-relu-pool-conv-relu-fc-relu-fc", small_net(), distinct_values((2, 1, 6, 6), 17), ()),
]


def main() -> int:
    start = time.perf_counter()
    name_width = max(len(name) for name, *_ in CHECKS)
    config_width = max(len(config) for _, config, *_ in CHECKS)
    failures = 0
    print(f"gradient checks: float64, central differences (h=1e-6), relative error <= {RTOL:.0e}\n")
    for name, config, module, x, args in CHECKS:
        prefix = f"{name:<{name_width}} | {config:<{config_width}}"
        try:
            errors = check_module(module, x, *args, rtol=RTOL)
        except AssertionError as error:
            failures += 1
            print(f"{prefix} | FAILED: {error}")
            continue
        cells = " | ".join(f"{tensor} {error:.1e}" for tensor, error in errors.items())
        print(f"{prefix} | {cells}")
    elapsed = time.perf_counter() - start
    print(f"\n({elapsed:.1f} s)")
    if failures:
        print(f"{failures} of {len(CHECKS)} checks FAILED (relative error > {RTOL:.0e})")
        return 1
    print(f"all {len(CHECKS)} checks passed (relative error <= {RTOL:.0e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
