"""The one site reader: `fedscan site check` and training see the same problems, and worker
processes read a site exactly as one process does."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fedscan.client.site import check_site_data
from fedscan.common.config import RunConfig
from fedscan.common.data import site_reader
from fedscan.common.data.dicom import list_files
from fedscan.common.data.layout import SiteDir
from fedscan.common.data.site_arrays import build_site_data, open_reader


@pytest.fixture
def damaged_site(synth_root: Path, tmp_path: Path) -> SiteDir:
    """hospital-a with a corrupt image of a labelled series, a mask for a series that is not
    there and a stray non-DICOM file among the images."""
    path = tmp_path / "hospital-a"
    shutil.copytree(synth_root / "hospital-a", path)
    site = SiteDir("hospital-a", path)
    victim = list_files(site.images)[5]
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) - 4000])  # pixel data cut short: the header still reads
    shutil.copy(sorted(site.labels.glob("*.nii.gz"))[0], site.labels / "1.2.826.0.1.999.1.nii.gz")
    (site.images / "notes.txt").write_text("scanner maintenance on Tuesday\n")
    return site


def _problems(pairs: list[tuple[Path, str]]) -> list[tuple[str, str]]:
    return sorted((p.name, r) for p, r in pairs)


def test_site_check_and_training_report_the_same_problems(damaged_site: SiteDir) -> None:
    report, ids = check_site_data(damaged_site.path)
    from_check = _problems([(ids[p.file], p.problem) for p in report.problems])

    cfg = RunConfig(image_size=32)
    with open_reader(damaged_site, cfg) as reader:
        data = build_site_data(damaged_site, cfg, reader)
        from_training = _problems([(p.path, p.reason) for p in reader.problems])

    assert from_check == from_training
    reasons = dict(from_check)
    assert reasons["notes.txt"] == "not a DICOM file"
    assert reasons["1.2.826.0.1.999.1.nii.gz"] == "mask for a series that is not among the images"
    assert "pixel data could not be decoded" in [r for _, r in from_check]
    assert len(from_check) == 3
    # the corrupt slice is the only one lost: 36 slices of 3 patients, as test_dataset counts them
    assert len(data) == 35 and report.inventory.slices == 35


@pytest.mark.parametrize("task_root", ["synth_root", "exam_root"])
def test_workers_read_a_site_exactly_as_one_process(
    task_root: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    root: Path = request.getfixturevalue(task_root)
    site = SiteDir("hospital-a", root / "hospital-a")
    task = "segmentation" if task_root == "synth_root" else "classification"
    cfg = RunConfig(task=task, image_size=32)
    monkeypatch.setattr(site_reader, "MIN_FILES_PER_WORKER", 1)  # small test sites still use the pool
    with open_reader(site, cfg, workers=1) as one:
        single = build_site_data(site, cfg, one)
    with open_reader(site, cfg, workers=2) as two:
        assert two.workers == 2
        pooled = build_site_data(site, cfg, two)
        assert [h.series_uid for h in two.series] == [h.series_uid for h in one.series]
    a, b = single.as_arrays(), pooled.as_arrays()
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_site_check_with_workers_gives_the_same_report(
    damaged_site: SiteDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(site_reader, "MIN_FILES_PER_WORKER", 1)
    one, ids_one = check_site_data(damaged_site.path, workers=1)
    two, ids_two = check_site_data(damaged_site.path, workers=2)
    assert one.model_dump() == two.model_dump()
    assert ids_one == ids_two


def test_a_small_site_is_read_in_one_process(synth_root: Path) -> None:
    site = SiteDir("hospital-a", synth_root / "hospital-a")
    n_files = len(list_files(site.images))
    assert n_files < 2 * site_reader.MIN_FILES_PER_WORKER  # a pool would cost more than it saves
    with site_reader.SiteReader(site, workers=2) as reader:
        assert reader.workers == 1 and reader._pool is None
