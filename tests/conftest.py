"""Shared fixtures: synthetic sites built with the same generator users run (`fedscan synth`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedscan.common.data.synthetic import Manifest, make_profiles, synthesize, write_site


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic hospitals (seed 0). Tests must not modify them."""
    root = tmp_path_factory.mktemp("synth") / "sites"
    synthesize(root, n_sites=2, seed=0)
    return root


@pytest.fixture(scope="session")
def exam_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic hospitals with exam-level class labels (seed 0). Do not modify."""
    root = tmp_path_factory.mktemp("exams") / "sites"
    return write_small_exam_sites(root, exams=(8, 12), label_level="exam")


@pytest.fixture(scope="session")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same images as ``exam_root`` (same seed and profiles), labelled per image."""
    return write_small_exam_sites(tmp_path_factory.mktemp("images") / "sites", (8, 12), "image")


def write_small_exam_sites(root: Path, exams: tuple[int, ...], label_level: str, seed: int = 0) -> Path:
    """Classification sites like `fedscan synth --task classification`, with fewer exams (faster)."""
    profiles = [
        p.model_copy(update={"n_patients": n, "lesion_prevalence": 0.5})
        for p, n in zip(make_profiles(len(exams), seed, "classification"), exams, strict=True)
    ]
    counts = {p.name: write_site(root, p, seed, i, label_level) for i, p in enumerate(profiles)}
    manifest = Manifest(
        seed=seed, task="classification", label_level=label_level, sites=profiles, counts=counts
    )
    (root / "manifest.json").write_text(manifest.model_dump_json(indent=2))
    return root


@pytest.fixture
def flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a Flower process sets before it builds messages: tests that build them use this."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


class FixedNodes:
    """A Grid stand-in that only lists its node IDs, for a strategy's configure_train."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)
