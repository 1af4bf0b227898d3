"""``covidct train --distributed``: one process per rank, started by mpiexec; rank 0 writes the run.

    mpiexec -n 2 python -m covidct train --distributed --data ../shared/covid-ct --out runs/dp2
    mpiexec -n 8 python -m covidct train --distributed nccl --device gpu ...   # one GPU per rank

What every rank does is in covidct.train.Trainer (sharded loader, averaged gradients) and
covidct.loop.EpochLoop.fit (metrics reduced over ranks, rank-0-only files); this module starts
the ranks' communicator and makes sure that an error on one rank stops all of them instead of
leaving the rest blocked in an all-reduce. See docs/distributed.md.
"""
from __future__ import annotations

import sys
import traceback

from .errors import CovidCTError

KINDS = ("mpi", "nccl")


def start_communicator(kind: str, device: str | None):
    """The communicator of this rank: 'mpi' (gradients over MPI, GPU arrays staged through the host
    unless MPI is CUDA-aware) or 'nccl' (GPU all-reduce with NCCL, one GPU per rank). ``device``
    (None: not given, as with --resume) only lets 'nccl' refuse an explicit --device cpu early."""
    import minicnn as mc

    if kind not in KINDS:
        raise CovidCTError(f"--distributed {kind!r}: expected one of {KINDS}")
    if kind == "nccl" and device == "cpu":
        raise CovidCTError("--distributed nccl needs --device gpu (NCCL reduces GPU arrays)")
    try:
        comm = mc.distributed.create_communicator(kind)
    except RuntimeError as error:                     # mpi4py or NCCL missing: a sentence, no traceback
        raise CovidCTError(str(error)) from None
    mc.distributed.abort_on_error(comm)               # uncaught errors: stop every rank
    return comm


def use_device(comm, device: str) -> None:
    """Before the model is built: GPU ranks use GPU rank % count (NCCL ranks chose theirs already)."""
    import minicnn as mc

    if comm.name == "nccl" and device != "gpu":
        raise CovidCTError("--distributed nccl needs --device gpu (NCCL reduces GPU arrays)")
    if comm.name == "mpi" and device == "gpu" and mc.gpu_available():
        mc.distributed.select_gpu(comm)


def root_first(comm, make):
    """make() on rank 0, then on the others: files it creates (the synthetic dataset) exist once."""
    if comm.rank == 0:
        result = make()
        comm.barrier()
    else:
        comm.barrier()
        result = make()
    return result


def run_on_ranks(kind: str, device: str, body) -> int:
    """body(comm) -> exit status on this rank. A user error (CovidCTError) or a non-zero status on
    any rank prints one line naming the rank and aborts all ranks (mpiexec then exits non-zero)."""
    comm = start_communicator(kind, device)
    if comm.size == 1:
        print("warning: --distributed with a single rank; start the ranks with mpiexec -n N", file=sys.stderr)
    elif comm.rank == 0:
        print(f"data-parallel training on {comm.size} ranks ({kind})")
    try:
        status = body(comm)
    except CovidCTError as error:
        print(f"error: rank {comm.rank} of {comm.size}: {error}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        status = 130
    except Exception:                                   # a bug: the traceback, then stop everyone
        print(f"rank {comm.rank} of {comm.size} failed:", file=sys.stderr)
        traceback.print_exc()
        status = 1
    if status and comm.size > 1:
        comm.abort(status)
    return status
