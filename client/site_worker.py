"""A deployed site's warm worker: one long-lived process that does the site's training and
evaluation for every message.

Flower's SuperNode starts a fresh ClientApp process per message; importing torch, MONAI and
fedscan's data and model code took 6.3 s of each on the 2-core development machine (python -X
importtime; flwr itself 1.5 s more). `fedscan site start` therefore keeps this process running
beside the SuperNode, with those imports done once; the per-message ClientApp
(``fedscan.client.site_runner``) hands it the message's arrays and config over a Unix socket and
sends back what it answers. The socket is the site user's only: bound 0600 in a 0700 folder,
and a connection from another user id is closed unanswered (SO_PEERCRED).

It runs ``fedscan.client.site_round``'s functions exactly as the ClientApp would in process, one
request at a time (the SuperNode handles one message at a time). A failure is logged here in
full; the answer names only its category.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import stat
import struct
import sys
from pathlib import Path

from flwr.app import ArrayRecord, Context, RecordDict

from fedscan.client import site_round
from fedscan.client.worker_protocol import ProtocolError, WorkerReply, WorkerRequest, receive_request, send
from fedscan.common.array_records import from_state
from fedscan.common.config import AppConfig
from fedscan.common.errors import FedscanError

log = logging.getLogger("fedscan.worker")

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
REQUEST_READ_SECONDS = 60.0  # a request is a model's arrays over a local socket: well under a second


def handle(req: WorkerRequest, record: ArrayRecord | None) -> tuple[WorkerReply, ArrayRecord | None]:
    """Do one request's work; failures become a reply with their category only."""
    try:
        cfg = AppConfig.from_run_config(dict(req.run_config))
        context = Context(
            run_id=0,
            node_id=0,
            node_config=dict(req.node_config),
            state=RecordDict(),
            run_config=dict(req.run_config),
        )
        conf = dict(req.conf)
        pid = os.getpid()
        if req.op == "ping":
            return WorkerReply(pid=pid), None
        if req.op == "model_keys":
            return WorkerReply(keys=site_round.model_keys(cfg), pid=pid), None
        if record is None:
            raise ValueError(f"a {req.op} request came without the global arrays")
        log.info("round %s: %s started (worker %d)", conf.get("server-round", "?"), req.op, pid)
        if req.op == "train":
            out, metrics, name = site_round.plain_train(record, conf, context, cfg)
            return WorkerReply(metrics=metrics, site=name, pid=pid), out
        if req.op == "train_secure":
            state, metrics, name = site_round.secure_train(record, conf, context, cfg)
            return WorkerReply(metrics=metrics, site=name, pid=pid), from_state(state)
        metrics, name = site_round.evaluate(record, conf, context, cfg)
        return WorkerReply(metrics=metrics, site=name, pid=pid), None
    except FedscanError as exc:
        log.error("%s failed: %s", req.op, exc)
        return WorkerReply(error="data"), None
    except Exception:
        log.exception("%s failed", req.op)
        return WorkerReply(error="internal"), None


def bind(path: Path) -> socket.socket:
    """Listen on ``path``, readable and writable by this user only. The folder must be this
    user's and closed to others; a socket file left by an earlier worker is replaced."""
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise FedscanError(
            f"the worker's folder {folder} must belong to this user and be closed to others",
            hint=f"chmod 700 {folder}",
        )
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FedscanError(f"{path} exists and is not a socket; the worker will not replace it")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(4)
    return sock


def peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return int(uid)


def serve(sock: socket.socket) -> None:
    """Answer requests, one connection at a time, until the process is stopped."""
    me = os.getuid()
    while True:
        conn, _ = sock.accept()
        with conn:
            uid = peer_uid(conn)
            if uid != me:
                log.warning(
                    "refused a connection from user id %d (this worker serves user id %d only)", uid, me
                )
                continue
            conn.settimeout(REQUEST_READ_SECONDS)  # a client that connects and stalls must not block the site
            try:
                req, record = receive_request(conn)
            except (ProtocolError, OSError) as exc:  # socket.timeout is an OSError
                log.warning("ignored a request that is not one of ours, or did not arrive: %s", exc)
                continue
            conn.settimeout(None)
            reply, out = handle(req, record)
            try:
                send(conn, reply, out)
            except OSError as exc:  # the ClientApp went away (its task was cancelled)
                log.warning("could not answer the %s request: %s", req.op, exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, required=True, help="the Unix socket to listen on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sock = bind(args.socket)
    except (FedscanError, OSError) as exc:
        print(f"fedscan site worker: {exc}", file=sys.stderr)
        return 2
    log.info("warm worker %d listening on %s", os.getpid(), args.socket)
    try:
        serve(sock)
    except KeyboardInterrupt:
        return 0
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
