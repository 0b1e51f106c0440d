"""Where `fedscan site explain` and `fedscan site predict` may write: never among the site's data."""

from __future__ import annotations

from pathlib import Path

from fedscan.common.data.layout import SiteDir
from fedscan.common.errors import FedscanError


def check_out(out: Path, site: SiteDir) -> None:
    """Refuse an output folder among the site's data: inside images/ or labels/ (the outputs would be
    read back as images or labels), or the site folder itself or a folder above it (``--overwrite``
    would then touch the site's data)."""
    resolved, data = Path(out).resolve(), site.path.resolve()
    for inside in (site.images, site.labels):
        if resolved == inside.resolve() or inside.resolve() in resolved.parents:
            raise FedscanError(
                f"output folder {out} is inside the site's {inside.name}/ folder",
                hint="choose an --out folder outside images/ and labels/",
            )
    if resolved == data or resolved in data.parents:
        raise FedscanError(
            f"output folder {out} holds the site's data folder {site.path}",
            hint="choose an --out folder of its own, outside the site's data",
        )
