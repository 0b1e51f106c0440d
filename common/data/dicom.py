"""Read a site's DICOM export into series of slices ordered by geometry; report everything else.

Files are found recursively under ``<site>/images`` whatever their names (with or without
``.dcm``, with or without the 128-byte preamble). Every file ends up in exactly one place:
  - a slice (or, for multi-frame files, several slices) of an image series;
  - a DICOM SEG object, kept aside as a label source;
  - a ``Skipped`` entry saying why it is not used: not DICOM, a DICOMDIR, a non-image object
    (SR, RTPLAN, ...), a colour image, a duplicate instance, an inconsistent series...

Slices are grouped by SeriesInstanceUID and ordered by ImagePositionPatient projected on the
slice normal from ImageOrientationPatient (per frame for enhanced multi-frame objects), never
by file name or InstanceNumber. Images without patient geometry (projection radiographs,
ultrasound, secondary captures) are kept as 2D images with ``geometry=False``.

Pixels go through the modality LUT (RescaleSlope/Intercept per slice or per frame, or a
Modality LUT Sequence); MONOCHROME1 is inverted so that bright means dense everywhere.
Compressed transfer syntaxes are decoded by pydicom's pylibjpeg, openjpeg, RLE and JPEG-LS
plugins. Nothing here raises for a bad file: problems become ``Skipped`` entries.

``Skipped.reason`` is fedscan's own wording and holds no DICOM value, UID or path, so it may
appear in the site-check JSON; ``Skipped.detail`` (exception text) stays in the local log.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.misc import is_dicom
from pydicom.pixels import apply_modality_lut
from pydicom.tag import BaseTag
from pydicom.uid import UID_dictionary

from fedscan.common.data.dicom_header import NotFast, RawHeader, read_raw_header

log = logging.getLogger(__name__)

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
MEDIA_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"
GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
# image objects with pixel data that are not images to train on
NOT_TRAINABLE = {"RTDOSE": "an RT dose grid", "RTIMAGE": "an RT portal image", "SEG": "a segmentation"}
# consecutive slices further apart than this many median spacings leave a gap
GAP_FACTOR = 1.5
# two slices closer than this (mm) along the normal share a position
SAME_POSITION_MM = 1e-3


@dataclass
class Skipped:
    """A file (or some of its frames) that is not used, and why. Stays at the site."""

    path: Path
    reason: str  # fedscan's wording: no DICOM values, UIDs or paths
    detail: str = ""  # e.g. the decoder's message; local log only


@dataclass(frozen=True)
class EncodedPixels:
    """Where a single-frame file's compressed Pixel Data starts, and what its decoder needs.

    With it, ``read_series`` hands the encapsulated bytes straight to pydicom's decoder for the
    transfer syntax instead of letting ``pydicom.pixels.pixel_array`` parse the file's data set
    again: ``read_series`` of the 224x224 synthetic CT in RLE took 0.30 instead of 0.93 ms a
    slice, the same values (measured in one run on the 2-core development machine)."""

    offset: int  # the Pixel Data element, as the header scan found it
    syntax: str  # transfer syntax UID
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric: str


@dataclass
class SeriesHeader:
    """One series' slices, read without pixel data, in geometric order.

    A slice is one frame of one file: ``files[i]`` and ``frames[i]`` (None for single-frame
    files). For a series without patient geometry, positions are nominal (1 mm apart).
    """

    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    manufacturer: str
    files: list[Path]
    frames: list[int | None]
    sop_uids: list[str]  # SOPInstanceUID of each slice's file
    positions: np.ndarray  # (n, 3) ImagePositionPatient, LPS mm
    row_dir: np.ndarray  # (3,) direction of increasing column index
    col_dir: np.ndarray  # (3,) direction of increasing row index
    spacing: tuple[float, float]  # (between rows, between columns) mm
    thickness: float
    shape: tuple[int, int]
    slopes: np.ndarray  # (n,) RescaleSlope per slice
    intercepts: np.ndarray  # (n,) RescaleIntercept per slice
    invert: np.ndarray  # (n,) bool: MONOCHROME1
    value_range: np.ndarray  # (n, 2) rescaled range of the stored values, for inversion
    lut: np.ndarray  # (n,) bool: the file has a Modality LUT Sequence
    transfer_syntaxes: list[str] = field(default_factory=list)  # names, one per slice
    native: list[tuple[int, str, int, bool] | None] = field(
        default_factory=list
    )  # per slice, see read_series
    encoded: list[EncodedPixels | None] = field(default_factory=list)  # per slice, see read_series
    geometry: bool = True
    warnings: list[str] = field(default_factory=list)  # fedscan's wording, like Skipped.reason

    def __len__(self) -> int:
        return len(self.files)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    @property
    def slice_spacing(self) -> float:
        if len(self.positions) < 2 or not self.geometry:
            return self.thickness
        d = np.diff(self.positions @ self.normal)
        return float(np.median(np.abs(d)))

    def subset(self, keep: np.ndarray) -> SeriesHeader:
        """The same series restricted to the slices where ``keep`` is True."""
        idx = np.flatnonzero(keep)

        def pick(seq: list) -> list:
            return [seq[i] for i in idx]

        return replace(
            self,
            files=pick(self.files),
            frames=pick(self.frames),
            sop_uids=pick(self.sop_uids),
            positions=self.positions[idx],
            slopes=self.slopes[idx],
            intercepts=self.intercepts[idx],
            invert=self.invert[idx],
            value_range=self.value_range[idx],
            lut=self.lut[idx],
            transfer_syntaxes=pick(self.transfer_syntaxes) if self.transfer_syntaxes else [],
            native=pick(self.native) if self.native else [],
            encoded=pick(self.encoded) if self.encoded else [],
            warnings=list(self.warnings),
        )


@dataclass
class SiteScan:
    series: list[SeriesHeader] = field(default_factory=list)
    segs: list[Path] = field(default_factory=list)  # DICOM SEG objects: label sources
    seg_refs: dict[Path, list[str]] = field(default_factory=dict)  # SEG -> the series it refers to
    skipped: list[Skipped] = field(default_factory=list)
    n_files: int = 0


@dataclass
class _Slice:
    path: Path
    frame: int | None
    sop: str
    shape: tuple[int, int]
    position: np.ndarray | None
    orientation: np.ndarray | None
    spacing: tuple[float, float] | None
    thickness: float
    slope: float
    intercept: float
    invert: bool
    value_range: tuple[float, float]
    lut: bool
    syntax: str
    native: tuple[int, str, int, bool] | None = None
    encoded: EncodedPixels | None = None


# DICOM's defined terms (PS3.3 C.7.3.1.1.1); anything else is reported as "other"
_MODALITIES = frozenset(
    "AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DG DOC DX ECG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER KO "
    "LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN PR PT PX REG RESP RF RG RTDOSE "
    "RTIMAGE RTINTENT "
    "RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XC".split()
)
_COLOUR_MODELS = frozenset(
    "RGB YBR_FULL YBR_FULL_422 YBR_PARTIAL_422 YBR_PARTIAL_420 YBR_ICT YBR_RCT HSV ARGB CMYK".split()
    + ["PALETTE COLOR"]
)


def standard_modality(value: object) -> str:
    """The Modality as one of DICOM's defined terms, or "other" (never free text)."""
    text = str(value or "").strip().upper()
    return text if text in _MODALITIES else ("OT" if not text else "other")


