"""CT scans as they arrive from scanners and research sets: DICOM and NIfTI, in Hounsfield units.

    read_scan(path, series=None)          -> Volume: hu (S, H, W) float32, one axial slice per row
    read_dicom_bytes(data, name)          -> hu (H, W) float32  (one uploaded slice)
    CTWindow(width=1500, level=-600)      -> window.apply(hu) = gray (..., H, W) in [0, 1]
    scan_inputs(volume, window, pre)      -> images (S, 1, size, size), what the network sees
    scan_score(p_slices, top_k=None)      -> P(COVID) of the scan (rule below)

Inputs (optional extra ``pip install -e ".[dicom]"``: pydicom and nibabel):
  * a single ``.dcm`` file (one slice, or a multi-frame volume);
  * a folder of DICOM files holding one series: slices are sorted by their position
    along the slice normal (ImagePositionPatient . (row x column direction)), or by
    InstanceNumber when positions are missing. A folder with several series is refused
    unless one is chosen by its SeriesInstanceUID;
  * a NIfTI volume ``.nii`` / ``.nii.gz``, reoriented to RAS+ and shown radiologically
    (patient's right on the image's left, anterior at the top), slices inferior -> superior.

Hounsfield units: DICOM stores HU = stored value * RescaleSlope + RescaleIntercept;
NIfTI stores HU = value * scl_slope + scl_inter (nibabel applies both).

Lung window (width W, level L): the HU range [L - W/2, L + W/2] is mapped linearly
onto [0, 1] and clipped:  gray = clip((HU - (L - W/2)) / W, 0, 1).
The default W = 1500, L = -600 shows [-1350, 150] HU: air (-1000) is dark gray 0.23,
lung parenchyma (-850) 0.33, ground-glass (-500) 0.57, soft tissue (40) 0.93.
After the window each slice follows the usual pipeline (``covidct.preprocess``).

Per-scan score: the mean of the k highest slice probabilities, k = top_k or, by
default, 10 % of the slices (at least 1). COVID lesions occupy some slices only, so
the mean over all slices would dilute them, and the single maximum is too noisy.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = ["CTWindow", "Volume", "is_scan_path", "read_scan", "read_dicom_bytes", "slice_input", "scan_inputs",
           "scan_score", "default_top_k", "window_from_metadata"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
DICOM_MAGIC_OFFSET = 128                     # a DICOM Part 10 file: 128-byte preamble, then b"DICM"
REQUIRED_PIXEL_ATTRIBUTES = [("Rows", "(0028,0010)"), ("Columns", "(0028,0011)"),
                             ("BitsAllocated", "(0028,0100)"), ("PixelRepresentation", "(0028,0103)")]
DECODER_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or gdcm)"


@dataclass(frozen=True)
class CTWindow:
    """Display window in Hounsfield units: gray = clip((HU - (level - width/2)) / width, 0, 1)."""
    width: float = 1500.0
    level: float = -600.0

    def __post_init__(self):
        if not (math.isfinite(self.width) and math.isfinite(self.level)) or self.width <= 0:
            raise DataError(f"CT window width={self.width}, level={self.level}: expected a width > 0 "
                            "and a finite level (HU)")

    def apply(self, hu) -> np.ndarray:
        """hu (..., H, W) -> float32 (..., H, W) in [0, 1]."""
        low = self.level - self.width / 2
        gray = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(self.width)
        return np.clip(gray, 0.0, 1.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CTWindow":
        unknown = set(d) - {"width", "level"}
        if unknown:
            raise DataError(f"CT window settings: unknown keys {sorted(unknown)}; expected width, level")
        return cls(**{k: float(v) for k, v in d.items()})

    @classmethod
    def parse(cls, text: str) -> "CTWindow":
        """'1500,-600' (width,level in HU) -> CTWindow."""
        try:
            width, level = (float(part) for part in str(text).split(","))
        except ValueError:
            raise DataError(f"--window {text!r}: expected WIDTH,LEVEL in HU, e.g. 1500,-600") from None
        return cls(width, level)


def window_from_metadata(meta: dict) -> CTWindow:
    """The window stored in a checkpoint's metadata ("ct_window"), or the default lung window."""
    stored = meta.get("ct_window")
    return CTWindow.from_dict(stored) if stored else CTWindow()


