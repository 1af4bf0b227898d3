"""Seed ensembles (covidct train --members M): M runs that differ only in their seed, one ensemble.npz."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from covidct.checkpoint import load_checkpoint, read_checkpoint
from covidct.ensemble import Ensemble, combine_probabilities
from covidct.evaluate import predict_checkpoint
from covidct.train import Trainer, member_seed, train
from conftest_models import tiny_train_config, train_on_phantom


def config(data, out, **overrides):
    return tiny_train_config(data, out, **{**dict(members=2, lungs="none"), **overrides})


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    data, summary, logs = train_on_phantom(root, seed=7, size=32, members=2, lungs="none")
    return root, data, summary, logs


def test_members_are_single_runs_with_their_own_seeds(ensemble_run, tmp_path):
    root, data, summary, logs = ensemble_run
    single = train(config(data, tmp_path / "single", members=1), log=lambda *a: None)
    first, _, _ = read_checkpoint(root / "run" / "member0" / "best.npz")
    alone, _, _ = read_checkpoint(tmp_path / "single" / "best.npz")
    second, _, second_meta = read_checkpoint(root / "run" / "member1" / "best.npz")
    for key in first:                                    # member 0 is the single-model run
        np.testing.assert_array_equal(first[key], alone[key], err_msg=key)
    assert any(not np.array_equal(first[key], second[key]) for key in first)
    assert second_meta["train_config"]["seed"] == member_seed(0, 1) != 0
    assert summary["checkpoint"] == str(root / "run" / "ensemble.npz") and single["checkpoint"].endswith("best.npz")
    assert sum("member " in line and "seed" in line for line in logs) == 2


def test_the_ensemble_is_the_geometric_mean_of_its_members_on_val(ensemble_run):
    root, _, summary, _ = ensemble_run
    ensemble, meta = load_checkpoint(root / "run" / "ensemble.npz")
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 2
    assert meta["threshold"] == pytest.approx(summary["threshold"]) == 0.5       # no --target-sensitivity
    predictions = pd.read_csv(root / "run" / "predictions.csv")
    images = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    assert meta["tta"] is True                           # the recipe's default: mirror images averaged in
    members = [predict_checkpoint(root / "run" / f"member{i}" / "best.npz", images, tta=True) for i in range(2)]
    together = predict_checkpoint(root / "run" / "ensemble.npz", images)
    assert np.allclose(together, combine_probabilities(members), atol=1e-6)
    assert meta["combine"] == "geometric"
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    assert metrics["threshold"]["total"] == len(predictions) and summary["members"] == 2
    assert json.loads((root / "run" / "config.json").read_text())["members"] == 2


def test_a_stopped_ensemble_resumes_to_the_same_models(ensemble_run, tmp_path, monkeypatch):
    root, data, _, _ = ensemble_run
    train_epoch = Trainer.train_epoch

    def stop_in_the_second_member(self, epoch):
        if self.config.seed == member_seed(0, 1) and epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", stop_in_the_second_member)
    with pytest.raises(KeyboardInterrupt):
        train(config(data, tmp_path / "stopped"), log=lambda *a: None)
    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    assert not (tmp_path / "stopped" / "ensemble.npz").exists()
    logs = []
    train(config(data, tmp_path / "stopped"), resume=True, log=logs.append)
    assert any("member0 had finished" in line for line in logs)
    assert any("resuming" in line for line in logs)                 # member 2 continued from its last.npz
    for name in ("member0/best.npz", "member1/best.npz"):
        resumed, _, _ = read_checkpoint(tmp_path / "stopped" / name)
        whole, _, _ = read_checkpoint(root / "run" / name)
        for key in whole:
            np.testing.assert_array_equal(resumed[key], whole[key], err_msg=f"{name} {key}")


def test_members_on_the_command_line(ensemble_run, tmp_path):
    _, data, _, _ = ensemble_run

    def covidct(*args):
        return subprocess.run([sys.executable, "-m", "covidct", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    run = tmp_path / "cli"
    done = covidct("train", "--data", data, "--out", run, "--model", "tiny", "--epochs", "1", "--batch-size", "8",
                   "--lungs", "none",
                   "--members", "2", "--no-progress", "--cache-dir", tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert f"an ensemble of 2 models; checkpoint {run / 'ensemble.npz'}" in done.stdout
    evaluated = covidct("evaluate", "--checkpoint", run / "ensemble.npz", "--data", data, "--split", "test",
                        "--out", tmp_path / "eval", "--cache-dir", tmp_path / "cache")
    assert evaluated.returncode == 0 and "test split" in evaluated.stdout, evaluated.stderr
    for args, message in [(("--resume", run, "--members", "3"), "--members cannot change"),
                          (("--data", data, "--members", "0", "--out", tmp_path / "zero"), "--members must be >= 1")]:
        refused = covidct("train", *args)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
