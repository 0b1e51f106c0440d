"""A message's arrays as one Flower object on the wire, and back, bit for bit.

Flower 1.42 sends a Message as a tree of objects: the message, each record, each Array and each
5 MB chunk of an Array, and a SuperNode, the SuperLink and the ServerApp push and pull every
object with a request of its own (two at a time; flwr/supercore/inflatable). A U-Net's
ArrayRecord is 82 Arrays and as many chunks, so a deployed train message and its reply took 8.5
to 12 s each to move 2 MB between processes on one machine (timestamps in the SuperNode's log on
the 2-core development machine), where a message of keys only took 0.1 s.

``pack`` turns an ArrayRecord of several Arrays into one Array whose bytes are a JSON layout
(each Array's key, dtype, shape, stype and size) followed by the Arrays' own bytes, untouched;
``unpack`` rebuilds the same Arrays from it. Nothing is converted, so what arrives is bit for bit
what was sent, whatever the Arrays hold (numpy arrays, or legacy Parameters' serialized tensors
under SecAgg+). The ServerApp packs what it sends (``fedscan.server.app.DeadlineGrid``) and
unpacks the replies; a site unpacks what it receives and packs its reply only when the request
came packed (``fedscan.client.app``), so either side copes with one that does not pack.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Array, ArrayRecord, Message, RecordDict
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PACKED_KEY = "fedscan-packed"  # the one key of a packed ArrayRecord
PACKED_STYPE = "fedscan.packed/1"  # the packed Array's stype: this module's format, version 1
_HEADER_BYTES = 8  # little-endian length of the JSON layout that starts the packed bytes


class PackError(ValueError):
    """A packed record that does not hold what its layout says."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str
    dtype: str
    shape: list[int]
    stype: str
    nbytes: int = Field(ge=0)


class _Layout(BaseModel):
    model_config = ConfigDict(extra="forbid")

    parts: list[_Part]


def is_packed(record: ArrayRecord) -> bool:
    return list(record.keys()) == [PACKED_KEY] and record[PACKED_KEY].stype == PACKED_STYPE


def pack(record: ArrayRecord) -> ArrayRecord:
    """One Array for all of ``record``'s; a record of one Array (or none) is returned as it is."""
    if len(record) < 2 or is_packed(record):
        return record
    arrays = list(record.items())
    layout = _Layout(
        parts=[
            _Part(key=k, dtype=a.dtype, shape=list(a.shape), stype=a.stype, nbytes=len(a.data))
            for k, a in arrays
        ]
    )
    header = layout.model_dump_json().encode()
    data = b"".join([len(header).to_bytes(_HEADER_BYTES, "little"), header, *(a.data for _, a in arrays)])
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)})


def unpack(record: ArrayRecord) -> ArrayRecord:
    """The Arrays ``pack`` put into ``record``, in their order; any other record as it is.
    Raises PackError for packed bytes that do not match their layout."""
    if not is_packed(record):
        return record
    data = memoryview(record[PACKED_KEY].data)
    try:
        size = int.from_bytes(data[:_HEADER_BYTES], "little")
        layout = _Layout.model_validate_json(bytes(data[_HEADER_BYTES : _HEADER_BYTES + size]))
    except ValidationError as exc:
        raise PackError(
            f"a packed array record with an unreadable layout: {exc.error_count()} errors"
        ) from None
    pos = _HEADER_BYTES + size
    if pos + sum(p.nbytes for p in layout.parts) != len(data):
        raise PackError("a packed array record whose bytes do not add up to its layout")
    out: dict[str, Array] = {}
    for p in layout.parts:
        out[p.key] = Array(
            dtype=p.dtype, shape=tuple(p.shape), stype=p.stype, data=bytes(data[pos : pos + p.nbytes])
        )
        pos += p.nbytes
    if len(out) != len(layout.parts):
        raise PackError("a packed array record that names one array twice")
    return ArrayRecord(out)


def _map_arrays(content: RecordDict, fn: Callable[[ArrayRecord], ArrayRecord]) -> RecordDict | None:
    """``content`` with ``fn`` applied to each ArrayRecord, or None when nothing changed."""
    changed = {name: fn(rec) for name, rec in content.array_records.items()}
    if all(changed[name] is content[name] for name in changed):
        return None
    return RecordDict({name: changed.get(name, rec) for name, rec in content.items()})


def packed(msg: Message) -> Message:
    """``msg`` with its ArrayRecords packed (its content replaced by a new RecordDict, so that a
    RecordDict shared by several messages, as Flower's strategies build them, is left as it was)."""
    if msg.has_content():
        content = _map_arrays(msg.content, pack)
        if content is not None:
            msg.content = content
    return msg


def unpacked(msg: Message) -> tuple[Message, bool]:
    """``msg`` with its packed ArrayRecords unpacked, and whether it held any."""
    if not msg.has_content():
        return msg, False
    content = _map_arrays(msg.content, unpack)
    if content is None:
        return msg, False
    msg.content = content
    return msg, True
