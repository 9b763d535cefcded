"""The bridge <-> scorer messages: exact round trips, and every kind of garbage refused."""

import msgpack
import numpy as np
import pytest

from iotcls import wire


def test_request_round_trip_keeps_matrices_bit_exact():
    m = np.random.default_rng(1).random((3, 6, 203), dtype=np.float32)
    m[0, 0, 0] = -0.0
    m[2, 5, 202] = np.float32(1e-38)
    got = wire.decode(wire.encode(wire.Request(7, m, [10, 11, 12])))
    assert isinstance(got, wire.Request)
    assert got.batch == 7 and got.refs == [10, 11, 12]
    assert got.matrices.dtype == np.float32 and got.matrices.shape == (3, 6, 203)
    assert got.matrices.tobytes() == m.tobytes()


def test_request_from_non_contiguous_float64_is_converted():
    m = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 4, 3).transpose(0, 2, 1)
    got = wire.decode(wire.encode(wire.Request(1, m, [0, 1])))
    np.testing.assert_array_equal(got.matrices, m.astype(np.float32))


def test_every_message_kind_round_trips():
    msgs = [
        wire.Hello("s0", 42, "host", "default-model@abc", {"history": 5}, "cpu", 256),
        wire.Welcome(2, 1.5),
        wire.Reject("layout differs"),
        wire.Heartbeat(),
        wire.Reply(
            3,
            ["Aria", "HueBridge"],
            [0.5, 1.0],
            [True, False],
            ["-", "low_confidence"],
            [["payload", "sizes"], []],
            "m@1",
            1.25,
        ),
        wire.Failure(4, "boom"),
        wire.Stop(),
        wire.Bye("stopping"),
    ]
    for m in msgs:
        assert wire.decode(wire.encode(m)) == m


@pytest.mark.parametrize(
    "data, kind, text",
    [
        (b"", "malformed", "not msgpack"),
        (b"\xc1garbage", "malformed", "not msgpack"),
        (b"\x93\x01\x02", "malformed", "not msgpack"),  # truncated array
        (msgpack.packb([1, 2, 3]), "malformed", "a msgpack list without 'v'"),
        (msgpack.packb({"t": "hb"}), "malformed", "without 'v'"),
        (msgpack.packb({"v": 2, "t": "req"}), "version", "wire version 2 (kind 'req')"),
        (msgpack.packb({"v": "1", "t": "hb"}), "version", "wire version '1'"),
        (msgpack.packb({"v": 1, "t": "nope"}), "malformed", "unknown message kind 'nope'"),
        (msgpack.packb({1: 1}), "malformed", "not msgpack"),  # non-string map key
    ],
)
def test_garbage_is_a_wire_error(data, kind, text):
    with pytest.raises(wire.WireError) as e:
        wire.decode(data)
    assert e.value.kind == kind
    assert text in str(e.value)


def _req(**over):
    d = {"v": 1, "t": "req", "id": 1, "shape": [2, 1, 3], "m": b"\0" * 24, "refs": [5, 6]}
    d.update(over)
    return msgpack.packb(d, use_bin_type=True)


@pytest.mark.parametrize(
    "over, text",
    [
        ({"shape": [2, 1]}, "bad shape [2, 1]"),
        ({"shape": [2, 0, 3]}, "bad shape"),
        ({"m": b"\0" * 23}, "23 matrix bytes for shape [2, 1, 3]"),
        ({"m": "text"}, "'m' has type str"),
        ({"refs": [5]}, "'refs' has 1 entries, expected 2"),
        ({"refs": [5, "x"]}, "'refs' holds a str"),
        ({"refs": [5, True]}, "'refs' holds a bool"),
        ({"id": 1.5}, "'id' has type float"),
    ],
)
def test_malformed_request_fields(over, text):
    with pytest.raises(wire.WireError, match="req message") as e:
        wire.decode(_req(**over))
    assert text in str(e.value)


def test_reply_with_ragged_fields_is_refused():
    r = wire.Reply(1, ["a", "b"], [0.5, 0.5], [True, True], ["-", "-"], [[], []])
    d = msgpack.unpackb(wire.encode(r))
    d["trusted"] = [True]
    with pytest.raises(wire.WireError, match="'trusted' has 1 entries, expected 2"):
        wire.decode(msgpack.packb(d))
    d["trusted"] = [1, 0]
    with pytest.raises(wire.WireError, match="'trusted' holds a int"):
        wire.decode(msgpack.packb(d))
    d["trusted"] = [True, False]
    d["groups"] = [["a"], [3]]
    with pytest.raises(wire.WireError, match="'groups' holds a non-string"):
        wire.decode(msgpack.packb(d))


def test_oversized_message_is_refused_before_parsing(monkeypatch):
    monkeypatch.setattr(wire, "MAX_MESSAGE_BYTES", 1000)
    with pytest.raises(wire.WireError, match="message of 1001 bytes exceeds 1000"):
        wire.decode(b"\0" * 1001)


def test_hints_and_explained_round_trip():
    m = np.zeros((2, 1, 3), np.float32)
    h = wire.Hints([True, False], ["", "cam"], [False, True])
    got = wire.decode(wire.encode(wire.Request(3, m, [1, 2], h)))
    assert got.hints == h
    assert wire.decode(wire.encode(wire.Request(3, m, [1, 2]))).hints is None
    r = wire.Reply(
        3,
        ["a", "b"],
        [0.5, 0.5],
        [True, False],
        ["-", "x"],
        [[], []],
        "m",
        1.0,
        explained=[True, False],
    )
    assert wire.decode(wire.encode(r)) == r
    d = msgpack.unpackb(wire.encode(wire.Request(3, m, [1, 2], h)))
    d["due"] = [True]
    with pytest.raises(wire.WireError, match="'due' has 1 entries, expected 2"):
        wire.decode(msgpack.packb(d, use_bin_type=True))


def test_identities_round_trip_and_are_checked():
    """A request's per-record DHCP identities (None where a device showed none) survive the
    wire; a bridge without them sends none; a wrong count or type is a WireError."""
    m = np.zeros((2, 1, 3), np.float32)
    ids = ["host=HS110(EU) vendor=udhcp 0.9.9-pre", None]
    got = wire.decode(wire.encode(wire.Request(3, m, [1, 2], None, ids)))
    assert got.identities == ids and got.hints is None
    assert wire.decode(wire.encode(wire.Request(3, m, [1, 2]))).identities is None
    d = msgpack.unpackb(wire.encode(wire.Request(3, m, [1, 2], None, ids)))
    for bad, what in (
        ([None], "'ids' has 1 entries, expected 2"),
        ([1, None], "'ids' holds a int"),
    ):
        d["ids"] = bad
        with pytest.raises(wire.WireError, match=what):
            wire.decode(msgpack.packb(d, use_bin_type=True))


def test_hello_carries_the_model_classes():
    h = wire.Hello("s0", 42, "host", "m@1", {"history": 5}, "cpu", 256, "logged", ["a", "b"])
    assert wire.decode(wire.encode(h)) == h
    old = wire.Hello("s0", 42, "host", "m@1", {"history": 5}, "cpu", 256)  # an older scorer
    assert wire.decode(wire.encode(old)).classes is None
    d = msgpack.unpackb(wire.encode(h), raw=False)
    d["classes"] = ["a", 3]
    with pytest.raises(wire.WireError, match="'classes' holds a int"):
        wire.decode(msgpack.packb(d))
