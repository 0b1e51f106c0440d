"""Deployment pieces that need no running Flower: keys and certificates, the waiting limits,
the round timing, the site config."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedscan.client.daemon import init_site, load_site, supernode_command
from fedscan.common.errors import FedscanError
from fedscan.server.app import DeadlineGrid, SitesMissing
from fedscan.server.coordinator import add_site, init_server, superlink_command
from fedscan.server.rounds import timing


def test_server_init_makes_a_ca_and_a_server_cert_with_the_names(tmp_path: Path) -> None:
    p = init_server(tmp_path / "coord", ["fl.hospital-net.example", "10.1.2.3"], port=9443)
    for key in ("ca_key", "key"):
        assert p[key].stat().st_mode & 0o777 == 0o600
    ca = x509.load_pem_x509_certificate(p["ca_crt"].read_bytes())
    cert = x509.load_pem_x509_certificate(p["crt"].read_bytes())
    assert cert.issuer == ca.subject
    ca.public_key().verify(
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.hospital-net.example", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    before = p["key"].read_bytes()
    with pytest.raises(FedscanError, match="not overwriting a key"):
        init_server(tmp_path / "coord", ["other"])
    assert p["key"].read_bytes() == before
    init_server(tmp_path / "coord", ["other"], force=True)
    assert p["key"].read_bytes() != before
    cmd = superlink_command(tmp_path / "coord", "0.0.0.0", 9443)
    for flag in (
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--ssl-ca-certfile",
        "--database",
    ):
        assert flag in cmd
    assert "--insecure" not in cmd


def test_site_keys_are_what_flower_reads(tmp_path: Path, synth_root: Path) -> None:
    cfg, fp = init_site(tmp_path / "site", "hospital-a", synth_root / "hospital-a")
    assert cfg.key.stat().st_mode & 0o777 == 0o600
    private = load_ssh_private_key(cfg.key.read_bytes(), None)  # how flower-supernode loads it
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    pub = (tmp_path / "site" / "site.pub").read_bytes()
    assert pub.startswith(b"ecdsa-sha2-nistp384 ")
    assert load_ssh_public_key(pub).public_numbers() == private.public_key().public_numbers()
    blob = base64.b64decode(pub.split()[1])  # as `ssh-keygen -l` computes it
    assert fp == "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    loaded = load_site(tmp_path / "site")
    assert loaded.name == "hospital-a" and loaded.data_dir == (synth_root / "hospital-a").resolve()
    cmd = supernode_command(loaded, "fl.example:9092", tmp_path / "ca.crt", tmp_path / "superexec.secret")
    assert cmd[cmd.index("--root-certificates") + 1] == str(tmp_path / "ca.crt") and "--insecure" not in cmd
    assert cmd[cmd.index("--isolation") + 1] == "process"  # the site's own executor runs the tasks
    assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == str(tmp_path / "superexec.secret")
    assert 'site-name="hospital-a"' in cmd[cmd.index("--node-config") + 1]
    with pytest.raises(FedscanError, match="not overwriting a key"):
        init_site(tmp_path / "site", "hospital-a", synth_root / "hospital-a")
    cfg.key.chmod(0o644)
    with pytest.raises(FedscanError, match="readable by other users"):
        load_site(tmp_path / "site")


def test_site_init_checks_the_data_and_the_name(tmp_path: Path) -> None:
    with pytest.raises(FedscanError, match="does not exist"):
        init_site(tmp_path / "s", "a", tmp_path / "missing")
    with pytest.raises(FedscanError, match="must be letters"):
        init_site(tmp_path / "s", "a b/c", tmp_path)


def test_add_site_refuses_a_bad_key_before_asking_flower(tmp_path: Path) -> None:
    init_server(tmp_path / "coord", ["localhost"])
    bad = tmp_path / "key.pub"
    bad.write_text("ssh-rsa AAAAnotakey\n")
    with pytest.raises(FedscanError, match="not an OpenSSH public key"):
        add_site(tmp_path / "coord", "a", bad)
    with pytest.raises(FedscanError, match="does not exist|not an OpenSSH"):
        add_site(tmp_path / "coord", "a", tmp_path / "nope.pub")


class _Grid:
    def __init__(self, counts: list[int]) -> None:
        self.counts = counts

    def get_node_ids(self) -> list[int]:
        return list(range(self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]))


def test_waiting_for_sites_gives_up_after_the_timeout() -> None:
    now = [0.0]
    grid = DeadlineGrid(_Grid([2, 2, 3, 2, 2, 2]), needed=3, timeout=10, clock=lambda: now[0])  # type: ignore[arg-type]
    assert len(list(grid.get_node_ids())) == 2  # short since t=0
    now[0] = 8.0
    grid.get_node_ids()
    now[0] = 9.0
    assert len(list(grid.get_node_ids())) == 3  # back to enough: the clock resets
    now[0] = 15.0
    grid.get_node_ids()  # short again since t=15
    now[0] = 24.0
    grid.get_node_ids()
    now[0] = 25.5
    with pytest.raises(SitesMissing, match="only 2 of the 3 sites .* after waiting 10s"):
        grid.get_node_ids()


class _Reply:
    def __init__(self, to: str) -> None:
        self.metadata = type("Meta", (), {"reply_to_message_id": to})()

    def has_content(self) -> bool:  # nothing to unpack
        return False


class _Sent(str):
    def has_content(self) -> bool:  # nothing to pack
        return False


class _LinkGrid:
    """push_messages/pull_messages as the SuperLink answers them: replies arrive over pulls."""

    def __init__(self, arrivals: list[list[str]]) -> None:
        self.arrivals = arrivals
        self.pulls: list[set[str]] = []

    def push_messages(self, messages: list[str]) -> list[str | None]:
        return [None if m == "malformed" else f"id-{m}" for m in messages]  # Flower: None, not pushed

    def pull_messages(self, ids: set[str]) -> list[_Reply]:
        self.pulls.append(set(ids))
        got = self.arrivals.pop(0) if self.arrivals else []
        return [_Reply(f"id-{m}") for m in got]


def _link(
    arrivals: list[list[str]], timeout: float = 10
) -> tuple[DeadlineGrid, _LinkGrid, list[float], list[float]]:
    link = _LinkGrid(arrivals)
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    grid = DeadlineGrid(link, needed=1, timeout=timeout, clock=lambda: now[0], poll=0.2, sleep=sleep)  # type: ignore[arg-type]
    return grid, link, now, slept


def test_replies_are_pulled_every_poll_until_all_came() -> None:
    grid, link, _, slept = _link([[], ["a"], [], ["c", "b"]])
    replies = grid.send_and_receive([_Sent(m) for m in ("a", "b", "c", "malformed")], timeout=60)  # type: ignore[arg-type]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["id-a", "id-b", "id-c"]
    # asks only for what is still missing, never for the message that was not pushed
    assert link.pulls == [
        {"id-a", "id-b", "id-c"},
        {"id-a", "id-b", "id-c"},
        {"id-b", "id-c"},
        {"id-b", "id-c"},
    ]
    assert slept == [0.2, 0.2, 0.2]  # no sleep after the last reply came


def test_send_and_receive_gives_up_at_the_timeout_with_what_came() -> None:
    grid, link, now, _ = _link([["a"]] + [[]] * 100, timeout=1.0)
    replies = grid.send_and_receive([_Sent("a"), _Sent("b")], timeout=1.0)  # type: ignore[arg-type]
    assert [r.metadata.reply_to_message_id for r in replies] == ["id-a"]
    assert 1.0 <= now[0] < 1.2 + 1e-9 and len(link.pulls) == 6
    grid, link, now, _ = _link([[]] * 30 + [["a"]])
    replies = grid.send_and_receive([_Sent("a")], timeout=None)  # type: ignore[arg-type]
    assert len(replies) == 1 and len(link.pulls) == 31  # no timeout: waits for every reply


def test_round_timing_overhead() -> None:
    t = timing(10.0, {"train": {"a": 4.0, "b": 6.0}, "evaluate": {"a": 1.0, "b": 0.5}})
    assert t["slowest_compute_seconds"] == 7.0  # slowest training + slowest evaluation
    assert t["overhead_fraction"] == 0.3
    assert t["site_seconds"] == {"a": 5.0, "b": 6.5}


def test_secagg_plan_and_count_rounding() -> None:
    from fedscan.client.secagg import round_count
    from fedscan.common.config import RunConfig

    cfg = RunConfig()
    assert cfg.secagg_plan(3) == (3, 2, 2**30) and cfg.secagg_plan(5) == (5, 3, 2**29)
    assert cfg.secagg_plan(10) == (10, 6, 2**28)
    assert RunConfig(secagg_shares=5, secagg_threshold=4).secagg_plan(10)[:2] == (5, 4)
    with pytest.raises(ValueError, match="exceeds"):
        RunConfig(secagg_threshold=4).secagg_plan(3)
    assert [round_count(n, 10) for n in (1, 10, 11, 99)] == [10, 10, 20, 100] and round_count(7, 1) == 7


def test_the_clientapp_imports_no_torch_until_a_message_needs_it() -> None:
    """A deployed SuperNode starts a ClientApp process per message: the SecAgg+ stages that only
    exchange keys must not pay for torch, MONAI and the data code."""
    import subprocess
    import sys

    code = (
        "import sys, fedscan.client.app; "
        "print(sorted(m for m in ('torch', 'monai', 'pydicom', 'fedscan.client.site_round') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_busy_runtime_port_stops_the_site_with_the_port_named(tmp_path: Path, synth_root: Path) -> None:
    """`fedscan site start` on a runtime port another program holds says which port and how to
    pick another, exits non-zero at once, and starts no SuperNode and no worker (no restart loop)."""
    import socket
    import subprocess
    import sys

    init_site(tmp_path / "site", "hospital-a", synth_root / "hospital-a")
    (tmp_path / "ca.crt").write_text("not read before the SuperNode starts\n")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cmd = [sys.executable, "-c", "from fedscan.common.cli import main; main()", "site", "start"]
        cmd += [
            "--dir",
            str(tmp_path / "site"),
            "--superlink",
            "127.0.0.1:1",
            "--ca",
            str(tmp_path / "ca.crt"),
        ]
        res = subprocess.run([*cmd, "--runtime-port", str(port)], capture_output=True, text=True, timeout=120)
    text = " ".join((res.stdout + res.stderr).split())
    assert res.returncode == 2, text
    assert f"127.0.0.1:{port} is already in use" in text and "hospital-a" in text
    assert "--runtime-port PORT" in text
    assert "Traceback" not in text and "restarting" not in text
    assert not (tmp_path / "site" / "logs" / "supernode.log").exists()
    assert not (tmp_path / "site" / "logs" / "worker.log").exists()


def test_a_free_runtime_port_passes_the_check(tmp_path: Path, synth_root: Path) -> None:
    import socket

    from fedscan.client.daemon import check_runtime_port

    cfg, _ = init_site(tmp_path / "site", "hospital-a", synth_root / "hospital-a")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    check_runtime_port(cfg.model_copy(update={"runtime_port": port}))  # no error: nothing listens there
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(FedscanError, match=f"127.0.0.1:{port} is already in use"):
            check_runtime_port(cfg.model_copy(update={"runtime_port": port}))


def test_a_supernode_that_keeps_failing_at_start_stops_the_site(
    tmp_path: Path, synth_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quick exits of the SuperNode (not network failures: flower-supernode retries those itself)
    stop the site after SUPERNODE_MAX_QUICK_EXITS; a runtime port taken after the check is the
    clear port error, not a restart."""
    import threading
    import types

    from fedscan.client import daemon

    cfg, _ = init_site(tmp_path / "site", "hospital-a", synth_root / "hospital-a")
    worker = types.SimpleNamespace(socket=tmp_path / "w.sock", broken=threading.Event())
    exits: list[tuple[int, str | None]] = []
    waits: list[float] = []
    monkeypatch.setattr(daemon, "_run_supernode", lambda *a, **k: exits.pop(0))
    monkeypatch.setattr(daemon.time, "sleep", waits.append)
    lines: list[str] = []
    secret = tmp_path / "superexec.secret"
    args = (cfg, "127.0.0.1:1", tmp_path / "ca.crt", worker, {}, tmp_path, "fp", None, lines.append, secret)

    exits[:] = [(1, None)] * daemon.SUPERNODE_MAX_QUICK_EXITS
    assert daemon._supervise(*args) == 1
    assert waits == [5.0, 10.0, 20.0, 40.0] and not exits
    assert "exited 5 times in a row" in lines[-1] and "supernode.log" in lines[-1]

    exits[:] = [(1, None), (1, "port")]
    with pytest.raises(FedscanError, match=f"127.0.0.1:{cfg.runtime_port} is already in use"):
        daemon._supervise(*args)
