"""Data-parallel training across processes and GPUs, the ChainerMN way: MPI (mpi4py) and NCCL (CuPy).

Every rank holds a full copy of the model and sees its own shard of each global
batch. After backward, the ranks average their gradients, so each one takes the
same optimizer step that a single process would take on the whole batch:

    global batch of B images, R ranks, shard r of B / R images, L = mean loss over the batch:
        dL/dw = (1/B) sum_n dl_n/dw = (1/R) sum_r [ (R/B) sum_{n in shard r} dl_n/dw ]
              = mean over ranks of each rank's own mean-loss gradient

Usage (under ``mpiexec -n 4 python train.py``):

    comm = create_communicator("mpi")                  # or "nccl" for one GPU per rank, "single" for none
    optimizer = DataParallelOptimizer(mc.optim.Adam(model.parameters(), 1e-3), comm)
    for x, y in my_shard_of_each_batch:                # e.g. order[comm.rank::comm.size]
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        model.backward(criterion.backward())
        optimizer.step()                               # broadcast weights (first step), average grads, update

Communicators (all with ``rank``, ``size``, ``broadcast_parameters``, ``allreduce_mean``, ``allreduce_sum``):

* ``SingleProcessCommunicator``: size 1, every collective is the identity; no MPI needed.
* ``MPICommunicator``: mpi4py. All arrays of one call travel in ONE flat buffer (one message per
  step, not one per layer). CuPy arrays are staged through host memory unless the MPI library is
  CUDA-aware (``MPIX_Query_cuda_support`` of Open MPI / MPICH, MVAPICH2's ``MV2_USE_CUDA=1``, or
  ``MINICNN_CUDA_AWARE_MPI=1`` to say so; ``=0`` forces staging).
* ``NCCLCommunicator``: ``cupy.cuda.nccl``, one GPU per rank (device ``rank % device count``); MPI
  only hands the NCCL unique id from rank 0 to the others, then the gradients stay on the GPU.

A rank that fails must not leave the others waiting forever in a collective:
``abort_on_error(comm)`` installs an excepthook that prints the error and calls ``MPI_Abort``,
which makes ``mpiexec`` stop every rank.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from .backend import as_numpy, get_array_module, is_gpu_array

__all__ = ["Communicator", "SingleProcessCommunicator", "MPICommunicator", "NCCLCommunicator",
           "create_communicator", "DataParallelOptimizer", "abort_on_error", "flatten", "unflatten"]


# -- packing many arrays into one buffer ----------------------------------------------------------
def flatten(arrays) -> tuple:
    """arrays of one dtype and device -> (flat (sum of sizes,) buffer, shapes)."""
    xp = get_array_module(*arrays)
    shapes = [tuple(array.shape) for array in arrays]
    flat = xp.concatenate([array.reshape(-1) for array in arrays]) if arrays else xp.empty(0)
    return flat, shapes


def unflatten(flat, shapes) -> list:
    """The inverse of flatten: views of ``flat`` with the given shapes."""
    pieces, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        pieces.append(flat[start:start + size].reshape(shape))
        start += size
    return pieces


def _groups(arrays) -> dict:
    """{(dtype, on gpu): [indices]}: arrays that can share one flat buffer (usually a single group)."""
    groups: dict = {}
    for index, array in enumerate(arrays):
        groups.setdefault((np.dtype(array.dtype).str, is_gpu_array(array)), []).append(index)
    return groups


class Communicator:
    """The collectives data-parallel training needs. Subclasses implement ``_allreduce_flat`` and
    ``_broadcast_flat`` on one 1-D buffer, plus ``broadcast_object`` and ``abort``.

    ``stats`` counts what went over the wire (for benchmarks): calls, bytes and seconds spent in
    allreduce (packing and unpacking included).
    """

    rank: int = 0
    size: int = 1
    name = "single"

    def __init__(self):
        self.stats = {"allreduce_calls": 0, "allreduce_bytes": 0, "allreduce_seconds": 0.0}

    # -- what subclasses provide --------------------------------------------------------------
    def _allreduce_flat(self, flat):
        """-> the element-wise sum of ``flat`` over all ranks (a new array, same device and dtype)."""
        return flat

    def _broadcast_flat(self, flat, root: int):
        """-> root's ``flat`` on every rank."""
        return flat

    def broadcast_object(self, obj, root: int = 0):
        """Any picklable Python object (a dict of metrics) from ``root`` to every rank."""
        return obj

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        """Stop every rank now (after an error on this one)."""
        sys.exit(code)

    # -- the public collectives -------------------------------------------------------------------
    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_sum(self, values) -> list:
        """[array or number, ...] -> the same list summed over ranks (arrays keep dtype and device,
        numbers come back as floats). Arrays of one dtype travel in one flat buffer."""
        return self._allreduce(values, scale=None)

    def allreduce_mean(self, values) -> list:
        """[array or number, ...] -> their mean over ranks (gradients: the full-batch gradient)."""
        return self._allreduce(values, scale=1.0 / self.size)

    def _allreduce(self, values, scale) -> list:
        values = list(values)
        if self.size == 1:
            return [value if hasattr(value, "shape") else float(value) for value in values]
        started = time.perf_counter()
        arrays = [value if hasattr(value, "shape") else np.asarray(value, dtype=np.float64) for value in values]  # host-ok
        result = list(arrays)
        for indices in _groups(arrays).values():
            flat, shapes = flatten([arrays[i] for i in indices])
            summed = self._allreduce_flat(flat)
            if scale is not None:
                summed *= summed.dtype.type(scale)          # one pass over the buffer, dtype kept
            self.stats["allreduce_calls"] += 1
            self.stats["allreduce_bytes"] += flat.nbytes
            for i, piece in zip(indices, unflatten(summed, shapes)):
                result[i] = piece
        self.stats["allreduce_seconds"] += time.perf_counter() - started   # GPU: host time (no sync)
        return [r if hasattr(v, "shape") else float(r) for r, v in zip(result, values)]

    def average_metrics(self, metrics: dict) -> dict:
        """{name: number} -> {name: mean over ranks}: exact for per-rank means over equal-sized shards."""
        return dict(zip(metrics, self.allreduce_mean(list(metrics.values()))))

    def broadcast_arrays(self, arrays, root: int = 0) -> list:
        """root's arrays on every rank (new arrays; the inputs are not changed)."""
        arrays = list(arrays)
        if self.size == 1:
            return arrays
        result = list(arrays)
        for indices in _groups(arrays).values():
            flat, shapes = flatten([arrays[i] for i in indices])
            for i, piece in zip(indices, unflatten(self._broadcast_flat(flat, root), shapes)):
                result[i] = piece
        return result

    def broadcast_parameters(self, model, root: int = 0) -> None:
        """Make every rank's weights and buffers (BatchNorm statistics) equal to ``root``'s."""
        names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
        values = self.broadcast_arrays(list(model.state_dict().values()), root)
        _assign(model, dict(zip(names, values)))

    def average_buffers(self, model) -> None:
        """Replace each floating-point buffer (BatchNorm running mean/var) by its mean over ranks.

        Training normalises with per-rank batch statistics; averaging the running estimates before
        validation and checkpoints gives every rank the same model (and a better estimate)."""
        named = [(name, value) for name, value in model.named_buffers()
                 if np.dtype(value.dtype).kind == "f"]
        if self.size > 1 and named:
            _assign(model, dict(zip([n for n, _ in named], self.allreduce_mean([v for _, v in named]))))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


