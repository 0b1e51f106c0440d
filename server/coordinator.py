"""The coordinator's side of a deployment: `fedscan server init/start/add-site/remove-site/sites`
and `fedscan run`.

Everything runs on Flower's deployment runtime: `flower-superlink` with TLS, SuperNode
authentication and a persistent state database; sites are registered with Flower's own
SuperNode registration (`flwr supernode register/unregister/list`); runs are submitted with
`flwr run --format json` (which answers the run ID as data) and followed with `flwr log
--stream`, which carries the ServerApp's run events (``fedscan.common.run_events``). fedscan
adds the certificate authority, a registry that maps site names to Flower node IDs and key
fingerprints, safe defaults, and the reports.

A coordinator folder holds:
```
ca.crt, ca.key            the federation's private CA (ca.key 0600: keep it offline if you can)
server.crt, server.key    the SuperLink's TLS certificate and key (0600)
server.toml               where the SuperLink listens (written by init and start)
sites.json                registered sites: name -> node ID, key fingerprint, date
state.db                  the SuperLink's state (runs, nodes), kept across restarts
logs/                     superlink.log, and one folder per `fedscan run`
flwr-home/                the Flower CLI's connection to this SuperLink (FLWR_HOME)
```
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import tomli_w

from fedscan.common import pki
from fedscan.common.atomic import atomic_write_bytes
from fedscan.common.config import AppConfig, RunConfig, tomllib
from fedscan.common.errors import FedscanError
from fedscan.common.flower_runtime import (
    FlowerProcess,
    RunNotFollowed,
    flower_exe,
    flwr_json,
    follow_run,
    offline_env,
    submit_run,
    write_app_dir,
)
from fedscan.common.run_events import ReportUpdated, RunEvent, RunFailed
from fedscan.server.report import ReportWriter

log = logging.getLogger("fedscan.coordinator")

DEFAULT_PORT = 9092
# a submitted run whose ServerApp says nothing for this long never started
STARTUP_TIMEOUT = 180.0
CONNECTION = "fedscan"
REGISTRY = "sites.json"


def _paths(d: Path) -> dict[str, Path]:
    d = Path(d)
    return {
        "ca_crt": d / "ca.crt",
        "ca_key": d / "ca.key",
        "crt": d / "server.crt",
        "key": d / "server.key",
        "conf": d / "server.toml",
        "registry": d / REGISTRY,
        "db": d / "state.db",
        "logs": d / "logs",
        "home": d / "flwr-home",
    }


def init_server(d: Path, hosts: list[str], port: int = DEFAULT_PORT, force: bool = False) -> dict[str, Path]:
    """Create the CA and the SuperLink's certificate for ``hosts`` (plus localhost for local
    administration). Existing keys are kept unless ``force``."""
    p = _paths(d)
    for key_name in ("ca_key", "key"):
        if p[key_name].exists() and not force:
            raise FedscanError(
                f"{p[key_name]} already exists; not overwriting a key",
                hint="pass --force to make new keys (every site must then get the new ca.crt)",
            )
    names = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
    ca_key, ca_cert = pki.make_ca()
    key, cert = pki.make_server_cert(ca_key, ca_cert, names)
    pki.write_secret(p["ca_key"], pki.server_pem(ca_key), force=force)
    pki.write_public(p["ca_crt"], pki.cert_pem(ca_cert))
    pki.write_secret(p["key"], pki.server_pem(key), force=force)
    pki.write_public(p["crt"], pki.cert_pem(cert))
    _write_conf(d, port)
    p["logs"].mkdir(exist_ok=True)
    return p


def _write_conf(d: Path, port: int, host: str = "0.0.0.0") -> None:
    atomic_write_bytes(_paths(d)["conf"], tomli_w.dumps({"host": host, "port": port}).encode())


def _read_conf(d: Path) -> dict[str, Any]:
    p = _paths(d)
    if not p["crt"].is_file() or not p["key"].is_file():
        raise FedscanError(
            f"{d} is not a coordinator folder (no server.crt/server.key)",
            hint="run `fedscan server init --dir DIR --host NAME` first",
        )
    try:
        return tomllib.loads(p["conf"].read_text())
    except (OSError, ValueError):
        return {"host": "0.0.0.0", "port": DEFAULT_PORT}


def superlink_command(d: Path, host: str, port: int) -> list[str]:
    p = _paths(d)
    return [
        flower_exe("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--ssl-ca-certfile",
        str(p["ca_crt"]),
        "--ssl-certfile",
        str(p["crt"]),
        "--ssl-keyfile",
        str(p["key"]),
        "--enable-supernode-auth",
        "--database",
        str(p["db"]),
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
    ]


def start_server(d: Path, host: str | None, port: int | None, on_line: Callable[[str], None] = print) -> int:
    """Run the SuperLink in the foreground (for systemd) until it exits or we are stopped.

    Its output goes to ``on_line`` and to logs/superlink.log; SIGTERM and Ctrl-C stop it."""
    conf = _read_conf(d)
    host = host or str(conf.get("host", "0.0.0.0"))
    port = int(port or conf.get("port", DEFAULT_PORT))
    _write_conf(d, port, host)
    p = _paths(d)
    p["logs"].mkdir(exist_ok=True)
    home = p["home"]
    home.mkdir(exist_ok=True)
    cmd = superlink_command(d, host, port)
    on_line(f"starting the SuperLink on {host}:{port} (TLS, site authentication, state in {p['db']})")
    with FlowerProcess(cmd, offline_env(home), p["logs"] / "superlink.log", on_line) as link:
        try:  # the CLI turns SIGTERM into KeyboardInterrupt
            code = link.wait()
        except KeyboardInterrupt:
            on_line("stopping the SuperLink")
            return 0
        link.stop()  # everything it started, and the last of its output
        return code


def _control_home(d: Path) -> Path:
    """FLWR_HOME whose `fedscan` connection reaches this folder's SuperLink locally."""
    conf = _read_conf(d)
    p = _paths(d)
    p["home"].mkdir(exist_ok=True)
    host = str(conf.get("host", "0.0.0.0"))
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    connection = {
        "address": f"{host}:{int(conf.get('port', DEFAULT_PORT))}",
        "root-certificates": str(p["ca_crt"].resolve()),
    }
    (p["home"] / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}})
    )
    return p["home"]


