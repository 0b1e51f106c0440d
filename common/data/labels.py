"""Segmentation masks aligned to a DICOM series by physical geometry.

A mask ``labels/<SeriesInstanceUID>.nii.gz`` is mapped onto the series' pixel grid through
the physical coordinates of every pixel: DICOM LPS from ImagePositionPatient, orientation
and spacing; NIfTI RAS+ from the image affine. The mapping does not care how the NIfTI
volume is ordered on disk, only where its voxels are.
"""

from __future__ import annotations

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
