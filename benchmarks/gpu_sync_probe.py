"""Does a minicnn-CuPy training step ever wait for the GPU?

    python benchmarks/gpu_sync_probe.py [--models default,lenet] [--batch 65] [--spin-ms 300]

A step that waits for the device (a device-to-host copy such as ``float(loss)``, an
``.item()``, a ``synchronize``, a ``cudaFree``) cannot be queued behind work that is
still running. So: occupy the GPU with one kernel that spins for ``--spin-ms``, then call
one training step (forward, loss, backward, SGD update) and time how long the *host*
takes to return from it. If it returns long before the GPU is done, nothing in the step
waited for the GPU; if it returns only after the spin, something did. (A CUDA-graph
capture would say the same, but CuPy refuses cuBLAS calls during a capture.) It also
prints the step's GPU time, from CUDA events, after a warm-up. Set MINICNN_CUDA_KERNELS
to probe the fused kernels or the readable path. Needs a GPU and CuPy.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_train_step  # noqa: E402

SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""


def probe(name: str, batch: int, spin_ms: float, steps: int = 20) -> str:
    import cupy
    spin = cupy.RawKernel(SPIN, "spin")
    _, _, train_step = bench_train_step.training_step(name, batch)
    for _ in range(3):                                   # warm-up: kernels compiled, memory pool filled
        train_step()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(steps):
        train_step()
    end.record()
    end.synchronize()
    step_ms = cupy.cuda.get_elapsed_time(start, end) / steps

    # Calibrate the spin: cycles per millisecond on this GPU, from one spin timed with events.
    cycles = 10_000_000
    start.record(); spin((1,), (1,), (cycles,)); end.record(); end.synchronize()
    cycles = int(cycles * spin_ms / cupy.cuda.get_elapsed_time(start, end))

    start.record()
    spin((1,), (1,), (cycles,))
    host_start = time.perf_counter()
    train_step()
    host_ms = (time.perf_counter() - host_start) * 1e3
    end.record()
    end.synchronize()
    busy_ms = cupy.cuda.get_elapsed_time(start, end)
    verdict = "never waits for the GPU" if host_ms < 0.5 * busy_ms else "WAITS for the GPU somewhere"
    return (f"{name} b{batch}: step {step_ms:.2f} ms on the GPU; queued behind a {spin_ms:.0f} ms spin, the host "
            f"returned after {host_ms:.1f} ms (GPU done after {busy_ms:.0f} ms): {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default,lenet")
    parser.add_argument("--batch", type=int, default=65)
    parser.add_argument("--spin-ms", type=float, default=300.0)
    args = parser.parse_args()
    print(f"MINICNN_CUDA_KERNELS={os.environ.get('MINICNN_CUDA_KERNELS', '(unset)')}")
    for name in args.models.split(","):
        try:
            print(probe(name, args.batch, args.spin_ms), flush=True)
        except Exception as error:
            print(f"{name} b{args.batch}: probe failed: {type(error).__name__}: {error}", flush=True)


if __name__ == "__main__":
    main()
