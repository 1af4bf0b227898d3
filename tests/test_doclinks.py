"""Links from docs/ to code lines name the code they mean (tools/doclinks.py); a moved line fails here."""
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("doclinks", REPO / "tools" / "doclinks.py")
doclinks = sys.modules.setdefault("doclinks", importlib.util.module_from_spec(spec))
spec.loader.exec_module(doclinks)


def test_every_doc_link_points_at_the_code_it_names():
    found = doclinks.links()
    assert len(found) > 90                                 # backprop.md, gradcheck.md, resnet.md
    wrong = [problem for problem, _ in map(doclinks.problems, found) if problem]
    assert not wrong, "run: python tools/doclinks.py --fix\n" + "\n".join(wrong)


def test_a_link_to_a_moved_line_or_a_missing_symbol_is_caught(tmp_path):
    (tmp_path / "code.py").write_text("import math\n\n\ndef area(r):\n    square = r * r\n    return math.pi * square\n")
    doc = tmp_path / "doc.md"
    doc.write_text('[area](code.py#L4-L6 "area") and [L5](code.py#L5 "area: square = ")\n'
                   '[moved](code.py#L3 "area: return math.pi") [gone](code.py#L1 "volume") [bare](code.py#L2)\n')
    results = [doclinks.problems(link) for link in doclinks.links([doc])]
    assert [problem is None for problem, _ in results] == [True, True, False, False, False]
    assert "is at lines 6-6, not 3-3" in results[2][0] and results[2][1] == (6, 6)
    assert "no function or class 'volume'" in results[3][0] and "no title" in results[4][0]
    moved = doclinks.links([doc])[2]
    assert doclinks.fixed(moved, (6, 6)) == '[moved](code.py#L6 "area: return math.pi")'