@dataclass
class Volume:
    """An axial CT volume. hu: (S, H, W) float32 in Hounsfield units, slices in scan order;
    positions: (S,) slice position along the slice normal in mm (or the slice index)."""
    hu: np.ndarray
    positions: np.ndarray
    source: str
    kind: str                                  # "DICOM series", "DICOM file", "NIfTI"
    details: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.hu)


# ------------------------------------------------------------------ what is a scan
def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            file.seek(DICOM_MAGIC_OFFSET)
            return file.read(4) == b"DICM"
    except OSError:
        return False


def _dicom_files(folder: Path) -> list[Path]:
    """The folder's own files that are DICOM by name (.dcm) or by content (the DICM marker)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and (p.suffix.lower() in DICOM_SUFFIXES or (p.suffix == "" and _has_dicom_magic(p))))


def is_scan_path(path) -> bool:
    """True for a .dcm file, a .nii/.nii.gz file or a folder holding DICOM files (not for PNG/JPEG)."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        return bool(_dicom_files(path))
    return name.endswith(NIFTI_SUFFIXES) or name.endswith(DICOM_SUFFIXES) or (
        path.is_file() and path.suffix == "" and _has_dicom_magic(path))


def read_scan(path, series: str | None = None) -> Volume:
    """A DICOM file, DICOM series folder or NIfTI file -> Volume (HU), or one-line DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        return read_dicom_series(path, series)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return read_nifti(path)
    return read_dicom_file(path)


# ------------------------------------------------------------------ DICOM
def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise DataError('reading DICOM needs pydicom: pip install -e ".[dicom]"') from None
    return pydicom


def _read_dataset(source, name: str, header_only: bool = False):
    """pydicom Dataset from a path or a file object (without the pixels: header_only), one-line errors."""
    pydicom = _pydicom()
    try:
        with warnings.catch_warnings():          # pydicom warns about odd values; we report what matters
            warnings.simplefilter("ignore")
            return pydicom.dcmread(source, stop_before_pixels=header_only)
    except pydicom.errors.InvalidDicomError:
        raise DataError(f"{name}: not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{name}: unreadable DICOM header ({_first_line(error)})") from None


def _first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _dataset_hu(ds, name: str) -> np.ndarray:
    """A pydicom Dataset -> HU float32 (H, W), or (F, H, W) for a multi-frame image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        modality = ds.get("Modality", "CT") or "CT"
        if not isinstance(modality, str) or not modality.isprintable():
            raise DataError(f"{name}: corrupt DICOM header (the Modality element holds "
                            f"{len(str(modality))} characters of binary data)")
        if modality != "CT":
            raise DataError(f"{name}: Modality is {str(modality)[:40]!r}, expected CT (Hounsfield units)")
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise DataError(f"{name}: no pixel data in this DICOM file (a DICOMDIR, report or "
                            "presentation state?); expected a CT image")
        missing = [f"{keyword} {tag}" for keyword, tag in REQUIRED_PIXEL_ATTRIBUTES if keyword not in ds]
        if missing:
            raise DataError(f"{name}: the DICOM header lacks {', '.join(missing)}, needed to decode the pixel data")
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        return _decode_hu(ds, name, syntax)


