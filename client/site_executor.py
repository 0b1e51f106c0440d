"""A deployed site's task executor: claims each task from the SuperNode's runtime API and runs
it in a process forked from one that has Flower's ClientApp runtime imported already.

Flower's own executor (``flower-superexec``, what ``flower-supernode --isolation subprocess``
starts) launches a fresh ``flwr-clientapp`` for every message: a new Python that imports flwr's
client runtime and the app again, 1.1 s of each message on the 2-core development machine
(``python -X importtime``; SecAgg+ sends five messages a round). `fedscan site start` runs the
SuperNode with ``--isolation process`` instead, and this process in its place: it asks the
runtime API for a task (``AcquireTask``, signed with the SuperExec secret that only the site's
user can read, so no other local program can claim the site's tasks), and for each one starts a
child from a multiprocessing fork server whose preload holds ``flwr.supernode.runtime.
run_clientapp`` and fedscan's ClientApp module. The child runs Flower's own
``run_clientapp(address, token)``: it pulls the message, loads the app and pushes the reply,
exactly as ``flwr-clientapp`` would, with the imports already done. The heavy work (torch, the
model, the site's data) is not in these processes at all: fedscan's ClientApp hands it to the
site's warm worker (``fedscan.client.site_worker``).

This is also the one place where the site decides what runs before any of an app's code is
imported (the site-governance issue).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import run_clientapp

log = logging.getLogger("fedscan.executor")

# what the fork server imports once, so that each task's process starts with them loaded
PRELOAD = ["fedscan.client.site_executor", "fedscan.client.app"]
# seconds between two AcquireTask calls while there is no task: a local HTTP call that costs
# about a millisecond, against Flower's own executor's 1 s default (FLWR_SUPEREXEC_TASK_POLL_INTERVAL)
POLL_SECONDS = 0.05
# seconds to wait before asking again when the runtime API does not answer (the daemon is
# restarting the SuperNode)
UNREACHABLE_SECONDS = 1.0
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"


def run_task(runtime_api_address: str, token: str, parent_pid: int) -> None:
    """One task, in a process forked from the fork server: Flower's ClientApp runtime."""
    run_clientapp(
        runtime_api_address=runtime_api_address,
        token=token,
        insecure=True,  # the runtime API listens on 127.0.0.1 only
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


class TaskExecutor:
    """The AcquireTask loop and the processes it started."""

    def __init__(self, runtime_api_address: str, secret: bytes, poll_seconds: float = POLL_SECONDS) -> None:
        self.address = runtime_api_address
        self.poll_seconds = poll_seconds
        self.stop = threading.Event()
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.running: dict[BaseProcess, tuple[int, float]] = {}  # process -> (task id, start)
        self.started = 0
        self.client = RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={_ACQUIRE}),
            ],
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def warm_up(self) -> None:
        """Start the fork server now (it imports PRELOAD), not when the first task comes."""
        proc = self.ctx.Process(target=os.getpid, name="fedscan-warm-up")
        proc.start()
        proc.join()

    def launch(self, token: str, task_id: int = 0) -> None:
        proc = self.ctx.Process(
            target=run_task, args=(self.address, token, os.getpid()), name="fedscan-task", daemon=False
        )
        proc.start()
        self.running[proc] = (task_id, time.monotonic())
        self.started += 1

    def reap(self) -> None:
        for proc in [p for p in self.running if p.exitcode is not None]:
            task_id, start = self.running.pop(proc)
            took = time.monotonic() - start
            if proc.exitcode:
                log.warning("task %d: its process exited with code %s (%.2fs)", task_id, proc.exitcode, took)
            else:
                log.info("task %d: done in %.2fs", task_id, took)
            proc.close()

    def poll_once(self) -> bool:
        """Ask for one task and start it; True when one was started."""
        res = self.client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if res.HasField("task") and res.token:
            log.info("task %d of run %d: starting", res.task.task_id, res.task.run_id)
            self.launch(res.token, res.task.task_id)
            return True
        return False

    def serve(self) -> None:
        """Claim and start tasks until ``stop`` is set. While the runtime API does not answer (the
        SuperNode is starting, or the daemon is restarting it) it asks again every
        UNREACHABLE_SECONDS; the daemon, not this loop, decides when the site gives up."""
        reachable: bool | None = None  # None: not yet answered since this executor started
        while not self.stop.is_set():
            self.reap()
            try:
                started = self.poll_once()
            except Exception as exc:  # noqa: BLE001 - the SuperNode is (re)starting; ask again shortly
                if reachable:  # said once per outage: the daemon restarts the SuperNode, not this
                    log.warning("the SuperNode's runtime API at %s does not answer (%s)", self.address, exc)
                reachable = False if reachable is not None else None
                self.stop.wait(UNREACHABLE_SECONDS)
                continue
            if reachable is False:
                log.info("the SuperNode's runtime API at %s answers again", self.address)
            reachable = True
            if not started:
                self.stop.wait(self.poll_seconds)

    def close(self) -> None:
        """Stop the tasks still running (the SuperNode treats them as it treats a ClientApp that
        died), then the runtime API client."""
        for proc in self.running:
            proc.terminate()
        for proc in self.running:
            proc.join(timeout=5)
        self.client.close()


def read_secret(path: Path) -> bytes:
    """The SuperExec secret, refusing a file other users can read."""
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} is readable by other users (chmod 600 it)")
    secret = path.read_bytes()
    if not secret:
        raise ValueError(f"{path} is empty")
    return secret


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's runtime API, HOST:PORT")
    parser.add_argument("--secret-file", type=Path, required=True, help="the SuperExec auth secret (0600)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per AcquireTask otherwise
    try:
        secret = read_secret(args.secret_file)
    except (OSError, ValueError) as exc:
        print(f"fedscan site executor: {exc}", file=sys.stderr)
        return 2
    executor = TaskExecutor(args.runtime_api_address, secret)
    signal.signal(signal.SIGTERM, lambda *_: executor.stop.set())
    executor.warm_up()
    log.info("task executor %d polling %s", os.getpid(), args.runtime_api_address)
    try:
        executor.serve()
    except KeyboardInterrupt:
        pass
    finally:
        executor.close()
    return 0


if __name__ == "__main__":
    # the imported module's main, not this copy's: the fork server's children find run_task as
    # fedscan.client.site_executor.run_task (`fedscan site start` runs it with -c, so that no
    # __main__ module is imported again in each task's process)
    from fedscan.client import site_executor

    sys.exit(site_executor.main())
