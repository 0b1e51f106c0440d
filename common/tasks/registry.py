"""Tasks by name: each owns its loss, its metrics, and its training and evaluation loops.

A task module provides ``METRICS`` (the names it reports, in order), ``MAIN_METRIC`` (the
one that ranks sites and models), ``train(model, data, indices, cfg, ...)`` and
``evaluate(model, data, indices, cfg, ..., scores=False)``, ``SCORES`` (the explanation scores
a site may share, which ``evaluate`` adds when ``scores`` is set), and ``check_data(data, cfg)``,
which fails early with a clear error when a site's labels do not suit the run.
"""

from __future__ import annotations

from types import ModuleType

from fedscan.common.errors import FedscanError


def get_task(name: str) -> ModuleType:
    if name == "segmentation":
        from fedscan.common.tasks import segmentation

        return segmentation
    if name == "classification":
        from fedscan.common.tasks import classification

        return classification
    raise FedscanError(f"unknown task '{name}'; allowed: segmentation, classification")


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