def uid_name(uid: object, unknown: str) -> str:
    """The standard name of a well-known UID (SOP class, transfer syntax); never the UID itself."""
    entry = UID_dictionary.get(str(uid))
    return entry[0] if entry else unknown


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.shape != (n,) or not np.isfinite(arr).all():
        return None
    return arr


def _number(value: Any, default: float) -> float:  # a header value, typed Any as pydicom types it
    try:
        out = float(value)  # what float() refuses is the default
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


# Elements the header scan reads of every file, and the VRs whose raw bytes it converts itself.
# pydicom converts an element through its hooks and DataElement validation; the scan reads some
# 20 per file, and that cost more than the file read itself. For these VRs in a little-endian
# file the value is read straight from the raw bytes: classifying the 96 synthetic CT headers of
# bench/ingest.py took 0.36 instead of 1.08 ms a file, measured in one run on the (busy) 2-core
# development machine, with the same result for every file. Anything unexpected (another VR, big
# endian, a value that does not parse) goes through pydicom, so the result is pydicom's.
_FAST_VRS = frozenset({"US", "DS", "IS", "UI", "CS"})
_TAGS: dict[str, int] = {}
# a header as the scan reads it: pydicom's, or fedscan's faster RawHeader (dicom_header.py)
Header = Dataset | RawHeader


