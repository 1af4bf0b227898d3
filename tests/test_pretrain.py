"""covidct pretrain: rotation prediction on the training images, then fine-tuning from its checkpoint."""
import numpy as np
import pytest

from covidct.checkpoint import read_checkpoint
from covidct.cli import main
from covidct.errors import CovidCTError
from covidct.pretrain import PretrainConfig, all_rotations, pretrain, rotate_batch
from covidct.synthetic import write_dataset
from covidct.train import TrainConfig, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("pretrain-data"), n=24, seed=6, size=32)


def pretrain_config(data, out, **overrides):
    values = dict(data=str(data), out=str(out), model="tiny", epochs=2, batch_size=8, progress=False,
                  warmup_epochs=0, cache_dir=str(out) + "-cache")
    values.update(overrides)
    return PretrainConfig(**values)


def test_rotate_batch_turns_each_image_by_its_own_amount():
    x = np.random.default_rng(0).random((6, 1, 5, 5), dtype=np.float32)
    turns = np.array([0, 1, 2, 3, 1, 0])
    rotated = rotate_batch(x, turns)
    for image, turned, k in zip(x, rotated, turns):
        np.testing.assert_array_equal(turned, np.rot90(image, k, axes=(1, 2)))
    assert rotated[1, 0, 0, 0] == x[1, 0, 0, -1]         # 90 degrees counter-clockwise: top-right -> top-left


def test_all_rotations_lists_every_orientation_once():
    images = np.arange(2 * 9, dtype=np.float32).reshape(2, 1, 3, 3)
    turned, turns = all_rotations(images)
    assert turned.shape == (8, 1, 3, 3) and turns.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    np.testing.assert_array_equal(turned[5], np.rot90(images[1], 2, axes=(1, 2)))


def test_pretrained_checkpoint_fine_tunes_with_everything_but_the_last_layer(data, tmp_path):
    path = pretrain(pretrain_config(data, tmp_path / "ssl"), log=lambda *a: None)
    arrays, _, meta = read_checkpoint(path)
    assert meta["pretext"] == "rotation" and meta["model_config"]["num_classes"] == 4
    assert arrays["13.weight"].shape == (4, 8)                         # tiny's last Linear: 4 rotations
    assert len(meta["history"]) == 2 and 0 <= meta["history"][-1]["val_rotation_accuracy"] <= 1

    messages = []
    train(TrainConfig(data=str(data), out=str(tmp_path / "ft"), model="tiny", epochs=1, batch_size=8,
                      progress=False, augment="none", warmup_epochs=0, cache_dir=str(tmp_path / "ft-cache"),
                      pretrained=str(path), freeze_backbone=True, lungs="none"), log=messages.append)
    assert any("freshly initialised: ['13.weight', '13.bias']" in str(m) for m in messages)
    fine_tuned, _, _ = read_checkpoint(tmp_path / "ft" / "last.npz")
    for key in ("0.weight", "3.weight"):                               # the frozen, pretrained convs
        np.testing.assert_array_equal(fine_tuned[key], arrays[key], err_msg=key)


def test_pretraining_is_deterministic_and_resumes_exactly(data, tmp_path):
    whole = pretrain(pretrain_config(data, tmp_path / "whole"), log=lambda *a: None)
    again = pretrain(pretrain_config(data, tmp_path / "again"), log=lambda *a: None)
    pretrain(pretrain_config(data, tmp_path / "split", epochs=1), log=lambda *a: None)
    resumed = pretrain(pretrain_config(data, tmp_path / "split", epochs=2), resume=True, log=lambda *a: None)
    reference, _, _ = read_checkpoint(whole)
    for other in (again, resumed):
        arrays, _, _ = read_checkpoint(other)
        for key, value in reference.items():
            np.testing.assert_array_equal(arrays[key], value, err_msg=f"{other}: {key}")


def test_flips_are_refused_with_the_reason(data, tmp_path):
    with pytest.raises(CovidCTError, match="flips make rotation prediction ambiguous"):
        pretrain(pretrain_config(data, tmp_path / "flip", augment="flip,translate:0.1"), log=lambda *a: None)


def test_cli_pretrain_errors_are_one_line(tmp_path, capsys):
    assert main(["pretrain", "--data", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --data {tmp_path / 'missing'}: no such file or directory"
    assert main(["pretrain", "--resume", str(tmp_path)]) == 2
    assert "no config.json there" in capsys.readouterr().err


def test_transfer_report_example_prints_the_side_by_side_table(data, tmp_path, capsys, monkeypatch):
    """examples/transfer_report.py: scratch and rotation-pretrained rows, one epoch each, on tiny data."""
    import importlib.util
    from pathlib import Path

    monkeypatch.setenv("COVIDCT_CACHE", str(tmp_path / "cache"))
    path = Path(__file__).resolve().parents[1] / "examples" / "transfer_report.py"
    spec = importlib.util.spec_from_file_location("transfer_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--data", str(data), "--epochs", "1", "--out", str(tmp_path / "report"), "--no-progress"]) == 0
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| default | from scratch | " in table and "| default | rotation-pretrained | " in table
    assert table in capsys.readouterr().out


# -- examples/contrastive_pretrain.py (SimCLR) --------------------------------------------------------

def _contrastive(*argv):
    import importlib.util
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "examples" / "contrastive_pretrain.py"
    spec = importlib.util.spec_from_file_location("contrastive_pretrain", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(arg) for arg in argv])


def test_contrastive_pretraining_is_a_deterministic_starting_point(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COVIDCT_CACHE", str(tmp_path / "cache"))
    from covidct.checkpoint import load_checkpoint
    from covidct.model import build_model, preset
    from covidct.train import load_pretrained_weights

    options = ["--data", data, "--model", "tiny", "--epochs", 2, "--batch-size", 8]
    assert _contrastive(*options, "--out", tmp_path / "a.npz") == 0
    assert _contrastive(*options, "--out", tmp_path / "b.npz") == 0
    assert "contrastive loss" in capsys.readouterr().out
    a, _, meta = read_checkpoint(tmp_path / "a.npz")
    b, _, _ = read_checkpoint(tmp_path / "b.npz")
    assert meta["task"] == "contrastive" and meta["model_config"]["num_classes"] == 64
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)      # same seed, same weights
    fresh = build_model(preset("tiny"), seed=0)
    loaded = load_pretrained_weights(fresh, tmp_path / "a.npz", log=lambda *_: None)
    assert loaded == len(fresh.state_dict()) - 2                                     # all but the 64-way layer
    assert np.array_equal(fresh.state_dict()["0.weight"], a["0.weight"])
    with pytest.raises(CovidCTError, match="contrastive-pretraining"):
        load_checkpoint(tmp_path / "a.npz")                                         # not a classifier


def test_contrastive_pretraining_refuses_a_bad_batch_size(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COVIDCT_CACHE", str(tmp_path / "cache"))
    assert _contrastive("--data", data, "--batch-size", 1, "--out", tmp_path / "x.npz") != 0
    assert "--batch-size" in capsys.readouterr().err
