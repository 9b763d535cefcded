"""Broker's JSON data model: the spec's example messages (Broker doc/web-socket.rst) and the
frames a real Zeek 8.2.2 exchanged (../shared/fixtures/zeek-8.2.2/websocket)."""

import ipaddress
import json

import pytest

from iotcls.bridge import broker_json as bj
from iotcls.testing.shared import require, zeek_fixtures_dir

FIX = require(zeek_fixtures_dir() / "websocket", module=True)
FRAMES = [json.loads(line) for line in (FIX / "frames.jsonl").read_text().splitlines()]


def frame(note: str, direction: str = "zeek") -> object:
    return next(f["frame"] for f in FRAMES if f["note"].startswith(note) and f["dir"] == direction)


def raw_sample() -> bytes:
    return frame("Probe::sample")["latin1"].encode("latin-1")


# -- the spec's examples, verbatim (web-socket.rst; the vector and set examples lack their
# -- enclosing braces there and are wrapped here) --------------------------------------------
SPEC_VALUES = [
    ('{"@data-type": "none", "data": {}}', None),
    ('{"@data-type": "boolean", "data": true}', True),
    ('{"@data-type": "boolean", "data": false}', False),
    ('{"@data-type": "count", "data": 123}', bj.Count(123)),
    ('{"@data-type": "integer", "data": -7}', bj.Integer(-7)),
    ('{"@data-type": "real", "data": -7.5}', -7.5),
    ('{"@data-type": "timespan", "data": "1500ms"}', bj.Timespan(1_500_000_000)),
    (
        '{"@data-type": "timestamp", "data": "2022-04-10T07:00:00.000"}',
        bj.Timestamp(1_649_574_000 * 10**9),
    ),
    ('{"@data-type": "string", "data": "Hello World!"}', "Hello World!"),
    ('{"@data-type": "enum-value", "data": "foo"}', bj.Enum("foo")),
    ('{"@data-type": "address", "data": "2001:db8::"}', ipaddress.ip_address("2001:db8::")),
    (
        '{"@data-type": "subnet", "data": "255.255.255.0/24"}',
        ipaddress.ip_network("255.255.255.0/24"),
    ),
    ('{"@data-type": "port", "data": "8080/tcp"}', bj.Port(8080, "tcp")),
    (
        '{"@data-type": "vector", "data": [{"@data-type": "count", "data": 42},'
        ' {"@data-type": "integer", "data": 23}]}',
        [bj.Count(42), bj.Integer(23)],
    ),
    (
        '{"@data-type": "set", "data": [{"@data-type": "string", "data": "foo"},'
        ' {"@data-type": "string", "data": "bar"}]}',
        frozenset({"foo", "bar"}),
    ),
    (
        '{"@data-type": "table", "data": [{"key": {"@data-type": "string", "data": "first-name"},'
        ' "value": {"@data-type": "string", "data": "John"}}, {"key": {"@data-type": "string",'
        ' "data": "last-name"}, "value": {"@data-type": "string", "data": "Doe"}}]}',
        {"first-name": "John", "last-name": "Doe"},
    ),
]


@pytest.mark.parametrize("text,value", SPEC_VALUES, ids=[t[15:35] for t, _ in SPEC_VALUES])
def test_spec_values_decode_and_encode_back(text, value):
    obj = json.loads(text)
    got = bj.decode(obj)
    assert got == value and type(got) is type(value)
    back = bj.encode(got)
    if isinstance(value, frozenset):  # a Python set has no order; Broker's is its own

        def key(x):
            return json.dumps(x, sort_keys=True)

        back["data"].sort(key=key)
        obj["data"].sort(key=key)
    assert back == obj


def test_spec_data_message_ack_and_error():
    msg = bj.decode_message(
        json.loads(
            '{"type": "data-message", "topic": "/foo/bar", "@data-type": "count", "data": 1}'
        )
    )
    assert msg == bj.DataMessage("/foo/bar", bj.Count(1))
    ack = bj.decode_message(
        json.loads(
            '{"type": "ack", "endpoint": "925c9110-5b87-57d9-9d80-b65568e87a44",'
            ' "version": "2.2.0-22"}'
        )
    )
    assert ack == bj.Ack("925c9110-5b87-57d9-9d80-b65568e87a44", "2.2.0-22")
    err = bj.decode_message(
        json.loads(
            '{"type": "error", "code": "deserialization_failed", "context": "input #1 contained'
            ' malformed JSON -> caf::pec::unexpected_character(1, 1)"}'
        )
    )
    assert err == bj.ErrorMessage(
        "deserialization_failed",
        "input #1 contained malformed JSON -> caf::pec::unexpected_character(1, 1)",
    )


