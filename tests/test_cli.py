"""The covidct command, run as a user runs it (subprocess): results, files, and one-line errors."""
import json
import os
import subprocess
import sys

import pytest

from covidct.synthetic import write_dataset
from pictures import assert_picture


def covidct(*args, cwd=None, env_extra=None):
    env = dict(os.environ, MPLBACKEND="Agg", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "covidct", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained through the CLI on a small synthetic dataset."""
    root = tmp_path_factory.mktemp("cli")
    data = write_dataset(root / "data", n=40, seed=1, size=32)
    run = root / "run"
    result = covidct("train", "--data", data, "--out", run, "--model", "tiny", "--epochs", "2", "--batch-size", "8",
                     "--lungs", "none",
                     "--no-progress", "--cache-dir", root / "cache", "--target-sensitivity", "0.9")
    assert result.returncode == 0, result.stderr
    return data, run, result


def test_train_prints_the_report_block_and_writes_a_checkpoint(trained):
    _, run, result = trained
    for line in ["Accuracy:", "Correct:", "Total: 6", "True positives:", "False negative rate:", "ROC AUC:"]:
        assert line in result.stdout
    assert (run / "best.npz").is_file() and "epoch   2/2" in result.stdout


def test_evaluate_writes_metrics_predictions_and_plots(trained, tmp_path):
    data, run, _ = trained
    result = covidct("evaluate", "--checkpoint", run / "best.npz", "--data", data, "--split", "test",
                     "--out", tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    assert "Total: 6" in result.stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["threshold"]["total"] == 6
    lines = (tmp_path / "eval" / "predictions.csv").read_text().splitlines()
    assert lines[0] == "file,label,p_covid,predicted,predicted_name" and len(lines) == 7
    assert_picture(tmp_path / "eval" / "roc.png", (660, 660))
    assert_picture(tmp_path / "eval" / "confusion.png", (600, 516))


def test_predict_folder_recursively_and_report_unreadable_files(trained, tmp_path):
    data, run, _ = trained
    folder = tmp_path / "scans" / "nested"
    folder.mkdir(parents=True)
    for source in sorted((data / "Images-processed" / "CT_COVID").glob("*.png"))[:2]:
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG truncated")
    result = covidct("predict", "--checkpoint", run / "best.npz", tmp_path / "scans", "--output", tmp_path / "p.json")
    assert result.returncode == 1  # some files failed
    assert "broken.png" in result.stderr and "1 of 3 files could not be read" in result.stderr
    assert "Traceback" not in result.stderr
    rows = json.loads((tmp_path / "p.json").read_text())
    assert len(rows) == 2 and all(0 <= row["p_covid"] <= 1 for row in rows)


def test_predict_all_good_exits_zero(trained):
    data, run, _ = trained
    image = sorted((data / "Images-processed" / "CT_NonCOVID").glob("*.png"))[0]
    result = covidct("predict", "--checkpoint", run / "best.npz", image)
    assert result.returncode == 0 and "P(COVID)" in result.stdout and image.name in result.stdout


def test_synth_and_describe(tmp_path):
    result = covidct("synth", "--out", tmp_path / "syn", "--n", "20", "--seed", "2")
    assert result.returncode == 0, result.stderr
    described = covidct("describe", tmp_path / "syn")
    assert described.returncode == 0 and "train" in described.stdout and "COVID" in described.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "/no/such/dir", "--no-progress"], "error: --data /no/such/dir: no such file or directory"),
    (["evaluate", "--checkpoint", "/no/such.npz", "--data", "."], "error: /no/such.npz: checkpoint not found"),
    (["predict", "--checkpoint", "/no/such.npz", "x.png"], "error: /no/such.npz: checkpoint not found"),
    (["describe", "/no/such/dir"], "error: "),
    (["train", "--resume", "/no/such/run"], "error: --resume /no/such/run: no config.json there"),
])
def test_user_mistakes_are_one_line_errors(args, message):
    result = covidct(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_option_values_are_rejected(trained, tmp_path):
    data, _, _ = trained
    result = covidct("train", "--data", data, "--epochs", "0", "--out", tmp_path / "r", "--no-progress")
    assert result.returncode == 2 and "error: --epochs must be >= 1, got 0" in result.stderr
    result = covidct("train", "--data", data, "--augment", "spin:3", "--out", tmp_path / "r", "--no-progress")
    assert result.returncode == 2 and "unknown transform 'spin:3'" in result.stderr
    result = covidct("evaluate", "--checkpoint", data / "Data-split" / "COVID" / "trainCT_COVID.txt",
                     "--data", data)
    assert result.returncode == 2 and "not a readable .npz checkpoint" in result.stderr


def test_help_shows_examples():
    result = covidct("train", "--help")
    assert result.returncode == 0 and "examples:" in result.stdout and "--target-sensitivity" in result.stdout
