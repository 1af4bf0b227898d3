"""One rank of the data-parallel tests; tests/test_distributed.py starts it as

    mpiexec -n 2 python tests/mpi_worker.py MODE OUT_DIR

and checks the files each rank writes to OUT_DIR. Modes:

  steps   float64: the averaged gradient of two half batches vs the full-batch gradient of one
          process, then K data-parallel SGD steps vs K single-process steps (weights per rank saved)
  uneven  a sharded DataLoader over a dataset size that divides neither the batch nor the ranks:
          every rank must run the same number of all-reduces (else this would never finish)
  die     rank 1 raises while rank 0 waits in an all-reduce: abort_on_error must stop both
  nccl    (GPU) the NCCL communicator: sums, means and broadcasts of CuPy arrays, and the steps
          of `steps` on the GPU; one rank per GPU
"""
import sys
from pathlib import Path

import numpy as np

import minicnn as mc
from covidct.loader import DataLoader
from minicnn.distributed import DataParallelOptimizer, abort_on_error, create_communicator

K_STEPS, BATCH = 3, 8


def small_model(seed: int):
    """conv 1->3 -> ReLU -> max-pool -> flatten -> linear(48 -> 2), float64, 8x8 inputs."""
    rng = np.random.default_rng(seed)
    return mc.Sequential(mc.Conv2d(1, 3, 3, padding=1, rng=rng, dtype=np.float64), mc.ReLU(), mc.MaxPool2d(2),
                         mc.Flatten(), mc.Linear(48, 2, rng=rng, dtype=np.float64))


def batches():
    """K_STEPS global batches (x (8, 1, 8, 8) float64, y (8,)), the same on every rank."""
    rng = np.random.default_rng(7)
    return [(rng.standard_normal((BATCH, 1, 8, 8)), rng.integers(0, 2, BATCH)) for _ in range(K_STEPS)]


def gradients(model, x, y):
    criterion = mc.SoftmaxCrossEntropy()
    model.zero_grad()
    criterion(model(x), y)
    model.backward(criterion.backward())
    return [param.grad for param in model.parameters()]


def single_process_weights(data) -> list:
    """The reference: one process, full batches, the same SGD steps -> the parameters' arrays."""
    reference = small_model(seed=0)
    optimizer = mc.optim.SGD(reference.parameters(), 0.1, momentum=0.9)
    for x, y in data:
        optimizer.zero_grad()
        gradients(reference, x, y)
        optimizer.step()
    return [p.data for p in reference.parameters()]


def steps(comm, out: Path):
    data = batches()
    half = slice(comm.rank * BATCH // comm.size, (comm.rank + 1) * BATCH // comm.size)

    model = small_model(seed=comm.rank)                   # different weights on purpose ...
    comm.broadcast_parameters(model)                       # ... until rank 0's are broadcast
    x, y = data[0]
    averaged = comm.allreduce_mean(gradients(model, x[half], y[half]))
    np.savez(out / f"gradient-rank{comm.rank}.npz", *averaged)

    optimizer = DataParallelOptimizer(mc.optim.SGD(model.parameters(), 0.1, momentum=0.9), comm)
    for x, y in data:
        optimizer.zero_grad()
        gradients(model, x[half], y[half])
        optimizer.step()
    np.savez(out / f"weights-rank{comm.rank}.npz", *[p.data for p in model.parameters()])
    np.savez(out / f"stats-rank{comm.rank}.npz", bytes=comm.stats["allreduce_bytes"],
             calls=comm.stats["allreduce_calls"])

    if comm.rank == 0:                                     # the single-process reference, full batches
        x, y = data[0]
        np.savez(out / "gradient-single.npz", *gradients(small_model(seed=0), x, y))
        np.savez(out / "weights-single.npz", *single_process_weights(data))


def uneven(comm, out: Path):
    n = 11                                                 # 11 = 2 * 5 + 1 images, batch 3 per rank
    images = np.arange(n * 4, dtype=np.float32).reshape(n, 1, 2, 2)
    loader = DataLoader(images, np.arange(n) % 2, batch_size=3, seed=0, shard=(comm.rank, comm.size),
                        prefetch=False)
    seen, batch_sizes = [], []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, y in loader:
            comm.allreduce_sum([x.sum()])                  # a collective per batch, as in training
            seen += [int(v) for v in x[:, 0, 0, 0] // 4]
            batch_sizes.append(len(x))
    total = comm.allreduce_sum([float(len(seen))])[0]
    np.savez(out / f"uneven-rank{comm.rank}.npz", seen=np.array(seen), batch_sizes=np.array(batch_sizes),
             total=total, batches=len(loader))


def die(comm, out: Path):
    if comm.rank == 1:
        raise RuntimeError("rank 1 dies on purpose")
    comm.allreduce_sum([np.ones(3)])                       # would wait forever without the abort
    (out / "rank0-passed-the-allreduce").write_text("should not happen\n")


def nccl(comm, out: Path):
    import cupy

    x = cupy.arange(5, dtype=cupy.float32) + comm.rank
    summed, mean = comm.allreduce_sum([x])[0], comm.allreduce_mean([x.astype(cupy.float64)])[0]
    broadcast = comm.broadcast_arrays([cupy.full(3, comm.rank + 1.0, dtype=cupy.float32)], root=0)[0]
    metrics = comm.average_metrics({"rank": float(comm.rank)})          # host numbers still go over MPI
    assert all(isinstance(a, cupy.ndarray) for a in (summed, mean, broadcast))

    data = batches()
    half = slice(comm.rank * BATCH // comm.size, (comm.rank + 1) * BATCH // comm.size)
    model = small_model(seed=comm.rank).to("gpu")
    comm.broadcast_parameters(model)
    optimizer = DataParallelOptimizer(mc.optim.SGD(model.parameters(), 0.1, momentum=0.9), comm)
    for x_host, y_host in data:
        optimizer.zero_grad()
        gradients(model, cupy.asarray(x_host[half]), cupy.asarray(y_host[half]))
        optimizer.step()
    np.savez(out / f"nccl-rank{comm.rank}.npz", summed=cupy.asnumpy(summed), mean=cupy.asnumpy(mean),
             broadcast=cupy.asnumpy(broadcast), metric=metrics["rank"], size=comm.size,
             *[cupy.asnumpy(p.data) for p in model.parameters()])
    if comm.rank == 0:                                     # the CPU single-process reference
        np.savez(out / "nccl-single.npz", *single_process_weights(data))


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    comm = create_communicator("nccl" if mode == "nccl" else "mpi")
    abort_on_error(comm)
    {"steps": steps, "uneven": uneven, "die": die, "nccl": nccl}[mode](comm, out)
