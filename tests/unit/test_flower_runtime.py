"""The one runner of Flower processes (common/flower_runtime.py), on stand-in processes: it logs
their output, hands it over line by line, ends with the process even when a child keeps the pipe
open, gives up when asked, and leaves nothing running."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil

from fedscan.common.flower_runtime import FlowerProcess

ENV = dict(os.environ, PYTHONUNBUFFERED="1")
# a parent that starts a child in its session which outlives it, holding the output pipe
LINGER = (
    "import subprocess, sys\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; print(\"child up\", flush=True); "
    "time.sleep(600)'])\n"
    "print('child', child.pid, flush=True)\n"
    "import time; time.sleep(0.5)\n"
    "print('parent done', flush=True)\n"
    "sys.exit(7)\n"
)


def test_the_end_is_the_process_s_not_the_pipe_s(tmp_path: Path) -> None:
    lines: list[str] = []
    log = tmp_path / "logs" / "node.log"
    t0 = time.monotonic()
    with FlowerProcess([sys.executable, "-c", LINGER], ENV, log, lines.append) as proc:
        assert proc.wait() == 7
        proc.stop()
    assert time.monotonic() - t0 < 60  # not the child's 600 s
    child = int(next(line for line in lines if line.startswith("child ")).split()[1])
    assert "parent done" in lines and "child up" in lines
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    assert "parent done" in log.read_text()


def test_give_up_stops_a_process_that_never_ends(tmp_path: Path) -> None:
    asked = []

    def give_up() -> bool:
        asked.append(1)
        return len(asked) >= 2

    forever = [sys.executable, "-c", "import time; time.sleep(600)"]
    with FlowerProcess(forever, ENV, tmp_path / "x.log") as proc:
        assert proc.wait(give_up, every=0.2) is None
        assert proc.poll() is not None  # stopped
    assert len(asked) == 2


def test_output_without_a_handler_goes_to_the_log_only(tmp_path: Path) -> None:
    log = tmp_path / "link.log"
    log.write_text("earlier\n")
    with FlowerProcess([sys.executable, "-c", "print('ready')"], ENV, log) as proc:
        assert proc.wait() == 0
    assert log.read_text() == "earlier\nready\n"  # appended, never replaced