def _value(ds: Header, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)`` for a top-level element of a header, converted as pydicom does."""
    if isinstance(ds, RawHeader):
        return ds.get(keyword, default)
    tag = _TAGS.get(keyword)
    if tag is None:
        tag = _TAGS[keyword] = int(tag_for_keyword(keyword) or 0)
    elem = ds._dict.get(BaseTag(tag))  # noqa: SLF001 - the raw element, before pydicom converts it
    if elem is None:
        return default
    if isinstance(elem, RawDataElement) and elem.value is not None and ds.original_encoding[1] is not False:
        vr = elem.VR or dictionary_VR(tag)
        raw = elem.value
        try:
            if vr in _FAST_VRS:
                if vr == "US":
                    if len(raw) == 2:
                        return int.from_bytes(raw, "little")
                else:
                    text = raw.decode("ascii")
                    if vr in ("UI", "CS"):
                        if "\\" not in text:
                            return text.rstrip("\0 ").lstrip(" ") if vr == "CS" else text.rstrip("\0 ")
                    else:
                        parts = text.strip(" \0").split("\\")
                        if parts != [""]:
                            vals = [float(v) for v in parts] if vr == "DS" else [int(v) for v in parts]
                            return vals[0] if len(vals) == 1 else vals
        except (UnicodeDecodeError, ValueError):
            pass
    return ds.get(keyword, default)


def list_files(images_dir: Path) -> list[Path]:
    """Every regular, non-hidden file below ``images_dir``, in a stable order (sorted as paths).

    Files behind symbolic links count; linked folders are not entered (as ``Path.rglob``).
    ``os.scandir`` rather than ``rglob`` and a check of every path's parts: the same list, and
    a regular file needs no ``stat`` (the directory entry says what it is); listing the bench's
    96-slice site took 1.2 instead of 3.5 ms, and a warm read of it (whose cache key lists the
    files) 3.7 instead of 5.8 ms."""
    root = Path(images_dir)
    if not root.is_dir():
        return []
    out: list[Path] = []
    folders = [root]
    while folders:
        folder = folders.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    folders.append(folder / entry.name)
                elif entry.is_file():
                    out.append(folder / entry.name)
    return sorted(out)


def read_header(path: Path) -> Dataset | Skipped:
    """The file's DICOM header without pixel data, or why it cannot be read as DICOM.

    The returned dataset carries ``fedscan_pixel_offset``: where the Pixel Data element starts.
    """
    try:
        with open(path, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # pydicom.misc.is_dicom's test, on the handle the header is then read from: opening the
            # file a second time for is_dicom cost 0.67 against 0.59 ms a file of the header read
            head = fh.read(132)
            preamble = len(head) == 132 and head[128:132] == b"DICM"
            fh.seek(0)
            ds = pydicom.dcmread(fh, stop_before_pixels=True, force=not preamble, defer_size=4096)
            ds.fedscan_pixel_offset = fh.tell()
            if not preamble and "SOPClassUID" not in ds and "Rows" not in ds:
                return Skipped(path, "not a DICOM file")
    except Exception as exc:  # noqa: BLE001 - any parse failure means the same to the site
        return Skipped(path, "not a readable DICOM file", f"{type(exc).__name__}: {exc}")
    return ds


_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit and explicit VR little endian


def _meta(ds: Header, keyword: str) -> str:
    """A file meta element (transfer syntax, media storage SOP class) as text; '' if absent."""
    return str(getattr(ds, "file_meta", None) and ds.file_meta.get(keyword, "") or "")


def _native_layout(ds: Header) -> tuple[int, str, int, bool] | None:
    """(offset, dtype, bits stored, explicit VR) when the pixels can be read straight from the
    file: uncompressed little endian, one frame, one sample. None means: let pydicom decode."""
    syntax = _meta(ds, "TransferSyntaxUID")
    if (
        syntax not in _NATIVE_SYNTAXES
        or "NumberOfFrames" in ds
        or int(_value(ds, "SamplesPerPixel", 1) or 1) != 1
    ):
        return None
    bits = int(_value(ds, "BitsAllocated", 0) or 0)
    if bits not in (8, 16, 32) or "ModalityLUTSequence" in ds:
        return None
    signed = int(_value(ds, "PixelRepresentation", 0) or 0) == 1
    dtype = f"<{'i' if signed else 'u'}{bits // 8}"
    stored = int(_value(ds, "BitsStored", bits) or bits)
    implicit = bool(ds.original_encoding[0])  # how the body really is encoded, whatever the meta says
    return int(getattr(ds, "fedscan_pixel_offset", -1)), dtype, stored, not implicit


_ENCAPSULATED_SYNTAXES = frozenset(str(uid) for uid in pydicom.uid.AllTransferSyntaxes if uid.is_encapsulated)


def _encoded_layout(ds: Header) -> EncodedPixels | None:
    """How pydicom's decoder can read the file's compressed pixels without the file's data set:
    single frame, one sample, no Modality LUT Sequence or offset tables beside the pixels."""
    syntax = _meta(ds, "TransferSyntaxUID")
    if (
        syntax not in _ENCAPSULATED_SYNTAXES
        or any(k in ds for k in ("NumberOfFrames", "ModalityLUTSequence", "ExtendedOffsetTable"))
        or int(_value(ds, "SamplesPerPixel", 1) or 1) != 1
    ):
        return None
    bits = int(_value(ds, "BitsAllocated", 0) or 0)
    if bits not in (8, 16, 32):
        return None
    return EncodedPixels(
        offset=int(getattr(ds, "fedscan_pixel_offset", -1)),
        syntax=syntax,
        bits_allocated=bits,
        bits_stored=int(_value(ds, "BitsStored", bits) or bits),
        pixel_representation=int(_value(ds, "PixelRepresentation", 0) or 0),
        photometric=str(_value(ds, "PhotometricInterpretation", "")).strip(),
    )


def _bits_range(ds: Header) -> tuple[int, int]:
    bits = int(_value(ds, "BitsStored", _value(ds, "BitsAllocated", 16)) or 16)
    if int(_value(ds, "PixelRepresentation", 0) or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _item(groups: Dataset | None, seq: str) -> Dataset | None:
    if groups is None or seq not in groups or not groups[seq].value:
        return None
    return groups[seq].value[0]


def _slices_of(path: Path, ds: Header) -> list[_Slice] | str:
    """The slices a greyscale image file contributes, or why it contributes none."""
    shape = (int(_value(ds, "Rows")), int(_value(ds, "Columns")))
    if shape[0] < 1 or shape[1] < 1:
        return "image with no rows or columns"
    sop = str(_value(ds, "SOPInstanceUID", ""))
    if not sop:
        return "image without SOPInstanceUID"
    syntax = uid_name(_meta(ds, "TransferSyntaxUID"), "unknown transfer syntax")
    invert = str(_value(ds, "PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    lut = "ModalityLUTSequence" in ds
    lo_hi = _bits_range(ds)
    top_iop = _floats(_value(ds, "ImageOrientationPatient"), 6)
    top_ipp = _floats(_value(ds, "ImagePositionPatient"), 3)
    top_spacing = _floats(_value(ds, "PixelSpacing"), 2)
    if top_spacing is None:
        top_spacing = _floats(_value(ds, "ImagerPixelSpacing"), 2)
    top_thick = _number(_value(ds, "SliceThickness"), 0.0)
    top_slope = _number(_value(ds, "RescaleSlope"), 1.0)
    top_icpt = _number(_value(ds, "RescaleIntercept"), 0.0)
    n_frames = int(_number(_value(ds, "NumberOfFrames"), 1.0))
    if n_frames < 1:
        return "NumberOfFrames is not a positive number"
    if lut and (invert or "NumberOfFrames" in ds):
        return "a Modality LUT Sequence on a MONOCHROME1 or multi-frame image is not supported"

    def make(frame: int | None, ipp, iop, spacing, thick, slope, icpt) -> _Slice:
        vals = sorted((lo_hi[0] * slope + icpt, lo_hi[1] * slope + icpt))
        return _Slice(
            path,
            frame,
            sop,
            shape,
            ipp,
            iop,
            None if spacing is None else tuple(spacing),
            thick,
            slope,
            icpt,
            invert,
            (vals[0], vals[1]),
            lut,
            syntax,
            _native_layout(ds) if frame is None else None,
            _encoded_layout(ds) if frame is None else None,
        )

    if "NumberOfFrames" not in ds:
        return [make(None, top_ipp, top_iop, top_spacing, top_thick, top_slope, top_icpt)]
    if isinstance(ds, RawHeader):
        raise NotFast("multi-frame")  # functional groups are sequences: pydicom reads them
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != n_frames:
        per_frame = None
    out = []
    for i in range(n_frames):
        fg = per_frame[i] if per_frame is not None else None

        def group(seq: str, fg: Dataset | None = fg) -> Dataset | None:
            return _item(fg, seq) or _item(shared, seq)

        pos, ori, meas, pvt = (
            group(s)
            for s in (
                "PlanePositionSequence",
                "PlaneOrientationSequence",
                "PixelMeasuresSequence",
                "PixelValueTransformationSequence",
            )
        )
        ipp = _floats(pos.get("ImagePositionPatient"), 3) if pos is not None else None
        if ipp is None and n_frames == 1:
            ipp = top_ipp
        iop = _floats(ori.get("ImageOrientationPatient"), 6) if ori is not None else top_iop
        spacing = _floats(meas.get("PixelSpacing"), 2) if meas is not None else None
        thick = _number(meas.get("SliceThickness"), top_thick) if meas is not None else top_thick
        slope = _number(pvt.get("RescaleSlope"), top_slope) if pvt is not None else top_slope
        icpt = _number(pvt.get("RescaleIntercept"), top_icpt) if pvt is not None else top_icpt
        out.append(make(i, ipp, iop, spacing if spacing is not None else top_spacing, thick, slope, icpt))
    return out


def _classify(path: Path, ds: Header) -> list[_Slice] | str | None:
    """Slices of an image, None for a DICOM SEG, or the reason the file is not used."""
    sop_class = str(_value(ds, "SOPClassUID", _meta(ds, "MediaStorageSOPClassUID")))
    if sop_class == MEDIA_DIRECTORY_STORAGE or "DirectoryRecordSequence" in ds:
        return "a DICOMDIR (a media index, not an image)"
    if sop_class == SEG_STORAGE:
        return None
    if "Rows" not in ds or "Columns" not in ds:
        return f"not an image (no pixel data): {uid_name(sop_class, 'unknown object type')}"
    modality = standard_modality(_value(ds, "Modality", ""))
    if modality in NOT_TRAINABLE:
        return f"not an image to train on: {NOT_TRAINABLE[modality]}"
    photometric = str(_value(ds, "PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in GREYSCALE or int(_number(_value(ds, "SamplesPerPixel"), 1)) != 1:
        kind = photometric if photometric in _COLOUR_MODELS else "colour"
        return f"colour image ({kind}): fedscan trains on greyscale images"
    if not str(_value(ds, "SeriesInstanceUID", "")):
        return "image without SeriesInstanceUID"
    return _slices_of(path, ds)


@dataclass(frozen=True)
class SeriesMeta:
    """The series-level attributes of a file, as the header scan keeps them (site-local)."""

    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    manufacturer: str


@dataclass
class FileScan:
    """What one file's header says: image slices (with their series), a DICOM SEG (with the
    series it refers to), or why the file is not used. Small and picklable: worker processes
    return these to the process that groups them into series."""

    path: Path
    slices: list[_Slice] | None = None
    series: SeriesMeta | None = None
    seg_refs: list[str] | None = None  # a DICOM SEG: the SeriesInstanceUIDs it refers to
    skipped: Skipped | None = None


def _seg_references(ds: Dataset) -> list[str]:
    return [str(item.get("SeriesInstanceUID", "")) for item in ds.get("ReferencedSeriesSequence", [])]


def scan_file(path: Path, seg_only: bool = False, fast: bool = True) -> FileScan:
    """Read one file's header and classify it. Never raises for a bad file. ``seg_only``: the
    file is only looked at as a possible DICOM SEG (files under labels/). ``fast``: try
    fedscan's own header reader first (``dicom_header``); pydicom reads whatever it leaves."""
    if fast and not seg_only:
        raw = read_raw_header(path)
        if raw is not None:
            try:
                return _scan_header(path, raw)
            except NotFast:
                pass
    ds = read_header(path)
    if isinstance(ds, Skipped):
        return FileScan(path, skipped=ds)
    if seg_only:
        is_seg = str(ds.get("SOPClassUID", "")) == SEG_STORAGE
        return FileScan(path, seg_refs=_seg_references(ds) if is_seg else None)
    return _scan_header(path, ds)


