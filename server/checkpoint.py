"""Saving the global model: after every round, and as the final weights of a run; and reading a
round's checkpoint back to resume the run from it.

checkpoints/round-NNN.pt holds the global model after round NNN, the strategy's state (the
server optimizer's moments or momentum, see ``PerSiteEvaluation.state``) and the report's history
up to that round: all a resumed run needs to continue as if it had never stopped. global_model.pt
holds the latest global model alone. Both load with ``torch.load(weights_only=True)``: numpy arrays
are stored as tensors, everything else as plain dicts, lists, strings and numbers.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tomli_w
import torch
from flwr.app import ArrayRecord

from fedscan.common.array_records import from_state, to_state
from fedscan.common.atomic import atomic_write_bytes
from fedscan.common.config import RunConfig, load_run_config
from fedscan.common.errors import FedscanError

GLOBAL_MODEL = "global_model.pt"
RUN_CONFIG = "run_config.toml"
CHECKPOINTS = "checkpoints"
_ROUND_FILE = re.compile(r"round-(\d{3,})\.pt")


def _to_tensors(value: Any) -> Any:
    """numpy arrays (at any depth of dicts and lists) as tensors, for a weights-only file."""
    if isinstance(value, (np.ndarray, np.generic)):  # Flower's arithmetic on 0-d arrays gives numpy scalars
        return torch.from_numpy(np.array(value, copy=True))  # copied: the strategy's may be read-only
    if isinstance(value, dict):
        return {k: _to_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_tensors(v) for v in value]
    return value


def _to_arrays(value: Any) -> Any:
    """The inverse of :func:`_to_tensors`."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: _to_arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_arrays(v) for v in value]
    return value


def _payload(arrays: ArrayRecord, cfg: RunConfig, server_round: int, **extra: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {
            "round": server_round,
            "model": cfg.model,
            "task": cfg.task,
            "strategy": cfg.strategy,
            "config": cfg.to_toml_dict(),
            "state_dict": to_state(arrays),
            **extra,
        },
        buf,
    )
    return buf.getvalue()


def checkpoint_path(out: Path, server_round: int) -> Path:
    return Path(out) / CHECKPOINTS / f"round-{server_round:03d}.pt"


def save_round(
    out: Path,
    server_round: int,
    arrays: ArrayRecord,
    cfg: RunConfig,
    strategy_state: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
) -> Path:
    """Save the global model after ``server_round``: with the strategy's state and the report's
    history as checkpoints/round-NNN.pt, and alone as global_model.pt."""
    ckpt = checkpoint_path(out, server_round)
    atomic_write_bytes(
        ckpt,
        _payload(
            arrays,
            cfg,
            server_round,
            strategy_state=_to_tensors(strategy_state or {}),
            history=list(history or []),
        ),
    )
    atomic_write_bytes(Path(out) / GLOBAL_MODEL, _payload(arrays, cfg, server_round))
    return ckpt


class Resume(NamedTuple):
    """What a checkpoint gives a resumed run."""

    server_round: int
    arrays: ArrayRecord
    strategy_state: dict[str, Any]
    history: list[dict[str, Any]]
    strategy: str
    config: dict[str, Any]


def latest_checkpoint(out: Path) -> Path | None:
    """OUT/checkpoints/round-NNN.pt of the highest round, or None when there is none."""
    found = [
        (int(m.group(1)), p)
        for p in (Path(out) / CHECKPOINTS).glob("round-*.pt")
        if (m := _ROUND_FILE.fullmatch(p.name))
    ]
    return max(found)[1] if found else None


def load_resume(path: Path) -> Resume:
    """Read a round's checkpoint for a resumed run. Raises FedscanError for a file that is not one."""
    try:
        ckpt = load_checkpoint(path)
    except Exception as exc:  # unreadable, truncated, or holding more than weights and plain values
        raise FedscanError(
            f"cannot read the checkpoint {path}: it is truncated, damaged or not a fedscan "
            f"checkpoint ({type(exc).__name__})",
            hint="remove it to resume from the round before, or start the run anew",
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "strategy_state" not in ckpt:
        raise FedscanError(
            f"{path} is not a checkpoint fedscan can resume from (it holds no strategy state)",
            hint="it was written by an earlier fedscan or is not a round checkpoint; start the run anew",
        )
    try:
        return Resume(
            server_round=int(ckpt["round"]),
            arrays=from_state(ckpt["state_dict"]),
            strategy_state=_to_arrays(ckpt["strategy_state"]),
            history=list(ckpt.get("history", [])),
            strategy=str(ckpt.get("strategy", ckpt["config"].get("strategy", ""))),
            config=dict(ckpt["config"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FedscanError(
            f"{path} is not a complete fedscan checkpoint (missing or wrong {exc})",
            hint="remove it to resume from the round before, or start the run anew",
        ) from None


def find_resume_point(out: Path, command: str) -> tuple[RunConfig, Path, Resume]:
    """The run config saved in ``out`` (its ``output`` set to ``out``), its last checkpoint and what
    that holds, checked: a FedscanError when there is no run, no checkpoint or nothing left to run.
    ``command``: the one that started the run (`fedscan simulate`, `fedscan run`), for the hints."""
    out = Path(out).expanduser().resolve()
    hint = f"pass the --out folder of an earlier `{command}`"
    if not out.is_dir():
        raise FedscanError(f"cannot resume: {out} does not exist", hint=hint)
    if not (out / RUN_CONFIG).is_file():
        raise FedscanError(f"cannot resume: {out} holds no run ({RUN_CONFIG} is missing)", hint=hint)
    cfg = load_run_config(out / RUN_CONFIG).model_copy(update={"output": out})
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise FedscanError(
            f"cannot resume the run in {out}: it has no checkpoint (it stopped before its first round ended)",
            hint=f"start it anew: {command} --config {out / RUN_CONFIG} --overwrite",
        )
    resumed = load_resume(ckpt)
    if resumed.server_round >= cfg.rounds:
        raise FedscanError(
            f"the run in {out} is already complete: its last checkpoint is of round {resumed.server_round} "
            f"of {cfg.rounds}",
            hint="nothing to resume; for more rounds, start a new run",
        )
    return cfg, ckpt, resumed


def save_run_config(out: Path, cfg: RunConfig) -> Path:
    path = Path(out) / RUN_CONFIG
    atomic_write_bytes(path, tomli_w.dumps(cfg.to_toml_dict()).encode())
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