SPEC_EVENT = {
    "type": "data-message",
    "topic": "/foo/bar",
    "@data-type": "vector",
    "data": [
        {"@data-type": "count", "data": 1},
        {"@data-type": "count", "data": 1},
        {
            "@data-type": "vector",
            "data": [
                {"@data-type": "string", "data": "event_1"},
                {
                    "@data-type": "vector",
                    "data": [
                        {"@data-type": "integer", "data": 42},
                        {"@data-type": "string", "data": "test"},
                    ],
                },
            ],
        },
    ],
}


def test_spec_event_both_ways():
    msg = bj.decode_message(SPEC_EVENT)
    ev = bj.decode_event(msg.data)
    assert ev == bj.Event("event_1", (bj.Integer(42), "test"), None)
    sent = bj.event_message("/foo/bar", "event_1", [bj.Integer(42), "test"])
    assert json.loads(sent) == SPEC_EVENT


def test_spec_event_with_network_timestamp_metadata():
    obj = json.loads(json.dumps(SPEC_EVENT))
    obj["data"][2]["data"].append(
        {
            "@data-type": "vector",
            "data": [
                {
                    "@data-type": "vector",
                    "data": [
                        {"@data-type": "count", "data": 1},
                        {"@data-type": "timestamp", "data": "2023-04-18T14:13:14.000"},
                    ],
                }
            ],
        }
    )
    ev = bj.decode_event(bj.decode_message(obj).data)
    ts = bj.Timestamp(1_681_827_194 * 10**9)
    assert ev.metadata == ((1, ts),) and ev.network_time() == ts
    back = bj.event_message("/foo/bar", "event_1", [bj.Integer(42), "test"], metadata=[(1, ts)])
    assert json.loads(back) == obj


# -- what Zeek 8.2.2 sent and received -------------------------------------------------------
def test_zeek_ack():
    assert bj.decode_message(frame("ack")) == bj.Ack(
        "98c8278f-27b3-595b-8110-f94728c0396e-websocket-0", "8.2.2"
    )


def test_zeek_error_replies():
    replies = [bj.decode_message(f["frame"]) for f in FRAMES if f["note"] == "reply"]
    assert replies == [
        bj.ErrorMessage("deserialization_failed", "failed to create Zeek event"),
        bj.ErrorMessage("deserialization_failed", "failed to decode JSON object"),
        bj.ErrorMessage("deserialization_failed", "no topic in top-level JSON object"),
        bj.ErrorMessage("deserialization_failed", "failed to create Zeek event"),
    ]


def test_zeek_sample_frame_every_type_raw_bytes():
    raw = raw_sample()
    with pytest.raises(UnicodeDecodeError) as e:
        raw.decode("utf-8")
    assert e.value.start == frame("Probe::sample")["invalid_utf8_at"] == 1223
    obj, lenient = bj.parse_frame(raw)
    assert lenient
    msg = bj.decode_message(obj)
    assert msg.topic == "probe/out"
    ev = bj.decode_event(msg.data)
    assert ev.name == "Probe::sample" and ev.metadata is None
    assert list(ev.args[:-1]) == [
        bj.Count(42),
        bj.Integer(-7),
        3.25,
        "hello",
        True,
        ipaddress.ip_address("192.168.1.10"),
        ipaddress.ip_address("2001:db8::1"),
        bj.Port(8080, "tcp"),
        ipaddress.ip_network("10.0.0.0/8"),
        bj.Timestamp(1_700_000_000_123_000_000),  # 1700000000.123456 truncated to ms
        bj.Timespan(1_500_000_000),
        [bj.Count(1), bj.Count(2), bj.Count(3)],
        frozenset({"x"}),
        {"k": bj.Count(1)},
        [bj.Count(1), "x", None],  # Rec($a=1, $b="x"): unset optional field -> none
        bj.Enum("tcp"),
    ]
    assert [type(a) for a in ev.args[:2]] == [bj.Count, bj.Integer]
    # "\x00\x01\x7f\x80\xff\"\\\x0a\x0b" in Zeek: the exact bytes come back
    assert bj.string_bytes(ev.args[-1]) == b'\x00\x01\x7f\x80\xff"\\\n\x0b'