def _scan_header(path: Path, ds: Header) -> FileScan:
    """Classify a file by its header; ``NotFast`` passes through for pydicom to read the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = _classify(path, ds)
            if result is None:
                if isinstance(ds, RawHeader):
                    raise NotFast("a DICOM SEG")  # its references are a sequence
                return FileScan(path, seg_refs=_seg_references(ds))
            if isinstance(result, str):
                return FileScan(path, skipped=Skipped(path, result))
            meta = SeriesMeta(
                series_uid=str(_value(ds, "SeriesInstanceUID")),
                study_uid=str(_value(ds, "StudyInstanceUID", "")),
                patient_id=str(_value(ds, "PatientID", "")),
                modality=standard_modality(_value(ds, "Modality", "")),
                manufacturer=str(_value(ds, "Manufacturer", "")).strip()[:64],
            )
    except NotFast:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed header must not stop the scan
        return FileScan(
            path, skipped=Skipped(path, "unreadable image header", f"{type(exc).__name__}: {exc}")
        )
    return FileScan(path, slices=result, series=meta)


def scan_files(paths: list[Path], seg_only: bool = False) -> list[FileScan]:
    """``scan_file`` over a list of files (one worker's share of a site)."""
    return [scan_file(p, seg_only) for p in paths]


def group_series(
    entries: list[FileScan], extra: list[FileScan] | None = None, n_files: int | None = None
) -> SiteScan:
    """Group scanned files (in the site's file order) into ordered series; ``extra`` are the
    scans of files looked at for DICOM SEG objects only."""
    scan = SiteScan(n_files=len(entries) if n_files is None else n_files)
    groups: dict[str, list[_Slice]] = {}
    meta: dict[str, SeriesMeta] = {}
    seen_sop: dict[str, Path] = {}
    for entry in entries:
        if entry.skipped is not None:
            scan.skipped.append(entry.skipped)
            continue
        if entry.slices is None:
            scan.segs.append(entry.path)
            scan.seg_refs[entry.path] = list(entry.seg_refs or [])
            continue
        assert entry.series is not None
        sop = entry.slices[0].sop
        if sop in seen_sop:
            scan.skipped.append(
                Skipped(entry.path, "the same image (SOPInstanceUID) as another file; ignored")
            )
            continue
        seen_sop[sop] = entry.path
        groups.setdefault(entry.series.series_uid, []).extend(entry.slices)
        meta.setdefault(entry.series.series_uid, entry.series)
    for entry in extra or []:
        if entry.seg_refs is not None:
            scan.segs.append(entry.path)
            scan.seg_refs[entry.path] = list(entry.seg_refs)
    for uid, slices in groups.items():
        try:
            header = _assemble(meta[uid], slices, scan.skipped)
        except Exception as exc:  # noqa: BLE001
            for path in dict.fromkeys(s.path for s in slices):
                scan.skipped.append(
                    Skipped(path, "series could not be assembled", f"{type(exc).__name__}: {exc}")
                )
            continue
        if header is not None:
            scan.series.append(header)
    scan.series.sort(key=lambda s: s.series_uid)
    return scan


def scan_site(images_dir: Path, extra_files: list[Path] | None = None) -> SiteScan:
    """Read every file's header and group the image slices into ordered series, in this
    process. Never raises for a bad file; ``extra_files`` (e.g. DICOM under labels/) are
    scanned for SEG objects only. ``fedscan.common.data.site_reader`` does the same in
    worker processes."""
    files = list_files(images_dir)
    return group_series(scan_files(files), scan_files(list(extra_files or []), seg_only=True))


def _skip_files(slices: list[_Slice], reason: str, skipped: list[Skipped]) -> None:
    for path in dict.fromkeys(s.path for s in slices):
        skipped.append(Skipped(path, reason))


def _assemble(meta: SeriesMeta, slices: list[_Slice], skipped: list[Skipped]) -> SeriesHeader | None:
    """Keep the series' largest consistent group of slices, ordered; report the rest."""
    geometric = [
        s
        for s in slices
        if s.position is not None
        and s.orientation is not None
        and s.spacing is not None
        and np.linalg.norm(np.cross(s.orientation[:3], s.orientation[3:])) > 0.5
    ]
    if geometric and len(geometric) < len(slices):
        in_geo = {id(s) for s in geometric}
        _skip_files(
            [s for s in slices if id(s) not in in_geo],
            "no usable ImagePositionPatient/ImageOrientationPatient while the rest of its series has them",
            skipped,
        )
    pool = geometric or slices

    def key(s: _Slice) -> tuple:
        ori = None if s.orientation is None else tuple(np.round(s.orientation, 3))
        spc = None if s.spacing is None else tuple(np.round(s.spacing, 3))
        return s.shape, ori, spc

    counts = Counter(key(s) for s in pool)
    main_key = max(counts, key=lambda k: (counts[k], str(k)))
    kept = [s for s in pool if key(s) == main_key]
    others = [s for s in pool if key(s) != main_key]
    if others:
        sizes = {s.shape for s in others} - {main_key[0]}
        what = "slice size differs from" if sizes else "orientation or pixel spacing differs from"
        _skip_files(others, f"inconsistent series: {what} the rest of its series", skipped)
    first = kept[0]
    warn: list[str] = []
    if geometric:
        assert first.orientation is not None  # every geometric slice has one
        row_dir, col_dir = first.orientation[:3], first.orientation[3:]
        normal = np.cross(row_dir, col_dir)
        # highdicom.spatial.get_plane_sort_index (index_convention "RD") gives the same order, but
        # the projections are needed here anyway for the duplicate and gap checks, and importing
        # highdicom costs the header scan 0.24 s a process (0.05 against 0.004 ms for 100 slices)
        proj = np.array([s.position @ normal for s in kept])
        order = np.argsort(proj, kind="stable")
        kept = [kept[i] for i in order]
        proj = proj[order]
        d = np.diff(proj)
        if (d < SAME_POSITION_MM).any():
            n_dup = int((d < SAME_POSITION_MM).sum())
            _skip_files(
                kept,
                f"inconsistent series: {n_dup} slice position(s) hold more than one image "
                "(repeated or multi-echo acquisition?); the series is not used",
                skipped,
            )
            return None
        if d.size >= 2:
            med = float(np.median(d))
            gaps = d > GAP_FACTOR * med
            if gaps.any():
                warn.append(
                    f"gap: {int(gaps.sum())} place(s) where slices are up to {d.max():.1f} mm apart "
                    f"(median spacing {med:.1f} mm); slices may be missing"
                )
        positions = np.stack([np.asarray(s.position) for s in kept])
        spacing = first.spacing or (1.0, 1.0)  # set: every geometric slice has one
    else:
        # no patient geometry: 2D images; a deterministic order not taken from file names
        kept.sort(key=lambda s: (s.sop, -1 if s.frame is None else s.frame))
        row_dir, col_dir = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
        positions = np.array([[0.0, 0.0, float(i)] for i in range(len(kept))])
        spacing = first.spacing or (1.0, 1.0)
    return SeriesHeader(
        series_uid=meta.series_uid,
        study_uid=meta.study_uid,
        patient_id=meta.patient_id,
        modality=meta.modality,
        manufacturer=meta.manufacturer,
        files=[s.path for s in kept],
        frames=[s.frame for s in kept],
        sop_uids=[s.sop for s in kept],
        positions=positions,
        row_dir=np.asarray(row_dir, dtype=np.float64),
        col_dir=np.asarray(col_dir, dtype=np.float64),
        spacing=(float(spacing[0]), float(spacing[1])),
        thickness=first.thickness,
        shape=first.shape,
        slopes=np.array([s.slope for s in kept], dtype=np.float64),
        intercepts=np.array([s.intercept for s in kept], dtype=np.float64),
        invert=np.array([s.invert for s in kept], dtype=bool),
        value_range=np.array([s.value_range for s in kept], dtype=np.float64),
        lut=np.array([s.lut for s in kept], dtype=bool),
        transfer_syntaxes=[s.syntax for s in kept],
        native=[s.native for s in kept],
        encoded=[s.encoded for s in kept],
        geometry=bool(geometric),
        warnings=warn,
    )


def _read_native(path: Path, layout: tuple[int, str, int, bool], shape: tuple[int, int]) -> np.ndarray | None:
    """Uncompressed pixels straight from the file; None when the element is not as expected."""
    offset, dtype, stored, explicit = layout
    if offset < 0:
        return None
    n = shape[0] * shape[1]
    itemsize = np.dtype(dtype).itemsize
    with open(path, "rb") as fh:
        fh.seek(offset)
        head = fh.read(12 if explicit else 8)
        if head[:4] != b"\xe0\x7f\x10\x00" or (explicit and head[4:6] not in (b"OB", b"OW", b"UN")):
            return None
        length = int.from_bytes(head[8:12] if explicit else head[4:8], "little")
        if length not in (n * itemsize, n * itemsize + 1):  # + 1: padding to an even length
            return None
        arr = np.frombuffer(fh.read(n * itemsize), dtype=dtype)
    if arr.size != n:
        return None
    bits = itemsize * 8
    if stored < bits:  # only the stored bits count: mask them, or sign-extend from the high bit
        if dtype[1] == "u":
            arr = arr & np.array(2**stored - 1, dtype=dtype)
        else:
            shift = bits - stored
            arr = (arr << shift) >> shift
    return arr.reshape(shape)


def _read_encoded(path: Path, layout: EncodedPixels, shape: tuple[int, int]) -> np.ndarray | None:
    """A compressed single frame decoded by pydicom's decoder from the bytes after the Pixel
    Data element's header; None when the element is not where and what the header scan saw,
    or the decoder refuses it (then the file is read the usual way, and reported from there)."""
    if layout.offset < 0:
        return None
    with open(path, "rb") as fh:
        fh.seek(layout.offset)
        head = fh.read(12)
        if head[:4] != b"\xe0\x7f\x10\x00" or head[4:6] != b"OB" or head[8:12] != b"\xff\xff\xff\xff":
            return None
        data = fh.read()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # as_array's **kwargs are annotated as DecodeOptions each (pydicom means Unpack[...])
            decoder = pydicom.pixels.get_decoder(layout.syntax)
            as_array: Callable[..., tuple[np.ndarray, Any]] = decoder.as_array
            arr, _ = as_array(
                data,
                rows=shape[0],
                columns=shape[1],
                samples_per_pixel=1,
                number_of_frames=1,
                bits_allocated=layout.bits_allocated,
                bits_stored=layout.bits_stored,
                pixel_representation=layout.pixel_representation,
                photometric_interpretation=layout.photometric,
                transfer_syntax_uid=pydicom.uid.UID(layout.syntax),
                pixel_keyword="PixelData",
            )
    except Exception:  # noqa: BLE001 - the full read decides, and reports, what is wrong
        return None
    return arr if arr.shape == shape else None


def _decode(path: Path, need_dataset: bool) -> tuple[np.ndarray, Dataset | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preamble = is_dicom(path)
        if not need_dataset and preamble:
            try:
                return pydicom.pixels.pixel_array(path), None  # reads only what decoding needs
            except Exception:  # noqa: BLE001 - e.g. deflated files: fall back to a full read
                pass
        ds = pydicom.dcmread(path, force=not preamble)
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
            # a raw dataset without file meta (old ACR-NEMA style): the encoding it was read with
            implicit, little = ds.original_encoding
            ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = (
                pydicom.uid.ImplicitVRLittleEndian
                if implicit
                else pydicom.uid.ExplicitVRLittleEndian
                if little
                else pydicom.uid.ExplicitVRBigEndian
            )
        return ds.pixel_array, ds


def read_series(series: SeriesHeader) -> tuple[np.ndarray, np.ndarray, list[Skipped]]:
    """Decode the series' pixels after the modality LUT (HU for CT) and MONOCHROME1 inversion.

    Returns float32 (n, rows, cols), a bool mask of the slices that decoded (a failed slice
    is left as zeros) and a ``Skipped`` entry per file that failed. Never raises for bad data.

    Not highdicom's get_volume_from_series: the same values (float32), but it needs every file
    read in full, raises for the whole series on an irregular spacing or one bad file (here a
    file is reported and the rest kept), and took 220 ms with the datasets already read against
    28 ms here for 100 slices of 512x512 read from the files.
    """
    n = len(series)
    out = np.zeros((n, *series.shape), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    failed: list[Skipped] = []
    by_file: dict[Path, list[int]] = {}
    for i, path in enumerate(series.files):
        by_file.setdefault(path, []).append(i)
    for path, idx in by_file.items():
        try:
            layout = series.native[idx[0]] if series.native else None
            arr = _read_native(path, layout, series.shape) if layout is not None else None
            encoded = series.encoded[idx[0]] if series.encoded else None
            if arr is None and encoded is not None and not series.lut[idx[0]]:
                arr = _read_encoded(path, encoded, series.shape)
            ds = None
            if arr is None:
                arr, ds = _decode(path, bool(series.lut[idx[0]]))
            for i in idx:
                frame = series.frames[i]
                img = arr if frame is None or arr.ndim == 2 else arr[frame]
                if img.shape != series.shape:
                    raise ValueError(f"decoded frame has shape {img.shape}, header says {series.shape}")
                if series.lut[i] and ds is not None and frame is None:
                    vals = np.asarray(apply_modality_lut(img, ds), dtype=np.float32)
                else:
                    slope, icpt = series.slopes[i], series.intercepts[i]
                    if slope == 1.0 and icpt == int(icpt):  # exact in float32: skip float64
                        vals = img.astype(np.float32) + np.float32(icpt)
                    else:
                        vals = (img * slope + icpt).astype(np.float32)
                if series.invert[i]:
                    lo, hi = series.value_range[i]
                    vals = np.float32(lo + hi) - vals
                out[i] = vals
                ok[i] = True
        except Exception as exc:  # noqa: BLE001 - a corrupt or undecodable file is reported, not raised
            ok[idx] = False
            out[idx] = 0.0
            failed.append(Skipped(path, "pixel data could not be decoded", f"{type(exc).__name__}: {exc}"))
    return out, ok, failed


def read_pixels(series: SeriesHeader) -> np.ndarray:
    """All of the series' pixels, or a ValueError naming how many files failed to decode."""
    pixels, ok, failed = read_series(series)
    if not ok.all():
        raise ValueError(f"{len(failed)} file(s) of the series could not be decoded: {failed[0].detail}")
    return pixels
