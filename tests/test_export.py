"""covidct export: ONNX (run in onnxruntime, matched against minicnn) and safetensors (read by the
safetensors package and loaded into the same network in torch.nn)."""
import json
from pathlib import Path

import numpy as np
import pytest

from covidct.checkpoint import load_checkpoint
from covidct.cli import main
from covidct.evaluate import predict_logits
from covidct.export import ONNX_IR_VERSION, ONNX_OPSET, export_safetensors
from conftest_models import write_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]

# Every preset; the slow ones at a smaller input (the same layers and operators).
PRESET_SIZES = [("tiny", None), ("default", 64), ("seed", 32), ("deep", 32), ("resnet18", 32), ("resnet-small", 32)]


def images(size, n=3, seed=0):
    return np.random.default_rng(seed).random((n, 1, size, size), dtype=np.float32)


@pytest.fixture(scope="module", params=PRESET_SIZES, ids=[name for name, _ in PRESET_SIZES])
def checkpoint(request, tmp_path_factory):
    name, size = request.param
    return write_checkpoint(tmp_path_factory.mktemp(f"export-{name}") / "best.npz", name, input_size=size,
                            threshold=0.37, ct_window={"width": 1200.0, "level": -500.0})


def test_onnx_export_runs_in_onnxruntime_like_minicnn(checkpoint, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    assert f"wrote {out} (onnx" in capsys.readouterr().out

    exported = onnx.load(str(out))
    onnx.checker.check_model(exported, full_check=True)
    assert exported.ir_version == ONNX_IR_VERSION and exported.opset_import[0].version == ONNX_OPSET
    props = {p.key: p.value for p in exported.metadata_props}
    model, meta = load_checkpoint(checkpoint)
    assert json.loads(props["covidct.preprocess"]) == meta["preprocess"]
    assert json.loads(props["covidct.ct_window"]) == {"width": 1200.0, "level": -500.0}
    assert float(props["covidct.threshold"]) == 0.37 and "P(COVID)" in props["covidct.input"]

    x = images(meta["preprocess"]["size"])
    expected = predict_logits(model, x, meta["normalization"]["mean"], meta["normalization"]["std"])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(["logits", "probabilities"], {"image": x})
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    shifted = np.exp(expected - expected.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probabilities, shifted / shifted.sum(axis=1, keepdims=True), atol=1e-6)
    assert np.ptp(logits[:, 1]) > 1e-4                            # the inputs give different answers



@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
def test_onnx_export_of_a_fold_ensemble(tmp_path, tta):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from covidct.ensemble import save_ensemble
    members = [write_checkpoint(tmp_path / f"m{seed}.npz", "tiny", seed=seed, epoch=3) for seed in (1, 2)]
    path = save_ensemble(tmp_path / "ensemble.npz", members, threshold=0.4, tta=tta)
    out = tmp_path / "ensemble.onnx"
    assert main(["export", "--checkpoint", str(path), "--format", "onnx", "--out", str(out)]) == 0
    ensemble, meta = load_checkpoint(path)
    x = images(meta["preprocess"]["size"], n=4)
    expected = predict_logits(ensemble, x, 0.0, 1.0)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(["logits", "probabilities"], {"image": x})
    np.testing.assert_allclose(probabilities, np.exp(expected), atol=1e-6)
    np.testing.assert_allclose(logits, expected, atol=1e-5)

def test_safetensors_export_loads_into_torch(checkpoint, tmp_path, monkeypatch):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    out = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "safetensors", "--out", str(out)]) == 0
    model, meta = load_checkpoint(checkpoint)
    loaded = safetensors_numpy.load_file(str(out))
    state = model.state_dict()
    assert set(loaded) == set(state)
    for name, array in state.items():
        assert loaded[name].dtype == array.dtype and np.array_equal(loaded[name], array), name

    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(out), "pt") as file:
        assert json.loads(file.metadata()["covidct.preprocess"]) == meta["preprocess"]
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    from common import _torch_module                              # the same architecture in torch.nn
    net = _torch_module(model)
    net.load_state_dict(load_file(str(out)), strict=True)
    net.eval()
    x = images(meta["preprocess"]["size"])
    normalized = (x - np.float32(meta["normalization"]["mean"])) / np.float32(meta["normalization"]["std"])
    with torch.no_grad():
        got = net(torch.from_numpy(normalized)).numpy()
    expected = predict_logits(model, x, meta["normalization"]["mean"], meta["normalization"]["std"])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_safetensors_header_is_aligned_and_little_endian(tmp_path):
    import minicnn as mc

    model = mc.Sequential(mc.Linear(3, 2, rng=np.random.default_rng(0)), mc.BatchNorm2d(2))
    meta = {"preprocess": {"size": 8, "resize": "pad"}, "normalization": {"mean": 0, "std": 1},
            "model_config": {}}
    path = export_safetensors(model, meta, tmp_path / "m.safetensors")
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    assert (8 + n) % 8 == 0 and header["__metadata__"]["format"] == "pt"
    begin, end = header["0.weight"]["data_offsets"]
    weight = np.frombuffer(data[8 + n + begin:8 + n + end], "<f4").reshape(header["0.weight"]["shape"])
    np.testing.assert_array_equal(weight, model[0].weight.data)
    counter = header["1.num_batches_tracked"]
    assert counter["dtype"] == "I64" and counter["shape"] == [] and np.diff(counter["data_offsets"]) == [8]


def test_export_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.npz"
    assert main(["export", "--checkpoint", str(missing), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {missing}: checkpoint not found"
