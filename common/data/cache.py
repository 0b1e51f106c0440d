"""A local cache of preprocessed site arrays, so later epochs and rounds decode no DICOM.

The key is a hash of the source files (relative path, size, modification time) and of the
preprocessing settings; a change to either makes a new entry. Entries are folders of
``.npy`` files written to a temporary name and renamed into place, and are opened
memory-mapped. The cache holds no identifiers: only arrays and integer indices.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

CACHE_VERSION = 3  # 2: the series' SNR per slice; 3: classification lesion masks


def cache_key(root: Path, files: list[Path], params: dict[str, object]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, **params}, sort_keys=True, default=str).encode())
    prefix = os.path.join(str(root), "")
    for f in files:
        st = os.stat(f)
        name = str(f)
        # the text of f.relative_to(root), without building a Path a file: the warm read's cost
        rel = name[len(prefix) :] if name.startswith(prefix) else str(f.relative_to(root))
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def load(entry: Path) -> dict[str, np.ndarray] | None:
    """Open a cache entry (memory-mapped), or None if there is none."""
    if not (entry / "complete").is_file():
        return None
    return {p.stem: np.load(p, mmap_mode="r") for p in sorted(entry.glob("*.npy"))}


def save(entry: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write a cache entry atomically."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr))
        (tmp / "complete").write_text("ok\n")
        if entry.exists() and not (entry / "complete").is_file():
            shutil.rmtree(entry)  # left over from an interrupted write
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / "complete").is_file():
                raise
            shutil.rmtree(tmp)  # another process wrote the same entry first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
