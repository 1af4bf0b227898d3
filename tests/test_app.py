"""The covidct app: model presets, trainer (overfit, resume, divergence), checkpoints, predict."""
import json

import numpy as np
import pytest

import minicnn as mc
from covidct.checkpoint import load_checkpoint, read_checkpoint
from covidct.errors import CovidCTError
from covidct.model import PRESETS, build_model, count_parameters, preset
from covidct.predict import predict_files
from covidct.synthetic import write_dataset
from covidct.train import TrainConfig, Trainer, learning_rate, train


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """48 synthetic slices at 32x32 in the UCSD layout (train 34 / val 7 / test 7)."""
    return write_dataset(tmp_path_factory.mktemp("synthetic"), n=48, seed=3, size=32)


def tiny_config(data, out, **overrides):
    values = dict(data=str(data), out=str(out), model="tiny", epochs=3, batch_size=8, progress=False,
                  augment="flip", warmup_epochs=0, cache_dir=str(out) + "-cache", lungs="none")
    values.update(overrides)
    return TrainConfig(**values)


def test_seed_preset_is_the_2020_cnnv3():
    config = preset("seed")
    assert config.input_size == 224 and config.feature_shape() == (64, 55, 55)
    channels, height, width = config.feature_shape()
    expected = (1 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + (channels * height * width * 1000 + 1000) \
        + (1000 * 500 + 500) + (500 * 2 + 2)
    assert expected == 194_121_318  # ~194M parameters, as in the report


def test_seed_preset_builds_and_takes_a_training_step():
    model = build_model(preset("seed"))
    assert count_parameters(model) == 194_121_318
    x = np.random.default_rng(0).random((2, 1, 224, 224), dtype=np.float32)
    criterion, optimizer = mc.SoftmaxCrossEntropy(), mc.optim.SGD(model.parameters(), lr=1e-3)
    criterion(model(x), np.array([0, 1]))
    model.backward(criterion.backward())
    before = [model[0].weight.data.copy(), model[11].weight.data.copy()]
    optimizer.step()
    assert not np.array_equal(before[0], model[0].weight.data)
    assert not np.array_equal(before[1], model[11].weight.data)


@pytest.mark.parametrize("name", ["seed", "default", "wide", "tiny"])
def test_presets_have_the_two_conv_three_fc_shape(name):
    model = build_model(preset(name))
    kinds = [type(layer).__name__ for layer in model if type(layer).__name__ != "Dropout"]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten",
                     "Linear", "ReLU", "Linear", "ReLU", "Linear"]


def test_unknown_preset_and_too_small_input_are_clear_errors():
    with pytest.raises(CovidCTError, match="unknown model preset 'huge'"):
        preset("huge")
    config = preset("default")
    config.input_size = 8
    with pytest.raises(CovidCTError, match="input size 8 is too small"):
        config.feature_shape()


def test_tiny_model_overfits_a_small_batch():
    rng = np.random.default_rng(0)
    config = preset("tiny")
    config.dropout = 0.0
    model = build_model(config, seed=0)
    x = rng.random((8, 1, 32, 32), dtype=np.float32)
    y = np.array([0, 1] * 4)
    criterion, optimizer = mc.SoftmaxCrossEntropy(), mc.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        optimizer.zero_grad()
        logits = model(x)
        losses.append(float(criterion(logits, y)))
        model.backward(criterion.backward())
        optimizer.step()
    assert losses[-1] < 0.05 < losses[0]
    assert np.array_equal(model(x).argmax(axis=1), y)


