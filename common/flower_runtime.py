"""Start, watch and stop Flower's processes, offline, for the simulator, the coordinator and sites.

One runner serves all three: :class:`FlowerProcess` starts a Flower process (a SuperLink, a
SuperNode, `flwr log --stream`), keeps its output in a log file, hands it over line by line
where asked, and stops it and everything it started. Runs are submitted with
:func:`submit_run` (`flwr run --format json`, the run ID as data) and followed with
:func:`follow_run`, which decodes the ServerApp's run events (``fedscan.common.run_events``).

Every Flower process fedscan starts gets a private FLWR_HOME and an environment with telemetry,
update checks and runtime dependency installation off: hospitals have no general internet, and
nothing but the coordinator may be contacted. Processes run in their own session so that
``stop_process_tree`` can stop them and everything they started.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, overload

import psutil

from fedscan.common.errors import FedscanError
from fedscan.common.run_events import RunEvent, RunFinished, decode

log = logging.getLogger(__name__)

# The Flower app that `flwr run` submits: the components of the installed fedscan package.
# Same components as [tool.flwr.app] in the repository's pyproject.toml.
APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedscan"
version = "{version}"
dependencies = []

[tool.flwr.app]
publisher = "fedscan"

[tool.flwr.app.components]
serverapp = "fedscan.server.app:app"
clientapp = "fedscan.client.app:app"

[tool.flwr.app.config]
fedscan-config = ""
"""


def offline_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: private home, no telemetry, no network installs."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    # The SuperExec (a site's, and the SuperLink's for the ServerApp) asks for a new task every
    # FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds, 1.0 by Flower's default: each message waited 0.5 s
    # on average before its ClientApp process started. One AcquireTask is one local HTTP request;
    # an explicit value in the environment is kept.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    # make sure the Flower executables of this interpreter's environment are found first
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_exe(name: str) -> str:
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise FedscanError(f"'{name}' was not found; is flwr[simulation] installed in this environment?")
    return found


def _process_group(pgid: int) -> list[psutil.Process]:
    """The processes of the process group ``pgid`` (a session fedscan started): those whose parent
    exited before them are no longer its children, but still its group's."""
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                members.append(p)
        except (ProcessLookupError, PermissionError):
            pass
    return members


