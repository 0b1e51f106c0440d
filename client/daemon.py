"""The hospital's side of a deployment: `fedscan site init` and `fedscan site start`.

`site init` makes the site's node-authentication key pair (ECDSA P-384 in OpenSSH format, as
Flower's SuperNode authentication expects) and a site config file; the public key goes to the
coordinator, who registers it. `site start` checks the config and the data, starts the site's
warm worker (``fedscan.client.site_worker``: the process that trains and evaluates for every
message, so that the ClientApp process of each message stays light) and its task executor
(``fedscan.client.site_executor``: it claims each task from the SuperNode's runtime API and
runs it in a pre-imported process), then runs `flower-supernode --isolation process` with TLS,
the site's key and its node config (site name, data folder, cache folder, the worker's socket).
It stays in the foreground for systemd, restarts the SuperNode with a backoff when it exits on
a network failure, restarts the worker and the executor when they exit, and stops with exit
code 3 when the coordinator refuses the site (an unregistered or removed key): retrying would
not help. A runtime port another program holds is a clear error (exit code 2) before anything
starts. A worker, executor or SuperNode that keeps dying at start stops the site with exit code
1 and a message pointing at its log.

A site folder holds `site.toml`, `site.key` (0600, never leaves the machine), `site.pub`,
`cache/` (preprocessed arrays), `run/worker.sock` and `run/superexec.secret` (0600, in a 0700
folder) and `logs/supernode.log`, `logs/worker.log`, `logs/executor.log`. The only connection
is outbound, to the coordinator's one port.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedscan.common import pki
from fedscan.common.config import tomllib
from fedscan.common.data.layout import SiteDir, check_images
from fedscan.common.errors import FedscanError
from fedscan.common.flower_runtime import FlowerProcess, flower_exe, offline_env

log = logging.getLogger("fedscan.site")

SITE_TOML = "site.toml"
EXIT_REFUSED = 3
# what flower-supernode prints when the SuperLink will not activate its key (not registered,
# or removed); other activation errors (network, TLS, a SuperLink hiccup) are worth retrying
_ACTIVATION_REFUSED = "Failed to activate SuperNode"
# what flower-supernode prints when its runtime API cannot listen (the port was taken between
# fedscan's check and the SuperNode's start): restarting would fail the same way
_RUNTIME_API_FAILED = "SuperNode Runtime HTTP API failed to start"
# a SuperNode that exits this many times in a row, each within SUPERNODE_SETTLE_SECONDS of its
# start, is failing on something a restart does not fix (flower-supernode retries network
# failures itself, without exiting): the site stops and points at the log
SUPERNODE_MAX_QUICK_EXITS = 5
SUPERNODE_SETTLE_SECONDS = 60.0
# a worker that exits this many times in a row, each within WORKER_SETTLE_SECONDS of its start,
# is broken (an environment or code problem), not unlucky: the site stops and says so
WORKER_MAX_QUICK_EXITS = 5
WORKER_SETTLE_SECONDS = 60.0
# how long a worker or executor that was sent SIGTERM waits for the site's own stop before it is
# taken for one stopped alone and restarted
STOP_GRACE_SECONDS = 30.0
_UNIX_PATH_MAX = 100  # AF_UNIX paths are limited to 107 bytes on Linux; keep a margin


class SiteConfig(BaseModel):
    """A site's deployment settings (site.toml)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the site's name, as the coordinator registered it")
    data_dir: Path = Field(description="the site folder: images/ and labels/")
    key: Path = Field(description="the node-authentication private key (OpenSSH, 0600)")
    cache_dir: Path = Field(description="where preprocessed arrays are kept")
    runtime_port: int = Field(
        default=9094, ge=1, le=65535, description="SuperNode's local runtime API port (127.0.0.1)"
    )


def init_site(d: Path, name: str, data: Path, force: bool = False) -> tuple[SiteConfig, str]:
    """Create the site's key pair and site.toml; return the config and the key's fingerprint."""
    d = Path(d).expanduser().resolve()
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise FedscanError(f"site name {name!r} must be letters, digits, '-' or '_'")
    data = Path(data).expanduser().resolve()
    check_images(SiteDir(name, data))
    private, public = pki.make_site_key()
    pki.write_secret(d / "site.key", private, force=force)
    pki.write_public(d / "site.pub", public)
    cfg = SiteConfig(name=name, data_dir=data, key=d / "site.key", cache_dir=d / "cache")
    (d / "logs").mkdir(exist_ok=True)
    (d / SITE_TOML).write_text(tomli_w.dumps(cfg.model_dump(mode="json")))
    return cfg, pki.fingerprint(public)