def test_learning_rate_schedules():
    config = TrainConfig(lr=0.1, epochs=10, warmup_epochs=1, schedule="cosine")
    rates = [learning_rate(config, e) for e in range(10)]
    assert rates[0] < rates[1] == pytest.approx(0.1) and rates[-1] < 0.02 and rates == sorted(rates[:2]) + sorted(rates[1:], reverse=True)[1:]
    step = TrainConfig(lr=0.1, warmup_epochs=0, schedule="step", step_epochs=3)
    assert [learning_rate(step, e) for e in (0, 2, 3, 6)] == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_training_writes_the_run_directory_and_is_deterministic(tiny_data, tmp_path):
    first = train(tiny_config(tiny_data, tmp_path / "a"), log=lambda *a: None)
    second = train(tiny_config(tiny_data, tmp_path / "b"), log=lambda *a: None)
    for name in ["config.json", "last.npz", "best.npz", "history.csv", "curves.png", "metrics.json",
                 "predictions.csv", "roc.png", "confusion.png"]:
        assert (tmp_path / "a" / name).is_file(), name
    a, _, meta = read_checkpoint(tmp_path / "a" / "last.npz")
    b, _, _ = read_checkpoint(tmp_path / "b" / "last.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a)  # same seed, same weights
    assert json.dumps(first["val"]) == json.dumps(second["val"])  # (nan-aware)
    assert len(meta["history"]) == 3 and meta["preprocess"]["size"] == 32


def test_resume_after_an_interruption_reaches_the_same_weights(tiny_data, tmp_path):
    train(tiny_config(tiny_data, tmp_path / "full", epochs=4), log=lambda *a: None)

    interrupted = Trainer(tiny_config(tiny_data, tmp_path / "split", epochs=4), log=lambda *a: None)
    run_epoch = interrupted.train_epoch

    def ctrl_c_in_epoch_3(epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return run_epoch(epoch)

    interrupted.train_epoch = ctrl_c_in_epoch_3
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    assert read_checkpoint(tmp_path / "split" / "last.npz")[2]["epoch"] == 1  # epochs 1-2 are saved

    config = TrainConfig.from_dict(json.loads((tmp_path / "split" / "config.json").read_text()))
    messages = []
    train(config, resume=True, log=messages.append)
    assert any("resuming" in str(m) and "after epoch 2" in str(m) for m in messages)
    full, full_opt, full_meta = read_checkpoint(tmp_path / "full" / "last.npz")
    resumed, resumed_opt, resumed_meta = read_checkpoint(tmp_path / "split" / "last.npz")
    assert resumed_meta["epoch"] == full_meta["epoch"] == 3
    assert resumed_meta["rng_states"] == full_meta["rng_states"]
    for key in full:
        np.testing.assert_array_equal(resumed[key], full[key])
    assert int(resumed_opt["step"]) == int(full_opt["step"])


def test_diverging_loss_stops_with_a_clear_message(tiny_data, tmp_path):
    with pytest.raises(CovidCTError, match="training diverged at epoch 1, batch 1: loss is nan"):
        trainer = Trainer(tiny_config(tiny_data, tmp_path / "nan"))
        trainer.model[0].weight.data[...] = np.nan
        trainer.fit()


def test_checkpoint_rebuilds_the_model_and_predict_reports_bad_files(tiny_data, tmp_path):
    train(tiny_config(tiny_data, tmp_path / "run", epochs=1), log=lambda *a: None)
    model, meta = load_checkpoint(tmp_path / "run" / "best.npz")
    assert not model.training and meta["model_config"]["input_size"] == 32 and 0 < meta["threshold"] <= 1
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    good = sorted((tiny_data / "Images-processed" / "CT_COVID").glob("*.png"))[:2]
    rows, failures, _ = predict_files(tmp_path / "run" / "best.npz", [*good, broken])
    assert [r["file"] for r in rows] == [str(p) for p in good]
    assert all(0.0 <= r["p_covid"] <= 1.0 and r["label"] in ("COVID", "non-COVID") for r in rows)
    assert len(failures) == 1 and "broken.png" in failures[0][1]


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CovidCTError, match="nothing.npz: checkpoint not found"):
        load_checkpoint(tmp_path / "nothing.npz")
    mc.serialization.save(tmp_path / "plain.npz", {"w": np.ones(2)})
    with pytest.raises(CovidCTError, match="not a covidct checkpoint"):
        load_checkpoint(tmp_path / "plain.npz")


def test_bad_training_options_are_clear_errors(tiny_data, tmp_path):
    with pytest.raises(CovidCTError, match="--lr must be > 0"):
        Trainer(tiny_config(tiny_data, tmp_path, lr=-1.0))
    with pytest.raises(CovidCTError, match="--class-weights must be"):
        Trainer(tiny_config(tiny_data, tmp_path, class_weights="heavy"))


def test_deep_preset_is_a_conv_stack_with_global_average_pooling():
    model = build_model(preset("deep"))
    kinds = [type(layer).__name__ for layer in model]
    assert kinds.count("Conv2d") == 4 and "AdaptiveAvgPool2d" in kinds and kinds[-1] == "Linear"
    assert model(np.zeros((2, 1, 128, 128), np.float32)).shape == (2, 2)
