"""The benchmark scripts run in --quick mode and produce sane rows.

No timing assertions: the numbers depend on the machine and its load. This only
checks that every script runs, exits 0, and reports positive times for
minicnn-numpy and (when torch is installed) PyTorch CPU, on identical networks.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minicnn as mc

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_TORCH = importlib.util.find_spec("torch") is not None
TIMEOUT = 240  # a guard against hangs only; both quick runs take well under a minute on 2 cores


def run(script, *args):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), "--quick", *args],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def assert_positive_times(row):
    assert row["median_s"] > 0 and row["min_s"] > 0 and row["max_s"] >= row["min_s"], row
    assert row["images_per_s"] > 0, row


def test_bench_train_step_quick(tmp_path):
    out = tmp_path / "train.json"
    result = run("bench_train_step.py", "--json", str(out))
    report = json.loads(out.read_text())
    assert report["benchmark"] == "train_step" and report["settings"]["quick"]
    assert report["machine"]["numpy"] and report["machine"]["cpu"]
    assert not report["errors"], report["errors"]
    rows = report["rows"]
    expected = {"minicnn-numpy"} | ({"torch-cpu", "torch-cpu-cl"} if HAS_TORCH else set())
    for model in ("default", "lenet"):
        for backend in expected:
            for mode in ("train", "infer"):
                matching = [r for r in rows if (r["model"], r["batch"], r["backend"], r["mode"])
                            == (model, 12, backend, mode)]
                assert len(matching) == 1, f"no {model}/{backend}/{mode} row in {out.read_text()}"
                row = matching[0]
                assert_positive_times(row)
                if row["mem_method"] != "unavailable":
                    assert row["mem_peak_bytes"] > 0 and row["mem_extra_bytes"] >= 0, row
                if backend == "minicnn-numpy":
                    assert not row["over_memory_limit"]
                    if HAS_TORCH:
                        assert row["ratio_torch"] > 0 and row["ratio_torch_cl"] > 0, row
    for model in ("default", "lenet"):   # same weights and batch: the same loss before training
        losses = [r["initial_eval_loss"] for r in rows if r["model"] == model]
        assert max(losses) - min(losses) < 1e-4 * max(1.0, abs(losses[0])), losses
    assert "| minicnn-numpy" in result.stdout and "# minicnn training-step benchmark" in result.stdout



def test_rounds_pool_the_timed_steps_of_every_round():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import bench_train_step
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))

    def case(times, extra, backend="minicnn-numpy"):
        timing = {"times": times, "median": float(np.median(times)), "min": min(times), "max": max(times),
                  "repeats": len(times), "mem_extra_bytes": extra, "mem_peak_bytes": extra + 100}
        return {"model": "default", "batch": 12, "backend": backend, "train": dict(timing), "infer": dict(timing)}

    first = [case([1.0, 2.0, 3.0], 10), case([5.0], 1, "torch-cpu")]
    second = [case([4.0, 5.0, 6.0], 30), {"model": "default", "batch": 12, "backend": "torch-cpu", "error": "boom"}]
    pooled = bench_train_step.pool_rounds([first, second])
    train = pooled[0]["train"]
    assert train["times"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] and train["median"] == 3.5 and train["repeats"] == 6
    assert train["round_medians"] == [2.0, 5.0] and train["mem_extra_bytes"] == 30 and pooled[0]["rounds"] == 2
    assert pooled[1]["error"] == "boom"                          # a failure in any round is reported
    assert bench_train_step.pool_rounds([first]) == first

def test_bench_layers_quick(tmp_path):
    out = tmp_path / "layers.json"
    result = run("bench_layers.py", "--json", str(out))
    report = json.loads(out.read_text())
    rows = report["rows"]
    backends = {"minicnn-numpy"} | ({"torch-cpu"} if HAS_TORCH else set())
    kinds = {"Conv2d", "MaxPool2d", "ReLU", "Linear", "SoftmaxCrossEntropy"}
    for backend in backends:
        for kind in kinds:
            for pass_name in ("forward", "forward+backward"):
                matching = [r for r in rows if (r["backend"], r["kind"], r["pass"]) == (backend, kind, pass_name)]
                assert matching, f"no {backend} {kind} {pass_name} row"
                for row in matching:
                    assert row["model"] == "default" and row["batch"] == 12
                    assert_positive_times(row)
    if HAS_TORCH:
        assert all(r["ratio_torch"] > 0 for r in rows if r["backend"] == "minicnn-numpy")
    assert "## default model shapes, batch 12" in result.stdout


def test_benchmark_torch_resnet18_has_minicnn_weights():
    """The PyTorch ResNet-18 that bench_train_step times (benchmarks/torch_resnet.py, through
    common.torch_layer_from) is minicnn's network with minicnn's weights: same logits."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import bench_train_step
        import common
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    torch.set_num_threads(1)
    model, shape, classes = bench_train_step.build("resnet18")
    assert shape == (1, 224, 224) and classes == 2          # what `covidct train --model resnet18` trains
    rng = np.random.default_rng(0)
    for module in model.modules():                           # non-trivial statistics, so copying them counts
        if isinstance(module, mc.BatchNorm2d):
            c = module.num_features
            module.weight.data = rng.uniform(0.5, 1.5, c).astype(np.float32)
            module.bias.data = rng.normal(0, 0.2, c).astype(np.float32)
            module.running_mean = rng.normal(0, 0.2, c).astype(np.float32)
            module.running_var = rng.uniform(0.5, 1.5, c).astype(np.float32)
    net = common.torch_layer_from(model)
    x = rng.standard_normal((2, 1, 64, 64), dtype=np.float32)   # small: any H, W >= 32 works
    for train in (False, True):
        model.train(train)
        net.train(train)
        with torch.no_grad():
            expected = net(torch.from_numpy(x.copy())).numpy()
        logits = model(x)
        assert logits.shape == (2, 2)
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max(),
                                   err_msg=f"train={train}")
