"""Read a COVID-CT dataset from disk: which image files, with which labels.

    read_dataset(source, split=None)  -> Dataset(paths, labels, name, source)
    list_splits(source)               -> ["train", "val", ...]
    write_manifest(dataset, csv_path)    canonical CSV "path,label"
    describe(source) / format_description(d)

Labels: COVID-19 positive = 1, negative = 0 (``covidct.COVID``, ``covidct.NON_COVID``).
The UCSD COVID-CT code used the opposite (0 = COVID); every covidct metric
treats COVID as the positive class.

Three layouts are recognised (``read_dataset`` detects which one):

1. UCSD COVID-CT::

       ROOT/[Images-processed/]CT_COVID/*.png      ROOT/[Images-processed/]CT_NonCOVID/*.jpg
       ROOT/Data-split/COVID/{train,val,test}CT_COVID.txt
       ROOT/Data-split/NonCOVID/{train,val,test}CT_NonCOVID.txt   (one file name per line)

2. A CSV file. Canonical header ``path,label`` (optional ``split`` column). The
   2020 report's files are accepted too: ``idx,images,patient id,labels`` and
   ``idx,images,blank,labels``. Relative paths are relative to the CSV's folder
   (or to ``root=``). Label 1 = COVID unless ``covid_label=0`` is given.

3. One folder per class (torchvision ImageFolder style)::

       ROOT/[SPLIT/]covid/*.png    ROOT/[SPLIT/]non-covid/*.jpg    (names configurable)

Every problem (missing file, duplicate, bad label, empty class, ...) is a
``DataError`` whose one-line message names the file.
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidct import CLASS_NAMES, COVID, NON_COVID
from covidct.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Dataset",
    "read_dataset",
    "read_ucsd",
    "read_csv",
    "read_folders",
    "list_splits",
    "detect_layout",
    "write_manifest",
    "describe",
    "format_description",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
UCSD_CLASS_DIRS = {COVID: "CT_COVID", NON_COVID: "CT_NonCOVID"}
UCSD_SPLIT_DIRS = {COVID: ("COVID", "CT_COVID"), NON_COVID: ("NonCOVID", "CT_NonCOVID")}
SPLIT_ORDER = ("train", "val", "test")

# CSV header names (lower-cased, stripped) -> meaning
PATH_COLUMNS = ("path", "images", "image", "filename", "file")
LABEL_COLUMNS = ("label", "labels")


@dataclass
class Dataset:
    """A list of image files and their labels.

    paths:  absolute file paths (str), one per image
    labels: int64 (N,), 1 = COVID, 0 = non-COVID
    name:   short name, e.g. "train"
    source: where it was read from (folder or CSV)
    """
    paths: list[str]
    labels: np.ndarray
    name: str = ""
    source: str = ""
    patients: list[str] | None = field(default=None, repr=False)

    def __post_init__(self):
        self.paths = [str(p) for p in self.paths]
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.paths) != len(self.labels):
            raise DataError(f"{self.source or 'dataset'}: {len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        """{"non-COVID": n0, "COVID": n1}"""
        return {CLASS_NAMES[k]: int(np.sum(self.labels == k)) for k in (NON_COVID, COVID)}

    def subset(self, indices, name: str | None = None) -> "Dataset":
        """The images at `indices` (e.g. one fold of a k-fold split)."""
        indices = np.asarray(indices, dtype=np.int64)
        patients = [self.patients[i] for i in indices] if self.patients is not None else None
        return Dataset([self.paths[i] for i in indices], self.labels[indices],
                       name if name is not None else self.name, self.source, patients)

    def __repr__(self) -> str:
        c = self.counts()
        return (f"Dataset(name={self.name!r}, {len(self)} images: {c['COVID']} COVID + "
                f"{c['non-COVID']} non-COVID, source={self.source!r})")


# ------------------------------------------------------------------ checks shared by readers
def _check_dataset(dataset: Dataset, check_files: bool, require_both_classes: bool) -> Dataset:
    where = dataset.source + (f" [{dataset.name}]" if dataset.name else "")
    if len(dataset) == 0:
        raise DataError(f"{where}: the dataset is empty (no images listed)")
    seen: dict[str, int] = {}
    for path, label in zip(dataset.paths, dataset.labels):
        key = os.path.normcase(path)
        if key in seen:
            if seen[key] != label:
                raise DataError(f"{path}: listed in both classes (COVID and non-COVID)")
            raise DataError(f"{path}: listed twice in {where}; remove the duplicate line")
        seen[key] = int(label)
    if check_files:
        for path in dataset.paths:
            if not os.path.isfile(path):
                what = "is not a file" if os.path.exists(path) else "does not exist"
                raise DataError(f"{path}: listed in {where} but {what}")
    if require_both_classes:
        for label in (NON_COVID, COVID):
            if not np.any(dataset.labels == label):
                raise DataError(f"{where}: no {CLASS_NAMES[label]} images (label {label}); "
                                f"both classes are needed")
    return dataset


# ------------------------------------------------------------------ UCSD layout
def _ucsd_image_dir(root: Path) -> Path | None:
    """The folder that holds CT_COVID/ and CT_NonCOVID/, or None."""
    for base in (root / "Images-processed", root):
        if all((base / d).is_dir() for d in UCSD_CLASS_DIRS.values()):
            return base
    return None


def _ucsd_split_file(root: Path, label: int, split: str) -> Path:
    folder, suffix = UCSD_SPLIT_DIRS[label]
    return root / "Data-split" / folder / f"{split}{suffix}.txt"


def _sorted_splits(names) -> list[str]:
    names = set(names)
    return [s for s in SPLIT_ORDER if s in names] + sorted(names - set(SPLIT_ORDER))


def _ucsd_splits(root: Path) -> list[str]:
    """Splits with a file in Data-split/COVID or Data-split/NonCOVID."""
    names = set()
    for label, (folder, suffix) in UCSD_SPLIT_DIRS.items():
        for f in (root / "Data-split" / folder).glob(f"*{suffix}.txt"):
            names.add(f.name[: -len(suffix + ".txt")])
    names.discard("")
    return _sorted_splits(names)


def _read_split_file(file: Path) -> list[str]:
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{file}: not a text file of image names (not UTF-8)") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_ucsd(root, split: str, check_files: bool = True, require_both_classes: bool = True) -> Dataset:
    """One split of the UCSD COVID-CT layout (see the module docstring)."""
    root = Path(root).resolve()
    image_dir = _ucsd_image_dir(root)
    if image_dir is None:
        raise DataError(f"{root}: no CT_COVID/ and CT_NonCOVID/ folders (directly or under Images-processed/)")
    if split is None:
        raise DataError(f"{root}: choose a split ({', '.join(_ucsd_splits(root)) or 'none found'})")
    paths, labels = [], []
    for label in (COVID, NON_COVID):
        file = _ucsd_split_file(root, label, split)
        if not file.is_file():
            existing = _ucsd_splits(root)
            raise DataError(f"{file}: split {split!r} not found; splits that exist: "
                            f"{', '.join(existing) if existing else 'none'}")
        for name in _read_split_file(file):
            paths.append(str(image_dir / UCSD_CLASS_DIRS[label] / name))
            labels.append(label)
    dataset = Dataset(paths, labels, split, str(root))
    return _check_dataset(dataset, check_files, require_both_classes)


# ------------------------------------------------------------------ CSV
def _find_column(header: list[str], candidates) -> int | None:
    for name in candidates:
        if name in header:
            return header.index(name)
    return None


def _parse_label(text: str, csv_path, line: int, covid_label: int) -> int:
    value = text.strip()
    if value.endswith(".0"):                   # "1.0" written by pandas
        value = value[:-2]
    if value not in ("0", "1"):
        raise DataError(f"{csv_path}: line {line}: label {text.strip()!r} is not 0 or 1")
    return COVID if int(value) == covid_label else NON_COVID


def read_csv(csv_path, split: str | None = None, root=None, covid_label: int = 1,
             check_files: bool = True, require_both_classes: bool = True) -> Dataset:
    """A CSV of image paths and 0/1 labels.

    Headers (case and spaces ignored): a path column (path, images, image,
    filename, file), a label column (label, labels), optionally split, patient
    id / name / blank / idx (ignored). covid_label: the label value that means
    COVID in this file (1, or 0 for files that follow the UCSD convention).
    split: keep only rows whose split column equals it.
    """
    csv_path = Path(csv_path).resolve()
    if covid_label not in (0, 1):
        raise DataError(f"covid_label={covid_label!r}: expected 0 or 1")
    base = Path(root).resolve() if root is not None else csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DataError(f"{csv_path}: CSV file not found") from None
    except UnicodeDecodeError:
        raise DataError(f"{csv_path}: not a text CSV file (not UTF-8)") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"{csv_path}: empty CSV (no header, no rows)")
    header = [h.strip().lower() for h in rows[0]]
    path_col, label_col = _find_column(header, PATH_COLUMNS), _find_column(header, LABEL_COLUMNS)
    split_col = _find_column(header, ("split",))
    if path_col is None or label_col is None:
        raise DataError(f"{csv_path}: header {','.join(rows[0])!r} lacks a "
                        f"{'path' if path_col is None else 'label'} column; expected 'path,label' "
                        f"(or the report's 'idx,images,patient id,labels')")
    if split is not None and split_col is None:
        raise DataError(f"{csv_path}: split {split!r} requested but the CSV has no 'split' column")
    patient_col = _find_column(header, ("patient id", "patient", "patient_id", "name"))

    paths, labels, patients, splits_seen = [], [], [], set()
    for line, row in enumerate(rows[1:], start=2):
        if len(row) <= max(path_col, label_col):
            raise DataError(f"{csv_path}: line {line}: {len(row)} columns, expected {len(header)}")
        if split_col is not None:
            row_split = row[split_col].strip() if split_col < len(row) else ""
            splits_seen.add(row_split)
            if split is not None and row_split != split:
                continue
        name = row[path_col].strip()
        if not name:
            raise DataError(f"{csv_path}: line {line}: empty image path")
        paths.append(str((base / name).resolve()))
        labels.append(_parse_label(row[label_col], csv_path, line, covid_label))
        patients.append(row[patient_col].strip() if patient_col is not None and patient_col < len(row) else "")
    if split is not None and not paths:
        raise DataError(f"{csv_path}: no rows with split {split!r}; splits that exist: "
                        f"{', '.join(_sorted_splits(splits_seen)) or 'none'}")
    dataset = Dataset(paths, labels, split or csv_path.stem, str(csv_path),
                      patients if patient_col is not None else None)
    return _check_dataset(dataset, check_files, require_both_classes)


# ------------------------------------------------------------------ folder per class
def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def class_dir(base: Path, name: str) -> Path:
    """base/name, matched without regard to case (``COVID/`` and ``non-COVID/`` as the
    SARS-CoV-2 CT set names them); base/name itself when nothing matches."""
    exact = Path(base) / name
    if exact.is_dir() or not Path(base).is_dir():
        return exact
    matches = [d for d in Path(base).iterdir() if d.is_dir() and d.name.lower() == name.lower()]
    return matches[0] if len(matches) == 1 else exact


def read_folders(root, split: str | None = None, covid_dir: str = "covid", non_covid_dir: str = "non-covid",
                 require_both_classes: bool = True) -> Dataset:
    """ROOT/[split/]covid/* = 1 and ROOT/[split/]non-covid/* = 0 (image extensions only)."""
    root = Path(root).resolve()
    base = root / split if split is not None else root
    if split is not None and not base.is_dir():
        raise DataError(f"{base}: split {split!r} not found; splits that exist: "
                        f"{', '.join(list_splits(root, covid_dir, non_covid_dir)) or 'none'}")
    paths, labels = [], []
    for label, folder_name in ((COVID, covid_dir), (NON_COVID, non_covid_dir)):
        folder = class_dir(base, folder_name)
        if not folder.is_dir():
            raise DataError(f"{folder}: class folder not found; expected {covid_dir}/ and {non_covid_dir}/ in {base}")
        files = _list_images(folder)
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    dataset = Dataset(paths, labels, split or root.name, str(root))
    return _check_dataset(dataset, False, require_both_classes)


# ------------------------------------------------------------------ detection and entry point
def detect_layout(source, covid_dir: str = "covid", non_covid_dir: str = "non-covid") -> str:
    """"ucsd", "csv", "folders" or "ucsd-folders" (CT_COVID/CT_NonCOVID without Data-split)."""
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() in (".csv", ".txt", ".tsv"):
            return "csv"
        raise DataError(f"{source}: a file that is not a CSV; expected a .csv or a dataset folder")
    if not source.is_dir():
        raise DataError(f"{source}: no such file or folder")
    if (source / "Data-split").is_dir() and _ucsd_image_dir(source) is not None:
        return "ucsd"
    if _ucsd_image_dir(source) is not None:
        return "ucsd-folders"
    if class_dir(source, covid_dir).is_dir() and class_dir(source, non_covid_dir).is_dir():
        return "folders"
    if any(class_dir(d, covid_dir).is_dir() and class_dir(d, non_covid_dir).is_dir()
           for d in source.iterdir() if d.is_dir()):
        return "folders"
    raise DataError(f"{source}: not a recognised dataset: expected Data-split/ with CT_COVID/ and "
                    f"CT_NonCOVID/ (UCSD layout), {covid_dir}/ and {non_covid_dir}/ folders, or a CSV file")


def read_dataset(source, split: str | None = None, *, root=None, covid_label: int = 1,
                 covid_dir: str = "covid", non_covid_dir: str = "non-covid", check_files: bool = True,
                 require_both_classes: bool = True) -> Dataset:
    """Read any supported layout (auto-detected) -> Dataset.

    split: "train", "val", "test", ... (required for the UCSD layout; for a CSV it
    selects rows by the 'split' column; for folders it is a sub-folder).
    root / covid_label: CSV options (see read_csv). covid_dir / non_covid_dir:
    class folder names for the folder-per-class layout.
    check_files=False defers missing-file errors to load_images (where skip_bad applies).
    """
    layout = detect_layout(source, covid_dir, non_covid_dir)
    if layout == "ucsd":
        return read_ucsd(source, split, check_files, require_both_classes)
    if layout == "csv":
        return read_csv(source, split, root, covid_label, check_files, require_both_classes)
    if layout == "ucsd-folders":
        base = _ucsd_image_dir(Path(source))
        if split is not None:
            raise DataError(f"{source}: no Data-split/ folder, so no split {split!r}; use split=None "
                            f"to read every image in CT_COVID/ and CT_NonCOVID/")
        return read_folders(base, None, UCSD_CLASS_DIRS[COVID], UCSD_CLASS_DIRS[NON_COVID], require_both_classes)
    if split is None and not class_dir(Path(source), covid_dir).is_dir():
        raise DataError(f"{source}: choose a split ({', '.join(list_splits(source, covid_dir, non_covid_dir))})")
    return read_folders(source, split, covid_dir, non_covid_dir, require_both_classes)


def list_splits(source, covid_dir: str = "covid", non_covid_dir: str = "non-covid") -> list[str]:
    """Split names available in a dataset, train/val/test first ([] if it has none)."""
    source = Path(source)
    layout = detect_layout(source, covid_dir, non_covid_dir)
    if layout == "ucsd":
        return _ucsd_splits(source)
    if layout == "csv":
        with open(source, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
        header = [h.strip().lower() for h in rows[0]] if rows else []
        col = _find_column(header, ("split",))
        if col is None:
            return []
        return _sorted_splits(r[col].strip() for r in rows[1:] if col < len(r) and r[col].strip())
    if layout == "folders":
        return _sorted_splits(d.name for d in source.iterdir()
                              if class_dir(d, covid_dir).is_dir() and class_dir(d, non_covid_dir).is_dir())
    return []


# ------------------------------------------------------------------ manifest
def write_manifest(dataset: Dataset, csv_path, split: str | None = None) -> Path:
    """Write the canonical CSV ``path,label[,split]``.

    Paths under the CSV's folder are written relative to it, others absolute.

    Read it back with read_dataset(csv_path). Edit or concatenate such files to make
    your own splits. Written atomically (temp file + os.replace).
    """
    csv_path = Path(csv_path).resolve()
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "label"] + (["split"] if split is not None else []))
        for path, label in zip(dataset.paths, dataset.labels):
            try:                                # relative when inside the CSV's folder
                shown = Path(path).relative_to(csv_path.parent).as_posix()
            except ValueError:
                shown = Path(path).as_posix()
            writer.writerow([shown, int(label)] + ([split] if split is not None else []))
    os.replace(tmp, csv_path)
    return csv_path


# ------------------------------------------------------------------ describe
def _image_stats(paths) -> dict:
    from PIL import Image
    sizes, modes, formats, unreadable = [], Counter(), Counter(), 0
    for path in paths:
        try:
            with Image.open(path) as image:        # reads the header only
                sizes.append(image.size)
                modes[image.mode] += 1
                formats[image.format] += 1
        except Exception:                          # describe() reports, it does not stop
            unreadable += 1
    stats = {"modes": dict(modes), "formats": dict(formats), "unreadable": unreadable}
    if sizes:
        w, h = np.array(sizes).T
        stats["width"] = (int(w.min()), int(w.max()))
        stats["height"] = (int(h.min()), int(h.max()))
    return stats


def describe(source, **read_options) -> dict:
    """Counts per class and split, image size range, modes and formats.

    {"source", "layout", "splits": {name: {"COVID": n, "non-COVID": n, "total": n,
     "width": (min, max), "height": (min, max), "modes": {...}, "formats": {...},
     "unreadable": n}}}
    """
    layout = detect_layout(source, read_options.get("covid_dir", "covid"),
                           read_options.get("non_covid_dir", "non-covid"))
    splits = list_splits(source, read_options.get("covid_dir", "covid"),
                         read_options.get("non_covid_dir", "non-covid")) or [None]
    result = {"source": str(Path(source).resolve()), "layout": layout, "splits": {}}
    for split in splits:
        dataset = read_dataset(source, split, **read_options)
        entry = {**dataset.counts(), "total": len(dataset)}
        for label in (COVID, NON_COVID):
            stats = _image_stats(p for p, y in zip(dataset.paths, dataset.labels) if y == label)
            entry[f"{CLASS_NAMES[label]} modes"] = stats["modes"]
            entry[f"{CLASS_NAMES[label]} formats"] = stats["formats"]
        stats = _image_stats(dataset.paths)
        entry.update(stats)
        result["splits"][split or dataset.name] = entry
    return result


def format_description(description: dict) -> str:
    """describe()'s dict as a small text table."""
    lines = [f"{description['source']} ({description['layout']} layout)",
             f"{'split':<8} {'COVID':>6} {'non-COVID':>10} {'total':>6}  {'width':>11}  {'height':>11}"]
    for name, e in description["splits"].items():
        width = "{}-{}".format(*e["width"]) if "width" in e else "-"
        height = "{}-{}".format(*e["height"]) if "height" in e else "-"
        lines.append(f"{name:<8} {e['COVID']:>6} {e['non-COVID']:>10} {e['total']:>6}  {width:>11}  {height:>11}")
    for name, e in description["splits"].items():
        for cls in ("COVID", "non-COVID"):
            modes = ", ".join(f"{k} {v}" for k, v in sorted(e[f"{cls} modes"].items()))
            formats = ", ".join(f"{k} {v}" for k, v in sorted(e[f"{cls} formats"].items(), key=str))
            lines.append(f"{name} {cls}: modes {modes or '-'}; formats {formats or '-'}")
        if e.get("unreadable"):
            lines.append(f"{name}: {e['unreadable']} unreadable files")
    return "\n".join(lines)
