"""Every README picture comes from a command in the repo: run those commands on tiny inputs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from covidct.synthetic import write_dataset
from covidct.train import TrainConfig, train
from pictures import assert_picture

REPO = Path(__file__).resolve().parents[1]


def run(script, *args):
    result = subprocess.run([sys.executable, str(REPO / "examples" / script), *map(str, args)],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, MPLBACKEND="Agg"))
    assert result.returncode == 0, result.stderr
    return result


def is_png(path):
    assert_picture(path)                   # raises, naming the problem, if blank, tiny or not a PNG
    return True


def test_synthetic_vs_real_picture_without_real_data(tmp_path):
    out = tmp_path / "synthetic_vs_real.png"
    result = run("plot_synthetic_vs_real.py", tmp_path / "no-real-data", "--out", out)
    assert "synthetic slices only" in result.stdout and is_png(out)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    data = write_dataset(root / "data", n=40, seed=2, size=32)
    train(TrainConfig(data=str(data), out=str(root / "run"), model="tiny", epochs=1, batch_size=8, progress=False,
                      augment="none", cache_dir=str(root / "cache"), lungs="none"), log=lambda *a: None)
    return data, root / "run"


def test_explain_makes_the_gradcam_grid_and_the_other_pictures(tiny_run, tmp_path):
    data, run_dir = tiny_run
    run("explain.py", "--checkpoint", run_dir / "best.npz", "--data", data, "--split", "val", "--out", tmp_path,
        "--n", "4")
    for name in ["gradcam_grid.png", "hand_kernels.png", "filters.png", "feature_maps.png"]:
        assert is_png(tmp_path / name), name


def test_training_writes_the_curve_roc_and_confusion_pictures(tiny_run):
    _, run_dir = tiny_run
    for name in ["curves.png", "roc.png", "confusion.png"]:
        assert is_png(run_dir / name), name
