"""Dataset readers: UCSD layout, CSV, folder per class, manifest, describe, bad input."""
import numpy as np
import pytest

from conftest_data import REAL_DATA, make_folders, make_ucsd, write_image
from covidct import COVID, NON_COVID
from covidct.data import (Dataset, describe, detect_layout, format_description, list_splits, read_csv,
                          read_dataset, write_manifest)
from covidct.errors import DataError


# ------------------------------------------------------------------ UCSD layout
@pytest.mark.parametrize("images_processed", [True, False])
def test_ucsd_reads_split_with_labels(tmp_path, images_processed):
    root = make_ucsd(tmp_path, 3, 2, images_processed=images_processed)
    ds = read_dataset(root, "train")
    assert detect_layout(root) == "ucsd"
    assert len(ds) == 5 and ds.name == "train"
    assert ds.labels.dtype == np.int64
    assert list(ds.labels) == [COVID] * 3 + [NON_COVID] * 2           # 1 = COVID, unlike UCSD's code
    assert all(p.startswith(str(tmp_path.resolve())) for p in ds.paths)
    assert ds.counts() == {"non-COVID": 2, "COVID": 3}


def test_ucsd_list_splits_and_missing_split_lists_existing(tmp_path):
    root = make_ucsd(tmp_path, splits=("train", "val"))
    assert list_splits(root) == ["train", "val"]
    with pytest.raises(DataError, match=r"testCT_COVID\.txt.*'test' not found.*train, val"):
        read_dataset(root, "test")


def test_ucsd_requires_a_split(tmp_path):
    with pytest.raises(DataError, match="choose a split"):
        read_dataset(make_ucsd(tmp_path), None)


def test_ucsd_missing_listed_file_names_it(tmp_path):
    root = make_ucsd(tmp_path)
    listing = root / "Data-split" / "COVID" / "trainCT_COVID.txt"
    listing.write_text(listing.read_text() + "ghost.png\n")
    with pytest.raises(DataError, match=r"ghost\.png: listed in .* does not exist"):
        read_dataset(root, "train")
    ds = read_dataset(root, "train", check_files=False)            # deferred to load_images
    assert ds.paths[-4].endswith("ghost.png")


def test_ucsd_duplicate_line_names_the_file(tmp_path):
    root = make_ucsd(tmp_path)
    listing = root / "Data-split" / "NonCOVID" / "trainCT_NonCOVID.txt"
    listing.write_text(listing.read_text() + "n0.jpg\n")
    with pytest.raises(DataError, match=r"n0\.jpg: listed twice"):
        read_dataset(root, "train")


def test_ucsd_empty_class_and_empty_dataset(tmp_path):
    root = make_ucsd(tmp_path)
    (root / "Data-split" / "NonCOVID" / "trainCT_NonCOVID.txt").write_text("")
    with pytest.raises(DataError, match=r"\[train\]: no non-COVID images"):
        read_dataset(root, "train")
    assert len(read_dataset(root, "train", require_both_classes=False)) == 3
    (root / "Data-split" / "COVID" / "trainCT_COVID.txt").write_text("\n")
    with pytest.raises(DataError, match="dataset is empty"):
        read_dataset(root, "train")


# ------------------------------------------------------------------ CSV
@pytest.mark.parametrize("header", ["idx,images,patient id,labels", "idx,images,blank,labels", "Path , Label"])
def test_csv_accepts_report_and_canonical_headers(tmp_path, header):
    write_image(tmp_path / "img" / "a.png")
    write_image(tmp_path / "img" / "b.jpg")
    columns = [h.strip().lower() for h in header.split(",")]
    rows = []
    for i, (name, label) in enumerate([("img/a.png", 1), ("img/b.jpg", 0)]):
        values = {"idx": str(i), "images": name, "path": name, "patient id": f"p{i}", "blank": "",
                  "labels": str(label), "label": str(label)}
        rows.append(",".join(values[c] for c in columns))
    csv = tmp_path / "list.csv"
    csv.write_text(header + "\n" + "\n".join(rows) + "\n")
    ds = read_dataset(csv)
    assert detect_layout(csv) == "csv"
    assert list(ds.labels) == [1, 0]
    assert ds.paths[0] == str((tmp_path / "img" / "a.png").resolve())


def test_csv_paths_relative_to_given_root_and_covid_label(tmp_path):
    write_image(tmp_path / "data" / "a.png")
    write_image(tmp_path / "data" / "b.png")
    csv = tmp_path / "lists" / "x.csv"
    csv.parent.mkdir()
    csv.write_text("path,label\na.png,0\nb.png,1\n")
    ds = read_csv(csv, root=tmp_path / "data", covid_label=0)      # a file in the UCSD convention
    assert list(ds.labels) == [COVID, NON_COVID]


def test_csv_split_column(tmp_path):
    for name in "abcd":
        write_image(tmp_path / f"{name}.png")
    csv = tmp_path / "s.csv"
    csv.write_text("path,label,split\na.png,1,train\nb.png,0,train\nc.png,1,val\nd.png,0,val\n")
    assert list_splits(csv) == ["train", "val"]
    assert len(read_dataset(csv, "val")) == 2
    with pytest.raises(DataError, match="no rows with split 'test'.*train, val"):
        read_dataset(csv, "test")


