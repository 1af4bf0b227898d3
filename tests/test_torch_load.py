"""minicnn.torch_load: torch.save checkpoints read with NumPy alone, and refused when they are not
plain tensor state_dicts (no pickled code ever runs)."""
import builtins
import contextlib
import pickle
import struct
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

import minicnn as mc
from minicnn.torch_load import is_torch_checkpoint, load_state_dict_file, load_torch_state_dict


@contextlib.contextmanager
def torch_imports_fail(monkeypatch):
    """Any `import torch...` inside the block raises, proving the loader does not use torch."""
    real_import = builtins.__import__

    def guarded(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise AssertionError(f"the loader imported {name}")
        return real_import(name, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "__import__", guarded)
        yield


# -- checkpoints written by hand: pickle opcodes + a zip, no torch needed ---------------------------

def op_global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_str(text):
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def op_int(value):
    return b"J" + struct.pack("<i", value)


def op_tuple(*items):
    return b"(" + b"".join(items) + b"t"


def op_tensor(storage_type, key, numel, offset, size, stride):
    """torch._utils._rebuild_tensor_v2(<persistent storage>, offset, size, stride, False, OrderedDict())."""
    storage = op_tuple(op_str("storage"), op_global("torch", storage_type), op_str(key), op_str("cpu"),
                       op_int(numel)) + b"Q"                                      # BINPERSID
    args = op_tuple(storage, op_int(offset), op_tuple(*map(op_int, size)), op_tuple(*map(op_int, stride)),
                    b"\x89", op_global("collections", "OrderedDict") + b")R")
    return op_global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def op_state_dict(**tensors):
    return b"\x80\x02}(" + b"".join(op_str(name) + value for name, value in tensors.items()) + b"u."


def write_checkpoint(path, data_pkl, storages=None, byteorder="little", prefix="archive/"):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{prefix}data.pkl", data_pkl)
        if byteorder is not None:
            archive.writestr(f"{prefix}byteorder", byteorder)
        for key, data in (storages or {}).items():
            archive.writestr(f"{prefix}data/{key}", data)
        archive.writestr(f"{prefix}version", "3\n")
    return path


def test_hand_written_checkpoint_with_views_and_byte_orders(tmp_path, monkeypatch):
    storage = np.arange(12, dtype=np.float32)
    pkl = op_state_dict(whole=op_tensor("FloatStorage", "0", 12, 0, (3, 4), (4, 1)),
                        transposed=op_tensor("FloatStorage", "0", 12, 0, (4, 3), (1, 4)),
                        window=op_tensor("FloatStorage", "0", 12, 5, (2, 2), (4, 1)),
                        scalar=op_tensor("LongStorage", "1", 1, 0, (), ()))
    for byteorder, code in [("little", "<"), ("big", ">"), (None, "<")]:
        path = write_checkpoint(tmp_path / f"{byteorder}.pth", pkl, {
            "0": storage.astype(code + "f4").tobytes(), "1": np.array([7], dtype=code + "i8").tobytes()}, byteorder)
        with torch_imports_fail(monkeypatch):
            state = load_torch_state_dict(path)
        grid = storage.reshape(3, 4)
        np.testing.assert_array_equal(state["whole"], grid)
        np.testing.assert_array_equal(state["transposed"], grid.T)
        np.testing.assert_array_equal(state["window"], grid[1:3, 1:3])
        assert state["scalar"].shape == () and int(state["scalar"]) == 7 and state["scalar"].dtype == np.int64
        for value in state.values():
            assert value.dtype.isnative and value.flags.c_contiguous and value.flags.writeable


@pytest.mark.parametrize("size, stride, offset, numel, message", [
    ((4,), (3,), 0, 6, "reach element 9"),                # strided past the end of the storage
    ((2, 2), (2, 1), 3, 6, "reach element 6"),             # offset pushes it past the end
    ((3,), (-1,), 2, 6, "negative"),
    ((6,), (1,), 0, 8, "has 24 bytes, expected 8 x 4"),    # the storage file is shorter than claimed
])
def test_malformed_tensors_are_refused(tmp_path, size, stride, offset, numel, message):
    pkl = op_state_dict(w=op_tensor("FloatStorage", "0", numel, offset, size, stride))
    path = write_checkpoint(tmp_path / "bad.pth", pkl, {"0": np.zeros(6, np.float32).tobytes()})
    with pytest.raises(pickle.UnpicklingError, match=message):
        load_torch_state_dict(path)


def test_missing_storage_and_odd_persistent_ids_are_refused(tmp_path):
    path = write_checkpoint(tmp_path / "missing.pth", op_state_dict(w=op_tensor("FloatStorage", "9", 1, 0, (1,), (1,))))
    with pytest.raises(pickle.UnpicklingError, match="missing from the archive"):
        load_torch_state_dict(path)
    odd = b"\x80\x02" + op_tuple(op_str("storage"), op_str("FloatStorage"), op_str("0"), op_str("cpu"), op_int(1)) + b"Q."
    with pytest.raises(pickle.UnpicklingError, match="unsupported persistent id"):
        load_torch_state_dict(write_checkpoint(tmp_path / "odd.pth", odd, {"0": b"\0" * 4}))


# -- safety: pickled code never runs ------------------------------------------------------------

class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


class RunsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "hand-written os.system", "inside a state_dict"])
def test_malicious_pickle_in_a_torch_zip_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    if payload == "os.system":
        pkl, refused = pickle.dumps({"w": RunsShell(marker)}, protocol=2), "'posix.system'"
    elif payload == "builtins.eval":
        pkl, refused = pickle.dumps(RunsEval(marker), protocol=2), "'builtins.eval'"
    elif payload == "hand-written os.system":
        pkl, refused = b"\x80\x02" + op_global("os", "system") + op_tuple(op_str(f"touch {marker}")) + b"R.", "'os.system'"
    else:  # a real tensor first, the payload as the second entry
        evil = op_global("os", "system") + op_tuple(op_str(f"touch {marker}")) + b"R"
        pkl = op_state_dict(w=op_tensor("FloatStorage", "0", 1, 0, (1,), (1,)), evil=evil)
        refused = "'os.system'"
    path = write_checkpoint(tmp_path / "evil.pth", pkl, {"0": b"\0" * 4})
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to load global {refused} "
                                                      r"\(only tensor state_dicts are allowed\)") as error:
        load_torch_state_dict(path)
    assert str(path) in str(error.value)
    assert not marker.exists(), "the payload ran"
    # control: the same payload does run under plain pickle, so the test would notice
    if payload == "builtins.eval":
        pickle.loads(pkl)
        assert marker.exists()


