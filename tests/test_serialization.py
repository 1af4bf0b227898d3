"""Checkpoints: .npz, atomic, no pickle."""
import os
import pickle

import numpy as np
import pytest

import minicnn as mc
from minicnn import serialization


def test_save_load_round_trip_with_metadata(tmp_path):
    model = mc.Sequential(mc.Conv2d(1, 2, 3), mc.Flatten(), mc.Linear(2, 2))
    path = serialization.save(tmp_path / "ckpt.npz", model.state_dict(), {"arch": "tiny", "epoch": 3})
    state, meta = serialization.load(path)
    assert meta == {"arch": "tiny", "epoch": 3}
    assert set(state) == set(model.state_dict())
    assert all(np.array_equal(state[k], v) and state[k].dtype == v.dtype for k, v in model.state_dict().items())


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    serialization.save(path, {"w": np.ones(3)}, {"version": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        serialization.save(path, {"w": np.zeros(3)}, {"version": 2})
    state, meta = serialization.load(path)  # the old file is intact
    assert meta == {"version": 1} and np.array_equal(state["w"], np.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.npz"]


def test_pickled_object_arrays_are_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, payload=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="evil.npz: not a readable .npz checkpoint"):
        serialization.load(path)
    with pytest.raises(TypeError, match="object array"):
        serialization.save(tmp_path / "x.npz", {"payload": np.array([{"a": 1}], dtype=object)})


def test_non_checkpoint_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz: no such checkpoint file"):
        serialization.load(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="junk.npz: not a readable .npz checkpoint"):
        serialization.load(junk)


def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    model = mc.Linear(3, 2, rng=rng)
    optimizer = mc.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        model(np.ones((1, 3), np.float32))
        model.backward(np.ones((1, 2), np.float32))
        optimizer.step()
    serialization.save(tmp_path / "o.npz", optimizer.state_dict())
    state, _ = serialization.load(tmp_path / "o.npz")
    fresh = mc.optim.Adam(model.parameters(), lr=0.5)
    fresh.load_state_dict(state)
    assert fresh.step_count == 2 and fresh.lr == 0.01
    assert np.array_equal(fresh.state[0]["exp_avg"], optimizer.state[0]["exp_avg"])