def test_render_zeek_reproduces_zeeks_bytes():
    raw = raw_sample()
    ev = bj.decode_event(bj.decode_message(bj.parse_frame(raw)[0]).data)
    assert bj.render_zeek("probe/out", bj.encode_event(ev.name, ev.args)) == raw
    assert bj.render_zeek("x", 3.25).endswith(b'"@data-type":"real","data":3.250000}')


def test_client_frames_as_recorded():
    """The encoder produces what the recording client sent (and Zeek accepted)."""
    args = [
        "CHhAvVGS1DHFjwGM9",
        bj.Count(3),
        0.875,
        ["payload"],
        True,
        bj.Timestamp(1_700_000_000_123_000_000),
        bj.Timespan(1_500_000_000),
    ]
    sent = bj.event_message("probe/in", "Probe::label", args)
    assert json.loads(sent) == frame("valid event", "client")
    bad = bj.event_message("probe/in", "Probe::label", [args[0], bj.Integer(3), *args[2:]])
    assert json.loads(bad) == frame("integer where", "client")
    assert json.loads(bj.event_message("probe/in", "Probe::done", [])) == frame("done", "client")
    # and Zeek read these values as it printed them (zeek-side.txt)
    zeek_side = (FIX / "zeek-side.txt").read_text()
    assert "label, CHhAvVGS1DHFjwGM9, 3, 0.875000, [payload], T, 1700000000.123000" in zeek_side
    assert f"{bj.Timestamp.parse('2023-11-14T22:13:20.123').seconds:.6f}" == "1700000000.123000"
    assert bj.Timespan.parse("1500ms").seconds == 1.5


# -- encoding rules -------------------------------------------------------------------------
def test_counts_are_json_integers_and_ints_pick_their_type():
    assert bj.encode(bj.Count(3)) == {"@data-type": "count", "data": 3}
    assert type(bj.encode(bj.Count(3))["data"]) is int
    assert bj.encode(7) == {"@data-type": "count", "data": 7}
    assert bj.encode(-7) == {"@data-type": "integer", "data": -7}
    assert bj.encode(bj.Integer(7)) == {"@data-type": "integer", "data": 7}
    assert b'"data":3}' in bj.dumps("t", bj.Count(3))
    with pytest.raises(bj.BrokerJSONError):
        bj.Count(-1)
    with pytest.raises(bj.BrokerJSONError):
        bj.Count(2**64)
    with pytest.raises(bj.BrokerJSONError, match=r"\$\[1\]: count needs JSON integer"):
        bj.decode(
            {
                "@data-type": "vector",
                "data": [{"@data-type": "count", "data": 1}, {"@data-type": "count", "data": 1.0}],
            }
        )
    with pytest.raises(bj.BrokerJSONError, match="out of range"):
        bj.decode({"@data-type": "count", "data": -1})


def test_reals_always_carry_a_decimal_point():
    assert bj.dumps("t", 3.0).endswith(b'"data":3.0}')
    assert bj.dumps("t", 1e-05).endswith(b'"data":0.00001}')
    assert bj.dumps("t", 1e16).endswith(b'"data":10000000000000000.0}')
    assert bj.dumps("t", 0.875).endswith(b'"data":0.875}')
    for bad in (float("nan"), float("inf")):
        with pytest.raises(bj.BrokerJSONError):
            bj.dumps("t", bad)


def test_timestamps_have_millisecond_resolution_as_broker_writes_them():
    assert bj.Timestamp.from_seconds(1700000000.123456).iso() == "2023-11-14T22:13:20.123"
    assert bj.Timestamp.from_seconds(1700000000.9999).iso() == "2023-11-14T22:13:20.999"
    assert bj.Timestamp.from_seconds(1700000000).iso() == "2023-11-14T22:13:20.000"
    assert bj.Timestamp.parse("2023-11-14T22:13:20.123456789Z").ns == 1_700_000_000_123_456_789
    assert bj.Timestamp.parse("2023-11-14T23:13:20+01:00").ns == 1_700_000_000 * 10**9
    for bad in ("2023-13-01T00:00:00", "yesterday", "2023-11-14 22:13:20"):
        with pytest.raises(bj.BrokerJSONError):
            bj.Timestamp.parse(bad)