def test_csv_without_needed_columns_names_file(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("file_name,diagnosis\na.png,1\n")
    with pytest.raises(DataError, match=r"bad\.csv: header .* lacks a path column"):
        read_dataset(csv)
    csv.write_text("path,diagnosis\na.png,1\n")
    with pytest.raises(DataError, match=r"bad\.csv: header .* lacks a label column"):
        read_dataset(csv)


@pytest.mark.parametrize("label", ["2", "-1", "yes", ""])
def test_csv_label_not_0_or_1(tmp_path, label):
    write_image(tmp_path / "a.png")
    csv = tmp_path / "l.csv"
    csv.write_text(f"path,label\na.png,{label}\n")
    with pytest.raises(DataError, match=r"l\.csv: line 2: label .* is not 0 or 1"):
        read_dataset(csv)


def test_csv_missing_and_duplicate_file(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\na.png,1\nb.png,0\nmissing.png,0\n")
    with pytest.raises(DataError, match=r"missing\.png: listed in .*m\.csv.* does not exist"):
        read_dataset(csv)
    csv.write_text("path,label\na.png,1\nb.png,0\na.png,1\n")
    with pytest.raises(DataError, match=r"a\.png: listed twice"):
        read_dataset(csv)
    csv.write_text("path,label\na.png,1\nb.png,0\na.png,0\n")
    with pytest.raises(DataError, match=r"a\.png: listed in both classes"):
        read_dataset(csv)


def test_csv_empty(tmp_path):
    csv = tmp_path / "e.csv"
    csv.write_text("path,label\n")
    with pytest.raises(DataError, match=r"e\.csv.*empty"):
        read_dataset(csv)


# ------------------------------------------------------------------ folders
def test_folder_per_class_and_custom_names(tmp_path):
    ds = read_dataset(make_folders(tmp_path / "a"))
    assert detect_layout(tmp_path / "a") == "folders"
    assert sorted(ds.labels.tolist()) == [0, 0, 1, 1]
    root = make_folders(tmp_path / "b" / "train", covid_dir="pos", non_covid_dir="neg")
    ds = read_dataset(root.parent, "train", covid_dir="pos", non_covid_dir="neg")
    assert len(ds) == 4 and list_splits(root.parent, "pos", "neg") == ["train"]
    (root / "pos" / "notes.txt").write_text("not an image")              # ignored: not an image extension
    assert len(read_dataset(root.parent, "train", covid_dir="pos", non_covid_dir="neg")) == 4


def test_unrecognised_source(tmp_path):
    with pytest.raises(DataError, match="not a recognised dataset"):
        read_dataset(tmp_path)
    with pytest.raises(DataError, match="no such file or folder"):
        read_dataset(tmp_path / "nope")


# ------------------------------------------------------------------ manifest and describe
def test_write_manifest_round_trip(tmp_path):
    root = make_ucsd(tmp_path / "data")
    ds = read_dataset(root, "train")
    csv = write_manifest(ds, tmp_path / "data" / "mine.csv")
    assert csv.read_text().splitlines()[0] == "path,label"
    assert "Images-processed/CT_COVID/c0.png,1" in csv.read_text()      # relative inside its folder
    again = read_dataset(csv)
    assert again.paths == ds.paths and np.array_equal(again.labels, ds.labels)
    subset = ds.subset([0, 4])
    assert isinstance(subset, Dataset) and list(subset.labels) == [1, 0]


def test_describe(tmp_path):
    d = describe(make_ucsd(tmp_path, 3, 2))
    train = d["splits"]["train"]
    assert (train["COVID"], train["non-COVID"], train["total"]) == (3, 2, 5)
    assert train["width"] == (24, 24) and train["height"] == (20, 20)
    assert train["formats"] == {"PNG": 3, "JPEG": 2}
    assert set(train["modes"]) == {"RGB", "RGBA", "L"}
    text = format_description(d)
    assert "train" in text and "val" in text and "RGBA" in text


# ------------------------------------------------------------------ real data
def test_real_covid_ct_counts():
    if not REAL_DATA.is_dir():
        pytest.skip(f"real COVID-CT data not found at {REAL_DATA} (set COVIDCT_DATA to its folder)")
    assert list_splits(REAL_DATA)[:2] == ["train", "val"]
    train, val = read_dataset(REAL_DATA, "train"), read_dataset(REAL_DATA, "val")
    assert train.counts() == {"COVID": 191, "non-COVID": 234}
    assert val.counts() == {"COVID": 60, "non-COVID": 58}


def test_class_folders_match_without_regard_to_case(tmp_path):
    """The SARS-CoV-2 CT set names its folders COVID/ and non-COVID/; they read as they are."""
    root = make_folders(tmp_path / "sars", covid_dir="COVID", non_covid_dir="non-COVID")
    dataset = read_dataset(root)
    assert dataset.counts() == {"COVID": 2, "non-COVID": 2}
    assert all("/COVID/" in p for p, y in zip(dataset.paths, dataset.labels) if y == 1)