def _flwr_json(args: list[str], home: Path, timeout: float = 60) -> dict[str, Any]:
    """Run a `flwr` CLI command with --format json against this coordinator's SuperLink."""
    return flwr_json(args, home, timeout=timeout, hint="is the SuperLink running (`fedscan server start`)?")


def _load_registry(d: Path) -> dict[str, dict[str, Any]]:
    path = _paths(d)["registry"]
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise FedscanError(f"{path} is not valid JSON; restore it from a backup") from None


def _save_registry(d: Path, reg: dict[str, dict[str, Any]]) -> None:
    atomic_write_bytes(_paths(d)["registry"], (json.dumps(reg, indent=2, sort_keys=True) + "\n").encode())


def add_site(d: Path, name: str, public_key: Path) -> dict[str, Any]:
    """Register a site's public key with the SuperLink under ``name``."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise FedscanError(f"site name {name!r} must be letters, digits, '-' or '_'")
    key = pki.load_site_public_key(public_key)
    reg = _load_registry(d)
    if name in reg:
        raise FedscanError(
            f"a site named '{name}' is already registered",
            hint="remove it first (`fedscan server remove-site`) to register a new key",
        )
    fp = pki.fingerprint(key)
    clash = [n for n, e in reg.items() if e.get("fingerprint") == fp]
    if clash:
        raise FedscanError(f"this key is already registered for site '{clash[0]}'")
    with tempfile.TemporaryDirectory() as tmp:  # flwr reads the key from a file
        keyfile = Path(tmp) / "site.pub"
        keyfile.write_bytes(key)
        data = _flwr_json(
            ["supernode", "register", str(keyfile), CONNECTION, "--name", name], _control_home(d)
        )
    entry = {
        "node_id": str(data["node-id"]),
        "fingerprint": fp,
        "added": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    reg[name] = entry
    _save_registry(d, reg)
    return {"name": name, **entry}


def remove_site(d: Path, name: str) -> dict[str, Any]:
    reg = _load_registry(d)
    if name not in reg:
        raise FedscanError(
            f"no site named '{name}' is registered", hint=f"registered: {', '.join(sorted(reg)) or 'none'}"
        )
    _flwr_json(["supernode", "unregister", reg[name]["node_id"], CONNECTION], _control_home(d))
    entry = reg.pop(name)
    _save_registry(d, reg)
    return {"name": name, **entry}


def list_sites(d: Path) -> list[dict[str, Any]]:
    """Registered sites with their status as the SuperLink sees it."""
    reg = _load_registry(d)
    listed = _flwr_json(["supernode", "ls", CONNECTION], _control_home(d))["nodes"]
    nodes = {str(n["node-id"]): n for n in listed}
    rows = []
    for name, entry in sorted(reg.items()):
        node = nodes.get(entry["node_id"], {})
        rows.append(
            {
                "name": name,
                **entry,
                "status": node.get("status", "unknown"),
                "online_at": node.get("online-at", "N/A"),
            }
        )
    return rows


def _stop_run(run_id: int, home: Path) -> None:
    """Ask the SuperLink to stop a run we no longer follow (Ctrl-C, a lost stream)."""
    try:
        _flwr_json(["stop", str(run_id), CONNECTION], home, timeout=30)
        log.warning("stopped run %s on the SuperLink", run_id)
    except FedscanError as exc:
        log.warning("could not stop run %s on the SuperLink: %s", run_id, exc.message)


def run_deployment(
    cfg: RunConfig,
    superlink: str,
    ca: Path,
    *,
    overwrite: bool = False,
    on_event: Callable[[RunEvent], None] | None = None,
    on_stage: Callable[[str], None] = print,
    resume_from: Path | None = None,
) -> dict[str, Any]:
    """Submit a run to a live SuperLink, follow its run events (``on_event`` gets each), write the
    report files into ``cfg.output``; return report.json's content. Raises FedscanError when the
    run fails. ``on_stage`` gets what the coordinator itself does. With ``resume_from`` (a round's
    checkpoint in ``cfg.output``, see ``checkpoint.find_resume_point``) the run continues after that
    round in its folder, with the strategy's state and the history the checkpoint holds."""
    from fedscan.server.simulate import check_output, clear_output

    if cfg.fault_site is not None:
        raise FedscanError(
            "fault_site and fault_kind are for simulation only; a deployed site never sends a "
            "faulty update on purpose",
            hint="remove them from the run config",
        )
    ca = Path(ca).expanduser().resolve()
    if not ca.is_file():
        raise FedscanError(
            f"CA certificate {ca} does not exist", hint="use the ca.crt from `fedscan server init`"
        )
    if ":" not in superlink:
        raise FedscanError(f"--superlink {superlink!r} must be HOST:PORT")
    out = Path(cfg.output).expanduser().resolve()
    if resume_from is None:  # a resumed run keeps its folder
        clear_output(out, check_output(out, overwrite))
    # the sites' own folders and caches come from their node config, never from the coordinator
    run = cfg.model_copy(update={"output": out, "data_root": None, "cache_dir": None})
    app_cfg = AppConfig(run=run, site_names=[], resume_from=resume_from)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    flower_log = logs / "flower.log"
    latest: dict[str, Any] = {}
    failure: list[RunFailed] = []
    started = threading.Event()  # the ServerApp has said something: the run is running

    write_report = ReportWriter(out)

    def on_run_event(event: RunEvent) -> None:
        started.set()
        if isinstance(event, ReportUpdated):
            latest.clear()
            latest.update(event.report.as_dict())
            try:
                write_report(latest)
            except OSError as exc:
                log.warning("cannot write the report into %s: %s", out, exc)
            return
        if isinstance(event, RunFailed):
            failure.append(event)
        if on_event is not None:
            on_event(event)

    not_started = FedscanError(
        f"the run did not start within {STARTUP_TIMEOUT:.0f}s",
        hint=f"is the SuperLink at {superlink} running, and is --ca its CA? see {flower_log}",
    )
    with tempfile.TemporaryDirectory(prefix="fedscan-run-") as tmp:
        tmp_path = Path(tmp)
        home = tmp_path / "flwr-home"
        home.mkdir()
        connection = {"address": superlink, "root-certificates": str(ca)}
        conf = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
        (home / "config.toml").write_text(tomli_w.dumps(conf))
        overrides = tmp_path / "run-config.toml"
        overrides.write_text(tomli_w.dumps(app_cfg.to_run_config()))
        rounds = (
            f"{run.rounds} rounds"
            if resume_from is None
            else f"the rounds after the checkpoint's of {run.rounds}"
        )
        on_stage(
            f"submitting the run to {superlink}: waiting for {run.sites} sites "
            f"(up to {run.wait_timeout:.0f}s), {rounds}"
        )
        t0 = time.monotonic()
        run_id = submit_run(
            write_app_dir(tmp_path / "app"),
            CONNECTION,
            home,
            overrides,
            flower_log,
            timeout=STARTUP_TIMEOUT,
            hint=not_started.hint,
        )
        log.debug("submitted run %s", run_id)
        try:
            follow_run(
                run_id,
                CONNECTION,
                home,
                flower_log,
                on_run_event,
                give_up=lambda: not started.is_set() and time.monotonic() - t0 > STARTUP_TIMEOUT,
            )
        except BaseException as exc:
            if latest.get("status") not in ("complete", "failed"):
                _stop_run(run_id, home)  # do not leave it training at the sites
            if isinstance(exc, FedscanError) and failure:
                pass  # the ServerApp's own message, below, says more
            elif isinstance(exc, RunNotFollowed):
                raise not_started from None
            else:
                raise
        if failure:
            message = failure[-1].message or "run failed"
            raise FedscanError(
                message[:1].upper() + message[1:],
                hint=failure[-1].hint or f"see {flower_log} and the SuperLink's log",
            )
        log.info("run finished in %.1fs", time.monotonic() - t0)
    if latest.get("status") != "complete":
        raise FedscanError(
            f"the federated run did not complete ({latest.get('rounds_completed', 0)} of {run.rounds} "
            "rounds)",
            hint=f"see {flower_log}",
        )
    return latest