def stop_process_tree(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop ``proc`` and every process it started: SIGTERM, then SIGKILL after ``timeout``."""
    try:
        parent = psutil.Process(proc.pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:  # it has exited; what it started may still run in its group
        procs = []
    known = {p.pid for p in procs}
    procs += [p for p in _process_group(proc.pid) if p.pid not in known]
    try:  # the whole session we started, including re-parented grandchildren
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def write_app_dir(app_dir: Path) -> Path:
    """The Flower app `flwr run` submits: the components of the installed fedscan package."""
    from fedscan.common import __version__

    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(APP_PYPROJECT.format(version=__version__))
    return app_dir


class FlowerProcess:
    """One Flower process that fedscan started and owns, as a context manager.

    It runs in its own session with the given environment; its output (stdout and stderr) is
    appended to ``log_path`` and, with ``on_line``, handed over line by line from a reader thread.
    The end of the process is taken from the process, never from its output (a child that lingers
    may keep the pipe open). Leaving the ``with`` block stops it and everything it started."""

    def __init__(
        self,
        cmd: list[str],
        env: dict[str, str],
        log_path: Path,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self.cmd = cmd
        self.env = env
        self.log_path = Path(log_path)
        self.on_line = on_line
        self.proc: subprocess.Popen | None = None
        self._log: IO[str] | None = None
        self._reader: threading.Thread | None = None
        self._stopped = False

    def __enter__(self) -> FlowerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8")  # closed in __exit__
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                stdout=subprocess.PIPE if self.on_line else self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                bufsize=1,
                start_new_session=True,
            )
        except BaseException:
            self._log.close()
            raise
        if self.on_line is not None:
            self._reader = threading.Thread(target=self._pump, daemon=True)
            self._reader.start()
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None and self._log is not None
        assert self.on_line is not None
        failed = False
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            try:
                self.on_line(line.rstrip("\n"))
            except Exception:  # a bug in a handler must not stop the pipe from draining
                if not failed:
                    log.exception(
                        "handling the output of %s failed; it is still logged", Path(self.cmd[0]).name
                    )
                failed = True

    def poll(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    @overload
    def wait(self, give_up: None = None, every: float = 1.0) -> int: ...

    @overload
    def wait(self, give_up: Callable[[], bool], every: float = 1.0) -> int | None: ...

    def wait(self, give_up: Callable[[], bool] | None = None, every: float = 1.0) -> int | None:
        """Wait until the process exits; its exit code. ``give_up`` is asked ``every`` seconds: when it
        says so, the process is stopped and the answer is None."""
        assert self.proc is not None
        if give_up is None:
            return self.proc.wait()
        while True:
            try:
                return self.proc.wait(timeout=every)
            except subprocess.TimeoutExpired:
                if give_up():
                    self.stop()
                    return None

    def stop(self, grace: float = 15.0) -> None:
        """Stop the process and everything it started (once): SIGTERM, and SIGKILL for what is still
        running ``grace`` seconds later; then let the reader finish the output."""
        if self.proc is not None and not self._stopped:
            self._stopped = True
            stop_process_tree(self.proc, timeout=grace)
        if self._reader is not None:
            self._reader.join(timeout=60)

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None


class RunNotFollowed(FedscanError):
    """Following a run was given up: it said nothing for too long (see :func:`follow_run`)."""


def flwr_json(
    args: list[str], home: Path, timeout: float = 60, hint: str | None = None, log_path: Path | None = None
) -> dict[str, Any]:
    """Run a `flwr` CLI command with ``--format json``; its answer, the JSON object it prints, or a
    FedscanError (with ``hint``) when it fails, times out or answers no such object."""
    cmd = [flower_exe("flwr"), *args, "--format", "json"]
    what = " ".join(args[:2])
    try:
        res = subprocess.run(
            cmd,
            env=offline_env(home),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise FedscanError(f"`flwr {what}` did not answer within {timeout:.0f}s", hint=hint) from None
    if log_path is not None:
        with open(log_path, "a", encoding="utf-8") as log_file:
            log_file.write(f"$ flwr {' '.join(args)} --format json\n{res.stdout}{res.stderr}")
    try:
        data = json.loads(res.stdout)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FedscanError(f"`flwr {what}` failed (exit code {res.returncode}): {last[0]}", hint=hint)
    if res.returncode != 0 or not data.get("success", False):
        detail = str(data.get("error-message") or f"exit code {res.returncode}").strip().splitlines()
        raise FedscanError(f"`flwr {what}` failed: {detail[-1] if detail else 'no message'}", hint=hint)
    return data


def submit_run(
    app_dir: Path,
    connection: str,
    home: Path,
    run_config: Path,
    log_path: Path,
    *,
    federation_config: str | None = None,
    timeout: float = 120,
    hint: str | None = None,
) -> int:
    """Submit the app with `flwr run --format json`; the run ID, which Flower answers as data."""
    args = ["run", str(app_dir), connection, "--run-config", str(run_config)]
    if federation_config is not None:
        args += ["--federation-config", federation_config]
    data = flwr_json(args, home, timeout=timeout, hint=hint, log_path=log_path)
    return int(data["run-id"])


def event_reader(on_event: Callable[[RunEvent], None]) -> Callable[[str], None]:
    """A handler of output lines that hands each run event among them to ``on_event``; other lines
    are not events and are left alone, and an event that cannot be read is logged and skipped."""

    def on_line(line: str) -> None:
        try:
            event = decode(line)
        except ValueError as exc:
            log.warning(
                "a run event from the ServerApp could not be read (%s); waiting for the next one",
                str(exc).splitlines()[0],
            )
            return
        if event is not None:
            on_event(event)

    return on_line


def follow_run(
    run_id: int,
    connection: str,
    home: Path,
    log_path: Path,
    on_event: Callable[[RunEvent], None],
    give_up: Callable[[], bool] | None = None,
    until_finished: bool = False,
) -> None:
    """Follow a run with `flwr log RUN --stream` until it ends: its whole output goes to the log, and
    every run event the ServerApp writes (``fedscan.common.run_events``) to ``on_event``.

    ``give_up`` is asked every 0.2 s; when it says so, following stops with RunNotFollowed. With
    ``until_finished``, following ends as soon as the ServerApp's RunFinished event has been handed
    over: its work is done and written, and what Flower still does after it (the simulation
    engine's Ray shutdown: `flwr log` ended 3.8 s after that event on 2 cores) is left to the caller
    to stop (``server/simulate.py``)."""

    finished = threading.Event()

    def on_run_event(event: RunEvent) -> None:
        on_event(event)
        if until_finished and isinstance(event, RunFinished):
            finished.set()

    def stop_following() -> bool:
        return finished.is_set() or (give_up is not None and give_up())

    cmd = [flower_exe("flwr"), "log", str(run_id), connection, "--stream"]
    with FlowerProcess(cmd, offline_env(home), log_path, event_reader(on_run_event)) as proc:
        code = proc.wait(stop_following, every=0.2)
        proc.stop()  # the reader has handed over every line before we look at what came
    if code is None and finished.is_set():
        return
    if code is None:
        raise RunNotFollowed(f"stopped following run {run_id}", hint=f"see {log_path}")
    if code != 0:
        raise FedscanError(f"`flwr log` failed (exit code {code})", hint=f"see {log_path}")