def _decode_hu(ds, name: str, syntax) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except Exception as error:     # pydicom raises RuntimeError, NotImplementedError, ValueError, ...
        if syntax is not None and syntax.is_compressed:
            raise DataError(f"{name}: pixel data is compressed ({syntax.name}) and no installed decoder "
                            f"can read it ({_first_line(error)}); {DECODER_HINT}") from None
        raise DataError(f"{name}: cannot decode the pixel data ({_first_line(error)})") from None
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or pixels.ndim not in (2, 3):
        raise DataError(f"{name}: pixel data of shape {pixels.shape} with {ds.get('SamplesPerPixel')} samples "
                        "per pixel; expected a grayscale CT image")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    # HU whatever the PhotometricInterpretation: MONOCHROME1 only inverts how a viewer shows them.
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _slice_position(ds) -> float | None:
    """Position along the slice normal (mm): ImagePositionPatient . (row dir x column dir)."""
    try:
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        position = np.asarray([float(v) for v in ds.ImagePositionPatient])
    except (AttributeError, TypeError, ValueError):
        return None
    if orientation.shape != (6,) or position.shape != (3,):
        return None
    return float(np.dot(position, np.cross(orientation[:3], orientation[3:])))


def read_dicom_bytes(data: bytes, name: str = "upload") -> np.ndarray:
    """One uploaded DICOM slice (its bytes) -> HU float32 (H, W)."""
    hu = _dataset_hu(_read_dataset(io.BytesIO(data), name), name)
    if hu.ndim != 2:
        raise DataError(f"{name}: a multi-frame DICOM ({hu.shape[0]} frames); expected a single slice")
    return hu


def read_dicom_file(path) -> Volume:
    """One .dcm file: a single slice (S = 1) or a multi-frame volume."""
    path = Path(path)
    ds = _read_dataset(str(path), str(path))
    hu = _dataset_hu(ds, str(path))
    hu = hu[None] if hu.ndim == 2 else hu
    return Volume(hu, np.arange(len(hu), dtype=np.float64), str(path), "DICOM file",
                  {"series": str(ds.get("SeriesInstanceUID", ""))})


def read_dicom_series(folder, series: str | None = None) -> Volume:
    """A folder of single-slice DICOM files -> one series as a Volume, sorted along the slice normal."""
    folder = Path(folder)
    files = _dicom_files(folder)
    if not files:
        raise DataError(f"{folder}: no DICOM files (.dcm, or files with the 'DICM' marker) in this folder")
    # Headers first (cheap): a mixed folder is refused before any pixels are decoded.
    headers = [(file, _read_dataset(str(file), str(file), header_only=True)) for file in files]
    groups: dict[str, list] = {}
    for file, ds in headers:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "") or "(no SeriesInstanceUID)"), []).append((file, ds))
    if series is not None:
        if series not in groups:
            raise DataError(f"{folder}: no series {series!r}; the folder holds {_describe_groups(groups)}")
        chosen = groups[series]
    elif len(groups) > 1:
        raise DataError(f"{folder}: {len(groups)} DICOM series mixed in one folder ({_describe_groups(groups)}); "
                        "choose one with --series UID")
    else:
        chosen = next(iter(groups.values()))
    positions = [_slice_position(ds) for _, ds in chosen]
    if all(p is not None for p in positions):
        order = np.argsort(positions, kind="stable")
        position_values = np.asarray(positions, dtype=np.float64)[order]
        if len(set(np.round(position_values, 3))) != len(position_values):
            raise DataError(f"{folder}: two or more slices share one position along the slice normal "
                            "(several series or acquisitions in one SeriesInstanceUID?)")
    else:
        numbers = [int(ds.get("InstanceNumber", 0) or 0) for _, ds in chosen]
        order = np.argsort(numbers, kind="stable")
        position_values = np.arange(len(chosen), dtype=np.float64)
    slices = []
    for index in order:
        file = chosen[index][0]
        hu = _dataset_hu(_read_dataset(str(file), str(file)), str(file))
        if hu.ndim != 2:
            raise DataError(f"{file}: a multi-frame DICOM inside a series folder; pass the file on its own")
        if slices and hu.shape != slices[0].shape:
            raise DataError(f"{file}: slice of {hu.shape[1]}x{hu.shape[0]} px in a series of "
                            f"{slices[0].shape[1]}x{slices[0].shape[0]} px slices")
        slices.append(hu)
    uid = str(chosen[0][1].get("SeriesInstanceUID", ""))
    return Volume(np.stack(slices), position_values, str(folder), "DICOM series",
                  {"series": uid, "description": str(chosen[0][1].get("SeriesDescription", ""))})


