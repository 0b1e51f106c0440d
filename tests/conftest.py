"""Shared fixtures: synthetic sites built with the same generator users run (`fedscan synth`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedscan.common.data.synthetic import synthesize


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic hospitals (seed 0). Tests must not modify them."""
    root = tmp_path_factory.mktemp("synth") / "sites"
    synthesize(root, n_sites=2, seed=0)
    return root