def load_site(d: Path) -> SiteConfig:
    path = Path(d).expanduser() / SITE_TOML
    if not path.is_file():
        raise FedscanError(
            f"{path} does not exist", hint="run `fedscan site init --dir DIR --name NAME --data DATA`"
        )
    try:
        cfg = SiteConfig.model_validate(tomllib.loads(path.read_text()))
    except (ValueError, ValidationError) as exc:
        raise FedscanError(f"{path} is not a valid site config: {exc}") from None
    if not cfg.key.is_file():
        raise FedscanError(
            f"the site key {cfg.key} is missing", hint="run `fedscan site init` again with --force"
        )
    if cfg.key.stat().st_mode & 0o077:
        raise FedscanError(f"the site key {cfg.key} is readable by other users", hint=f"chmod 600 {cfg.key}")
    return cfg


def supernode_command(
    cfg: SiteConfig, superlink: str, ca: Path, secret_file: Path, worker_socket: Path | None = None
) -> list[str]:
    """flower-supernode for the site: TLS to the coordinator, the runtime API on 127.0.0.1, and
    ``--isolation process``: the site's own task executor (``fedscan.client.site_executor``, which
    signs its requests with the secret in ``secret_file``) runs each task, not Flower's."""
    items = [("site-name", cfg.name), ("data-dir", cfg.data_dir), ("cache-dir", cfg.cache_dir)]
    if worker_socket is not None:  # the key fedscan.client.site_runner reads
        items.append(("worker-socket", worker_socket))
    node_config = " ".join(f'{k}="{v}"' for k, v in items)
    return [
        flower_exe("flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(ca),
        "--auth-supernode-private-key",
        str(cfg.key),
        "--node-config",
        node_config,
        "--host",
        "127.0.0.1",
        "--port",
        str(cfg.runtime_port),
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(secret_file),
    ]


def start_site(
    d: Path,
    superlink: str,
    ca: Path,
    *,
    runtime_port: int | None = None,
    max_restarts: int | None = None,
    threads: int | None = None,
    on_line: Callable[[str], None] = print,
) -> int:
    """Run the site's SuperNode until stopped; returns the exit code for the service manager.

    ``threads`` caps the CPU threads each training process uses (default: all cores); set it
    when several sites, or other work, share one machine, or they slow each other down."""
    d = Path(d).expanduser().resolve()
    cfg = load_site(d)
    if runtime_port:
        cfg = cfg.model_copy(update={"runtime_port": runtime_port})
    ca = Path(ca).expanduser().resolve()
    if not ca.is_file():
        raise FedscanError(f"CA certificate {ca} does not exist", hint="copy ca.crt from the coordinator")
    if ":" not in superlink:
        raise FedscanError(f"--superlink {superlink!r} must be HOST:PORT")
    check_images(SiteDir(cfg.name, cfg.data_dir))
    check_runtime_port(cfg)
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    logs = d / "logs"
    logs.mkdir(exist_ok=True)
    home = d / "flwr-home"
    home.mkdir(exist_ok=True)
    fp = pki.fingerprint((d / "site.pub").read_bytes()) if (d / "site.pub").is_file() else "unknown"
    env = site_env(home, threads)
    secret = write_executor_secret(d / "run")
    executor_cmd = [
        sys.executable,
        "-c",  # not -m: the fork server's children would import a __main__ module again, each task
        "import sys; from fedscan.client.site_executor import main; sys.exit(main(sys.argv[1:]))",
        "--runtime-api-address",
        f"127.0.0.1:{cfg.runtime_port}",
        "--secret-file",
        str(secret),
    ]
    broken = threading.Event()
    worker = WorkerSupervisor(cfg.name, worker_socket_path(d), env, logs / "worker.log", on_line, broken)
    executor = ProcessSupervisor(
        cfg.name, "task executor", executor_cmd, env, logs / "executor.log", on_line, broken
    )
    with worker, executor:
        return _supervise(cfg, superlink, ca, worker, env, logs, fp, max_restarts, on_line, secret)


def write_executor_secret(folder: Path) -> Path:
    """A fresh SuperExec secret for this start of the site, 0600 in a 0700 folder: the SuperNode
    answers AcquireTask only to a request signed with it, so only the site's own executor (this
    user's) can claim the site's tasks from the runtime API."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    path = folder / "superexec.secret"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path


def _port_busy_error(cfg: SiteConfig) -> FedscanError:
    return FedscanError(
        f"site {cfg.name}: the SuperNode's runtime port 127.0.0.1:{cfg.runtime_port} is already in use "
        "by another program (another site on this machine, or an earlier SuperNode still running)",
        hint="pick a free port with `fedscan site start --runtime-port PORT`, or set runtime_port "
        "in site.toml; each site on one machine needs its own",
    )


def check_runtime_port(cfg: SiteConfig) -> None:
    """FedscanError naming the port when the SuperNode could not listen on its runtime port.

    Bound as the SuperNode's server binds it (SO_REUSEADDR, so a port left in TIME_WAIT by a
    SuperNode that just stopped is free), and released at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", cfg.runtime_port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise _port_busy_error(cfg) from None
            raise FedscanError(
                f"site {cfg.name}: cannot listen on 127.0.0.1:{cfg.runtime_port}: {exc.strerror}"
            ) from None


