"""A model's label map of one series as a DICOM SEG object that opens over the source series.

``build_seg`` turns a (n_slices, rows, cols) label map, aligned with a ``SeriesHeader``'s slices
(geometric order, ``files``/``frames``/``sop_uids``), into a BINARY Segmentation written with
highdicom: one segment per foreground class, produced by an AUTOMATIC algorithm identified as
"fedscan <model>" (family Artificial Intelligence), referencing every source image, on the source's
frame of reference and patient. ``write_seg`` stores it so that no reader ever sees half a file.

The source files are read without their pixel data: the SEG needs their header only.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from fedscan.common.atomic import atomic_write_bytes
from fedscan.common.data.dicom import SeriesHeader

log = logging.getLogger(__name__)

MANUFACTURER = "fedscan"
SERIES_NUMBER = 9000  # far above a scanner's own series numbers, so that viewers list it last
CONTENT_LABEL = "FEDSCAN"  # a CS value: upper case, at most 16 characters
# a two-class run segments lesions; classes of a larger run are named by number only
LESION_CATEGORY = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure")
LESION_TYPE = hd.sr.CodedConcept("52988006", "SCT", "Lesion")
GENERIC = hd.sr.CodedConcept("85756007", "SCT", "Tissue")


def fedscan_version() -> str:
    """The installed fedscan's version, as the SEG's software and algorithm versions give it."""
    try:
        return version("fedscan")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def segment_descriptions(num_classes: int, model: str) -> list[hd.seg.SegmentDescription]:
    """One segment per foreground class 1..num_classes-1, numbered as the classes are."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"fedscan {model}",
        family=codes.cid7162.ArtificialIntelligence,
        version=fedscan_version(),
    )
    out = []
    for c in range(1, num_classes):
        lesion = num_classes == 2
        out.append(
            hd.seg.SegmentDescription(
                segment_number=c,
                segment_label="lesion" if lesion else f"class {c}",
                segmented_property_category=LESION_CATEGORY if lesion else GENERIC,
                segmented_property_type=LESION_TYPE if lesion else GENERIC,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    return out


def _sources(hdr: SeriesHeader, labels: np.ndarray) -> tuple[list[Dataset], np.ndarray]:
    """The source datasets and the label frames in their order: one per single-frame file, or
    every frame of one multi-frame file (frames the header does not hold stay empty)."""
    files = list(dict.fromkeys(hdr.files))
    if len(files) == len(hdr.files):  # one slice per file
        return [pydicom.dcmread(f, stop_before_pixels=True) for f in hdr.files], labels
    if len(files) == 1:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        frames = np.zeros((int(ds.NumberOfFrames), *labels.shape[1:]), dtype=labels.dtype)
        frames[[int(f) for f in hdr.frames]] = labels  # type: ignore[arg-type]  # frames are set here
        return [ds], frames
    raise ValueError(
        f"the series' slices come from {len(files)} multi-frame files; a SEG can reference "
        "the frames of one multi-frame image only"
    )


@contextmanager
def _quiet_highdicom() -> Iterator[None]:
    """Hold back highdicom's INFO lines (nine per SEG, naming the source UIDs) from the site's log."""
    logger = logging.getLogger("highdicom")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def build_seg(hdr: SeriesHeader, labels: np.ndarray, *, num_classes: int, model: str) -> hd.seg.Segmentation:
    """The BINARY SEG of ``labels`` (uint8 (n_slices, rows, cols), 0 = background) over ``hdr``'s images."""
    labels = np.asarray(labels)
    if labels.shape != (len(hdr), *hdr.shape):
        raise ValueError(
            f"label map of shape {labels.shape} does not match the series' {len(hdr)} slices of {hdr.shape}"
        )
    if labels.size and int(labels.max()) >= num_classes:
        raise ValueError(
            f"label map holds class {int(labels.max())}, but the model has {num_classes} classes"
        )
    sources, frames = _sources(hdr, labels.astype(np.uint8))
    name = f"fedscan {model}"
    with _quiet_highdicom():
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segment_descriptions(num_classes, model),
            series_instance_uid=generate_uid(),
            series_number=SERIES_NUMBER,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=name,
            software_versions=fedscan_version(),
            device_serial_number="none",
            # nothing found: every frame is kept (empty), so the SEG still says so for each image
            omit_empty_frames=bool(frames.any()),
            series_description=f"{name} prediction",
            content_label=CONTENT_LABEL,
            content_description=f"{name} prediction",
        )
    _complete(seg, hdr, sources[0])
    return seg


def _complete(seg: hd.seg.Segmentation, hdr: SeriesHeader, source: Dataset) -> None:
    """Two attributes highdicom leaves out for some sources, where the header knows them: the
    slice thickness (a source without SliceThickness) and, for images without patient geometry
    (radiographs, NM), the Patient Orientation (Type 2C: empty when the source has none)."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    measures = shared.get("PixelMeasuresSequence")
    if measures and "SliceThickness" not in measures[0]:
        thickness = hdr.thickness if hdr.thickness > 0 else hdr.slice_spacing
        if thickness > 0:
            measures[0].SliceThickness = f"{thickness:.6g}"
    if "PlaneOrientationSequence" not in shared and "PatientOrientation" not in seg:
        seg.PatientOrientation = source.get("PatientOrientation", "")


def write_seg(path: Path, hdr: SeriesHeader, labels: np.ndarray, *, num_classes: int, model: str) -> None:
    """Build the SEG (``build_seg``) and write it to ``path`` through a temporary file."""
    seg = build_seg(hdr, labels, num_classes=num_classes, model=model)
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    atomic_write_bytes(Path(path), buf.getvalue())
    log.debug("wrote %s (%d frame(s))", path, int(seg.NumberOfFrames))
