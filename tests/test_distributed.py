"""Data-parallel training: communicators, the optimizer wrapper, sharding, and 2-rank runs under mpiexec.

The MPI tests start `mpiexec -n 2 python tests/mpi_worker.py MODE OUT` (or the covidct CLI) as a
subprocess and skip when mpi4py or mpiexec is absent (pip install -e ".[mpi]" brings both).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minicnn as mc
from covidct.checkpoint import read_checkpoint
from covidct.loader import DataLoader
from covidct.synthetic import write_dataset
from covidct.train import Trainer, TrainConfig, train
from minicnn.distributed import DataParallelOptimizer, SingleProcessCommunicator, flatten, unflatten

WORKER = Path(__file__).with_name("mpi_worker.py")
TIMEOUT = 120          # seconds; a deadlock fails the test instead of hanging CI


def mpiexec(*args, timeout=TIMEOUT, ranks=2):
    """Run `mpiexec -n RANKS ...` -> CompletedProcess; skip when MPI is not installed."""
    pytest.importorskip("mpi4py")
    launcher = shutil.which("mpiexec")
    if launcher is None:
        pytest.skip("mpiexec not found (pip install -e '.[mpi]' brings the mpich wheel)")
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([launcher, "-n", str(ranks), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


# -- without MPI ------------------------------------------------------------------------------------------------
def test_flatten_and_unflatten_round_trip():
    arrays = [np.arange(6.0).reshape(2, 3), np.array([7.0]), np.ones((2, 1, 2))]
    flat, shapes = flatten(arrays)
    assert flat.shape == (11,) and shapes == [(2, 3), (1,), (2, 1, 2)]
    for original, piece in zip(arrays, unflatten(flat, shapes)):
        np.testing.assert_array_equal(original, piece)


def test_single_process_communicator_is_the_identity_and_wrapper_matches_the_plain_optimizer():
    comm = SingleProcessCommunicator()
    assert (comm.rank, comm.size) == (0, 1)
    assert comm.allreduce_sum([np.ones(2), 3])[1] == 3.0
    assert comm.average_metrics({"loss": 0.5}) == {"loss": 0.5}

    def run(wrap):
        rng = np.random.default_rng(0)
        model = mc.Linear(3, 2, rng=rng, dtype=np.float64)
        optimizer = mc.optim.Adam(model.parameters(), 0.01)
        optimizer = DataParallelOptimizer(optimizer, comm) if wrap else optimizer
        for _ in range(3):
            optimizer.zero_grad()
            out = model(rng.standard_normal((4, 3)))
            model.backward(np.ones_like(out))
            optimizer.step()
        optimizer.lr = 0.5
        return model, optimizer

    (plain, plain_opt), (wrapped, wrapped_opt) = run(False), run(True)
    np.testing.assert_array_equal(plain.weight.data, wrapped.weight.data)
    assert wrapped_opt.lr == wrapped_opt.optimizer.lr == 0.5 and wrapped_opt.step_count == 3
    assert wrapped_opt.state_dict().keys() == plain_opt.state_dict().keys()


@pytest.mark.parametrize("n, global_batch, size", [(20, 8, 2), (23, 6, 3), (9, 4, 2)])
def test_shards_of_step_b_together_are_the_single_process_batch_b(n, global_batch, size):
    images = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
    labels = np.zeros(n, dtype=np.int64)
    single = DataLoader(images, labels, global_batch, seed=3, drop_last=True, prefetch=False)
    shards = [DataLoader(images, labels, global_batch // size, seed=3, drop_last=True, prefetch=False,
                         shard=(rank, size)) for rank in range(size)]
    assert {len(shard) for shard in shards} == {len(single)}                 # same number of steps
    for epoch in range(2):
        for loader in [single] + shards:
            loader.set_epoch(epoch)
        for (x, _), *parts in zip(single, *shards):
            together = np.concatenate([part[0] for part in parts]).ravel()
            assert sorted(together) == sorted(x.ravel())


def test_a_shard_needs_as_many_images_as_ranks():
    from covidct.errors import DataError

    with pytest.raises(DataError, match=r"shard=\(0, 4\) of 3 images"):
        DataLoader(np.zeros((3, 1, 2, 2), np.float32), np.zeros(3), 1, shard=(0, 4))


def test_trainer_refuses_a_global_batch_that_the_ranks_cannot_share(tmp_path):
    from covidct.errors import CovidCTError

    class TwoRanks(SingleProcessCommunicator):
        size = 2

    config = TrainConfig(data=str(tmp_path), batch_size=7, progress=False, lungs="none")
    with pytest.raises(CovidCTError, match="--batch-size 7 .* multiple of the number of ranks, 2"):
        Trainer(config, comm=TwoRanks())


def test_cuda_aware_mpi_can_be_declared(monkeypatch):
    from minicnn.distributed import cuda_aware_mpi

    monkeypatch.setenv("MINICNN_CUDA_AWARE_MPI", "1")
    assert cuda_aware_mpi() is True
    monkeypatch.setenv("MINICNN_CUDA_AWARE_MPI", "0")
    monkeypatch.setenv("MV2_USE_CUDA", "1")
    assert cuda_aware_mpi() is False                   # the explicit setting wins


# -- two ranks under mpiexec -------------------------------------------------------------------------------------
def test_two_half_batches_give_the_full_batch_gradient_and_identical_weights(tmp_path):
    result = mpiexec(sys.executable, WORKER, "steps", tmp_path)
    assert result.returncode == 0, result.stderr
    single = np.load(tmp_path / "gradient-single.npz")
    for rank in range(2):
        averaged = np.load(tmp_path / f"gradient-rank{rank}.npz")
        for key in single.files:                       # float64: only reduction-order rounding remains
            np.testing.assert_allclose(averaged[key], single[key], rtol=0, atol=1e-12)
    weights = [np.load(tmp_path / f"weights-rank{rank}.npz") for rank in range(2)]
    reference = np.load(tmp_path / "weights-single.npz")
    for key in reference.files:
        np.testing.assert_array_equal(weights[0][key], weights[1][key])          # bit-identical ranks
        np.testing.assert_allclose(weights[0][key], reference[key], rtol=0, atol=1e-12)
    stats = np.load(tmp_path / "stats-rank0.npz")
    parameters = sum(weights[0][key].size for key in reference.files)
    assert int(stats["calls"]) == 1 + 3                 # one flat buffer per step
    assert int(stats["bytes"]) == 4 * parameters * 8


def test_uneven_dataset_sizes_give_every_rank_the_same_steps(tmp_path):
    result = mpiexec(sys.executable, WORKER, "uneven", tmp_path)
    assert result.returncode == 0, result.stderr
    ranks = [np.load(tmp_path / f"uneven-rank{rank}.npz") for rank in range(2)]
    assert int(ranks[0]["batches"]) == int(ranks[1]["batches"]) == 2          # 5 images per rank, batch 3
    np.testing.assert_array_equal(ranks[0]["batch_sizes"], ranks[1]["batch_sizes"])
    for epoch in range(2):                                                      # disjoint shards per epoch
        first, second = (set(r["seen"][epoch * 5:(epoch + 1) * 5].tolist()) for r in ranks)
        assert not first & second and len(first) == len(second) == 5
    assert float(ranks[0]["total"]) == 20.0


def test_a_rank_that_dies_stops_the_others_with_a_clear_error(tmp_path):
    result = mpiexec(sys.executable, WORKER, "die", tmp_path, timeout=60)   # a hang would time out
    assert result.returncode != 0
    assert "rank 1 of 2 failed (RuntimeError: rank 1 dies on purpose); stopping all ranks" in result.stderr
    assert not (tmp_path / "rank0-passed-the-allreduce").exists()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    return write_dataset(root / "data", n=40, seed=1, size=32), root / "cache"


def run_options(data, cache, epochs=2):
    """A small model without dropout (dropout masks depend on the batch split) and no augmentation."""
    return dict(data=str(data), model="default", image_size=32, epochs=epochs, batch_size=8,
                augment="none", class_weights="none", cache_dir=str(cache), progress=False, lungs="none")


def test_two_rank_cli_run_matches_one_process_and_resumes(phantom, tmp_path):
    """One process trains 2 epochs; two ranks train epoch 1, stop, and --resume epoch 2."""
    data, cache = phantom
    train(TrainConfig(out=str(tmp_path / "single"), **run_options(data, cache)), log=lambda *a: None)

    options = ["--data", data, "--model", "default", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
               "--lungs", "none",
               "--augment", "none", "--class-weights", "none", "--cache-dir", cache, "--no-progress"]
    result = mpiexec(sys.executable, "-m", "covidct", "train", "--distributed", *options, "--out", tmp_path / "two")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("epoch   1/1") == 1 and "data-parallel training on 2 ranks" in result.stdout
    assert set(os.listdir(tmp_path / "two")) == set(os.listdir(tmp_path / "single"))   # rank 0 wrote them all

    result = mpiexec(sys.executable, "-m", "covidct", "train", "--distributed", "--resume", tmp_path / "two",
                     "--epochs", "2", "--no-progress")                          # extend the run by one epoch
    assert result.returncode == 0, result.stderr
    assert "after epoch 1" in result.stdout and result.stdout.count("epoch   2/2") == 1

    single, single_opt, single_meta = read_checkpoint(tmp_path / "single" / "last.npz")
    two, two_opt, two_meta = read_checkpoint(tmp_path / "two" / "last.npz")
    assert two.keys() == single.keys() and two_opt.keys() == single_opt.keys()   # the same format
    assert two_meta.keys() == single_meta.keys() and len(two_meta["history"]) == 2
    assert two_meta["epoch"] == 1 and int(two_opt["step"]) == int(single_opt["step"])
    for key in single:                  # float32: the two runs differ only in summation order
        np.testing.assert_allclose(two[key], single[key], rtol=1e-4, atol=1e-6)
    for key in single_opt:              # Adam's moments too
        np.testing.assert_allclose(two_opt[key], single_opt[key], rtol=1e-4, atol=1e-6)


def test_two_ranks_train_the_default_views_like_one_process(phantom, tmp_path):
    """The default recipe's two views (whole slice window-calibrated, lung crop) of one preset, each model
    data-parallel over both ranks."""
    data, cache = phantom
    options = dict(run_options(data, cache, epochs=1), lungs="none-window,crop")
    train(TrainConfig(out=str(tmp_path / "single"), **options), log=lambda *a: None)
    result = mpiexec(sys.executable, "-m", "covidct", "train", "--distributed", "--data", data, "--model", "default",
                     "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--augment", "none",
                     "--class-weights", "none", "--cache-dir", cache, "--no-progress", "--out", tmp_path / "two")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("member 2/2") == 1 and "an ensemble of 2 models" in result.stdout
    assert (tmp_path / "two" / "ensemble.npz").is_file()
    for name in ("member0-none-window", "member0-crop"):
        single, _, _ = read_checkpoint(tmp_path / "single" / name / "best.npz")
        two, _, _ = read_checkpoint(tmp_path / "two" / name / "best.npz")
        for key in single:              # float32: the two runs differ only in summation order
            np.testing.assert_allclose(two[key], single[key], rtol=1e-4, atol=1e-6, err_msg=f"{name} {key}")


def test_a_user_error_on_the_ranks_exits_with_one_line_each(phantom, tmp_path):
    data, cache = phantom
    result = mpiexec(sys.executable, "-m", "covidct", "train", "--distributed", "--data", data, "--model", "tiny",
                     "--batch-size", "7", "--cache-dir", cache, "--no-progress", "--out", tmp_path / "r")
    assert result.returncode != 0
    assert "error: rank 0 of 2: --batch-size 7 (the global batch) must be a multiple of the number of ranks, 2" \
        in result.stderr or "error: rank 1 of 2: --batch-size 7" in result.stderr
    assert "Traceback" not in result.stderr


def test_nccl_communicator_on_the_gpus(gpu, tmp_path):
    """One rank per GPU (NCCL refuses two ranks on one device), at most two."""
    nccl = pytest.importorskip("cupy.cuda.nccl")
    if not getattr(nccl, "available", True):
        pytest.skip("CuPy was built without NCCL")
    ranks = min(2, gpu.cuda.runtime.getDeviceCount())
    result = mpiexec(sys.executable, WORKER, "nccl", tmp_path, ranks=ranks)
    assert result.returncode == 0, result.stderr
    reference = np.load(tmp_path / "nccl-single.npz")
    for rank in range(ranks):
        got = np.load(tmp_path / f"nccl-rank{rank}.npz")
        expected_sum = sum(np.arange(5, dtype=np.float32) + r for r in range(ranks))
        np.testing.assert_array_equal(got["summed"], expected_sum)
        np.testing.assert_allclose(got["mean"], expected_sum / ranks, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(got["broadcast"], np.full(3, 1.0, np.float32))
        assert float(got["metric"]) == (ranks - 1) / 2
        for key in reference.files:                    # float64 on the GPU vs the CPU
            np.testing.assert_allclose(got[key], reference[key], rtol=0, atol=1e-10)


def test_bench_distributed_quick_reports_rows_for_one_and_two_ranks(tmp_path):
    pytest.importorskip("mpi4py")
    if shutil.which("mpiexec") is None:
        pytest.skip("mpiexec not found")
    out = tmp_path / "dp.json"
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_distributed.py"
    result = subprocess.run([sys.executable, bench, "--quick", "--scalings", "strong", "--json", out],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    one, two = json.loads(out.read_text())["rows"]
    assert (one["ranks"], two["ranks"]) == (1, 2) and one["images_per_s"] > 0 and two["images_per_s"] > 0
    assert one["allreduce_bytes_per_step"] == 0                       # one rank: nothing to reduce
    assert two["allreduce_bytes_per_step"] == 4 * one["parameters"]  # float32 gradients, one buffer