def _describe_groups(groups) -> str:
    parts = []
    for uid, members in sorted(groups.items()):
        description = str(members[0][1].get("SeriesDescription", "") or "")
        parts.append(f"{uid}: {len(members)} files" + (f" '{description}'" if description else ""))
    return "; ".join(parts)


# ------------------------------------------------------------------ NIfTI
def read_nifti(path) -> Volume:
    """A .nii / .nii.gz CT volume -> Volume: RAS+ orientation, axial slices inferior -> superior,
    each (H, W) = (anterior -> posterior, patient right -> left), values scaled to HU."""
    try:
        import nibabel
        from nibabel.filebasedimages import ImageFileError
    except ImportError:
        raise DataError('reading NIfTI needs nibabel: pip install -e ".[dicom]"') from None
    path = Path(path)
    try:
        image = nibabel.load(str(path))
        shape = tuple(image.shape)
    except (ImageFileError, OSError, EOFError, ValueError) as error:
        raise DataError(f"{path}: not a readable NIfTI file ({_first_line(error)})") from None
    if len(shape) == 4 and shape[3] == 1:
        image = image.slicer[..., 0]
    elif len(shape) != 3:
        raise DataError(f"{path}: a {len(shape)}-D volume of shape {shape}; expected one 3-D CT volume "
                        "(X, Y, Z)" + (" - a time series or several volumes?" if len(shape) > 3 else ""))
    try:
        image = nibabel.as_closest_canonical(image)
        data = np.asarray(image.get_fdata(dtype=np.float32))     # applies scl_slope / scl_inter
    except (OSError, EOFError, ValueError, MemoryError) as error:
        raise DataError(f"{path}: cannot read the NIfTI voxel data ({_first_line(error)})") from None
    if not np.all(np.isfinite(data)):
        raise DataError(f"{path}: the volume holds NaN or infinite values; expected HU")
    hu = np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0))       # (Z, Y, X), radiological view
    z = image.affine[2, 2] * np.arange(shape[2]) + image.affine[2, 3]
    return Volume(hu, np.asarray(z, dtype=np.float64), str(path), "NIfTI",
                  {"voxel_mm": [float(v) for v in image.header.get_zooms()[:3]]})


# ------------------------------------------------------------------ into the network
def slice_input(gray, preprocess) -> np.ndarray:
    """One windowed slice (H, W) in [0, 1] -> (1, size, size) float32: the steps a PNG/JPEG slice
    takes after its gray conversion (covidct.preprocess.prepare_gray: lung-field cut, resize)."""
    from .preprocess import prepare_gray

    return prepare_gray(gray, preprocess)[0]


def scan_inputs(volume: Volume, window: CTWindow, preprocess) -> np.ndarray:
    """Volume -> (S, 1, size, size) float32 in [0, 1]: the lung window, then the slice pipeline."""
    return np.stack([slice_input(gray, preprocess) for gray in window.apply(volume.hu)])


def default_top_k(n_slices: int) -> int:
    """10 % of the slices, at least 1."""
    return max(1, math.ceil(0.1 * n_slices))


def scan_score(p_slices, top_k: int | None = None) -> float:
    """Mean of the top_k largest slice probabilities (default: default_top_k)."""
    p = np.sort(np.asarray(p_slices, dtype=np.float64))[::-1]
    if p.size == 0:
        raise DataError("scan_score: no slices")
    k = default_top_k(p.size) if top_k is None else int(top_k)
    if k < 1:
        raise DataError(f"--top-k {top_k}: expected at least 1")
    return float(p[:min(k, p.size)].mean())
