"""Where a message's work runs: in this process, or in the site's warm worker.

A deployed site started by `fedscan site start` names its worker's socket in the node config
(``worker-socket``); the ClientApp then stays light (Flower and this module, no torch) and each
operation is one request to the worker (``fedscan.client.site_worker``). Without it (the
simulation, or a SuperNode started by hand) the same ``fedscan.client.site_round`` functions run
here, imported when first needed. Both paths give the same arrays and metrics.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context

from fedscan.client.worker_protocol import ProtocolError, WorkerReply, WorkerRequest, receive_reply, send
from fedscan.common.config import AppConfig
from fedscan.common.errors import FedscanError

WORKER_SOCKET = "worker-socket"  # the node-config key `fedscan site start` sets
# how long a message waits for a worker that is (re)starting: the daemon restarts a worker
# that died within seconds; one that does not come back fails the message, not the site
WORKER_WAIT_SECONDS = 120.0


class WorkerLost(RuntimeError):
    """The site's worker could not be reached, or hung up before it answered."""


class WorkerFailed(RuntimeError):
    """The site's worker answered that the work failed for an internal reason (see its log)."""


def worker_socket(context: Context) -> Path | None:
    value = str(context.node_config.get(WORKER_SOCKET, ""))
    return Path(value) if value else None


def _connect(path: Path, wait: float) -> socket.socket:
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() >= deadline:
                raise WorkerLost(
                    f"the site's worker did not answer at {path} within {wait:.0f}s: {exc}"
                ) from None
            time.sleep(0.1)  # the daemon is starting it again
        except OSError:
            sock.close()
            raise


def ask(
    path: Path,
    op: str,
    context: Context,
    conf: Mapping[str, object] | None = None,
    arrays: ArrayRecord | None = None,
    wait: float | None = None,
) -> tuple[WorkerReply, ArrayRecord | None]:
    """One request to the worker at ``path``: its reply, or FedscanError ("data") / WorkerFailed
    ("internal") / WorkerLost (no answer)."""
    req = WorkerRequest.model_validate(
        {
            "op": op,
            "node_config": dict(context.node_config),
            "run_config": dict(context.run_config),
            "conf": dict(conf or {}),
        }
    )
    with _connect(path, WORKER_WAIT_SECONDS if wait is None else wait) as sock:
        try:
            send(sock, req, arrays)
            reply, record = receive_reply(sock)
        except (ProtocolError, OSError) as exc:
            raise WorkerLost(f"the site's worker hung up during {op}: {exc}") from None
    if reply.error == "data":
        raise FedscanError(
            f"the site's worker could not {op}: a data or configuration problem (see worker.log)"
        )
    if reply.error is not None:
        raise WorkerFailed(f"the site's worker failed during {op} (see worker.log)")
    return reply, record


def _record(record: ArrayRecord | None, op: str) -> ArrayRecord:
    if record is None:
        raise WorkerLost(f"the site's worker answered {op} without arrays")
    return record


def plain_train(
    arrays: ArrayRecord, conf: dict, context: Context, cfg: AppConfig
) -> tuple[ArrayRecord, dict[str, float], str]:
    """Local training without secure aggregation: the update as it is sent, metrics, site name."""
    path = worker_socket(context)
    if path is None:
        from fedscan.client import site_round

        return site_round.plain_train(arrays, conf, context, cfg)
    reply, record = ask(path, "train", context, conf, arrays)
    return _record(record, "train"), reply.metrics, reply.site


def secure_train(
    arrays: ArrayRecord, conf: dict, context: Context, cfg: AppConfig
) -> tuple[dict[str, np.ndarray], dict[str, float], str]:
    """Local training for SecAgg+'s masking stage: the trained model's whole state as numpy
    arrays by name, its metrics and the site's name."""
    path = worker_socket(context)
    if path is None:
        from fedscan.client import site_round

        return site_round.secure_train(arrays, conf, context, cfg)
    reply, record = ask(path, "train_secure", context, conf, arrays)
    record = _record(record, "train_secure")
    return {k: record[k].numpy() for k in record}, reply.metrics, reply.site


def evaluate(
    arrays: ArrayRecord, conf: dict, context: Context, cfg: AppConfig
) -> tuple[dict[str, float], str]:
    """The global arrays on this site's validation split: metrics and the site's name."""
    path = worker_socket(context)
    if path is None:
        from fedscan.client import site_round

        return site_round.evaluate(arrays, conf, context, cfg)
    reply, _ = ask(path, "evaluate", context, conf, arrays)
    return reply.metrics, reply.site


def model_keys(context: Context, cfg: AppConfig) -> list[str]:
    """The model's array names, in order (SecAgg+ sends the arrays by position)."""
    path = worker_socket(context)
    if path is None:
        from fedscan.client import site_round

        return site_round.model_keys(cfg)
    return ask(path, "model_keys", context)[0].keys
