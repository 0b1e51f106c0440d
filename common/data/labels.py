"""Labels: segmentation masks aligned to a DICOM series by geometry, and class labels.

A mask ``labels/<SeriesInstanceUID>.nii.gz`` is mapped onto the series' pixel grid through
the physical coordinates of every pixel: DICOM LPS from ImagePositionPatient, orientation
and spacing; NIfTI RAS+ from the image affine. The mapping does not care how the NIfTI
volume is ordered on disk, only where its voxels are.

Class labels come from ``labels/labels.csv``: a header with exactly one key column,
``SOPInstanceUID`` (one label per image), ``SeriesInstanceUID`` or ``StudyInstanceUID``
(one label per exam), and a ``label`` column holding the class index 0..num_classes-1.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from fedscan.common.data.dicom import SeriesHeader
from fedscan.common.errors import FedscanError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
# how far (in voxels) a series pixel may fall from the mask's voxel centres
_TOLERANCE_VOX = 0.05


def mask_path(labels_dir: Path, series_uid: str) -> Path:
    return Path(labels_dir) / f"{series_uid}.nii.gz"


def load_mask(path: Path, series: SeriesHeader) -> np.ndarray:
    """Return the mask on the series grid: uint8 (n_slices, rows, cols).

    Raises FedscanError when the mask does not cover the series or sits off its grid.
    """
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for a corrupt file
        raise FedscanError(f"cannot read mask {path.name}: {exc}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise FedscanError(f"mask {path.name} has {data.ndim} dimensions; expected a 3D volume")
    inv = np.linalg.inv(img.affine)
    rows, cols = series.shape
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    dr, dc = series.spacing
    out = np.zeros((len(series.files), rows, cols), dtype=np.uint8)
    for k, ipp in enumerate(series.positions):
        # LPS position of every pixel centre of slice k
        lps = (
            ipp[None, None, :]
            + c[..., None] * dc * series.row_dir[None, None, :]
            + r[..., None] * dr * series.col_dir[None, None, :]
        )
        ras = lps @ _LPS_TO_RAS.T
        ijk = ras @ inv[:3, :3].T + inv[:3, 3]
        idx = np.rint(ijk).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.array(data.shape)), axis=-1)
        if not inside.all():
            raise FedscanError(
                f"mask {path.name} does not cover slice {k + 1} of its series "
                f"(mask shape {data.shape}, series {len(series.files)}x{rows}x{cols})",
                hint="the mask must be written on the same geometry as the DICOM series",
            )
        # the slice must fall on a mask slice centre, not between two of them
        off = np.abs(ijk - idx)
        if off.max() > _TOLERANCE_VOX:
            raise FedscanError(
                f"mask {path.name} is off the series grid by {off.max():.2f} voxels at slice {k + 1}",
                hint="the mask must be written on the same geometry as the DICOM series",
            )
        out[k] = data[idx[..., 0], idx[..., 1], idx[..., 2]]
    return out


LABELS_CSV = "labels.csv"
KEY_COLUMNS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


@dataclass
class ClassLabels:
    """The rows of a labels.csv: which UID level they key, and the class of each UID."""

    key: str  # one of KEY_COLUMNS
    labels: dict[str, int]

    @property
    def exam_level(self) -> bool:
        return self.key != "SOPInstanceUID"


def read_class_labels(path: Path, num_classes: int) -> ClassLabels:
    """Read and validate a labels.csv; every problem is a FedscanError naming the row."""
    path = Path(path)
    if not path.is_file():
        raise FedscanError(
            f"no class labels: {path} does not exist",
            hint="classification needs labels/labels.csv with a UID column and a 'label' column",
        )
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = [(reader.line_num, row) for row in reader]  # line numbers as an editor shows them
            header = [h.strip() for h in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FedscanError(f"cannot read {path.name}: {exc}") from None
    if not rows:
        raise FedscanError(f"{path.name} holds no label rows")
    keys = [k for k in KEY_COLUMNS if k in header]
    if len(keys) != 1 or "label" not in header:
        raise FedscanError(
            f"{path.name} has columns {header}; it needs a 'label' column and exactly one of "
            f"{', '.join(KEY_COLUMNS)}"
        )
    key = keys[0]
    labels: dict[str, int] = {}
    for line, row in rows:
        row = {str(k).strip(): (v or "").strip() for k, v in row.items() if k is not None}
        uid, raw = row.get(key, ""), row.get("label", "")
        if not uid:
            raise FedscanError(f"{path.name} line {line}: empty {key}")
        try:
            value = int(raw)
        except ValueError:
            raise FedscanError(
                f"{path.name} line {line}: label {raw!r} is not a class index 0..{num_classes - 1}"
            ) from None
        if not 0 <= value < num_classes:
            raise FedscanError(
                f"{path.name} line {line}: class {value} is outside 0..{num_classes - 1}",
                hint="set num_classes in the run config to the number of classes",
            )
        if labels.get(uid, value) != value:
            raise FedscanError(f"{path.name} line {line}: {key} listed again with another label")
        labels[uid] = value
    return ClassLabels(key, labels)
