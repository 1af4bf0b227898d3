"""The shared epoch loop: a Trainer built from arrays in memory trains exactly like one that reads the data."""
import numpy as np
import pytest

from covidct.checkpoint import read_checkpoint
from covidct.errors import CovidCTError
from covidct.preprocess import Preprocess
from covidct.synthetic import write_dataset
from covidct.train import TrainConfig, TrainData, Trainer, train


def config(data, out, **overrides):
    values = dict(data=str(data), out=str(out), model="tiny", epochs=2, batch_size=8, progress=False,
                  augment="flip", warmup_epochs=0, cache_dir=str(out) + "-cache", lungs="none")
    values.update(overrides)
    return TrainConfig(**values)


def test_in_memory_data_trains_like_data_read_from_the_config(tmp_path):
    data = write_dataset(tmp_path / "data", n=24, seed=7, size=32)
    train(config(data, tmp_path / "read"), log=lambda *a: None)
    arrays = TrainData.from_config(config(data, tmp_path / "x"), Preprocess(size=32))
    in_memory = TrainData(arrays.train_images.copy(), arrays.train_labels, arrays.val_images.copy(),
                          arrays.val_labels)                           # no paths: named val[i]
    summary = Trainer(config("", tmp_path / "memory"), data=in_memory, log=lambda *a: None).fit()
    read, _, read_meta = read_checkpoint(tmp_path / "read" / "last.npz")
    memory, _, memory_meta = read_checkpoint(tmp_path / "memory" / "last.npz")
    for key in read:
        np.testing.assert_array_equal(memory[key], read[key], err_msg=key)
    assert memory_meta["history"][-1]["val_auc"] == read_meta["history"][-1]["val_auc"]
    assert summary["best_epoch"] >= 1
    assert (tmp_path / "memory" / "predictions.csv").read_text().splitlines()[1].startswith("val[0],")


def test_in_memory_data_of_the_wrong_shape_is_refused(tmp_path):
    images, labels = np.zeros((4, 1, 16, 16), np.float32), np.array([0, 1, 0, 1])
    with pytest.raises(CovidCTError, match=r"model 'tiny' takes 32x32"):
        Trainer(config("", tmp_path / "r"), data=TrainData(images, labels, images, labels))
    with pytest.raises(CovidCTError, match="must be \\(N, C, H, W\\)"):
        TrainData(images[:, 0], labels, images, labels)


def test_resuming_a_frozen_backbone_run_with_cached_features_is_bit_identical(tmp_path):
    """2 epochs, then --resume to 3 (schedule none: the same learning rates) == 3 epochs at once."""
    data = write_dataset(tmp_path / "data", n=24, seed=8, size=32)
    frozen = dict(freeze_backbone=True, augment="none", schedule="none")
    train(config(data, tmp_path / "whole", epochs=3, **frozen), log=lambda *a: None)
    train(config(data, tmp_path / "split", epochs=2, **frozen), log=lambda *a: None)
    messages = []
    train(config(data, tmp_path / "split", epochs=3, **frozen), resume=True, log=messages.append)
    assert sum("frozen backbone: cached" in str(m) for m in messages) == 1       # recomputed once after resume
    whole, _, whole_meta = read_checkpoint(tmp_path / "whole" / "last.npz")
    resumed, _, resumed_meta = read_checkpoint(tmp_path / "split" / "last.npz")
    for key in whole:
        np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)
    assert [row["val_loss"] for row in resumed_meta["history"]] == [row["val_loss"] for row in whole_meta["history"]]
    assert not (tmp_path / "split" / ".lock").exists()