def _assign(model, arrays: dict) -> None:
    """Set parameter data / buffers by name without touching the gradients."""
    params = dict(model.named_parameters())
    for name, value in arrays.items():
        if name in params:
            params[name].data = value.copy() if value.base is not None else value
        else:
            owner, _, attr = name.rpartition(".")
            module = model._submodule(owner)
            setattr(module, attr, value.copy() if value.base is not None else value)


class SingleProcessCommunicator(Communicator):
    """rank 0 of 1: every collective is the identity. Lets the same training code run without MPI."""


# -- MPI ------------------------------------------------------------------------------------------------
def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise RuntimeError(f"distributed training needs mpi4py ({error}); install it with "
                           f"pip install -e '.[mpi]' and start the ranks with mpiexec -n N ...") from None
    return MPI


def cuda_aware_mpi(MPI=None) -> bool:
    """Can the MPI library read CuPy (device) buffers directly?

    MINICNN_CUDA_AWARE_MPI=1/0 decides; otherwise the library is asked through the extension
    MPIX_Query_cuda_support (Open MPI, MPICH >= 4) and MVAPICH2 is trusted when MV2_USE_CUDA=1.
    Anything else: no (stage through the host).
    """
    setting = os.environ.get("MINICNN_CUDA_AWARE_MPI")
    if setting in ("0", "1"):
        return setting == "1"
    if os.environ.get("MV2_USE_CUDA") == "1":
        return True
    try:
        import ctypes

        MPI = MPI or _import_mpi()
        query = ctypes.CDLL(MPI.__file__).MPIX_Query_cuda_support   # found in the libmpi mpi4py links
        return bool(query())
    except (AttributeError, OSError):
        return False


