"""Start, watch and stop Flower's processes, offline, for the simulator, the coordinator and sites.

Every Flower process fedscan starts gets a private FLWR_HOME and an environment with telemetry,
update checks and runtime dependency installation off: hospitals have no general internet, and
nothing but the coordinator may be contacted. Processes run in their own session so that
``stop_process_tree`` can stop them and everything they started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from fedscan.common.errors import FedscanError

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


def stop_process_tree(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop ``proc`` and every process it started: SIGTERM, then SIGKILL after ``timeout``."""
    try:
        parent = psutil.Process(proc.pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
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


def stream_flwr_run(cmd: list[str], env: dict[str, str], log_path: Path, on_line: Callable[[str], None],
                    give_up: Callable[[], bool] | None = None) -> None:
    """Run `flwr run --stream`, keep its whole output in a log, hand every line to ``on_line``.

    ``give_up`` is asked every few seconds; when it says so, the command is stopped and a
    FedscanError raised (for a run that never starts)."""
    with open(log_path, "a", encoding="utf-8") as log_file:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, bufsize=1, start_new_session=True,
        )
        gave_up = threading.Event()

        def watch() -> None:
            while proc.poll() is None:
                if give_up is not None and give_up():
                    gave_up.set()
                    stop_process_tree(proc)
                    return
                time.sleep(2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log_file.write(line)
                log_file.flush()
                on_line(line.rstrip("\n"))
            proc.wait()
        finally:
            if proc.poll() is None:
                stop_process_tree(proc)
    if gave_up.is_set():
        raise FedscanError("`flwr run` was stopped: the run did not start", hint=f"see {log_path}")
    if proc.returncode != 0:
        raise FedscanError(f"`flwr run` failed (exit code {proc.returncode})", hint=f"see {log_path}")