def _supervise(
    cfg: SiteConfig,
    superlink: str,
    ca: Path,
    worker: WorkerSupervisor,
    env: dict[str, str],
    logs: Path,
    fp: str,
    max_restarts: int | None,
    on_line: Callable[[str], None],
    secret: Path,
) -> int:
    cmd = supernode_command(cfg, superlink, ca, secret, worker.socket)
    restarts, backoff, quick = 0, 5.0, 0
    while True:
        on_line(f"site {cfg.name}: connecting to {superlink} (key {fp})")
        started = time.monotonic()
        result = _run_supernode(cmd, env, logs / "supernode.log", on_line, worker.broken)
        if worker.broken.is_set():  # the worker's or the executor's supervisor gave up
            on_line(
                f"site {cfg.name}: the {worker.broken_by or 'task executor'} exited {WORKER_MAX_QUICK_EXITS} "
                f"times in a row within {WORKER_SETTLE_SECONDS:.0f}s of starting; stopping the site. See "
                f"{logs / ('worker.log' if worker.broken_by else 'executor.log')}."
            )
            return 1
        if result is None:  # we were asked to stop
            on_line(f"site {cfg.name}: stopped")
            return 0
        code, cause = result
        if cause == "refused":
            on_line(
                f"site {cfg.name}: the coordinator refused this site's key ({fp}); it is not registered "
                "or was removed. Ask the coordinator to run `fedscan server add-site`."
            )
            return EXIT_REFUSED
        if cause == "port":
            raise _port_busy_error(cfg)
        quick = quick + 1 if time.monotonic() - started < SUPERNODE_SETTLE_SECONDS else 0
        if quick >= SUPERNODE_MAX_QUICK_EXITS:
            on_line(
                f"site {cfg.name}: the SuperNode exited {quick} times in a row within "
                f"{SUPERNODE_SETTLE_SECONDS:.0f}s of starting (last exit code {code}); this is not a "
                f"network failure, so the site stops. See {logs / 'supernode.log'}."
            )
            return 1
        restarts += 1  # a SuperNode does not end by itself (code 0: the SuperLink ended the session)
        if max_restarts is not None and restarts > max_restarts:
            on_line(f"site {cfg.name}: the SuperNode failed {restarts} times; giving up")
            return 1
        if time.monotonic() - started > 300:
            backoff = 5.0  # it ran for a while: a fresh failure, not a crash loop
        on_line(f"site {cfg.name}: the SuperNode exited (code {code}); restarting in {backoff:.0f}s")
        try:
            time.sleep(backoff)
        except KeyboardInterrupt:
            return 0
        backoff = min(backoff * 2, 300.0)


def site_env(home: Path, threads: int | None = None) -> dict[str, str]:
    """The environment of the site's processes: Flower's offline settings, and with ``threads``
    the CPU threads of the worker and of every ClientApp process the SuperNode starts."""
    env = offline_env(home)
    if threads:
        env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    return env


def worker_socket_path(d: Path) -> Path:
    """Where the site's worker listens: ``run/worker.sock`` in the site folder, or, when that path
    is too long for a Unix socket, in a private temporary folder (removed when the site stops)."""
    path = d / "run" / "worker.sock"
    if len(str(path).encode()) <= _UNIX_PATH_MAX:
        return path
    return Path(tempfile.mkdtemp(prefix="fedscan-site-")) / "worker.sock"  # mkdtemp: 0700


