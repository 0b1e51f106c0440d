"""A real deployment on 127.0.0.1: `fedscan server start` (flower-superlink with TLS and node
authentication) and three `fedscan site start` daemons (flower-supernode), driven by the fedscan
commands a coordinator and hospital IT would type. Every process is stopped at the end, also
when a test fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from test_robustness import run_plaintext_reference
from test_simulate import FEDSCAN, flower_processes, run_cli

from fedscan.common.data.synthetic import synthesize
from fedscan.common.flower_runtime import flower_exe, free_port, offline_env, stop_process_tree

SITES = ["hospital-a", "hospital-b", "hospital-c"]
RUN_ARGS = ["--rounds", "2", "--image-size", "32", "--local-epochs", "1", "--seed", "3", "--device", "cpu"]


class Federation:
    """The coordinator folder, the site folders and every process started for them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.coord = root / "coord"
        self.data = root / "data"
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.runtime_ports: dict[str, int] = {}

    @property
    def ca(self) -> Path:
        return self.coord / "ca.crt"

    @property
    def superlink(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.out", "w")  # noqa: SIM115 - closed with the process
        env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
        proc = subprocess.Popen(
            [*FEDSCAN, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        return (self.root / f"{name}.out").read_text()

    def start_site(self, name: str) -> subprocess.Popen:
        self.runtime_ports[name] = port = free_port()
        return self.spawn(
            name,
            "site",
            "start",
            "--dir",
            str(self.root / name),
            "--superlink",
            self.superlink,
            "--ca",
            str(self.ca),
            "--runtime-port",
            str(port),
            "--threads",
            "1",
        )

    def online(self) -> dict[str, str]:
        res = run_cli("server", "sites", "--dir", str(self.coord), timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        return {
            line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in res.stdout.splitlines()
            if line.startswith("│")
        }

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if run_cli("server", "sites", "--dir", str(self.coord), timeout=60).returncode == 0:
                return
            time.sleep(1)
        raise AssertionError(f"the SuperLink did not answer within {timeout}s:\n{self.output('superlink')}")

    def wait_online(self, names: list[str], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.online()
            if all(status.get(n) == "online" for n in names):
                return
            time.sleep(2)
        raise AssertionError(f"sites not online after {timeout}s: {status}")

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_process_tree(proc)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    before = flower_processes()
    f = Federation(tmp_path_factory.mktemp("deploy"))
    try:
        synthesize(f.data, 3, seed=5)
        res = run_cli("server", "init", "--dir", str(f.coord), "--host", "localhost", "--port", str(f.port))
        assert res.returncode == 0, res.stderr
        for key in ("ca.key", "server.key"):
            assert (f.coord / key).stat().st_mode & 0o777 == 0o600
        again = run_cli("server", "init", "--dir", str(f.coord), "--host", "localhost")
        assert again.returncode == 2 and "not overwriting a key" in again.stderr
        f.spawn("superlink", "server", "start", "--dir", str(f.coord))
        f.wait_ready()
        for name in SITES:
            res = run_cli(
                "site", "init", "--dir", str(f.root / name), "--name", name, "--data", str(f.data / name)
            )
            assert res.returncode == 0, res.stderr
            assert (f.root / name / "site.key").stat().st_mode & 0o777 == 0o600
            fingerprint = res.stdout.split("fingerprint is")[1].split()[0]
            res = run_cli(
                "server",
                "add-site",
                "--dir",
                str(f.coord),
                "--name",
                name,
                str(f.root / name / "site.pub"),
                timeout=60,
            )
            assert res.returncode == 0, res.stdout + res.stderr
            assert fingerprint in res.stdout.replace("\n", "")
            f.start_site(name)
        f.wait_online(SITES)
        yield f
    finally:
        f.stop()
        assert flower_processes() - before == set(), "Flower processes were left running"


@pytest.mark.integration
def test_two_rounds_through_fedscan_run_match_simulation(fed: Federation) -> None:
    out = fed.root / "run"
    res = run_cli(
        "run", "--superlink", fed.superlink, "--ca", str(fed.ca), "--sites", "3", "--out", str(out), *RUN_ARGS
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "round 1/2 done" in res.stderr and "round 2/2 done" in res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and report["rounds_completed"] == 2
    assert report["sites"] == SITES
    # SecAgg+ is on by default in deployment: the strategy saw one aggregated record per round
    assert report["secagg"] is True
    assert [h["aggregation"]["records_seen_by_strategy"] for h in report["history"]] == [1, 1]
    assert (out / "per_site.csv").is_file() and "hospital-c" in (out / "report.md").read_text()

    # the same run simulated: fedscan's ServerApp and ClientApp in this process (test_robustness.py's
    # harness, torch on one thread as in each Ray actor; the simulate tests cover Flower's engine,
    # whose start-up and shutdown would add about 35 s here)
    simulated = run_plaintext_reference(fed.data, SITES, fed.root / "sim", rounds=2, seed=3)
    assert simulated["sites"] == report["sites"] and simulated["secagg"] is False
    assert [h["aggregation"]["records_seen_by_strategy"] for h in simulated["history"]] == [3, 3]
    for site in SITES:
        dep, ref = report["final"]["per_site"][site], simulated["final"]["per_site"][site]
        assert set(dep) == set(ref)
        assert dep["num_examples"] == ref["num_examples"]  # the same patient split
        assert abs(dep["dice"] - ref["dice"]) < 0.05, (site, dep["dice"], ref["dice"])


def _wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None):  # type: ignore[no-untyped-def]
    """Poll ``check`` until it returns something truthy; fail naming ``what`` (or when ``proc`` ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before {what}")
        time.sleep(0.02)
    raise AssertionError(f"no {what} within {timeout}s")


PLAIN_ARGS = ["--image-size", "32", "--seed", "3", "--device", "cpu", "--no-secagg"]


@pytest.mark.integration
def test_a_site_whose_worker_dies_in_round_2_misses_only_that_round(fed: Federation) -> None:
    """The warm worker of one site is killed while it trains in round 2: the daemon starts it again,
    the run completes, the report names round 2 as the round that site missed, and the site
    trains again in round 3."""
    out = fed.root / "worker-killed"
    worker_log = fed.root / "hospital-c" / "logs" / "worker.log"
    run = fed.spawn(
        "run-killed",
        "run",
        "--superlink",
        fed.superlink,
        "--ca",
        str(fed.ca),
        "--sites",
        "3",
        "--out",
        str(out),
        "--rounds",
        "3",
        "--local-epochs",
        "3",  # hospital-c, the largest site, trains for seconds: the kill lands while it trains
        *PLAIN_ARGS,
    )

    def training_round_2() -> int | None:
        for line in worker_log.read_text().splitlines():
            if "round 2: train started (worker " in line:
                return int(line.rsplit("(worker ", 1)[1].rstrip(")"))
        return None

    pid = _wait_for("round 2 training at hospital-c", training_round_2, timeout=600, proc=run)
    os.kill(pid, signal.SIGKILL)
    assert run.wait(timeout=600) == 0, fed.output("run-killed")
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and report["rounds_completed"] == 3
    first, second, third = report["history"]
    assert second["missed_training"] == ["hospital-c"]
    assert second["aggregation"]["sites_trained"] == ["hospital-a", "hospital-b"]
    assert "missed_training" not in first and "missed_training" not in third
    # round 1's evaluation rode on the round-2 training message the kill cut short: it still counts
    assert set(first["per_site"]) == set(second["per_site"]) == set(SITES)
    assert third["aggregation"]["sites_trained"] == SITES  # back in round 3
    assert set(third["per_site"]) == set(SITES)
    assert "round 2: no training update from hospital-c" in " ".join(fed.output("run-killed").split())
    assert "the warm worker exited" in fed.output("hospital-c")
    after_kill = worker_log.read_text().split(f"round 2: train started (worker {pid})", 1)[1]
    assert after_kill.count("listening on") == 1  # started again, once


@pytest.mark.integration
def test_a_run_resumed_after_the_superlink_was_killed_ends_bit_identical(fed: Federation) -> None:
    """The SuperLink is killed (SIGKILL) after round 2 of 4 and started again on its state database;
    `fedscan run --resume OUT` ends with the same weights, bit for bit, and the same per-site
    history as a run that was never interrupted."""
    args = ["--superlink", fed.superlink, "--ca", str(fed.ca), "--sites", "3", "--rounds", "4"]
    args += ["--local-epochs", "1", *PLAIN_ARGS]
    whole = run_cli("run", *args, "--out", str(fed.root / "whole"), timeout=900)
    assert whole.returncode == 0, whole.stdout + whole.stderr

    part = fed.root / "part"
    run = fed.spawn("run-part", "run", *args, "--out", str(part))
    _wait_for("round 2 checkpoint", (part / "checkpoints" / "round-002.pt").is_file, timeout=600, proc=run)
    # a crash: `fedscan server start`, flower-superlink (in a session of its own), its SuperExec and
    # the ServerApp, all at once, with no chance to clean up
    coordinator = psutil.Process(fed.procs["superlink"].pid)
    tree = [coordinator, *coordinator.children(recursive=True)]
    assert any("flwr-serverapp" in " ".join(p.cmdline()) for p in tree)
    for proc in tree:
        proc.kill()
    psutil.wait_procs(tree, timeout=60)
    assert run.wait(timeout=300) != 0
    # the report is published just after the checkpoint is written: the kill may fall between them
    assert json.loads((part / "report.json").read_text())["rounds_completed"] in (1, 2, 3)

    fed.spawn("superlink", "server", "start", "--dir", str(fed.coord))
    fed.wait_ready()
    fed.wait_online(SITES, timeout=180)
    res = run_cli(
        "run", "--resume", str(part), "--superlink", fed.superlink, "--ca", str(fed.ca), timeout=900
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming the run" in res.stdout + res.stderr

    ref = json.loads((fed.root / "whole" / "report.json").read_text())
    got = json.loads((part / "report.json").read_text())
    assert got["status"] == "complete" and got["rounds_completed"] == 4
    assert [h["per_site"] for h in got["history"]] == [h["per_site"] for h in ref["history"]]
    a = torch.load(fed.root / "whole" / "global_model.pt", weights_only=True)["state_dict"]
    b = torch.load(part / "global_model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = run_cli(
        "run", "--resume", str(part), "--superlink", fed.superlink, "--ca", str(fed.ca), "--rounds", "5"
    )
    assert again.returncode == 2 and "takes no other options" in " ".join(again.stderr.split())


@pytest.mark.integration
def test_only_the_sites_own_executor_can_claim_its_tasks(fed: Federation) -> None:
    """The SuperNode runs with --isolation process: fedscan's executor claims each task, signing
    AcquireTask with a secret only the site's user can read; an unsigned request is refused."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    site = fed.root / "hospital-a"
    secret = site / "run" / "superexec.secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and (site / "run").stat().st_mode & 0o777 == 0o700
    assert "task executor" in (site / "logs" / "executor.log").read_text()
    address = f"127.0.0.1:{fed.runtime_ports['hospital-a']}"
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])

    def acquire(interceptors: list) -> object:  # type: ignore[type-arg]
        client = RuntimeHttpClient.from_server_address(
            server_address=address,
            insecure=True,
            root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"), *interceptors],
        )
        try:
            return client.AcquireTask(request)
        finally:
            client.close()

    with pytest.raises(Exception, match="(?i)auth|permission|401|403|denied"):
        acquire([])
    signed = SuperExecAuthHttpInterceptor(
        master_secret=secret.read_bytes(), protected_methods={"/flwr.proto.Runtime/AcquireTask"}
    )
    assert not acquire([signed]).HasField("task")  # accepted; no run is in progress


@pytest.mark.integration
def test_an_unregistered_key_is_refused(fed: Federation) -> None:
    res = run_cli(
        "site",
        "init",
        "--dir",
        str(fed.root / "stranger"),
        "--name",
        "stranger",
        "--data",
        str(fed.data / "hospital-a"),
    )
    assert res.returncode == 0, res.stderr
    proc = fed.start_site("stranger")
    assert proc.wait(timeout=90) == 3
    assert "refused this site's key" in fed.output("stranger")


@pytest.mark.integration
def test_a_supernode_without_tls_cannot_connect(fed: Federation) -> None:
    home = fed.root / "insecure-home"
    home.mkdir()
    log = fed.root / "insecure.out"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [
                flower_exe("flower-supernode"),
                "--insecure",
                "--superlink",
                fed.superlink,
                "--port",
                str(free_port()),
                "--node-config",
                'site-name="plain"',
            ],
            env=offline_env(home),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        fed.procs["insecure"] = proc
        deadline = time.monotonic() + 60  # wait for its first failed attempt, not a fixed time
        while "Connection attempt failed" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
    text = log.read_text()
    assert "Connection attempt failed" in text and "SuperNode ID" not in text
    stop_process_tree(proc)


@pytest.mark.integration
def test_a_removed_site_is_refused_and_too_few_sites_fail_cleanly(fed: Federation) -> None:
    res = run_cli("server", "remove-site", "--dir", str(fed.coord), "--name", "hospital-c", timeout=60)
    assert res.returncode == 0, res.stderr
    assert fed.procs["hospital-c"].wait(timeout=120) == 3  # its session ends, and it is refused back in
    assert "refused this site's key" in fed.output("hospital-c")
    assert "hospital-c" not in fed.online()

    out = fed.root / "too-few"
    t0 = time.monotonic()
    res = run_cli(
        "run",
        "--superlink",
        fed.superlink,
        "--ca",
        str(fed.ca),
        "--sites",
        "3",
        "--out",
        str(out),
        "--wait-timeout",
        "15",
        *RUN_ARGS,
        timeout=180,
    )
    elapsed = time.monotonic() - t0
    assert res.returncode == 2, res.stdout + res.stderr
    assert "only 2 of the 3 sites this run needs were connected after waiting 15s" in res.stderr.replace(
        "\n", " "
    )
    assert elapsed < 90
    assert json.loads((out / "report.json").read_text())["status"] == "failed"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
