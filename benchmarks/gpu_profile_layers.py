"""Where a minicnn-CuPy training step spends its time, per layer type (a measurement aid, not a benchmark).

    python benchmarks/gpu_profile_layers.py [--model resnet18] [--batch 8] [--steps 5]

First it times whole steps two ways: on the GPU (CUDA events) and on the host (how long the Python
calls take to return, nothing synchronised). Host time close to GPU time means the step is bound
by the host (Python and launch overhead), not by the GPU. Then it synchronises around every
layer's forward and backward and sums the time per layer type (these times include each layer's
launch overhead and are larger than in an unsynchronised step). Needs a GPU and CuPy.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_train_step  # noqa: E402
import minicnn as mc  # noqa: E402


def main() -> None:
    import cupy
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    model, optimizer, step = bench_train_step.training_step(args.model, args.batch)
    for _ in range(3):
        step()
    mc.synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    host = 0.0
    start.record()
    for _ in range(args.steps):
        began = time.perf_counter()
        step()
        host += time.perf_counter() - began
    end.record()
    end.synchronize()
    gpu_ms = cupy.cuda.get_elapsed_time(start, end) / args.steps
    print(f"{args.model} batch {args.batch}: step {gpu_ms:.2f} ms (events), host calls return after "
          f"{host * 1e3 / args.steps:.2f} ms")

    totals, counts = defaultdict(float), defaultdict(int)
    leaves = [m for m in model.modules() if not list(m.children())]

    def timed(kind, function):
        def wrapper(*a, **k):
            mc.synchronize()
            began = time.perf_counter()
            out = function(*a, **k)
            mc.synchronize()
            totals[kind] += time.perf_counter() - began
            counts[kind] += 1
            return out
        return wrapper

    for leaf in leaves:
        name = type(leaf).__name__
        leaf.forward = timed(f"{name} forward", leaf.forward)
        leaf.backward = timed(f"{name} backward", leaf.backward)
    optimizer.step = timed("optimizer step", optimizer.step)
    for _ in range(args.steps):
        step()
    total = sum(totals.values())
    print(f"synchronised per layer: {total * 1e3 / args.steps:.2f} ms per step")
    for kind, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {kind:28s} {seconds * 1e3 / args.steps:8.2f} ms  ({counts[kind] // args.steps} calls per step)")


if __name__ == "__main__":
    main()
