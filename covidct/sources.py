"""Where a slice comes from: its source (paper, case, scan) from the file name, and source weights.

    source_group(path, label)        -> the source of one slice
    slice_groups(paths, labels)      -> the source of every slice (plain-number runs joined)
    source_weights(paths, labels)    -> sampling weights: every source of a class weighs alike

COVID-CT's slices were cut out of papers, often several from one paper (one patient,
one scanner, one figure style). The rules, from the file names:

  COVID      ``2020.02.25.20021568-p23-108%2.png``  -> the preprint id before ``-p``
  non-COVID  ``39%1.jpg``                            -> the number before ``%`` (one case)
  non-COVID  ``1058.png``, ``1059.png``, ...          -> runs of consecutive numbers (per extension)
  anything else                                      -> the file name without extension

Limits: the non-COVID sources are not published; consecutive numbers are a guess
(neighbouring slices of one scan are numbered in a row) and may split one source in
two or join two. Cross-validation (``covidct.cv``) keeps sources apart; training with
``--sampling sources`` draws slices so that a preprint with 26 slices counts as much as
one with 2 (``covidct.loader.DataLoader(weights=...)``).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

__all__ = ["source_group", "slice_groups", "source_weights"]


def source_group(path, label: int) -> str:
    """The source of one slice, from its file name (rules in the module docstring)."""
    path = Path(path)
    stem = path.stem
    if label == 1 and "-p" in stem:
        return "covid:" + stem.split("-p")[0]
    if "%" in stem:
        return f"{label}:" + stem.split("%")[0]
    if stem.isdigit():                                      # joined into runs by slice_groups
        return f"{label}:{stem}{path.suffix.lower()}"
    return f"{label}:{stem}"


def _join_number_runs(groups: list[str]) -> list[str]:
    """Plain-number names (``1058.png``) of one class and extension joined into runs of
    consecutive numbers. Case numbers from ``A%B`` names (``0:39``) are never joined: a case
    is one patient, and neighbouring case numbers are different patients."""
    def parts(g):
        cls, name = g.split(":")
        number, ext = name.split(".")
        return cls, ext, int(number)

    numbered = sorted({g for g in groups if re.fullmatch(r"\d+:\d+\.\w+", g)}, key=parts)
    run_of, previous, start = {}, None, None
    for g in numbered:
        cls, ext, number = parts(g)
        if previous is None or previous[:2] != (cls, ext) or number != previous[2] + 1:
            start = f"{cls}:run{number}.{ext}"
        run_of[g], previous = start, (cls, ext, number)
    return [run_of.get(g, g) for g in groups]


def slice_groups(paths, labels) -> list[str]:
    """source_group for every slice, with plain-number runs joined."""
    return _join_number_runs([source_group(p, int(y)) for p, y in zip(paths, labels)])


def source_weights(paths, labels) -> np.ndarray:
    """One weight per slice, 1 / (slices of its source), scaled within each class so that the class
    keeps its share: drawing slices with these weights gives every source of a class the same
    expected number of draws, and the classes their usual counts."""
    labels = np.asarray(labels)
    _, inverse, sizes = np.unique(slice_groups(paths, labels), return_inverse=True, return_counts=True)
    weights = 1.0 / sizes[inverse]
    for label in np.unique(labels):
        in_class = labels == label
        weights[in_class] *= in_class.sum() / weights[in_class].sum()
    return weights
