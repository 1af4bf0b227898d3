"""Write a synthetic CT scan in Hounsfield units as a NIfTI volume and as a DICOM series,
to try ``covidct predict`` and ``covidct serve`` on scan files (needs ``pip install -e ".[dicom]"``).

    python examples/make_phantom_scan.py --out data/phantom-scan --slices 24 --covid-slices 8

The slices are covidct's synthetic phantom slices (covidct.synthetic.make_slice); the middle
``--covid-slices`` carry COVID-like lesions. Their gray values g in [0, 1] become HU through the
inverse of the default lung window (HU = -1350 + 1500 g), so reading the scan back through
that window gives the slices again (to 1/1500). Written:
    <out>/scan.nii.gz       int16 HU, RAS affine with 1 mm pixels and --spacing mm slices
    <out>/dicom/IM0000.dcm  one CT slice per file, int16 with RescaleIntercept -1024
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from covidct.scan import CTWindow
from covidct.synthetic import make_slice


def phantom_hu(slices: int, covid_slices: int, size: int, seed: int, difficulty: float) -> np.ndarray:
    """(S, H, W) int16 HU; the middle covid_slices slices have lesions."""
    rng = np.random.default_rng(seed)
    first = (slices - covid_slices) // 2
    window = CTWindow()
    low = window.level - window.width / 2
    grays = [make_slice(int(first <= k < first + covid_slices), rng, size=size, difficulty=difficulty) for k in range(slices)]
    return np.round(low + window.width * np.stack(grays)).astype(np.int16)


def write_nifti(path: Path, hu: np.ndarray, spacing: float) -> Path:
    import nibabel

    # voxel (i, j, k) = column i, row j, slice k; LPS like DICOM, so the affine flips x and y to RAS
    image = nibabel.Nifti1Image(hu.transpose(2, 1, 0), np.diag([-1.0, -1.0, spacing, 1.0]))
    image.header.set_xyzt_units("mm")
    nibabel.save(image, str(path))
    return path


def write_dicom_series(folder: Path, hu: np.ndarray, spacing: float) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    for k, image in enumerate(hu):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", study, series
        ds.SeriesDescription, ds.PatientName, ds.InstanceNumber = "synthetic phantom", "Phantom^Synthetic", k + 1
        ds.ImagePositionPatient = [0.0, 0.0, spacing * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], spacing
        ds.Rows, ds.Columns = image.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1   # signed
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (image + np.int16(1024)).astype("<i2").tobytes()       # stored = HU - intercept
        ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/phantom-scan")
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--covid-slices", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--difficulty", type=float, default=0.3, help="as covidct's default phantom dataset")
    parser.add_argument("--spacing", type=float, default=5.0, help="slice spacing in mm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hu = phantom_hu(args.slices, args.covid_slices, args.size, args.seed, args.difficulty)
    print(f"wrote {write_nifti(out / 'scan.nii.gz', hu, args.spacing)} and "
          f"{write_dicom_series(out / 'dicom', hu, args.spacing)}/ ({args.slices} slices, "
          f"{args.covid_slices} with lesions, HU {hu.min()}..{hu.max()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
