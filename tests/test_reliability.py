"""No silent wrong answers and no tracebacks for bad input: wrong-task, damaged and hand-edited checkpoints,
resumes that cannot continue, two writers in one run directory, unwritable outputs, huge or all-NaN images."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import minicnn as mc
from covidct import preprocess
from covidct.checkpoint import load_checkpoint, read_checkpoint
from covidct.cli import main
from covidct.data import read_dataset
from covidct.errors import CovidCTError, DataError
from covidct.pretrain import PretrainConfig, pretrain
from covidct.runlock import RunLock
from covidct.synthetic import write_dataset
from covidct.train import TrainConfig, Trainer, load_pretrained_weights, train

QUIET = dict(log=lambda *a: None)


def tiny(data, out, **overrides):
    values = dict(data=str(data), out=str(out), model="tiny", epochs=1, batch_size=8, progress=False,
                  augment="none", warmup_epochs=0, schedule="none", cache_dir=str(out) + "-cache", lungs="none")
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("reliability-data"), n=24, seed=4, size=32)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reliability") / "run"
    train(tiny(data, out), **QUIET)
    return out


@pytest.fixture
def image(data):
    return sorted((data / "Images-processed" / "CT_COVID").glob("*.png"))[0]


def one_line_error(capsys, argv, *fragments):
    """Run the covidct CLI in-process: exit 2 and one stderr line holding every fragment."""
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def rewrite_checkpoint(source, target, arrays=None, metadata=None):
    """A copy of checkpoint ``source`` with some arrays / metadata replaced (None in metadata: key removed)."""
    stored, meta = mc.serialization.load(source)
    stored.update(arrays or {})
    for key, value in (metadata or {}).items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return mc.serialization.save(target, stored, meta)


# 1. a checkpoint says which task it is for ---------------------------------------------------------
def test_pretraining_checkpoints_are_refused_by_predict_and_evaluate(data, image, tmp_path, capsys):
    config = PretrainConfig(data=str(data), out=str(tmp_path / "ssl"), model="tiny", epochs=1, batch_size=8,
                            progress=False, warmup_epochs=0, cache_dir=str(tmp_path / "cache"))
    pretrained = pretrain(config, **QUIET)
    for checkpoint in (pretrained, tmp_path / "ssl" / "last.npz"):
        one_line_error(capsys, ["predict", "--checkpoint", checkpoint, image],
                       "rotation-pretraining", f"covidct train --pretrained {checkpoint}")
        one_line_error(capsys, ["evaluate", "--checkpoint", checkpoint, "--data", data, "--split", "val",
                                "--out", tmp_path / "eval"], "needs a COVID classifier")
    assert not (tmp_path / "eval").exists()
    assert load_checkpoint(pretrained, task="rotation")[1]["task"] == "rotation"   # its own task loads
    assert main(["viz", "filters", "--checkpoint", str(pretrained), "--out", str(tmp_path / "f.png")]) == 0


# 2. NaN/inf weights are refused on load, naming the tensor -------------------------------------
def test_non_finite_weights_are_refused_naming_the_tensor(run, image, tmp_path, capsys):
    arrays, _ = mc.serialization.load(run / "best.npz")
    weight = arrays["model.0.weight"].copy()
    weight[0, 0, 0, 0] = np.nan
    weight[1, 0, 0, 0] = np.inf
    bad = rewrite_checkpoint(run / "best.npz", tmp_path / "nan.npz", {"model.0.weight": weight})
    one_line_error(capsys, ["predict", "--checkpoint", bad, image], "tensor '0.weight' has 2 NaN/inf values")
    with pytest.raises(CovidCTError, match="'0.weight' has 2 NaN/inf"):
        load_pretrained_weights(mc.Sequential(mc.Conv2d(1, 4, 3, padding=1)), bad, log=lambda *a: None)


# 3. --resume with a larger --epochs extends the run; a finished run is not "resumed" silently ----------
def test_resume_with_more_epochs_continues_exactly_like_a_longer_run(data, tmp_path, capsys):
    train(tiny(data, tmp_path / "long", epochs=3), **QUIET)
    train(tiny(data, tmp_path / "short", epochs=2), **QUIET)
    one_line_error(capsys, ["train", "--resume", tmp_path / "short", "--no-progress"],
                   "already completed 2 of 2 epochs", "--epochs N with N > 2")
    one_line_error(capsys, ["train", "--resume", tmp_path / "short", "--lr", "0.1"], "--lr cannot change")
    assert main(["train", "--resume", str(tmp_path / "short"), "--epochs", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "extending the run from 2 to 3 epochs" in out and "epoch   3/3" in out
    long, _, long_meta = read_checkpoint(tmp_path / "long" / "last.npz")
    extended, _, meta = read_checkpoint(tmp_path / "short" / "last.npz")
    assert len(meta["history"]) == 3 and json.loads((tmp_path / "short" / "config.json").read_text())["epochs"] == 3
    for key in long:                                   # schedule "none": extending = never having stopped
        np.testing.assert_array_equal(extended[key], long[key], err_msg=key)


# 4. one writer per run directory ---------------------------------------------------------------
def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(data, tmp_path):
    out = tmp_path / "run"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])    # a live second writer
    try:
        with RunLock(out):                                       # held by this process: the other one's view
            assert (out / ".lock").read_text().split()[0] == str(os.getpid())
        out.mkdir(exist_ok=True)
        (out / ".lock").write_text(f"{other.pid} {os.uname().nodename}\n")
        with pytest.raises(CovidCTError, match=f"in use by process {other.pid}"):
            train(tiny(data, out), **QUIET)
        with pytest.raises(CovidCTError, match=f"in use by process {other.pid}"):
            Trainer(tiny(data, out), **QUIET).fit()
    finally:
        other.kill()
        other.wait()
    assert not (out / "best.npz").exists() and not (out / "history.csv").exists()

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()                                             # its pid no longer runs: a kill -9 leftover
    (out / ".lock").write_text(f"{finished.pid} {os.uname().nodename}\n")
    messages = []
    train(tiny(data, out), log=messages.append)
    assert any("removing the stale lock" in str(m) for m in messages)
    assert (out / "best.npz").is_file() and not (out / ".lock").exists()


# 5. unwritable outputs fail at the start with one line ---------------------------------------------
def test_unwritable_outputs_are_refused_before_any_work(data, run, image, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    one_line_error(capsys, ["train", "--data", data, "--model", "tiny", "--epochs", "1", "--no-progress",
                            "--out", blocker / "run"], f"--out {blocker / 'run'}: cannot write there")
    one_line_error(capsys, ["train", "--data", data, "--model", "tiny", "--epochs", "1", "--no-progress",
                            "--out", tmp_path / "run2", "--cache-dir", blocker / "cache"], "--cache-dir")
    one_line_error(capsys, ["predict", "--checkpoint", run / "best.npz", image, "--output", blocker / "p.csv"],
                   f"--output {blocker / 'p.csv'}: cannot write there")
    one_line_error(capsys, ["predict", "--checkpoint", run / "best.npz", image, "--gradcam", blocker / "cams"],
                   "--gradcam")
    one_line_error(capsys, ["synth", "--out", blocker / "syn", "--n", "4"], "--out")
    # evaluate next to a checkpoint whose folder cannot take eval-val/: refused before predicting anything
    beside = tmp_path / "ckpt"
    beside.mkdir()
    shutil.copy(run / "best.npz", beside / "best.npz")
    (beside / "eval-val").write_text("a file where the output folder would go")
    one_line_error(capsys, ["evaluate", "--checkpoint", beside / "best.npz", "--data", data, "--split", "val"],
                   "--out", "eval-val")


# 6. damaged or hand-edited checkpoints: "not a covidct checkpoint: ..." -----------------------------
@pytest.mark.parametrize("metadata, reason", [
    ({"model_config": None}, "no 'model_config'"),
    ({"normalization": None}, "no 'normalization'"),
    ({"preprocess": {"size": 32, "resize": "pad", "gamma": 2}}, "unknown keys"),
    ({"normalization": {"mean": 0.5}}, "'mean' and 'std'"),
    ({"threshold": "high"}, "threshold 'high'"),
])
def test_hand_edited_metadata_is_one_line(run, image, tmp_path, capsys, metadata, reason):
    edited = rewrite_checkpoint(run / "best.npz", tmp_path / "edited.npz", metadata=metadata)
    one_line_error(capsys, ["predict", "--checkpoint", edited, image], "not a covidct checkpoint:", reason)


def test_unknown_model_config_field_and_corrupt_npy_header_are_one_line(run, image, tmp_path, capsys):
    _, meta = mc.serialization.load(run / "best.npz")
    edited = rewrite_checkpoint(run / "best.npz", tmp_path / "edited.npz",
                                metadata={"model_config": dict(meta["model_config"], width=3)})
    one_line_error(capsys, ["predict", "--checkpoint", edited, image], "not a covidct checkpoint:", "width")
    with zipfile.ZipFile(run / "best.npz") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    name = next(n for n in members if n.startswith("model."))
    raw = members[name]
    members[name] = raw[:10] + b"{'descr': '<f4', '''".ljust(len(raw[10:raw.index(b"\n") + 1])) + \
        raw[raw.index(b"\n") + 1:]                          # an unterminated string in the .npy header
    with zipfile.ZipFile(tmp_path / "corrupt.npz", "w") as archive:
        for member, content in members.items():
            archive.writestr(member, content)
    one_line_error(capsys, ["predict", "--checkpoint", tmp_path / "corrupt.npz", image],
                   "not a covidct checkpoint:", "not a readable .npz")


# 7. --skip-bad keeps the skipped files of every split, in the run directory ---------------------------
def test_skip_bad_keeps_every_splits_list_in_the_run(tmp_path):
    data = write_dataset(tmp_path / "data", n=24, seed=5, size=32)
    broken = {split: read_dataset(data, split=split).paths[0] for split in ("train", "val")}
    for path in broken.values():
        Path(path).write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped 1 of"):
        train(tiny(data, tmp_path / "run", skip_bad=True), **QUIET)
    for split, path in broken.items():
        listing = (tmp_path / "run" / f"skipped-{split}.txt").read_text()
        assert path in listing and "not a readable image" in listing, split


# 8. smaller ones --------------------------------------------------------------------------------
def test_resume_before_the_first_epoch_ended_says_how_to_restart(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**tiny(data, out).__dict__}))   # killed during epoch 1
    one_line_error(capsys, ["train", "--resume", out], "no epoch was completed, so nothing was saved yet",
                   f"covidct train --data {data} --out {out}")


def test_a_directory_given_as_checkpoint_is_named_as_one(run, image, capsys):
    one_line_error(capsys, ["predict", "--checkpoint", run, image], "is a directory", str(run / "best.npz"))


def test_skip_warnings_are_one_plain_line(data, run, tmp_path, capsys):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    Path(read_dataset(copy, split="val").paths[0]).write_bytes(b"broken")
    status = main(["evaluate", "--checkpoint", str(run / "best.npz"), "--data", str(copy), "--split", "val",
                   "--skip-bad", "--out", str(tmp_path / "eval"), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert status == 0
    assert "warning: skipped 1 of" in err and "UserWarning" not in err and ".py:" not in err
    assert "broken" not in err and "not a readable image" in (tmp_path / "eval" / "skipped_files.txt").read_text()


def test_images_over_the_pixel_limit_are_refused_before_decoding(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preprocess, "MAX_PIXELS", preprocess.MAX_PIXELS)   # restored after main() changes it
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((120, 100), np.uint8)).save(big)
    status = main(["--max-pixels", "10000", "predict", "--checkpoint", str(run / "best.npz"), str(big)])
    assert status == 1 and "100x120 = 12,000 pixels, more than the limit of 10,000" in capsys.readouterr().err
    monkeypatch.undo()
    assert preprocess.load_image(big, preprocess.Preprocess(32)).shape == (1, 32, 32)  # the default allows it


def test_big_images_decode_one_at_a_time(tmp_path, monkeypatch):
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((60, 50), 40 * i, np.uint8)).save(paths[-1])
    monkeypatch.setattr(preprocess, "_decode_budget", preprocess.PixelBudget(5000))  # one 3000-pixel image fits
    active, peak, lock = [0], [0], threading.Lock()
    to_gray = preprocess.to_gray

    def slow_to_gray(image):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return to_gray(image)

    monkeypatch.setattr(preprocess, "to_gray", slow_to_gray)
    dataset = read_dataset.__globals__["Dataset"]([str(p) for p in paths], [0, 1, 0, 1])
    images, _, _ = preprocess.load_images(dataset, preprocess.Preprocess(16), workers=4)
    assert images.shape == (4, 1, 16, 16) and peak[0] == 1


def test_all_nan_float_tiff_is_refused_and_partly_nan_warns(tmp_path):
    nan = tmp_path / "nan.tif"
    Image.fromarray(np.full((20, 24), np.nan, np.float32)).save(nan)
    with pytest.raises(DataError, match="nan.tif: every pixel is NaN or infinite"):
        preprocess.load_image(nan, preprocess.Preprocess(16))
    values = np.full((20, 24), 0.5, np.float32)
    values[0, :3] = np.nan
    partly = tmp_path / "partly.tif"
    Image.fromarray(values).save(partly)
    with pytest.warns(UserWarning, match="3 of 480 pixels are NaN or infinite"):
        preprocess.load_image(partly, preprocess.Preprocess(16))


# 9. exit statuses and real bugs ---------------------------------------------------------------------
def test_train_covid_example_returns_a_failed_steps_status(data, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_covid", Path(__file__).parents[1] / "examples" / "train_covid.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(example, "train", lambda config, **_: {"best_epoch": 1, "checkpoint": str(tmp_path / "best.npz")})
    monkeypatch.setattr("covidct.cli.main", lambda argv: 2)        # evaluate fails (and says why itself)
    args = example.argparse.Namespace(data=str(data), out=str(tmp_path / "run"), epochs=1, device="cpu", seed=0,
                                      no_progress=True, members=None, jobs=1)
    assert example.run(args) == 2


def test_only_user_errors_become_one_line(tmp_path, monkeypatch):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"PK not really a zip")
    with pytest.raises(CovidCTError, match="cannot read weights"):
        load_pretrained_weights(mc.Sequential(mc.Linear(2, 2)), bad)

    def bug(path):
        raise AttributeError("a bug, not a user mistake")

    monkeypatch.setattr("minicnn.torch_load.load_state_dict_file", bug)
    with pytest.raises(AttributeError, match="a bug"):                 # keeps its traceback
        load_pretrained_weights(mc.Sequential(mc.Linear(2, 2)), bad)


def test_the_cli_reports_fixable_os_errors_in_one_line_and_keeps_bugs_tracebacks(capsys):
    from covidct.cli import run_reporting_errors

    def no_permission(args):
        raise PermissionError(13, "Permission denied", "/runs/x/last.npz")

    def disk_full(args):
        raise OSError(28, "No space left on device", "/runs/x/best.npz")

    def bug(args):
        raise TypeError("a bug")

    assert run_reporting_errors(no_permission, None) == 2
    assert capsys.readouterr().err.strip() == "error: /runs/x/last.npz: Permission denied"
    assert run_reporting_errors(disk_full, None) == 2
    assert capsys.readouterr().err.strip() == "error: /runs/x/best.npz: No space left on device"
    with pytest.raises(TypeError, match="a bug"):
        run_reporting_errors(bug, None)
