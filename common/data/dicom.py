"""Read a site's DICOM images into series volumes ordered by geometry.

Files are found recursively under ``<site>/images`` whatever their names. Slices are grouped
by SeriesInstanceUID and ordered by ImagePositionPatient projected on the slice normal,
never by file name or InstanceNumber. Stored values go through the modality LUT (rescale
slope and intercept, per slice). Files that are not usable images are reported, not hidden.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

log = logging.getLogger(__name__)


@dataclass
class Skipped:
    """A file that was not ingested, and why. Stays at the site."""

    path: Path
    reason: str


@dataclass
class SeriesHeader:
    """One series' slices, read without pixel data, in geometric order."""

    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    files: list[Path]
    sop_uids: list[str]  # SOPInstanceUID of each file, same order
    positions: np.ndarray  # (n, 3) ImagePositionPatient, LPS mm
    row_dir: np.ndarray  # (3,) direction of increasing column index
    col_dir: np.ndarray  # (3,) direction of increasing row index
    spacing: tuple[float, float]  # (between rows, between columns) mm
    thickness: float
    shape: tuple[int, int]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    @property
    def slice_spacing(self) -> float:
        if len(self.positions) < 2:
            return self.thickness
        d = np.diff(self.positions @ self.normal)
        return float(np.median(np.abs(d)))


@dataclass
class SiteScan:
    series: list[SeriesHeader] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def _floats(value: object, n: int) -> np.ndarray | None:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) else None


def list_files(images_dir: Path) -> list[Path]:
    """Every regular, non-hidden file below ``images_dir``, in a stable order."""
    return sorted(
        p for p in Path(images_dir).rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(images_dir).parts)
    )


def scan_site(images_dir: Path) -> SiteScan:
    """Read every file's header and group the image slices into ordered series."""
    scan = SiteScan()
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for path in list_files(images_dir):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as exc:
            scan.skipped.append(Skipped(path, f"not a readable DICOM file ({type(exc).__name__})"))
            continue
        if "PixelData" not in ds and "FloatPixelData" not in ds and "Rows" not in ds:
            scan.skipped.append(Skipped(path, "DICOM object without an image (no pixel data)"))
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid:
            scan.skipped.append(Skipped(path, "image without SeriesInstanceUID"))
            continue
        groups.setdefault(uid, []).append((path, ds))

    for uid, items in groups.items():
        header = _order_series(uid, items, scan.skipped)
        if header is not None:
            scan.series.append(header)
    scan.series.sort(key=lambda s: s.series_uid)
    return scan


def _order_series(
    uid: str, items: list[tuple[Path, pydicom.Dataset]], skipped: list[Skipped]
) -> SeriesHeader | None:
    first = items[0][1]
    iop = _floats(first.get("ImageOrientationPatient"), 6)
    spacing = _floats(first.get("PixelSpacing"), 2)
    if iop is None or spacing is None:
        for path, _ in items:
            skipped.append(Skipped(path, "no usable ImageOrientationPatient/PixelSpacing"))
        return None
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    shape = (int(first.Rows), int(first.Columns))
    kept: list[tuple[float, Path, np.ndarray, str]] = []
    for path, ds in items:
        ipp = _floats(ds.get("ImagePositionPatient"), 3)
        if ipp is None:
            skipped.append(Skipped(path, "no usable ImagePositionPatient"))
            continue
        if (int(ds.Rows), int(ds.Columns)) != shape:
            skipped.append(Skipped(path, f"slice size differs from the rest of its series {shape}"))
            continue
        kept.append((float(ipp @ normal), path, ipp, str(ds.get("SOPInstanceUID", ""))))
    if not kept:
        return None
    kept.sort(key=lambda t: t[0])
    thickness = float(first.get("SliceThickness", 0) or 0)
    return SeriesHeader(
        series_uid=uid,
        study_uid=str(first.get("StudyInstanceUID", "")),
        patient_id=str(first.get("PatientID", "")),
        modality=str(first.get("Modality", "")),
        files=[p for _, p, _, _ in kept],
        sop_uids=[sop for _, _, _, sop in kept],
        positions=np.stack([ipp for _, _, ipp, _ in kept]),
        row_dir=row_dir,
        col_dir=col_dir,
        spacing=(float(spacing[0]), float(spacing[1])),
        thickness=thickness,
        shape=shape,
    )


def read_pixels(series: SeriesHeader) -> np.ndarray:
    """The series' pixels after the modality LUT (HU for CT), float32 (n, rows, cols)."""
    out = np.empty((len(series.files), *series.shape), dtype=np.float32)
    for i, path in enumerate(series.files):
        ds = pydicom.dcmread(path)
        out[i] = apply_modality_lut(ds.pixel_array, ds)
    return out