def test_timespans_pick_the_coarsest_exact_unit():
    cases = {
        0: "0s",
        1: "1ns",
        1000: "1us",
        1500: "1500ns",
        1_500_000: "1500us",
        1_500_000_000: "1500ms",
        90 * 10**9: "90s",
        106_685_876: "106685876ns",
    }
    for ns, text in cases.items():
        assert bj.Timespan(ns).text() == text
        assert bj.Timespan.parse(text).ns == ns
    assert bj.Timespan.parse("2min").seconds == 120 and bj.Timespan.parse("1h").seconds == 3600
    assert bj.Timespan.parse("1d").seconds == 86400 and bj.Timespan.parse("-5ms").ns == -5_000_000
    with pytest.raises(bj.BrokerJSONError):
        bj.Timespan.parse("5 parsecs")


def test_nested_round_trip_of_every_type():
    value = [
        None,
        True,
        bj.Count(2**64 - 1),
        bj.Integer(-(2**63)),
        -0.5,
        "ünï\x00",
        bj.Enum("udp"),
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_network("2001:db8::/32"),
        bj.Port(53, "udp"),
        bj.Port(0, "?"),
        bj.Timestamp(1_700_000_000_123_000_000),
        bj.Timespan(42),
        frozenset({(bj.Count(1), "a"), (bj.Count(2), "b")}),
        {(ipaddress.ip_address("::1"), bj.Port(80, "tcp")): [bj.Count(1)], "k": {}},
    ]
    obj, lenient = bj.parse_frame(bj.dumps("topic/x", value))
    assert not lenient
    msg = bj.decode_message(obj)
    assert msg.topic == "topic/x" and msg.data == value


def test_parse_frame_reads_zeeks_escapes_and_rejects_garbage():
    # \v is no JSON escape, but Zeek writes it; "\\v" is an escaped backslash, then v
    obj, lenient = bj.parse_frame(b'{"a":"x\\vy","b":"\\\\v"}')
    assert lenient and obj == {"a": "x\x0by", "b": "\\v"}
    obj, lenient = bj.parse_frame(b'{"a":"\xff\x00"}')
    assert lenient and bj.string_bytes(obj["a"]) == b"\xff\x00"
    for garbage in (b"{not json", b"", b"\xff\xfe", b'{"a":'):
        with pytest.raises(bj.BrokerJSONError):
            bj.parse_frame(garbage)


def test_decode_errors_name_the_place():
    with pytest.raises(bj.BrokerJSONError, match=r"\$\[0\]\.value: unknown @data-type 'blob'"):
        bj.decode(
            {
                "@data-type": "table",
                "data": [
                    {
                        "key": {"@data-type": "count", "data": 1},
                        "value": {"@data-type": "blob", "data": 1},
                    }
                ],
            }
        )
    with pytest.raises(bj.BrokerJSONError, match="invalid address"):
        bj.decode({"@data-type": "address", "data": "10.0.0.256"})
    with pytest.raises(bj.BrokerJSONError, match="invalid port"):
        bj.decode({"@data-type": "port", "data": "80/sctp"})
    with pytest.raises(bj.BrokerJSONError, match="unknown message type"):
        bj.decode_message({"type": "hello"})
    assert bj.decode_event([bj.Count(1), bj.Count(2), ["x", []]]) is None  # not an event
    assert bj.decode_event([1, 1, ["x", []]]) is None  # plain ints are no Broker counts


def test_parse_frame_has_a_depth_limit():
    """Python's parser recurses per bracket: 100,000 of them raised RecursionError, no
    ValueError, which stopped the service. Brackets inside strings do not count."""
    from iotcls.bridge import safejson

    for deep in (b"[" * 100_000, b"[" * 65 + b"]" * 65, b'{"a":' * 70 + b"1" + b"}" * 70):
        with pytest.raises(bj.BrokerJSONError, match=r"levels deep, the limit is 64"):
            bj.parse_frame(deep)
    ok = b"[" * 64 + b"]" * 64
    assert bj.parse_frame(ok)[0] is not None
    assert bj.parse_frame(b'{"s":"' + b"[" * 5000 + b'"}')[0] == {"s": "[" * 5000}
    assert safejson.depth(b'["\\"[[[", [1]]') == 2


def test_the_codec_raises_only_its_own_error():
    """Numbers and durations Python cannot hold are Broker JSON errors, not OverflowError
    or Python's integer digit limit."""
    for node in (
        {"@data-type": "real", "data": 10**400},
        {"@data-type": "timespan", "data": "9" * 5000 + "ns"},
        {"@data-type": "timespan", "data": "1" + "0" * 40 + "s"},
        {"@data-type": "count", "data": 2**64},
        {"@data-type": ["vector"], "data": []},
    ):
        with pytest.raises(bj.BrokerJSONError):
            bj.decode(node)
