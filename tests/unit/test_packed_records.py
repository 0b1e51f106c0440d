"""A message's arrays travel as one Flower object and arrive bit for bit (common/packed_records.py)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from fedscan.common.packed_records import PACKED_KEY, PackError, pack, packed, unpack, unpacked

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # Messages need a run and a task


def model_like() -> ArrayRecord:
    rng = np.random.default_rng(0)
    arrays = {f"layer{i}.weight": rng.normal(size=(8, 4, 3, 3)).astype(np.float32) for i in range(20)}
    arrays["bn.num_batches_tracked"] = np.array(7, dtype=np.int64)
    arrays["bn.running_mean"] = rng.normal(size=8).astype(np.float64)
    arrays["empty"] = np.zeros((0, 3), dtype=np.float16)
    rec = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    # a legacy Parameters tensor, as SecAgg+'s FitIns carries them: bytes with no dtype or shape
    rec["0"] = Array(dtype="", shape=(), stype="numpy.ndarray", data=b"\x93NUMPY serialized elsewhere")
    return rec


def fields(rec: ArrayRecord) -> list[tuple]:
    return [(k, a.dtype, tuple(a.shape), a.stype, a.data) for k, a in rec.items()]


def wire(rec: ArrayRecord) -> ArrayRecord:
    """What the other side inflates: every object deflated to bytes and rebuilt, as Flower does."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(rec).items()}
    return inflate_object_from_contents(rec.object_id, contents)


def test_a_packed_record_is_three_objects_and_arrives_bit_for_bit() -> None:
    rec = model_like()
    p = pack(rec)
    assert list(p.keys()) == [PACKED_KEY]
    assert len(get_all_nested_objects(rec)) == 1 + 2 * len(rec)  # the record, each Array and its chunk
    assert len(get_all_nested_objects(p)) == 3
    back = unpack(wire(p))
    assert fields(back) == fields(rec)  # keys in order, dtypes, shapes, stypes, bytes
    np.testing.assert_array_equal(back["layer3.weight"].numpy(), rec["layer3.weight"].numpy())
    assert pack(p) is p and unpack(rec) is rec  # packing twice, or unpacking a plain record, does nothing
    single = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    assert pack(single) is single  # one Array is one object already


def test_messages_sharing_one_content_are_packed_without_changing_it() -> None:
    rec = model_like()
    shared = RecordDict({"arrays": rec, "config": ConfigRecord({"server-round": 1})})
    msgs = [Message(content=shared, dst_node_id=n, message_type="train") for n in (1, 2)]
    out = [packed(m) for m in msgs]
    assert shared["arrays"] is rec  # the strategy's RecordDict is left as it was
    assert all(list(m.content.array_records["arrays"].keys()) == [PACKED_KEY] for m in out)
    assert out[0].content.config_records["config"]["server-round"] == 1
    again, was_packed = unpacked(out[1])
    assert was_packed and fields(again.content.array_records["arrays"]) == fields(rec)
    plain = Message(
        content=RecordDict({"config": ConfigRecord({"a": 1})}), dst_node_id=1, message_type="train"
    )
    assert unpacked(plain) == (plain, False)


def test_packed_bytes_that_do_not_match_their_layout_are_refused() -> None:
    p = pack(model_like())
    data = p[PACKED_KEY].data
    cut = ArrayRecord(
        {PACKED_KEY: Array(dtype="uint8", shape=(1,), stype=p[PACKED_KEY].stype, data=data[:-1])}
    )
    with pytest.raises(PackError, match="do not add up"):
        unpack(cut)
    garbled = bytearray(data)
    garbled[8:20] = b"not json at!"
    bad = ArrayRecord(
        {PACKED_KEY: Array(dtype="uint8", shape=(1,), stype=p[PACKED_KEY].stype, data=bytes(garbled))}
    )
    with pytest.raises(PackError, match="unreadable layout"):
        unpack(bad)
