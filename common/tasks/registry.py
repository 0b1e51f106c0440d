"""Tasks by name, and the ``Task`` protocol every task module satisfies.

A task (``fedscan.common.tasks.segmentation``, ``fedscan.common.tasks.classification``) owns its
loss, its metrics, and its training and evaluation loops; callers reach it through
:func:`get_task` and use only what :class:`Task` declares.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from fedscan.common.errors import FedscanError

if TYPE_CHECKING:  # the annotations only: importing the task code (torch, MONAI) waits for get_task
    import numpy as np
    from torch import nn

    from fedscan.common.config import RunConfig
    from fedscan.common.data.site_arrays import SiteData
    from fedscan.common.tasks.precision import Precision


@runtime_checkable
class Task(Protocol):
    """What a task module provides (its module-level names; a module satisfies this protocol)."""

    @property
    def METRICS(self) -> tuple[str, ...]:
        """The metric names it reports, in order."""
        ...

    @property
    def MAIN_METRIC(self) -> str:
        """The metric that ranks sites and models (one of ``METRICS``)."""
        ...

    @property
    def SCORES(self) -> tuple[str, ...]:
        """The explanation scores a site may share, which ``evaluate`` adds when ``scores`` is set."""
        ...

    def check_data(self, data: SiteData, cfg: RunConfig) -> None:
        """Fail early with a clear error when a site's labels do not suit the run."""
        ...

    def train(
        self,
        model: nn.Module,
        data: SiteData,
        indices: np.ndarray,
        cfg: RunConfig,
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        seed: int,
        precision: Precision,
        proximal_mu: float = 0.0,
    ) -> dict[str, float]:
        """Train ``model`` in place on the slices ``indices``; scalar training metrics, among them
        ``num-examples`` and ``steps``."""
        ...

    def evaluate(
        self,
        model: nn.Module,
        data: SiteData,
        indices: np.ndarray,
        cfg: RunConfig,
        *,
        precision: Precision,
        scores: bool = False,
    ) -> dict[str, float]:
        """The metrics of ``model`` on the slices ``indices``, with ``num-examples`` and ``loss``;
        with ``scores`` also the ``SCORES``."""
        ...


def _segmentation() -> Task:
    from fedscan.common.tasks import segmentation

    return segmentation  # a module, checked against Task by mypy


def _classification() -> Task:
    from fedscan.common.tasks import classification

    return classification


# the registered tasks, by name (a task's code, with torch and MONAI, is imported on first use)
REGISTERED: dict[str, Callable[[], Task]] = {"segmentation": _segmentation, "classification": _classification}


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name is a FedscanError that lists the known ones."""
    if name not in REGISTERED:
        raise FedscanError(f"unknown task '{name}'; allowed: {', '.join(REGISTERED)}")
    return REGISTERED[name]()


# the explanation scores' titles in reports and pages
SCORE_TITLES = {
    "uncertainty_auroc": "uncertainty AUROC (wrong vs right voxels)",
    "ece": "expected calibration error",
    "gradcam_lesion_energy": "Grad-CAM energy in lesion",
    "lesion_area_share": "lesion share of image area",
}


def task_scores(name: str) -> tuple[str, ...]:
    """The explanation scores a task's sites may share (computed in the final round's evaluation)."""
    return tuple(get_task(name).SCORES)


def task_metrics(name: str) -> tuple[tuple[str, ...], str]:
    """The metric names a task reports, and its main metric."""
    task = get_task(name)
    return tuple(task.METRICS), str(task.MAIN_METRIC)
