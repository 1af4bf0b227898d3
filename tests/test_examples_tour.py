"""examples/gradcheck_tour.py runs, checks every layer and reports a failure with exit status 1."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path


import minicnn

REPO_ROOT = Path(__file__).resolve().parents[1]
TOUR = REPO_ROOT / "examples" / "gradcheck_tour.py"


def test_gradcheck_tour_passes():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(TOUR)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"^all (\d+) checks passed \(relative error <= 1e-06\)$", result.stdout, re.MULTILINE)
    assert match, result.stdout
    rows = [line for line in result.stdout.splitlines() if line.count(" | ") >= 2]
    assert len(rows) == int(match.group(1)) >= 15
    for layer in ["Conv2d", "MaxPool2d", "ReLU", "Linear", "Flatten", "Dropout", "SoftmaxCrossEntropy", "Sequential"]:
        assert any(row.startswith(layer) for row in rows), f"no {layer} row in:\n{result.stdout}"
    assert any("s=2 p=1" in row and row.startswith("Conv2d") for row in rows)
    assert any("input" in row and "weight" in row and "bias" in row for row in rows)


class _WrongBackward(minicnn.ReLU):
    """ReLU whose backward forgets the mask: the tour must catch it."""

    def backward(self, grad_output):
        self.saved_for_backward()
        return grad_output


def test_gradcheck_tour_reports_a_wrong_backward(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gradcheck_tour", TOUR)
    tour = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tour)
    x = tour.distinct_values((2, 3), seed=0)
    monkeypatch.setattr(tour, "CHECKS", tour.CHECKS[:1] + [("BadReLU", "no mask", _WrongBackward(), x, ())])
    assert tour.main() == 1
    out = capsys.readouterr().out
    assert "BadReLU" in out and "FAILED" in out
    assert "1 of 2 checks FAILED" in out
