"""The site folder contract, and the checks a site must pass before training starts.

```
<site>/images/**                          DICOM files, any nesting, any file names
<site>/labels/<SeriesInstanceUID>.nii.gz  segmentation masks, aligned by DICOM geometry
<site>/labels/labels.csv                  classification labels: a UID column
                                          (SOPInstanceUID, SeriesInstanceUID or
                                          StudyInstanceUID) and a `label` column
```
A data root holds one such folder per site; the folder name is the site's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom

from fedscan.common.data.dicom import list_files
from fedscan.common.errors import FedscanError

LAYOUT_HINT = (
    "each site folder needs images/ (DICOM files, any nesting) and, for segmentation, "
    "labels/<SeriesInstanceUID>.nii.gz masks; for classification, labels/labels.csv"
)


@dataclass(frozen=True)
class SiteDir:
    name: str
    path: Path

    @property
    def images(self) -> Path:
        return self.path / "images"

    @property
    def labels(self) -> Path:
        return self.path / "labels"


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    try:  # DICOM without the preamble: let pydicom decide
        pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - any failure means "not DICOM"
        return False
    return True


def discover_sites(data_root: Path) -> list[SiteDir]:
    """The site folders under ``data_root``, sorted by name."""
    root = Path(data_root)
    if not root.exists():
        raise FedscanError(f"data root {root} does not exist", hint=LAYOUT_HINT)
    if not root.is_dir():
        raise FedscanError(f"data root {root} is not a folder", hint=LAYOUT_HINT)
    sites = [SiteDir(p.name, p) for p in sorted(root.iterdir()) if (p / "images").is_dir()]
    if not sites and (root / "images").is_dir():
        raise FedscanError(
            f"{root} looks like a single site folder; --data-root takes the folder that holds "
            "the site folders", hint=LAYOUT_HINT,
        )
    if not sites:
        raise FedscanError(f"no site folders with an images/ folder under {root}", hint=LAYOUT_HINT)
    return sites


def check_site(site: SiteDir, task: str) -> None:
    """Fast checks before anything heavy: DICOM present, labels present."""
    files = list_files(site.images)
    if not files:
        raise FedscanError(f"site '{site.name}': {site.images} holds no files", hint=LAYOUT_HINT)
    if not any(_looks_like_dicom(f) for f in files[:200]):
        raise FedscanError(
            f"site '{site.name}': no DICOM among the {len(files)} files under {site.images}",
            hint=LAYOUT_HINT,
        )
    if task == "segmentation":
        masks = sorted(site.labels.glob("*.nii.gz")) if site.labels.is_dir() else []
        if not masks:
            raise FedscanError(
                f"site '{site.name}' has images but no labels: expected "
                f"{site.labels}/<SeriesInstanceUID>.nii.gz",
                hint=LAYOUT_HINT,
            )
    if task == "classification" and not (site.labels / "labels.csv").is_file():
        raise FedscanError(
            f"site '{site.name}' has images but no class labels: expected {site.labels}/labels.csv",
            hint=LAYOUT_HINT,
        )
