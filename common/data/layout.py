"""The site folder contract, and the checks a site must pass before training starts.

```
<site>/images/**                          DICOM files, any nesting, any file names
<site>/labels/<SeriesInstanceUID>.nii.gz  segmentation masks, aligned by DICOM geometry
<site>/images/** or labels/**             DICOM SEG objects: masks that reference their images
<site>/labels/labels.csv                  classification labels: a UID column
                                          (SOPInstanceUID, SeriesInstanceUID or
                                          StudyInstanceUID) and a `label` column
```
A data root holds one such folder per site; the folder name is the site's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedscan.common.data.dicom import SEG_STORAGE, Skipped, list_files, read_header
from fedscan.common.errors import FedscanError

LAYOUT_HINT = (
    "each site folder needs images/ (DICOM files, any nesting) and, for segmentation, "
    "labels/<SeriesInstanceUID>.nii.gz masks or DICOM SEG objects; for classification, labels/labels.csv"
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
    return not isinstance(read_header(path), Skipped)


def _is_seg(path: Path) -> bool:
    ds = read_header(path)
    return not isinstance(ds, Skipped) and str(ds.get("SOPClassUID", "")) == SEG_STORAGE


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
            "the site folders",
            hint=LAYOUT_HINT,
        )
    if not sites:
        raise FedscanError(f"no site folders with an images/ folder under {root}", hint=LAYOUT_HINT)
    return sites


def check_images(site: SiteDir) -> list[Path]:
    """The site folder exists and holds DICOM under images/; returns the image files."""
    if not site.path.is_dir():
        raise FedscanError(f"site '{site.name}': folder {site.path} does not exist", hint=LAYOUT_HINT)
    if not site.images.is_dir():
        raise FedscanError(f"site '{site.name}': {site.path} has no images/ folder", hint=LAYOUT_HINT)
    files = list_files(site.images)
    if not files:
        raise FedscanError(f"site '{site.name}': {site.images} holds no files", hint=LAYOUT_HINT)
    if not any(_looks_like_dicom(f) for f in files[:200]):
        raise FedscanError(
            f"site '{site.name}': no DICOM among the {len(files)} files under {site.images}",
            hint=LAYOUT_HINT,
        )
    return files


def check_site(site: SiteDir, task: str) -> None:
    """Fast checks before anything heavy: DICOM present, labels present."""
    files = check_images(site)
    if task == "segmentation":
        masks = list_files(site.labels)
        if not masks and not any(_is_seg(f) for f in files):
            raise FedscanError(
                f"site '{site.name}' has images but no labels: expected "
                f"{site.labels}/<SeriesInstanceUID>.nii.gz or DICOM SEG objects",
                hint=LAYOUT_HINT,
            )
    if task == "classification" and not (site.labels / "labels.csv").is_file():
        raise FedscanError(
            f"site '{site.name}' has images but no class labels: expected {site.labels}/labels.csv",
            hint=LAYOUT_HINT,
        )
