"""Several models trained at once, in worker processes (``covidct cv --jobs``, ``covidct train --jobs``).

    check_jobs(jobs, device)                 CovidCTError unless jobs >= 1, and 1 on the GPU
    worker_threads(jobs)                  -> threads each of ``jobs`` workers may use
    limit_threads(threads)                   (in a worker) cap NumPy's BLAS and minicnn at that many
    training_cost(config, n_images)       -> multiply-adds to train one model: start the slowest first

Why processes: a small network's layers are too short for two threads to keep two
cores busy, while two models trained side by side, one core each, take about half the
time (the real-data recipe: 4 min 43 s against 6 min 50 s on 2 cores). Each model's run
is deterministic given its seed, whichever process trains it and on how many threads
(training holds BLAS at one thread: ``minicnn.fast.one_blas_thread``), so the results
equal a serial run's bit for bit. Running the slowest models first keeps a worker from
training the last big model alone while the others sit idle.
"""
from __future__ import annotations

from .errors import CovidCTError


def check_jobs(jobs: int, device: str = "cpu") -> None:
    """A one-line error for a --jobs that cannot work: below 1, or several workers on the GPU (CUDA does
    not survive the fork of a worker process; one process keeps the GPU busy anyway)."""
    if jobs < 1:
        raise CovidCTError(f"--jobs must be >= 1, got {jobs}")
    if jobs > 1 and device != "cpu":
        raise CovidCTError(f"--jobs {jobs} trains models in CPU worker processes; with --device {device} "
                           f"use --jobs 1")


def worker_threads(jobs: int) -> int:
    """Threads per worker (minicnn's pool, and BLAS outside training) when ``jobs`` workers share this
    machine's cores (at least 1)."""
    from minicnn.fast import available_cores

    return max(1, available_cores() // jobs)


def limit_threads(threads: int) -> None:
    """Cap minicnn's and NumPy's BLAS threads in this (worker) process; BLAS was loaded before the
    fork, so it is limited live (threadpoolctl) where that is installed. Training holds BLAS at one
    thread anyway (``minicnn.fast.one_blas_thread``), so a worker's models are a serial run's, bit for bit."""
    from minicnn import fast

    fast.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads)
    except ImportError:
        pass


def training_cost(config, n_images: int) -> int:
    """Multiply-adds to train the model of ``config`` (a TrainConfig) on n_images for its epochs:
    forward + backward ~ 3 forward passes."""
    from .model import build_model, count_multiply_adds
    from .train import model_config_for

    model_config = model_config_for(config)
    one_image = (model_config.in_channels, model_config.input_size, model_config.input_size)
    return 3 * count_multiply_adds(build_model(model_config), one_image) * n_images * config.epochs