@pytest.mark.parametrize("content", ["harmless dict", "os.system"])
def test_plain_pickle_files_are_refused(tmp_path, content):
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"w": [1.0]} if content == "harmless dict" else RunsShell(marker)))
    with pytest.raises(pickle.UnpicklingError, match="plain pickle.*refusing to unpickle"):
        load_torch_state_dict(path)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        load_state_dict_file(path)
    assert not marker.exists()


def test_other_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_torch_state_dict(tmp_path / "absent.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(pickle.UnpicklingError, match="not a zip archive"):
        load_torch_state_dict(tmp_path / "text.pth")
    mc.serialization.save(tmp_path / "model.npz", {"w": np.ones(2)})
    with pytest.raises(ValueError, match="without data.pkl"):
        load_torch_state_dict(tmp_path / "model.npz")
    not_a_state_dict = b"\x80\x02" + op_tuple(op_int(1), op_int(2)) + b"."
    with pytest.raises(ValueError, match="expected a state_dict"):
        load_torch_state_dict(write_checkpoint(tmp_path / "tuple.pth", not_a_state_dict))


def test_load_state_dict_file_dispatches_npz_and_torch_zip(tmp_path):
    mc.serialization.save(tmp_path / "model.npz", {"a.weight": np.arange(3.0)})
    renamed = tmp_path / "model.bin"                                     # an .npz under another name
    renamed.write_bytes((tmp_path / "model.npz").read_bytes())
    for path in (tmp_path / "model.npz", renamed):
        state = load_state_dict_file(path)
        assert list(state) == ["a.weight"]
        np.testing.assert_array_equal(state["a.weight"], np.arange(3.0))
    torch_file = write_checkpoint(tmp_path / "t.pth", op_state_dict(w=op_tensor("IntStorage", "0", 2, 0, (2,), (1,))),
                                  {"0": np.array([5, 6], "<i4").tobytes()})
    assert is_torch_checkpoint(torch_file) and not is_torch_checkpoint(renamed)
    np.testing.assert_array_equal(load_state_dict_file(torch_file)["w"], [5, 6])
    assert mc.serialization.load_torch_state_dict is load_torch_state_dict


# -- files written by torch.save ----------------------------------------------------------------

@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def test_dtypes_written_by_torch_save(torch, tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(2, 3, generator=generator)
    tensors = {
        "float32": values, "float64": values.double(), "float16": values.half(), "bfloat16": values.bfloat16(),
        "int64": torch.tensor([-3, 2**40]), "int32": torch.tensor([1, -2], dtype=torch.int32),
        "int16": torch.tensor([-7], dtype=torch.int16), "int8": torch.tensor([-8, 9], dtype=torch.int8),
        "uint8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False]),
        "num_batches_tracked": torch.tensor(5),
    }
    torch.save(tensors, tmp_path / "dtypes.pth")
    with torch_imports_fail(monkeypatch):
        state = load_torch_state_dict(tmp_path / "dtypes.pth")
    assert list(state) == list(tensors)
    for name, tensor in tensors.items():
        expected = tensor.float().numpy() if name == "bfloat16" else tensor.numpy()
        assert state[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(state[name], expected, err_msg=name)
    assert state["num_batches_tracked"].shape == () and state["num_batches_tracked"].dtype == np.int64


def test_views_written_by_torch_save(torch, tmp_path, monkeypatch):
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    tensors = OrderedDict([
        ("base", base),
        ("transposed", base[0].t()),                     # stride (1, 5)
        ("permuted", base.permute(2, 0, 1)),
        ("slice", base[1:, 1:3, ::2]),                  # offset 25, strides (20, 5, 2)
        ("row", base[2, 3]),                            # offset 55
        ("expanded", torch.tensor([1.0, 2.0]).expand(3, 2)),   # stride (0, 1)
        ("empty", base[:, :0]),
        ("half_view", base.half()[:, 1].t()),
    ])
    assert not tensors["slice"].is_contiguous() and tensors["slice"].storage_offset() == 25
    torch.save(tensors, tmp_path / "views.pth")
    with torch_imports_fail(monkeypatch):
        state = load_torch_state_dict(tmp_path / "views.pth")
    for name, tensor in tensors.items():
        assert state[name].shape == tuple(tensor.shape), name
        np.testing.assert_array_equal(state[name], tensor.contiguous().numpy(), err_msg=name)
        assert state[name].flags.c_contiguous and state[name].flags.writeable
    state["row"][0] = -1                                   # copies: the views do not share memory
    assert state["base"][2, 3, 0] == 55


def test_parameters_and_nested_checkpoints(torch, tmp_path, monkeypatch):
    layer = torch.nn.Conv2d(2, 3, 3)
    torch.save(dict(layer.named_parameters()), tmp_path / "params.pth")     # nn.Parameter -> _rebuild_parameter
    torch.save({"epoch": 3, "lr": 0.1, "state_dict": layer.state_dict()}, tmp_path / "nested.pth")
    torch.save({"model": layer.state_dict(), "note": "hi"}, tmp_path / "model_key.pth")
    for name in ("params.pth", "nested.pth", "model_key.pth"):
        with torch_imports_fail(monkeypatch):
            state = load_torch_state_dict(tmp_path / name)
        assert list(state) == ["weight", "bias"], name
        np.testing.assert_array_equal(state["weight"], layer.weight.detach().numpy())


def test_torch_state_dict_loads_into_a_minicnn_model(torch, tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, bias=False), torch.nn.BatchNorm2d(2))
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0)
    net[1].num_batches_tracked.fill_(4)
    torch.save(net.state_dict(), tmp_path / "net.pth")
    model = mc.Sequential(mc.Conv2d(1, 2, 3, bias=False), mc.BatchNorm2d(2))
    model.load_state_dict(load_state_dict_file(tmp_path / "net.pth"))
    np.testing.assert_array_equal(model[1].running_var, net[1].running_var.numpy())
    assert int(model[1].num_batches_tracked) == 4
    x = np.random.default_rng(0).standard_normal((2, 1, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(model.eval()(x), net.eval()(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)