class ProcessSupervisor:
    """Keeps one of the site's long-lived processes (the warm worker, the task executor) running
    while the site runs: it starts it, and starts it again when it exits (after 1 s, doubling to
    30 s; back to 1 s once it has run for a minute). After WORKER_MAX_QUICK_EXITS quick exits in
    a row it gives up and sets ``broken`` (which the site's supervisors may share). The process's
    output goes to its log only."""

    first_backoff = 1.0

    def __init__(
        self,
        site: str,
        label: str,
        cmd: list[str],
        env: dict[str, str],
        log_path: Path,
        on_line: Callable[[str], None],
        broken: threading.Event | None = None,
    ) -> None:
        self.site = site
        self.label = label
        self.cmd = cmd
        self.env = env
        self.log_path = log_path
        self.on_line = on_line
        self.broken = broken if broken is not None else threading.Event()
        self.gave_up = False
        self.starts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"site-{label}", daemon=True)

    def __enter__(self) -> ProcessSupervisor:
        self._thread.start()
        return self

    def _run(self) -> None:
        backoff, quick = self.first_backoff, 0
        while not self._stop.is_set():
            started = time.monotonic()
            self.starts += 1
            with FlowerProcess(self.cmd, self.env, self.log_path) as proc:
                code = proc.wait(give_up=self._stop.is_set, every=0.5)
            if code is None or self._stop.is_set():
                return
            # asked to stop (SIGTERM: it exits 0, or by the signal): the site is being stopped as a
            # whole (systemd, or a process-tree stop), and the daemon sets _stop once it has
            # stopped the SuperNode; a restart in between would outlive the site's stop
            if code in (0, -signal.SIGTERM) and self._stop.wait(STOP_GRACE_SECONDS):
                return
            if time.monotonic() - started > WORKER_SETTLE_SECONDS:
                backoff, quick = self.first_backoff, 0
            quick += 1
            if quick >= WORKER_MAX_QUICK_EXITS:
                self.gave_up = True
                self.broken.set()
                return
            self.on_line(
                f"site {self.site}: the {self.label} exited (code {code}); restarting it in {backoff:.0f}s"
            )
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, 30.0)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class WorkerSupervisor(ProcessSupervisor):
    """The supervisor of the site's warm worker, listening on ``socket``."""

    def __init__(
        self,
        site: str,
        socket: Path,
        env: dict[str, str],
        log_path: Path,
        on_line: Callable[[str], None],
        broken: threading.Event | None = None,
    ) -> None:
        cmd = [sys.executable, "-m", "fedscan.client.site_worker", "--socket", str(socket)]
        super().__init__(site, "warm worker", cmd, env, log_path, on_line, broken)
        self.socket = socket

    @property
    def broken_by(self) -> str | None:
        """This supervisor's label when it gave up; None when another one sharing ``broken`` did."""
        return self.label if self.gave_up else None

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self.socket.parent.name.startswith("fedscan-site-"):  # a temporary folder of ours
            shutil.rmtree(self.socket.parent, ignore_errors=True)


def _run_supernode(
    cmd: list[str],
    env: dict[str, str],
    log_path: Path,
    on_line: Callable[[str], None],
    give_up: threading.Event | None = None,
) -> tuple[int, str | None] | None:
    """Run the SuperNode, mirroring its output (and its ClientApps', which share the pipe).

    Returns (exit code, cause) once the SuperNode process itself has exited, or None when
    interrupted or ``give_up`` was set; its whole process tree is then stopped
    (``FlowerProcess``). ``cause``, from what flower-supernode only says in its log: "refused"
    (the SuperLink would not activate this node's key), "port" (its runtime API could not
    listen), or None."""
    causes: list[str] = []

    def mirror(line: str) -> None:
        if _ACTIVATION_REFUSED in line:
            causes.append("refused")
        elif _RUNTIME_API_FAILED in line or "address already in use" in line:
            causes.append("port")
        on_line(line)

    with FlowerProcess(cmd, env, log_path, mirror) as node:
        try:
            code = node.wait() if give_up is None else node.wait(give_up=give_up.is_set)
        except KeyboardInterrupt:
            return None
        if code is None:
            return None
        node.stop()  # lingering children release the pipe; the reader has seen every line
    return code, causes[0] if causes else None
