"""examples/reproduce_report.py: --rounds picks the rounds; round 4 needs --extra-data."""
import pytest

from conftest_models import load_example


def _script():
    return load_example("reproduce_report")


def test_rounds_selects_round_4_alone_and_it_asks_for_the_extra_data(tmp_path, capsys):
    _script().main(["--data", str(tmp_path), "--rounds", "4", "--out", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ") and "round" not in line]
    assert len(table) == 1 and table[0].startswith("| 4: large data set") and "needs --extra-data" in out
    assert not (tmp_path / "runs").exists()                 # nothing was trained


def test_rounds_refuses_an_unknown_round(tmp_path):
    with pytest.raises(SystemExit, match="--rounds '1,9'"):
        _script().main(["--data", str(tmp_path), "--rounds", "1,9"])
