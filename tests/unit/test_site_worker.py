"""The warm site worker: its frames, its socket, and that a message's work done there gives the
same reply as in the ClientApp's own process."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedscan.client import daemon, site_runner, site_worker
from fedscan.client.app import SiteFailure
from fedscan.client.app import evaluate as client_evaluate
from fedscan.client.app import train as client_train
from fedscan.client.worker_protocol import (
    ProtocolError,
    WorkerReply,
    WorkerRequest,
    receive_reply,
    receive_request,
    send,
)
from fedscan.common.array_records import to_record
from fedscan.common.config import AppConfig, RunConfig
from fedscan.common.errors import FedscanError
from fedscan.common.models.registry import build_model


def test_a_frame_carries_its_arrays_bit_for_bit() -> None:
    record = ArrayRecord(
        {
            "w": Array(np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)),
            "steps": Array(np.array(7, dtype=np.int64)),  # 0-d, as BatchNorm's counter
            "mask": Array(np.array([[1, 0], [0, 1]], dtype=np.uint8)),
            "empty": Array(np.zeros((0, 5), dtype=np.float64)),
        }
    )
    a, b = socket.socketpair()
    with a, b:
        req = WorkerRequest(op="train", node_config={"site-name": "x"}, conf={"server-round": 3, "lr": 0.01})
        send(a, req, record)
        got, arrays = receive_request(b)
        assert got.op == "train" and got.conf == {"server-round": 3, "lr": 0.01}
        assert arrays is not None and list(arrays) == ["w", "steps", "mask", "empty"]
        for k in record:
            assert arrays[k].data == record[k].data and arrays[k].dtype == record[k].dtype
            np.testing.assert_array_equal(arrays[k].numpy(), record[k].numpy())
        send(b, WorkerReply(error="data"))
        reply, none = receive_reply(a)
        assert reply.error == "data" and none is None


def test_a_stranger_s_bytes_are_not_a_frame() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall((2**40).to_bytes(8, "big"))
        with pytest.raises(ProtocolError, match="not one of ours"):
            receive_request(b)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(len(b'{"op": "rm -rf"}').to_bytes(8, "big") + b'{"op": "rm -rf"}')
        with pytest.raises(ProtocolError, match="not a WorkerRequest"):
            receive_request(b)
    a, b = socket.socketpair()
    with b:
        a.sendall((100).to_bytes(8, "big") + b'{"op"')
        a.close()
        with pytest.raises(ProtocolError, match="closed the connection"):
            receive_request(b)


def test_the_socket_is_the_site_user_s_only(tmp_path: Path) -> None:
    path = tmp_path / "run" / "worker.sock"
    with site_worker.bind(path) as sock:
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700
        assert sock.getsockname() == str(path)
    with site_worker.bind(path):  # a socket left behind by an earlier worker is replaced
        pass
    plain = tmp_path / "other" / "worker.sock"
    plain.parent.mkdir(mode=0o700)
    plain.write_text("not a socket")
    with pytest.raises(FedscanError, match="is not a socket"):
        site_worker.bind(plain)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    with pytest.raises(FedscanError, match="closed to others"):
        site_worker.bind(shared / "worker.sock")


def test_a_connection_from_another_user_is_closed_unanswered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run" / "worker.sock"
    sock = site_worker.bind(path)
    monkeypatch.setattr(site_worker, "peer_uid", lambda conn: 4242)  # as SO_PEERCRED would say
    threading.Thread(target=site_worker.serve, args=(sock,), daemon=True).start()
    ctx = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(site_runner.WorkerLost, match="hung up during ping"):
        site_runner.ask(path, "ping", ctx, wait=10)


@pytest.fixture(autouse=True)
def _flower_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for attr in ("_run_id", "_node_id", "_task_id"):  # what a running Flower app sets for Messages
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _context(cfg: AppConfig, site: Path, cache: Path, worker: Path | None) -> Context:
    node: dict[str, bool | float | int | str] = {
        "site-name": site.name,
        "data-dir": str(site),
        "cache-dir": str(cache),
    }
    if worker is not None:
        node["worker-socket"] = str(worker)
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=cfg.to_run_config())


@pytest.fixture
def worker(tmp_path: Path):  # noqa: ANN201
    """A worker process as `fedscan site start` runs it, on a socket in tmp_path."""
    path = tmp_path / "run" / "worker.sock"
    log = open(tmp_path / "worker.log", "w")  # noqa: SIM115  closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedscan.client.site_worker", "--socket", str(path)], stdout=log, stderr=log
    )
    try:
        yield proc, path, tmp_path / "worker.log"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()


def test_work_in_the_warm_worker_equals_work_in_the_clientapp(
    synth_root: Path, tmp_path: Path, worker
) -> None:  # noqa: ANN001
    proc, path, log = worker
    run = RunConfig(image_size=32, base_channels=4, unet_depth=2, local_epochs=1, seed=3)
    cfg = AppConfig(run=run, site_names=["hospital-a"])
    site = synth_root / "hospital-a"
    warm = _context(cfg, site, tmp_path / "cache", path)
    here = _context(cfg, site, tmp_path / "cache", None)
    assert site_runner.ask(path, "ping", warm)[0].pid == proc.pid  # waits for the worker to listen

    arrays = to_record(build_model(run))
    conf = {"server-round": 1, "local-epochs": 1, "lr": 1e-3, "batch-size": 4}

    def message(kind: str) -> Message:
        return Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord(conf)}), dst_node_id=1, message_type=kind
        )

    remote, local = client_train(message("train"), warm), client_train(message("train"), here)
    sent, ref = remote.content.array_records["arrays"], local.content.array_records["arrays"]
    assert list(sent) == list(ref) and all(sent[k].data == ref[k].data for k in ref)  # bit-identical
    rm, lm = remote.content.metric_records["metrics"], local.content.metric_records["metrics"]
    assert set(rm) == set(lm) and all(rm[k] == lm[k] for k in lm if k != "compute_seconds")
    assert remote.content.config_records["site"]["name"] == "hospital-a"
    assert "site hospital-a round 1: trained on" in log.read_text()  # the worker did the work

    ev_remote, ev_local = (
        client_evaluate(message("evaluate"), warm),
        client_evaluate(message("evaluate"), here),
    )
    em, el = ev_remote.content.metric_records["metrics"], ev_local.content.metric_records["metrics"]
    assert all(em[k] == el[k] for k in el if k != "compute_seconds")

    state, metrics, name = site_runner.secure_train(arrays, conf, warm, cfg)
    own, own_metrics, _ = site_runner.secure_train(arrays, conf, here, cfg)
    assert list(state) == list(own) == site_runner.model_keys(warm, cfg) == site_runner.model_keys(here, cfg)
    assert all(np.array_equal(state[k], own[k]) for k in own) and name == "hospital-a"
    assert metrics["train_loss"] == own_metrics["train_loss"]


def test_a_failing_or_lost_worker_fails_the_message_without_details(
    synth_root: Path, tmp_path: Path, worker, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    proc, path, log = worker
    cfg = AppConfig(run=RunConfig(image_size=32, base_channels=4, unet_depth=2), site_names=["x"])
    missing = tmp_path / "no-such-site"
    ctx = _context(cfg, missing, tmp_path / "cache", path)
    msg = Message(
        RecordDict({"arrays": to_record(build_model(cfg.run)), "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=1,
        message_type="evaluate",
    )
    with pytest.raises(SiteFailure) as failed:
        client_evaluate(msg, ctx)
    assert str(failed.value) == "site evaluation failed: data or configuration problem (see the site log)"
    assert str(missing) in log.read_text()  # the details stay in the worker's log

    proc.kill()
    proc.wait(timeout=30)
    monkeypatch.setattr(site_runner, "WORKER_WAIT_SECONDS", 0.5)
    with pytest.raises(SiteFailure) as lost:
        client_evaluate(msg, ctx)
    assert str(lost.value) == "site evaluation failed: internal error (see the site log)"


def test_the_daemon_restarts_a_worker_that_died_and_gives_up_on_one_that_cannot_start(tmp_path: Path) -> None:
    path = daemon.worker_socket_path(tmp_path)
    said: list[str] = []
    restarting = threading.Event()

    def on_line(line: str) -> None:
        said.append(line)
        restarting.set()

    env = daemon.site_env(tmp_path / "home", threads=1)
    ctx = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with daemon.WorkerSupervisor("hospital-a", path, env, tmp_path / "worker.log", on_line) as sup:
        first = site_runner.ask(path, "ping", ctx)[0].pid
        subprocess.run(["kill", "-9", str(first)], check=True)
        assert restarting.wait(timeout=60)  # the daemon saw it die
        second = site_runner.ask(path, "ping", ctx)[0].pid  # waits while the daemon starts it again
        assert second != first and sup.starts == 2 and not sup.broken.is_set()
    assert said == ["site hospital-a: the warm worker exited (code -9); restarting it in 1s"]
    with pytest.raises(site_runner.WorkerLost):  # stopped with the site
        site_runner.ask(path, "ping", ctx, wait=0.2)

    broken = daemon.WorkerSupervisor(
        "hospital-b", tmp_path / "b" / "w.sock", env, tmp_path / "b.log", said.append
    )
    broken.cmd = [sys.executable, "-c", "raise SystemExit(2)"]  # as a worker whose environment is broken
    broken.first_backoff = 0.01
    with broken:
        assert broken.broken.wait(timeout=120)
    assert broken.starts == daemon.WORKER_MAX_QUICK_EXITS
