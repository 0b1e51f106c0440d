"""No patient data leaves a site: synthetic DICOM full of fake PHI, checked and trained on.

Every DICOM file gets distinctive fake identifiers (names, IDs, dates, institution,
accession number, descriptions). `fedscan site check --json` and one training and evaluation
round of the real ClientApp handlers run on them; the messages the ClientApp returns are
serialized exactly as Flower sends them, and neither those bytes nor the check JSON may
contain any of the strings, nor any UID of the site's files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import message_to_proto
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner

from fedscan.client.app import SiteFailure
from fedscan.client.app import evaluate as client_evaluate
from fedscan.client.app import train as client_train
from fedscan.common.array_records import to_record
from fedscan.common.cli import app as cli
from fedscan.common.config import AppConfig, RunConfig
from fedscan.common.data.dicom import list_files
from fedscan.common.models.registry import build_model
from fedscan.common.packed_records import is_packed, packed, unpacked

PHI = {
    "PatientName": "ZZSECRET^ALICE^QUINN",
    "InstitutionName": "Saint Phileas Hospital 8812",
    "InstitutionAddress": "12 Confidential Lane",
    "AccessionNumber": "ACC5521PHI",
    "ReferringPhysicianName": "PHIDOC^ROBERT",
    "StudyDescription": "PHI STUDY 7731",
    "SeriesDescription": "PHI SERIES 4409",
    "PatientBirthDate": "19370415",
    "StudyDate": "19990228",
    "StudyID": "STUDY9917",
}


@pytest.fixture(scope="module")
def phi_root(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    root = tmp_path_factory.mktemp("phi") / "sites"
    shutil.copytree(synth_root, root)
    secrets = set(PHI.values())
    for f in list_files(root):
        if f.parent.name != "images" and "images" not in f.parts:
            continue
        ds = pydicom.dcmread(f)
        for key, value in PHI.items():
            setattr(ds, key, value)
        ds.PatientID = f"MRN{ds.PatientID}X"
        secrets.add(ds.PatientID)
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if key in ds:
                secrets.add(str(ds[key].value))
        ds.save_as(f)
    return root, secrets


def _leaks(blob: bytes, secrets: set[str]) -> list[str]:
    return sorted(s for s in secrets if s.encode() in blob)


def test_site_check_json_holds_no_phi(phi_root: tuple[Path, set[str]], tmp_path: Path) -> None:
    root, secrets = phi_root
    out = tmp_path / "check.json"
    result = CliRunner().invoke(
        cli, ["site", "check", "--data", str(root / "hospital-a"), "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    text = out.read_text()
    report = json.loads(text)
    assert report["ready"] and report["inventory"]["slices"] == 36
    assert _leaks(text.encode(), secrets) == []
    assert str(root) not in text and "hospital-a" not in text


def _context(cfg: AppConfig, k: int) -> Context:
    return Context(
        run_id=1,
        node_id=k + 1,
        node_config={"partition-id": k, "num-partitions": 2},
        state=RecordDict(),
        run_config=cfg.to_run_config(),
    )


def test_a_training_round_sends_no_phi(
    phi_root: tuple[Path, set[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what a Flower process sets before it builds messages
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    root, secrets = phi_root
    run = RunConfig(
        data_root=root,
        sites=2,
        rounds=1,
        local_epochs=1,
        image_size=32,
        base_channels=4,
        unet_depth=2,
        output=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        count_rounding=7,
    )
    cfg = AppConfig(run=run, site_names=["hospital-a", "hospital-b"])
    arrays = to_record(build_model(run))
    sent = b""
    for k in range(2):
        for handler, kind, conf in (
            (client_train, "train", {"server-round": 1, "local-epochs": 1, "lr": 1e-3, "batch-size": 4}),
            (client_evaluate, "evaluate", {"server-round": 1}),
        ):
            msg = Message(
                content=RecordDict({"arrays": arrays, "config": ConfigRecord(conf)}),
                dst_node_id=k + 1,
                message_type=kind,
            )
            reply = handler(msg, _context(cfg, k))
            assert reply.has_content()
            if kind == "train" and k == 0:
                plain_update = reply.content.array_records["arrays"]
            sent += message_to_proto(reply).SerializeToString()
            # exactly what the README lists, and the counts rounded up to a multiple of 7
            metrics = reply.content["metrics"]
            if kind == "train":
                assert set(reply.content.keys()) == {"arrays", "metrics", "site"}
                assert set(metrics.keys()) == {"train_loss", "num-examples", "compute_seconds"}
            else:
                assert set(reply.content.keys()) == {"metrics", "site"}
                assert "uncertainty_auroc" in metrics  # round 1 of 1 is the final round: the scores are in
            assert metrics["num-examples"] > 0 and metrics["num-examples"] % 7 == 0
            assert dict(reply.content["site"]) == {"name": f"hospital-{'ab'[k]}"}
    # a request whose arrays came packed into one object is answered packed, with the same update
    conf = {"server-round": 1, "local-epochs": 1, "lr": 1e-3, "batch-size": 4}
    msg = Message(
        content=RecordDict({"arrays": arrays, "config": ConfigRecord(conf)}),
        dst_node_id=1,
        message_type="train",
    )
    reply = client_train(packed(msg), _context(cfg, 0))
    assert is_packed(reply.content.array_records["arrays"])
    sent += message_to_proto(reply).SerializeToString()  # the packed layout is checked for PHI too
    update = unpacked(reply)[0].content.array_records["arrays"]
    assert [(k, a.data) for k, a in update.items()] == [(k, a.data) for k, a in plain_update.items()]
    assert len(sent) > 10_000  # the weights were really in there
    assert _leaks(sent, secrets) == []
    assert str(root).encode() not in sent

    # a site that fails says so without its details
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    shutil.rmtree(broken / "hospital-b" / "labels")
    bad = AppConfig(run=run.model_copy(update={"data_root": broken}), site_names=cfg.site_names)
    msg = Message(
        content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=2,
        message_type="train",
    )
    with pytest.raises(SiteFailure) as info:
        client_train(msg, _context(bad, 1))
    assert _leaks(str(info.value).encode(), secrets | {str(broken)}) == []


def test_site_check_reports_bad_masks_and_csv_without_echoing_them(synth_root: Path, tmp_path: Path) -> None:
    import nibabel as nib
    import numpy as np

    site = tmp_path / "site"
    shutil.copytree(synth_root / "hospital-a", site)
    first, second = sorted((site / "labels").glob("*.nii.gz"))[:2]
    img = nib.load(str(first))
    header = img.header.copy()
    header["srow_z"] = [0.0, 0.0, 0.0, 0.0]  # a singular affine
    header["qform_code"], header["sform_code"] = 0, 1
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), None, header=header), str(first))
    second.write_bytes(b"not gzip")
    (site / "labels" / "labels.csv").write_text("DOE^JOHN 19650304,1\n1.2.3,2\n")
    out = tmp_path / "check.json"
    result = CliRunner().invoke(cli, ["site", "check", "--data", str(site), "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["mismatches"]["masks_not_matching_their_series"] == 2
    problems = sorted(p["problem"] for p in report["problems"])
    assert problems == sorted(
        [
            "labels.csv has 2 column(s) in its first line; it needs a header with a 'label' column "
            "and exactly one of SOPInstanceUID, SeriesInstanceUID, StudyInstanceUID",
            "the mask has no usable affine (singular or not finite)",
            "cannot read the mask (not a readable NIfTI file)",
        ]
    )
    assert "DOE" not in out.read_text() and str(tmp_path) not in out.read_text()
    folder = CliRunner().invoke(cli, ["site", "check", "--data", str(site), "--json", str(tmp_path)])
    # the message is wrapped to the terminal's width: compare it with the line breaks taken out
    assert folder.exit_code == 2 and "it is a folder" in " ".join(folder.output.split())