class MPICommunicator(Communicator):
    """Collectives over an mpi4py communicator (default COMM_WORLD), one flat buffer per call."""

    name = "mpi"

    def __init__(self, comm=None):
        super().__init__()
        self.MPI = _import_mpi()
        self.comm = comm if comm is not None else self.MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.cuda_aware = cuda_aware_mpi(self.MPI)

    def _to_wire(self, flat):
        """The buffer MPI reads: flat itself on the CPU or with CUDA-aware MPI, else a host copy."""
        if not is_gpu_array(flat):
            return np.ascontiguousarray(flat)
        if self.cuda_aware:
            import cupy

            cupy.cuda.get_current_stream().synchronize()    # MPI must see finished kernels
            return flat
        return as_numpy(flat)

    def _from_wire(self, buffer, like):
        return get_array_module(like).asarray(buffer)

    def _allreduce_flat(self, flat):
        send = self._to_wire(flat)
        received = get_array_module(send).empty_like(send)
        self.comm.Allreduce(send, received, op=self.MPI.SUM)
        return self._from_wire(received, flat)

    def _broadcast_flat(self, flat, root: int):
        buffer = self._to_wire(flat)
        buffer = buffer.copy() if buffer is flat else buffer   # never overwrite the caller's array
        self.comm.Bcast(buffer, root=root)
        return self._from_wire(buffer, flat)

    def broadcast_object(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


# -- NCCL -----------------------------------------------------------------------------------------------
class NCCLCommunicator(MPICommunicator):
    """GPU collectives with NCCL (cupy.cuda.nccl); MPI only starts the ranks and bootstraps NCCL.

    Rank r uses GPU ``r % cupy.cuda.runtime.getDeviceCount()`` (so 8 ranks on a node with 8 GPUs use
    one each). Rank 0 creates the NCCL unique id and broadcasts it over MPI; every rank then builds
    ``NcclCommunicator(size, uid, rank)``. Reductions run on the current CuPy stream. Host (NumPy)
    arrays, such as metrics, still go over MPI.
    """

    name = "nccl"

    def __init__(self, comm=None):
        super().__init__(comm)
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError as error:
            raise RuntimeError(f"NCCL training needs CuPy with NCCL ({error}); pip install -e '.[gpu]'") from None
        if not getattr(nccl, "available", True):
            raise RuntimeError("CuPy was built without NCCL; install a cupy-cuda12x wheel with NCCL support")
        self.cupy, self.nccl = cupy, nccl
        self.device = self.rank % cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(self.device).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self.nccl_types = {np.dtype(np.float16).str: nccl.NCCL_FLOAT16,
                           np.dtype(np.float32).str: nccl.NCCL_FLOAT32,
                           np.dtype(np.float64).str: nccl.NCCL_FLOAT64}

    def _nccl_type(self, flat):
        try:
            return self.nccl_types[np.dtype(flat.dtype).str]
        except KeyError:
            raise TypeError(f"NCCLCommunicator: no NCCL type for dtype {flat.dtype}; "
                            f"expected float16, float32 or float64") from None

    def _allreduce_flat(self, flat):
        if not is_gpu_array(flat):
            return super()._allreduce_flat(flat)
        received = self.cupy.empty_like(flat)
        stream = self.cupy.cuda.get_current_stream()
        self.nccl_comm.allReduce(flat.data.ptr, received.data.ptr, flat.size, self._nccl_type(flat),
                                 self.nccl.NCCL_SUM, stream.ptr)
        return received

    def _broadcast_flat(self, flat, root: int):
        if not is_gpu_array(flat):
            return super()._broadcast_flat(flat, root)
        buffer = flat.copy()
        stream = self.cupy.cuda.get_current_stream()
        self.nccl_comm.bcast(buffer.data.ptr, buffer.size, self._nccl_type(buffer), root, stream.ptr)
        return buffer

    def abort(self, code: int = 1) -> None:
        try:
            self.nccl_comm.abort()
        finally:
            super().abort(code)


def create_communicator(kind: str = "mpi", comm=None) -> Communicator:
    """'single' (no MPI), 'mpi' (mpi4py, host or CUDA-aware buffers) or 'nccl' (CuPy + NCCL on GPUs).

    For 'mpi' with GPU training, call ``select_gpu(comm)`` before the model goes to the GPU.
    """
    if kind == "single":
        return SingleProcessCommunicator()
    if kind == "mpi":
        return MPICommunicator(comm)
    if kind == "nccl":
        return NCCLCommunicator(comm)
    raise ValueError(f"unknown communicator {kind!r}; expected 'single', 'mpi' or 'nccl'")


def select_gpu(comm: Communicator) -> int:
    """Use GPU ``rank % device count`` for this rank's CuPy work -> the device id."""
    import cupy

    device = comm.rank % cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(device).use()
    return device


def abort_on_error(comm: Communicator) -> None:
    """An uncaught exception on any rank prints its traceback (tagged with the rank) and stops ALL
    ranks through ``comm.abort``, instead of leaving the others blocked in a collective."""
    if comm.size == 1:
        return
    import traceback

    def hook(kind, value, trace):
        text = "".join(traceback.format_exception(kind, value, trace))
        sys.stderr.write(f"rank {comm.rank} of {comm.size} failed ({kind.__name__}: {value}); "
                         f"stopping all ranks\n{text}")
        sys.stderr.flush()
        comm.abort(1)

    sys.excepthook = hook


# -- the optimizer wrapper -----------------------------------------------------------------------------------
class DataParallelOptimizer:
    """Wrap any minicnn optimizer for data-parallel training.

    ``step()``: on the first call, broadcast rank 0's weights and buffers to every rank; then replace
    each gradient by its mean over ranks (one all-reduce of one flat buffer) and take the wrapped
    optimizer's step. Every rank thus applies the same update to the same weights and the models
    stay identical. Everything else (``lr``, ``zero_grad``, ``state_dict``, ...) is the wrapped
    optimizer's, so checkpoints have the single-process format.

    The first step's gradients were computed with each rank's own starting weights: build the model
    with the same seed on every rank (covidct does), or call ``comm.broadcast_parameters(model)``
    before the first forward pass when they may differ.

    Parameters whose grad is None are skipped (frozen layers); every rank must skip the same ones.
    """

    def __init__(self, optimizer, comm: Communicator):
        self.optimizer, self.comm = optimizer, comm
        self.needs_broadcast = True

    @property
    def lr(self) -> float:
        return self.optimizer.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer.lr = value

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def broadcast_weights(self, root: int = 0) -> None:
        """root's parameter values on every rank, in place of theirs (grads untouched)."""
        params = self.optimizer.params
        for param, value in zip(params, self.comm.broadcast_arrays([p.data for p in params], root)):
            param.data = value.copy() if value.base is not None else value

    def average_gradients(self) -> None:
        with_grad = [param for param in self.optimizer.params if param.grad is not None]
        for param, grad in zip(with_grad, self.comm.allreduce_mean([param.grad for param in with_grad])):
            param.grad = grad

    def step(self) -> None:
        if self.needs_broadcast:
            self.broadcast_weights()
            self.needs_broadcast = False
        self.average_gradients()
        self.optimizer.step()

    def __getattr__(self, name):            # state_dict, load_state_dict, params, step_count, ...
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"DataParallelOptimizer({type(self.optimizer).__name__}, {self.comm!r})"
