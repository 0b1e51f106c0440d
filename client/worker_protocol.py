"""The frames between a deployed site's per-message ClientApp and its warm worker.

One request and one reply per connection, over the site's Unix socket. A frame is an 8-byte
big-endian header length, the header as JSON (a pydantic model), then the raw bytes of the
arrays the header lists, in order. Arrays travel as Flower ``Array`` parts (dtype, shape, stype
and the serialized bytes), so a record arrives bit for bit as it left; nothing is pickled.
This module imports neither torch nor the data code: the ClientApp side stays light.
"""

from __future__ import annotations

import socket
import struct
from typing import Literal, TypeVar

from flwr.app import Array, ArrayRecord
from pydantic import BaseModel, ConfigDict, Field

# a site's arrays are a model (tens of MB at most); anything far beyond is not a frame of ours
MAX_HEADER_BYTES = 16 * 2**20
MAX_ARRAY_BYTES = 8 * 2**30
_LEN = struct.Struct(">Q")

Scalar = str | int | float | bool


class ProtocolError(RuntimeError):
    """The other end sent something that is not a frame of this protocol, or hung up mid-frame."""


class ArrayPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    dtype: str
    shape: list[int]
    stype: str
    nbytes: int = Field(ge=0, le=MAX_ARRAY_BYTES)


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arrays: list[ArrayPart] = []  # filled in by ``send`` from the record that goes with the frame


class WorkerRequest(_Frame):
    """What the ClientApp asks the worker: one operation of ``fedscan.client.site_round``."""

    op: Literal["train", "train_secure", "evaluate", "model_keys", "ping"]
    node_config: dict[str, Scalar] = {}
    run_config: dict[str, Scalar] = {}
    conf: dict[str, Scalar] = {}


class WorkerReply(_Frame):
    """The worker's answer. ``error`` is a category only ("data": a data or configuration
    problem, "internal": anything else); the details stay in the worker's log."""

    error: Literal["data", "internal"] | None = None
    metrics: dict[str, float] = {}
    site: str = ""
    keys: list[str] = []
    pid: int = 0  # the worker's process, for the site's log


F = TypeVar("F", bound=_Frame)


def _parts(record: ArrayRecord | None) -> tuple[list[ArrayPart], list[bytes]]:
    if record is None:
        return [], []
    parts, blobs = [], []
    for name in record:
        arr = record[name]
        parts.append(
            ArrayPart(
                name=name, dtype=arr.dtype, shape=list(arr.shape), stype=arr.stype, nbytes=len(arr.data)
            )
        )
        blobs.append(arr.data)
    return parts, blobs


def send(sock: socket.socket, header: _Frame, record: ArrayRecord | None = None) -> None:
    """Write one frame: ``header`` with the arrays of ``record`` (in its order)."""
    parts, blobs = _parts(record)
    body = header.model_copy(update={"arrays": parts}).model_dump_json().encode()
    sock.sendall(_LEN.pack(len(body)) + body)
    for blob in blobs:
        sock.sendall(blob)


def _read(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ProtocolError(f"the other end closed the connection {got} bytes into a {n}-byte read")
        got += k
    return bytes(buf)


def _receive(sock: socket.socket, kind: type[F]) -> tuple[F, ArrayRecord | None]:
    (length,) = _LEN.unpack(_read(sock, _LEN.size))
    if length > MAX_HEADER_BYTES:
        raise ProtocolError(f"a frame header of {length} bytes is not one of ours")
    try:
        header = kind.model_validate_json(_read(sock, length))
    except ValueError as exc:  # pydantic's ValidationError is one
        raise ProtocolError(f"not a {kind.__name__}: {exc}") from None
    if not header.arrays:
        return header, None
    record = ArrayRecord(
        {
            p.name: Array(dtype=p.dtype, shape=tuple(p.shape), stype=p.stype, data=_read(sock, p.nbytes))
            for p in header.arrays
        }
    )
    return header, record


def receive_request(sock: socket.socket) -> tuple[WorkerRequest, ArrayRecord | None]:
    return _receive(sock, WorkerRequest)


def receive_reply(sock: socket.socket) -> tuple[WorkerReply, ArrayRecord | None]:
    return _receive(sock, WorkerReply)
