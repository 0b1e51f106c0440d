"""Saving the global model: after every round, and as the final weights of a run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import tomli_w
import torch
from flwr.app import ArrayRecord

from fedscan.common.config import RunConfig

GLOBAL_MODEL = "global_model.pt"
RUN_CONFIG = "run_config.toml"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, so a reader never sees half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _payload(arrays: ArrayRecord, cfg: RunConfig, server_round: int) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(
        {"round": server_round, "model": cfg.model, "task": cfg.task,
         "config": cfg.to_toml_dict(), "state_dict": arrays.to_torch_state_dict()},
        buf,
    )
    return buf.getvalue()


def save_round(out: Path, server_round: int, arrays: ArrayRecord, cfg: RunConfig) -> Path:
    """Save the global model after ``server_round`` as checkpoints/round-NNN.pt and global_model.pt."""
    data = _payload(arrays, cfg, server_round)
    ckpt = Path(out) / "checkpoints" / f"round-{server_round:03d}.pt"
    atomic_write_bytes(ckpt, data)
    atomic_write_bytes(Path(out) / GLOBAL_MODEL, data)
    return ckpt


def save_run_config(out: Path, cfg: RunConfig) -> Path:
    path = Path(out) / RUN_CONFIG
    atomic_write_bytes(path, tomli_w.dumps(cfg.to_toml_dict()).encode())
    return path


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
