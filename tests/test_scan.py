"""DICOM and NIfTI input: Hounsfield units, slice order, orientation, the lung window, predict on
scans, and one clear line for each kind of bad file. The scans are phantoms written by the tests."""
import csv

import numpy as np
import pytest

from covidct.errors import DataError
from covidct.scan import CTWindow, read_scan, scan_inputs, scan_score
from covidct.preprocess import Preprocess
from conftest_models import write_checkpoint

pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")

AIR, LUNG, GROUND_GLASS, TISSUE = -1000, -850, -500, 40


def phantom(slices: int = 5, size: int = 16) -> np.ndarray:
    """(S, H, W) HU: air around a soft-tissue body, two lungs, a ground-glass spot growing with z,
    and a marker voxel (tissue) in the top-left corner of slice 0 (patient's right, anterior)."""
    hu = np.full((slices, size, size), AIR, np.float32)
    hu[:, 2:-2, 1:-1] = TISSUE
    hu[:, 4:-4, 3:size // 2 - 1] = LUNG
    hu[:, 4:-4, size // 2 + 1:-3] = LUNG
    for k in range(slices):
        hu[k, 5:5 + k, 4:6] = GROUND_GLASS
    hu[0, 0, 0] = TISSUE
    return hu


def write_dicom(path, hu, z, series="1.2.3.4", instance=1, slope=1.0, intercept=-1024.0,
                syntax=None, pixels=True, description="LUNG"):
    """One CT slice (H, W) in HU as a DICOM Part 10 file, stored = (HU - intercept) / slope as uint16."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesDescription = "CT", series, description
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if pixels:
        stored = np.round((np.asarray(hu, np.float64) - intercept) / slope).astype(np.uint16)
        if syntax is not None and syntax.is_compressed:
            from pydicom.encaps import encapsulate
            ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not really a JPEG 2000 codestream"])
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder, hu, series="1.2.3.4", spacing=2.5, **kw):
    """Slices written in a shuffled file order with reversed InstanceNumbers: only the position sorts them."""
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(0).permutation(len(hu))
    for n, k in enumerate(order):
        write_dicom(folder / f"IM{n:04d}.dcm", hu[k], z=-100 + spacing * k, series=series,
                    instance=len(hu) - k, **kw)
    return folder


def write_nifti(path, hu, slope=2.0, intercept=-1024.0, spacing=2.5):
    """The same phantom as a NIfTI volume stored as int16 with scl_slope/scl_inter, in DICOM's LPS
    layout (voxel (i, j, k) = column i, row j, slice k; affine diag(-1, -1, spacing) to RAS)."""
    stored = np.round((hu.transpose(2, 1, 0) - intercept) / slope).astype(np.int16)    # (X, Y, Z)
    image = nibabel.Nifti1Image(stored, np.diag([-1.0, -1.0, spacing, 1.0]))
    image.header.set_slope_inter(slope, intercept)
    nibabel.save(image, str(path))
    return path


@pytest.fixture
def run_cli(capsys):
    """covidct's main() in this process -> (exit status, stdout, stderr)."""
    from covidct.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("scan-model") / "best.npz", "tiny")


def test_dicom_series_is_sorted_by_position_and_scaled_to_hu(tmp_path):
    hu = phantom()
    volume = read_scan(write_series(tmp_path / "series", hu, slope=0.5, intercept=-1024.0))
    np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_allclose(volume.positions, -100 + 2.5 * np.arange(len(hu)))
    assert volume.kind == "DICOM series" and volume.details["description"] == "LUNG"


def test_nifti_matches_the_dicom_series_of_the_same_phantom(tmp_path):
    hu = phantom()
    from_nifti = read_scan(write_nifti(tmp_path / "scan.nii.gz", hu, slope=2.0))
    from_dicom = read_scan(write_series(tmp_path / "series", hu))
    np.testing.assert_array_equal(from_nifti.hu, hu)             # scl_slope / scl_inter applied, LPS layout kept
    np.testing.assert_array_equal(from_nifti.hu, from_dicom.hu)
    assert from_nifti.hu[0, 0, 0] == TISSUE                       # patient's right and anterior: top left
    np.testing.assert_allclose(from_nifti.positions, 2.5 * np.arange(len(hu)))


def test_lung_window_maps_known_hu_to_known_gray():
    window = CTWindow()                                           # width 1500, level -600: [-1350, 150] HU
    gray = window.apply([AIR, LUNG, GROUND_GLASS, TISSUE, -2000, 3000])
    np.testing.assert_allclose(gray, [350 / 1500, 500 / 1500, 850 / 1500, 1390 / 1500, 0, 1], atol=1e-6)
    assert CTWindow.parse("400,40") == CTWindow(400, 40)
    with pytest.raises(DataError, match="expected WIDTH,LEVEL"):
        CTWindow.parse("wide")
    with pytest.raises(DataError, match="width > 0"):
        CTWindow(0, -600)


def test_scan_inputs_are_windowed_slices_at_the_model_size(tmp_path):
    hu = phantom(size=16)
    volume = read_scan(write_nifti(tmp_path / "scan.nii", hu))
    images = scan_inputs(volume, CTWindow(), Preprocess(size=16))
    assert images.shape == (5, 1, 16, 16) and images.dtype == np.float32
    np.testing.assert_allclose(images[:, 0], CTWindow().apply(hu), atol=1e-6)   # same size: no resampling


def test_scan_score_is_the_mean_of_the_top_k_slices():
    p = [0.1, 0.9, 0.2, 0.7, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert scan_score(p) == pytest.approx((0.9 + 0.7) / 2)      # 10 % of 12 slices, rounded up: 2
    assert scan_score(p, top_k=3) == pytest.approx((0.9 + 0.7 + 0.3) / 3)
    assert scan_score([0.4], top_k=5) == pytest.approx(0.4)


def test_pydicom_sample_ct_reads_in_hounsfield_units():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    volume = read_scan(path)
    assert volume.hu.shape == (1, 128, 128)
    np.testing.assert_array_equal(volume.hu[0], ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    assert -1100 < volume.hu.min() < volume.hu.max() < 3000


def test_predict_on_a_nifti_volume_and_a_dicom_folder(tmp_path, checkpoint, run_cli):
    hu = phantom(slices=12, size=32)
    nifti = write_nifti(tmp_path / "scan.nii.gz", hu)
    series = write_series(tmp_path / "series", hu)
    out = tmp_path / "slices.csv"
    code, stdout, stderr = run_cli("predict", "--checkpoint", checkpoint, nifti, series, "--output", out)
    assert code == 0, stderr
    assert "12 slices, window W1500/L-600 HU" in stdout and "mean of the top 2 of 12 slices" in stdout
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 24 and [r["slice"] for r in rows[:12]] == [str(i) for i in range(12)]
    p_nifti = np.array([float(r["p_covid"]) for r in rows[:12]])
    p_dicom = np.array([float(r["p_covid"]) for r in rows[12:]])
    np.testing.assert_allclose(p_nifti, p_dicom, atol=1e-6)     # the same phantom, two formats
    assert f"scan P(COVID) = {scan_score(p_nifti):.4f}" in stdout

    code, stdout_narrow, _ = run_cli("predict", "--checkpoint", checkpoint, nifti, "--window", "400,40",
                                     "--top-k", "12")
    assert code == 0 and "window W400/L40 HU" in stdout_narrow and "mean of the top 12 of 12" in stdout_narrow


def test_pydicom_sample_through_the_cli(checkpoint, run_cli):
    from pydicom.data import get_testdata_file

    code, stdout, stderr = run_cli("predict", "--checkpoint", checkpoint, get_testdata_file("CT_small.dcm"))
    assert code == 0, stderr
    assert "(DICOM file, 1 slices" in stdout and "mean of the top 1 of 1 slices" in stdout


def no_rows(tmp_path):
    path = write_dicom(tmp_path / "norows.dcm", phantom()[0], z=0)
    ds = pydicom.dcmread(path)
    del ds.Rows
    ds.save_as(path)
    return path


def corrupt_length(tmp_path):
    """The Modality element's length field overwritten: the parser swallows the rest as its value."""
    path = write_dicom(tmp_path / "corrupt.dcm", phantom()[0], z=0)
    data = bytearray(path.read_bytes())
    at = data.find(b"\x08\x00\x60\x00CS")
    data[at + 6:at + 8] = b"\xff\x7f"
    path.write_bytes(bytes(data))
    return path


def truncated_dicom(tmp_path):
    path = write_dicom(tmp_path / "cut.dcm", phantom()[0], z=0)
    path.write_bytes(path.read_bytes()[:-100])
    return path


def not_dicom(tmp_path):
    path = tmp_path / "photo.dcm"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)
    return path


def no_pixels(tmp_path):
    return write_dicom(tmp_path / "nopix.dcm", phantom()[0], z=0, pixels=False)


def compressed(tmp_path):
    from pydicom.uid import JPEG2000

    return write_dicom(tmp_path / "j2k.dcm", phantom()[0], z=0, syntax=JPEG2000)


def mixed_series(tmp_path):
    folder = write_series(tmp_path / "mixed", phantom(3), series="1.2.3.4")
    write_series(folder / "other", phantom(2), series="1.2.3.5")
    for file in (folder / "other").iterdir():
        file.rename(folder / f"B{file.name}")
    return folder


def four_d(tmp_path):
    image = nibabel.Nifti1Image(np.zeros((8, 8, 4, 3), np.int16), np.eye(4))
    nibabel.save(image, str(tmp_path / "fmri.nii.gz"))
    return tmp_path / "fmri.nii.gz"


def truncated_nifti(tmp_path):
    path = write_nifti(tmp_path / "cut.nii", phantom())
    path.write_bytes(path.read_bytes()[:400])
    return path


@pytest.mark.parametrize("make, message", [
    (no_rows, "the DICOM header lacks Rows (0028,0010)"),
    (corrupt_length, "corrupt DICOM header (the Modality element holds"),
    (truncated_dicom, "cannot decode the pixel data (The number of bytes of pixel data is less than expected"),
    (not_dicom, "not a DICOM file"),
    (no_pixels, "no pixel data"),
    (compressed, "compressed (JPEG 2000"),
    (mixed_series, "2 DICOM series mixed in one folder (1.2.3.4: 3 files 'LUNG'; 1.2.3.5: 2 files 'LUNG')"),
    (four_d, "a 4-D volume of shape (8, 8, 4, 3)"),
    (truncated_nifti, "NIfTI"),
])
def test_bad_scans_end_in_one_clear_line(tmp_path, checkpoint, run_cli, recwarn, make, message):
    path = make(tmp_path)
    with pytest.raises(DataError, match="^" + str(path).replace("\\", "\\\\")):
        read_scan(path)
    code, _, stderr = run_cli("predict", "--checkpoint", checkpoint, path)
    assert not [str(w.message) for w in recwarn if "pydicom" in str(w.filename)]   # no warnings leak out
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith(f"error: {path}")


def test_series_option_picks_one_series_from_a_mixed_folder(tmp_path):
    folder = mixed_series(tmp_path)
    from covidct.scan import read_dicom_series

    assert len(read_dicom_series(folder, series="1.2.3.5")) == 2
    with pytest.raises(DataError, match="no series '9.9'"):
        read_dicom_series(folder, series="9.9")


def test_example_phantom_scan_reads_back_as_the_phantom_slices(tmp_path):
    import importlib.util
    from pathlib import Path

    from covidct.synthetic import make_slice

    path = Path(__file__).resolve().parents[1] / "examples" / "make_phantom_scan.py"
    spec = importlib.util.spec_from_file_location("make_phantom_scan", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--out", str(tmp_path), "--slices", "3", "--covid-slices", "1", "--size", "32"]) == 0
    rng = np.random.default_rng(0)
    expected = np.stack([make_slice(label, rng, size=32, difficulty=0.3) for label in (0, 1, 0)])
    for scan in (tmp_path / "scan.nii.gz", tmp_path / "dicom"):
        gray = CTWindow().apply(read_scan(scan).hu)
        np.testing.assert_allclose(gray, expected, atol=0.5 / 1500 + 1e-6)
