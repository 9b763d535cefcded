"""Flow records in, labels out: the iotcls events on Zeek's WebSocket API.

Zeek (``zeek-scripts/iotcls/main.zeek``) publishes each ended window as
``IoTClass::flow(rec: IoTClass::FlowRecord)``; the record travels as a Broker vector of its
16 fields in :class:`iotcls.schema.FlowRecord` order. :func:`flow_record` reads it with a fast
path specialised to exactly that shape (one pass over the parsed JSON, no generic decoding);
anything unexpected falls back to :func:`flow_record_generic`, which goes through the full
codec and names the offending field. Tests check that both agree.

Times. Zeek's packet times are whole microseconds (libpcap) and the wire keeps them: ``start``
and ``last`` are reals printed with six decimals, offsets are intervals in (truncated)
nanoseconds of a difference of doubles. Both are rounded back to whole microseconds here and
turned into floats exactly as iotcls.flows forms them (:func:`us_to_time`,
:func:`us_to_offset`), so the same packets give the same floats on both sensors.

The native capture plugin publishes records in batches instead, packed one record a line of
text: ``IoTClass::flows(recs: vector of string)``, final and early records together. The
packed format is defined once, below (:func:`packed_flow_record`, its inverse
:func:`pack_flow_record`); a line decodes to exactly the FlowRecord of the JSON path.

Labels go back as ``IoTClass::label(l: IoTClass::Label)``, built from a
:class:`iotcls.logschema.LogEntry` (:func:`label_message`); the record's fields are those of
iot_class.log with the connection id flattened and ``ts`` a real (µs kept).
"""

from __future__ import annotations

import ipaddress
import json
import re
from binascii import a2b_base64, b2a_base64, unhexlify
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from iotcls.logschema import LogEntry
from iotcls.schema import FlowRecord, proto_name

from . import broker_json as bj

FLOW_EVENT = "IoTClass::flow"
WELCOME_EVENT = "IoTClass::welcome"
DRAIN_EVENT = "IoTClass::drain"
HELLO_EVENT = "IoTClass::hello"
LABEL_EVENT = "IoTClass::label"
EARLY_FLOW_EVENT = "IoTClass::early_flow"  # the early record of a window (schema.early_record)
EARLY_LABEL_EVENT = "IoTClass::early_label"  # its label: for the device log, not iot_class.log
DRAINED_EVENT = "IoTClass::drained"
ACK_EVENT = "IoTClass::ack"  # the bridge is done with these records: Zeek stops keeping them
SHED_EVENT = "IoTClass::shed"  # the bridge dropped these records unlabelled, for a reason

# IoTClass::FlowRecord, in order: (field, Broker @data-type). Field names are those of
# iotcls.schema.FlowRecord (a test checks both and the Zeek record).
FLOW_FIELDS: tuple[tuple[str, str], ...] = (
    ("device_mac", "string"),
    ("device_ip", "address"),
    ("device_port", "count"),
    ("remote_ip", "address"),
    ("remote_port", "count"),
    ("proto", "count"),
    ("start", "real"),
    ("last", "real"),
    ("total_bytes", "count"),
    ("total_packets", "count"),
    ("offsets", "vector"),  # of timespan
    ("sizes", "vector"),  # of count
    ("directions", "vector"),  # of count
    ("payloads", "vector"),  # of string (hex)
    ("uid", "string"),
    ("device_is_orig", "boolean"),
)
FLOW_TYPES = tuple(t for _, t in FLOW_FIELDS)

# IoTClass::RecordId, in order: (field, Broker @data-type): how the bridge names a record to
# Zeek in IoTClass::ack and IoTClass::shed (a label names its record by the same fields).
RECORD_ID_FIELDS: tuple[tuple[str, str], ...] = (
    ("uid", "string"),
    ("device_mac", "string"),
    ("device_ip", "address"),
    ("start", "real"),
)

# IoTClass::Label, in order: (field, Broker @data-type).
LABEL_FIELDS: tuple[tuple[str, str], ...] = (
    ("ts", "real"),
    ("uid", "string"),
    ("orig_h", "address"),
    ("orig_p", "port"),
    ("resp_h", "address"),
    ("resp_p", "port"),
    ("device_mac", "string"),
    ("device_ip", "address"),
    ("label", "string"),
    ("confidence", "real"),
    ("strategy", "string"),
    ("n_flows", "count"),
    ("trusted", "boolean"),
    ("reason", "string"),
    ("top_groups", "vector"),  # of string
    ("model", "string"),
)


class RecordError(ValueError):
    """An IoTClass event that does not have the declared shape; the message says where."""


def us_to_time(us: int) -> float:
    """An absolute time in whole microseconds to float seconds as Zeek forms it from a pcap
    header (``tv_sec + tv_usec / 1e6``), which is also how iotcls.flows forms ``start``."""
    sec, usec = divmod(us, 1_000_000)
    return sec + usec / 1e6


def us_to_offset(us: int) -> float:
    """A time offset in whole microseconds to float seconds as iotcls.flows forms offsets
    (integer nanoseconds / 1e9)."""
    return (us * 1000) / 1e9


# What a record's times may be: seconds since the epoch (until year 2242), offsets from the
# window start up to 10^18 ns. Beyond, the arithmetic overflows or the matrix row is not
# finite: such a record is refused here, one record, with a reason.
MAX_TIME_S = float(2**33)
MAX_OFFSET_NS = 10**18


def _time(x: float) -> float:
    if not 0.0 <= x <= MAX_TIME_S:  # NaN fails too
        raise ValueError(f"time {x!r} is not seconds since the epoch"[:80])
    return us_to_time(round(x * 1e6))


def _span_ns(s: str) -> int:
    """Zeek writes offsets in ns, us, ms or s (Broker picks the coarsest exact unit)."""
    if s[-2:] == "ns":
        return int(s[:-2])
    if s[-2:] == "us":
        return int(s[:-2]) * 1_000
    if s[-2:] == "ms":
        return int(s[:-2]) * 1_000_000
    return bj.Timespan.parse(s).ns


def _offset(ns: int) -> float:
    """Zeek's truncated nanoseconds to the whole microseconds they stand for (half up; a
    difference of two microsecond times never lies near a half microsecond)."""
    if not 0 <= ns <= MAX_OFFSET_NS:
        raise ValueError(f"offset of {ns} ns out of range"[:80])
    return ((ns + 500) // 1000 * 1000) / 1e9


def event_name(obj: Any) -> str | None:
    """The event name of a parsed data message, or None if it is no Zeek event."""
    try:
        d = obj["data"]
        if obj["@data-type"] != "vector" or len(d) != 3:
            return None
        body = d[2]["data"]
        name = body[0]
        return name["data"] if name["@data-type"] == "string" else None
    except (KeyError, IndexError, TypeError):
        return None


# -- the fast path on raw frames ---------------------------------------------------------------
# Broker renders an event deterministically (no spaces, "@data-type" before "data"); a frame
# that matches this pattern exactly is an IoTClass::flow event with plain field values and is
# read without building the JSON tree. Anything else (escapes in strings, other units, extra
# fields) does not match and goes through the JSON parser and the generic codec.
def _node(dtype: bytes, data: bytes) -> bytes:
    return rb'\{"@data-type":"' + dtype + rb'","data":' + data + rb"\}"


_F_MAC = _node(b"string", rb'"([0-9a-f:]*)"')
_F_UID = _node(b"string", rb'"([0-9A-Za-z_-]*)"')
_F_ADDR = _node(b"address", rb'"([0-9A-Fa-f.:]{2,45})"')
# JSON numbers: no leading zeros (the generic JSON parser refuses them; so must these)
_F_COUNT = _node(b"count", rb"(0|[1-9]\d{0,18})")
_F_REAL = _node(b"real", rb"(-?(?:0|[1-9]\d{0,19})\.\d{1,20})")
_F_BOOL = _node(b"boolean", rb"(true|false)")
_F_VEC = _node(b"vector", rb"\[([^\[\]]*)\]")
# The only metadata Zeek attaches (with EventMetadata::add_network_timestamp): network time.
_META_NETWORK_TIME = _node(
    b"vector",
    rb"\["
    + _node(
        b"vector",
        rb"\["
        + _node(b"count", b"1")
        + b","
        + _node(b"timestamp", rb'"[0-9T:.-]{19,30}"')
        + rb"\]",
    )
    + rb"\]",
)
_FLOW_RE = re.compile(
    rb'\{"type":"data-message","topic":"((?:[^"\\]|\\.)*)",'
    + rb'"@data-type":"vector","data":\['
    + _node(b"count", b"1")
    + b","
    + _node(b"count", b"1")
    + rb',\{"@data-type":"vector","data":\['
    + _node(b"string", b'"IoTClass::flow"')
    + rb',\{"@data-type":"vector","data":\[\{"@data-type":"vector","data":\['
    + b",".join(
        [
            _F_MAC,
            _F_ADDR,
            _F_COUNT,
            _F_ADDR,
            _F_COUNT,
            _F_COUNT,
            _F_REAL,
            _F_REAL,
            _F_COUNT,
            _F_COUNT,
            _F_VEC,
            _F_VEC,
            _F_VEC,
            _F_VEC,
            _F_UID,
            _F_BOOL,
        ]
    )
    + rb"\]\}\]\}(?:,"
    + _META_NETWORK_TIME
    + rb")?\]\}\]\}",
    re.S,
)

_COUNT_MAX = 2**64 - 1
_ip_cache: dict[bytes, str] = {}
_HEX_DIGITS = b"0123456789abcdef"


def _vector_parts(dtype: bytes, quoted: bool) -> tuple[bytes, bytes, bytes]:
    q = b'"' if quoted else b""
    head = b'{"@data-type":"' + dtype + b'","data":' + q
    tail = q + b"}"
    return head, tail, tail + b"," + head


_V_COUNT = _vector_parts(b"count", False)
_V_SPAN = _vector_parts(b"timespan", True)
_V_STRING = _vector_parts(b"string", True)


def _split(inner: bytes, parts: tuple[bytes, bytes, bytes]) -> list[bytes] | None:
    """The element values of a vector rendered by Broker (``{"@data-type":T,"data":V},...``),
    or None when *inner* is not exactly that. Splitting on the separator and checking the
    ends is exact: what lies between separators must then be a bare value, which the
    caller validates (digits, hex)."""
    if not inner:
        return []
    head, tail, sep = parts
    if not (inner.startswith(head) and inner.endswith(tail)):
        return None
    return inner[len(head) : len(inner) - len(tail)].split(sep)


def _counts(inner: bytes) -> list[int] | None:
    vals = _split(inner, _V_COUNT)
    if not vals:
        return vals
    if not b"".join(vals).isdigit() or not all(vals) or max(map(len, vals)) > 19:
        return None
    if any(v[0] == 48 and len(v) > 1 for v in vals):  # "07": not a JSON number
        return None
    return list(map(int, vals))


def _spans_ns(inner: bytes) -> list[int] | None:
    vals = _split(inner, _V_SPAN)
    if not vals:
        return vals
    joined = b",".join(vals) + b","
    if joined.count(b"ns,") == len(vals):  # the usual case: every offset in nanoseconds
        digits = joined.replace(b"ns,", b",")[:-1]
        if (
            b",," in b"," + digits + b","
            or not digits.replace(b",", b"").isdigit()
            or max(map(len, vals)) > 21
        ):
            return None
        return list(map(int, digits.split(b",")))
    out = []
    for v in vals:
        if v[-2:] == b"ns":
            d, scale = v[:-2], 1
        elif v[-2:] == b"us":
            d, scale = v[:-2], 1_000
        elif v[-2:] == b"ms":
            d, scale = v[:-2], 1_000_000
        elif v[-1:] == b"s":
            d, scale = v[:-1], 1_000_000_000
        else:
            return None
        if not d.isdigit() or len(d) > 19:
            return None
        out.append(int(d) * scale)
    return out


def _hexes(inner: bytes) -> list[bytes] | None:
    vals = _split(inner, _V_STRING)
    if not vals:
        return vals
    if b"".join(vals).translate(None, _HEX_DIGITS):
        return None
    try:
        return list(map(unhexlify, vals))
    except ValueError:  # odd length (binascii.Error)
        return None


def _ip(raw: bytes) -> str:
    s = _ip_cache.get(raw)
    if s is None:
        s = str(ipaddress.ip_address(raw.decode("ascii")))
        if len(_ip_cache) >= 65536:
            _ip_cache.clear()
        _ip_cache[raw] = s
    return s


def flow_record_raw(raw: bytes) -> FlowRecord | None:
    """The FlowRecord of a raw ``IoTClass::flow`` frame, or None when the frame is not in
    the plain shape (then parse it and use :func:`flow_record`)."""
    m = _FLOW_RE.fullmatch(raw)
    if m is None:
        return None
    (
        _,
        mac,
        dip,
        dport,
        rip,
        rport,
        proto,
        start,
        last,
        tbytes,
        tpkts,
        offs,
        sizes,
        dirs,
        pays,
        uid,
        orig,
    ) = m.groups()
    off_ns, sizes_i, dirs_i, payloads = _spans_ns(offs), _counts(sizes), _counts(dirs), _hexes(pays)
    if (
        off_ns is None
        or sizes_i is None
        or dirs_i is None
        or payloads is None
        or (off_ns and max(off_ns) > MAX_OFFSET_NS)
    ):
        return None
    ints = [int(dport), int(rport), int(proto), int(tbytes), int(tpkts)]
    if (
        max(ints) > _COUNT_MAX
        or (sizes_i and max(sizes_i) > _COUNT_MAX)
        or (dirs_i and max(dirs_i) > 1)
    ):
        return None
    try:
        return FlowRecord(
            device_mac=mac.decode(),
            device_ip=_ip(dip),
            device_port=ints[0],
            remote_ip=_ip(rip),
            remote_port=ints[1],
            proto=ints[2],
            start=_time(float(start)),
            last=_time(float(last)),
            total_bytes=ints[3],
            total_packets=ints[4],
            offsets=[((n + 500) // 1000 * 1000) / 1e9 for n in off_ns],
            sizes=sizes_i,
            directions=dirs_i,
            payloads=payloads,
            uid=uid.decode(),
            device_is_orig=orig == b"true",
        )
    except ValueError:  # an address Python does not read, vectors of unequal length
        return None


_ONE = {"@data-type": "count", "data": 1}
_FLOW_NAME = {"@data-type": "string", "data": FLOW_EVENT}
_EARLY_FLOW_NAME = {"@data-type": "string", "data": EARLY_FLOW_EVENT}


def flow_record(obj: Any) -> FlowRecord:
    """The FlowRecord of a parsed ``IoTClass::flow`` data message (a direct walk of the JSON
    tree; falls back to :func:`flow_record_generic` for anything unexpected)."""
    try:
        d = obj["data"]
        body = d[2]["data"]
        rec = body[1]["data"][0]
        if (
            obj["@data-type"] != "vector"
            or len(d) != 3
            or d[0] != _ONE
            or d[1] != _ONE
            or d[2]["@data-type"] != "vector"
            or len(body) not in (2, 3)
            or body[0] != _FLOW_NAME
            or body[1]["@data-type"] != "vector"
            or len(body[1]["data"]) != 1
            or rec["@data-type"] != "vector"
            or not isinstance(obj["topic"], str)
        ):
            raise ValueError
        if len(body) == 3:  # metadata: let the codec check it
            raise ValueError
        f = rec["data"]
        if len(f) != 16 or tuple(n["@data-type"] for n in f) != FLOW_TYPES:
            raise ValueError
        v = [n["data"] for n in f]
        off, siz, dirs, pay = v[10], v[11], v[12], v[13]
        offsets = [_offset(_span_ns(n["data"])) for n in off if n["@data-type"] == "timespan"]
        sizes = [n["data"] for n in siz if n["@data-type"] == "count"]
        directions = [n["data"] for n in dirs if n["@data-type"] == "count"]
        payloads = [bytes.fromhex(n["data"]) for n in pay if n["@data-type"] == "string"]
        if not (
            len(offsets) == len(off)
            and len(sizes) == len(siz)
            and len(directions) == len(dirs)
            and len(payloads) == len(pay)
        ):
            raise ValueError
        ints = (v[2], v[4], v[5], v[8], v[9], *sizes, *directions)
        if not all(type(x) is int and x >= 0 for x in ints):
            raise ValueError
        if not (
            type(v[0]) is str
            and type(v[14]) is str
            and type(v[15]) is bool
            and all(d in (0, 1) for d in directions)
        ):
            raise ValueError
        return FlowRecord(
            device_mac=v[0],
            device_ip=str(ipaddress.ip_address(v[1])),
            device_port=v[2],
            remote_ip=str(ipaddress.ip_address(v[3])),
            remote_port=v[4],
            proto=v[5],
            start=_time(v[6]),
            last=_time(v[7]),
            total_bytes=v[8],
            total_packets=v[9],
            offsets=offsets,
            sizes=sizes,
            directions=directions,
            payloads=payloads,
            uid=v[14],
            device_is_orig=v[15],
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError):
        return flow_record_generic(obj)


def early_flow_record(obj: Any) -> FlowRecord:
    """The FlowRecord of a parsed ``IoTClass::early_flow`` data message: the same record
    type as ``IoTClass::flow``, so the same decoder reads it (under the flow event's name)."""
    try:
        body = obj["data"][2]["data"]
        if body[0] != _EARLY_FLOW_NAME:
            raise RecordError(f"not an {EARLY_FLOW_EVENT} event")
        renamed = dict(
            obj, data=[*obj["data"][:2], dict(obj["data"][2], data=[_FLOW_NAME, *body[1:]])]
        )
    except (KeyError, IndexError, TypeError, AttributeError):
        raise RecordError(f"not an {EARLY_FLOW_EVENT} event") from None
    return flow_record(renamed)


def flow_record_generic(obj: Any) -> FlowRecord:
    """The same through the full codec; raises :class:`RecordError` naming the bad field."""
    try:
        msg = bj.decode_message(obj)
    except bj.BrokerJSONError as e:
        raise RecordError(f"flow event: {e}") from None
    ev = bj.decode_event(msg.data) if isinstance(msg, bj.DataMessage) else None
    if ev is None or ev.name != FLOW_EVENT:
        raise RecordError(f"not an {FLOW_EVENT} event")
    if len(ev.args) != 1 or not isinstance(ev.args[0], list):
        raise RecordError(f"{FLOW_EVENT}: expected one record argument")
    return record_from_values(ev.args[0])


def record_from_values(values: list) -> FlowRecord:
    """A FlowRecord from the decoded field values of ``IoTClass::FlowRecord``."""
    if len(values) != len(FLOW_FIELDS):
        raise RecordError(
            f"{FLOW_EVENT}: record has {len(values)} fields, expected {len(FLOW_FIELDS)}"
        )
    addr = (ipaddress.IPv4Address, ipaddress.IPv6Address)
    expect = {
        "string": str,
        "address": addr,
        "count": bj.Count,
        "real": float,
        "boolean": bool,
        "vector": list,
    }
    for (name, dtype), v in zip(FLOW_FIELDS, values):
        if not isinstance(v, expect[dtype]):
            raise RecordError(f"{FLOW_EVENT}: field {name} must be {dtype}, got {v!r}"[:200])
    vals = dict(zip((n for n, _ in FLOW_FIELDS), values))

    def items(name: str, kind: type) -> list:
        xs = vals[name]
        for i, x in enumerate(xs):
            if not isinstance(x, kind):
                raise RecordError(f"{FLOW_EVENT}: {name}[{i}] must be {kind.__name__}, got {x!r}")
        return xs

    try:
        payloads = [bytes.fromhex(p) for p in items("payloads", str)]
    except ValueError:
        raise RecordError(f"{FLOW_EVENT}: payloads must be hex strings") from None
    directions = [int(d) for d in items("directions", bj.Count)]
    if any(d not in (0, 1) for d in directions):
        raise RecordError(f"{FLOW_EVENT}: directions must be 0 or 1, got {directions}")
    try:
        return FlowRecord(
            device_mac=vals["device_mac"],
            device_ip=str(vals["device_ip"]),
            device_port=int(vals["device_port"]),
            remote_ip=str(vals["remote_ip"]),
            remote_port=int(vals["remote_port"]),
            proto=int(vals["proto"]),
            start=_time(vals["start"]),
            last=_time(vals["last"]),
            total_bytes=int(vals["total_bytes"]),
            total_packets=int(vals["total_packets"]),
            offsets=[_offset(s.ns) for s in items("offsets", bj.Timespan)],
            sizes=[int(s) for s in items("sizes", bj.Count)],
            directions=directions,
            payloads=payloads,
            uid=vals["uid"],
            device_is_orig=vals["device_is_orig"],
        )
    except (ValueError, OverflowError, TypeError) as e:
        raise RecordError(f"{FLOW_EVENT}: {e}"[:200]) from None


def zeek_times(r: FlowRecord) -> tuple[float, list[int]]:
    """``(start, offsets in ns)`` of *r* as Zeek computes them: the start a double from
    (sec, usec), each offset ``t - start`` of two such doubles truncated to nanoseconds
    (Broker's ``duration_cast``; the packed records' writer truncates the same way). Shared
    by :func:`flow_values` and :func:`pack_flow_record`, so both wires carry the same ns."""
    start_us = round(r.start * 1e6)
    t0 = us_to_time(start_us)
    return t0, [int((us_to_time(start_us + round(o * 1e6)) - t0) * 1e9) for o in r.offsets]


def flow_values(r: FlowRecord) -> list:
    """The Broker values Zeek sends for *r*, computed the way Zeek computes them: times as
    doubles from (sec, usec), offsets as ``t - start`` truncated to nanoseconds (Broker's
    ``duration_cast``). For tests and benchmarks; the scripts are the real producer."""
    t0, offsets_ns = zeek_times(r)
    return [
        r.device_mac,
        ipaddress.ip_address(r.device_ip),
        bj.Count(r.device_port),
        ipaddress.ip_address(r.remote_ip),
        bj.Count(r.remote_port),
        bj.Count(r.proto),
        t0,
        us_to_time(round(r.last * 1e6)),
        bj.Count(r.total_bytes),
        bj.Count(r.total_packets),
        [bj.Timespan(ns) for ns in offsets_ns],
        [bj.Count(s) for s in r.sizes],
        [bj.Count(d) for d in r.directions],
        [p.hex() for p in r.payloads],
        r.uid,
        bool(r.device_is_orig),
    ]


def flow_frame(topic: str, r: FlowRecord) -> bytes:
    """An ``IoTClass::flow`` frame byte for byte as Zeek sends it (tests, benchmarks)."""
    return bj.render_zeek(topic, bj.encode_event(FLOW_EVENT, [flow_values(r)]))


# -- packed flow records: IoTClass::flows ------------------------------------------------------
# Why: Broker's conversion of a FlowRecord's vectors is most of what publishing a record costs
# Zeek. The native capture plugin (zeek-plugin/) therefore writes each record as one line of
# text and publishes them in batches, ``IoTClass::flows(recs: vector of string)``, final and
# early records in publishing order. This is the one definition of that line.
#
# Packed format, version 2. One ASCII line per record, no newline, 17 fields separated by TAB:
#
#   0 kind           F2 (a final record: as IoTClass::flow) or E2 (early: as IoTClass::early_flow)
#   1 device_mac     text (no TAB, as in every text field), may be empty
#   2 device_ip      IPv4 dotted quad or IPv6 text, as Zeek prints an addr
#   3 device_port    count (decimal, no sign, no leading zeros; as for every count below)
#   4 remote_ip
#   5 remote_port    count
#   6 proto          count
#   7 start          a real printed with C's "%f" (six decimals), as Broker's JSON writes reals
#   8 last           the same
#   9 total_bytes    count
#  10 total_packets  count
#  11 offsets        comma-separated counts: ns since start, truncated as Broker converts an
#                    interval (duration_cast); empty field = no packets
#  12 sizes          comma-separated counts
#  13 directions     comma-separated, each 0 or 1
#  14 payloads       comma-separated base64 (RFC 4648's standard alphabet, padded), an element
#                    may be empty: with N packets (N = len(sizes)) the field splits on "," into
#                    N elements ("" is one empty payload when N == 1, ",," three); with N == 0
#                    it must be empty
#  15 uid            text
#  16 device_is_orig T or F
#
# A line decodes to exactly the FlowRecord the JSON path gives for the same record
# (tests/test_packed_records.py) and is checked as that path checks: counts in
# [0, 2^64 - 1], directions 0 or 1, the four vectors of one length, times by _time, offsets
# by _offset, addresses by ipaddress. Anything else is a RecordError naming the field.
#
# Version 1 (kind F or E, no digit) wrote payloads as lowercase hex. Why base64 now: payloads
# are most of a line, and Zeek's cost of publishing a line grows with its length (Broker
# copies it byte by byte); base64 is 2/3 of hex's length. Version 1 lines still decode: a
# spool file written before an upgrade is read back and published as it is.

FLOWS_EVENT = "IoTClass::flows"
PACKED_VERSION = 2
_PACKED_KINDS = {"F2": (False, 2), "E2": (True, 2), "F": (False, 1), "E": (True, 1)}
PACKED_FIELDS: tuple[str, ...] = ("kind", *(name for name, _ in FLOW_FIELDS))
_FLOWS_NAME = {"@data-type": "string", "data": FLOWS_EVENT}
_P_COUNT = r"(?:0|[1-9][0-9]{0,19})"
_P_COUNT_RE = re.compile(_P_COUNT)
_P_COUNTS_RE = re.compile(rf"{_P_COUNT}(?:,{_P_COUNT})*")
_P_DIRS_RE = re.compile(r"[01](?:,[01])*")
_P_REAL_RE = re.compile(r"(?:0|[1-9][0-9]{0,19})\.[0-9]{6}")
_P_HEX_RE = re.compile(r"[0-9a-f,]*")
_P_B64 = r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"
_P_B64S_RE = re.compile(rf"{_P_B64}(?:,{_P_B64})*")
_P_ADDR_RE = re.compile(r"[0-9A-Fa-f.:]{2,45}")


@lru_cache(maxsize=65536)
def _packed_ip(s: str) -> str:
    """The address as the JSON path writes it (``str(ip_address(...))``), cached: a sensor
    sees the same few device addresses over and over."""
    if not _P_ADDR_RE.fullmatch(s):  # no scope ids, no spaces: what Zeek never prints
        raise ValueError("is not an address")
    return str(ipaddress.ip_address(s))


def _packed_count(s: str) -> int:
    if not _P_COUNT_RE.fullmatch(s):
        raise ValueError("is not a count")
    v = int(s)
    if v > _COUNT_MAX:
        raise ValueError("is beyond a count")
    return v


def _packed_counts(s: str) -> list[int]:
    if not s:
        return []
    if not _P_COUNTS_RE.fullmatch(s):
        raise ValueError("is not comma-separated counts")
    vals = list(map(int, s.split(",")))
    if max(vals) > _COUNT_MAX:
        raise ValueError("holds a value beyond a count")
    return vals


def _packed_directions(s: str) -> list[int]:
    if s and not _P_DIRS_RE.fullmatch(s):
        raise ValueError("must be comma-separated 0 or 1")
    return [1 if d == "1" else 0 for d in s.split(",")] if s else []


def _packed_time(s: str) -> float:
    if not _P_REAL_RE.fullmatch(s):
        raise ValueError('is not a time written with "%f"')
    return _time(float(s))


def _packed_hex(s: str, n: int) -> list[bytes]:
    if not _P_HEX_RE.fullmatch(s):
        raise ValueError("is not comma-separated lowercase hex")
    try:
        return [bytes.fromhex(p) for p in s.split(",")] if n or s else []
    except ValueError:  # only hex digits are left: an odd number of them
        raise ValueError("holds hex of odd length") from None


def _packed_base64(s: str, n: int) -> list[bytes]:
    if not n and not s:
        return []
    if not _P_B64S_RE.fullmatch(s):
        raise ValueError("is not comma-separated padded base64")
    return [a2b_base64(p) for p in s.split(",")]


def _packed_error(name: str, why: str, text: str) -> RecordError:
    return RecordError(f"{FLOWS_EVENT}: {name} {why}: {text[:80]!r}")


def _parsed(f: list[str], i: int, parse: Callable[[str], Any]) -> Any:
    """Field *i* of a packed line through *parse*; its ValueError as a RecordError naming
    the field."""
    try:
        return parse(f[i])
    except (ValueError, OverflowError) as e:
        raise _packed_error(PACKED_FIELDS[i], str(e), f[i]) from None


def packed_flow_record(line: str) -> tuple[FlowRecord, bool]:
    """``(record, early)`` of one packed line (the format above): the FlowRecord the JSON path
    (:func:`flow_record`, :func:`early_flow_record`) gives for the same record. Raises
    :class:`RecordError` naming the field for anything else, and nothing but RecordError
    whatever the input (the fuzz suite checks): one bad line costs only itself."""
    if type(line) is not str:
        raise RecordError(f"{FLOWS_EVENT}: a record must be a string, not {type(line).__name__}")
    f = line.split("\t")
    if len(f) != len(PACKED_FIELDS):
        raise _packed_error("record", f"has {len(f)} fields, expected {len(PACKED_FIELDS)}", line)
    if not line.isascii():
        raise _packed_error("record", "is not ASCII", line)
    kind = _PACKED_KINDS.get(f[0])
    if kind is None:
        raise _packed_error("kind", "must be F2 or E2 (F or E: version 1)", f[0])
    early, version = kind
    if f[16] not in ("T", "F"):
        raise _packed_error("device_is_orig", "must be T or F", f[16])
    dip = _parsed(f, 2, _packed_ip)
    dport = _parsed(f, 3, _packed_count)
    rip = _parsed(f, 4, _packed_ip)
    rport = _parsed(f, 5, _packed_count)
    proto = _parsed(f, 6, _packed_count)
    start = _parsed(f, 7, _packed_time)
    last = _parsed(f, 8, _packed_time)
    tbytes = _parsed(f, 9, _packed_count)
    tpkts = _parsed(f, 10, _packed_count)
    offsets = _parsed(f, 11, lambda s: [_offset(ns) for ns in _packed_counts(s)])
    sizes = _parsed(f, 12, _packed_counts)
    directions = _parsed(f, 13, _packed_directions)
    payloads = _parsed(
        f, 14, lambda s: (_packed_base64 if version == 2 else _packed_hex)(s, len(sizes))
    )
    n = (len(offsets), len(sizes), len(directions), len(payloads))
    if min(n) != max(n):
        why = "differ in length ({}, {}, {}, {})".format(*n)
        raise _packed_error("offsets, sizes, directions and payloads", why, line)
    rec = FlowRecord(
        device_mac=f[1],
        device_ip=dip,
        device_port=dport,
        remote_ip=rip,
        remote_port=rport,
        proto=proto,
        start=start,
        last=last,
        total_bytes=tbytes,
        total_packets=tpkts,
        offsets=offsets,
        sizes=sizes,
        directions=directions,
        payloads=payloads,
        uid=f[15],
        device_is_orig=f[16] == "T",
    )
    return rec, early


def pack_flow_record(r: FlowRecord, early: bool = False, version: int = PACKED_VERSION) -> str:
    """The packed line of *r* as the native plugin writes it (times with "%f", offsets in ns
    as :func:`zeek_times` derives them): the inverse of :func:`packed_flow_record`, for tests
    and benchmarks (the plugin is the real producer); ``version=1`` as plugins before base64
    wrote it. A text field holding a TAB, or anything not ASCII, has no packed form:
    RecordError."""
    if version not in (1, 2):
        raise ValueError(f"packed format version {version} (1 or 2)")
    t0, offsets_ns = zeek_times(r)
    if version == 1:
        payloads = ",".join([bytes(p).hex() for p in r.payloads])
    else:
        payloads = ",".join([b2a_base64(bytes(p), newline=False).decode() for p in r.payloads])
    fields = (
        ("E" if early else "F") + ("" if version == 1 else str(version)),
        r.device_mac,
        str(ipaddress.ip_address(r.device_ip)),
        f"{r.device_port:d}",
        str(ipaddress.ip_address(r.remote_ip)),
        f"{r.remote_port:d}",
        f"{r.proto:d}",
        f"{t0:f}",
        f"{us_to_time(round(r.last * 1e6)):f}",
        f"{r.total_bytes:d}",
        f"{r.total_packets:d}",
        ",".join([f"{ns:d}" for ns in offsets_ns]),
        ",".join([f"{s:d}" for s in r.sizes]),
        ",".join([f"{d:d}" for d in r.directions]),
        payloads,
        r.uid,
        "T" if r.device_is_orig else "F",
    )
    if any("\t" in x for x in fields) or not all(x.isascii() for x in fields):
        raise RecordError(f"{FLOWS_EVENT}: record {r.uid!r} has a text field with no packed form")
    return "\t".join(fields)


def packed_records(obj: Any) -> list[str]:
    """The packed lines of a parsed ``IoTClass::flows`` data message (its one argument, a
    Broker vector of strings), undecoded: each is decoded on its own, so that a bad line
    costs only itself. An event of another shape is refused whole (RecordError)."""
    try:
        d = obj["data"]
        body = d[2]["data"]
        if not (
            obj["@data-type"] == "vector"
            and len(d) == 3
            and d[0] == _ONE
            and d[1] == _ONE
            and d[2]["@data-type"] == "vector"
            and len(body) in (2, 3)
            and body[0] == _FLOWS_NAME
            and body[1]["@data-type"] == "vector"
            and len(body[1]["data"]) == 1
            and isinstance(obj["topic"], str)
        ):
            raise ValueError
        # metadata (network time), which the bridge does not read: a vector is all it must be
        if len(body) == 3 and (
            body[2]["@data-type"] != "vector" or type(body[2]["data"]) is not list
        ):
            raise ValueError
        arg = body[1]["data"][0]
        nodes = arg["data"]
        if arg["@data-type"] != "vector" or type(nodes) is not list:
            raise ValueError
        lines = [n["data"] for n in nodes if n["@data-type"] == "string"]
        if len(lines) != len(nodes) or not all(type(s) is str for s in lines):
            raise ValueError
        return lines
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise RecordError(f"{FLOWS_EVENT}: not an event with one vector of strings") from None


def flows_frame(topic: str, lines: Iterable[str]) -> bytes:
    """An ``IoTClass::flows`` frame byte for byte as Zeek sends it (tests, benchmarks)."""
    return bj.render_zeek(topic, bj.encode_event(FLOWS_EVENT, [list(lines)]))


# -- labels ----------------------------------------------------------------------------------
_PORT_PROTO = {"tcp": "tcp", "udp": "udp", "icmp": "icmp"}


def label_values(e: LogEntry) -> list:
    """The Broker values of ``IoTClass::Label`` for a log entry."""
    proto = _PORT_PROTO.get(e.proto, "?")
    try:
        return [
            float(e.ts),
            e.uid,
            ipaddress.ip_address(e.orig_h),
            bj.Port(int(e.orig_p), proto),
            ipaddress.ip_address(e.resp_h),
            bj.Port(int(e.resp_p), proto),
            e.device_mac or "",
            ipaddress.ip_address(e.device_ip),
            e.label,
            float(e.confidence),
            e.strategy,
            bj.Count(int(e.n_flows)),
            bool(e.trusted),
            e.reason or "-",
            [str(g) for g in e.top_groups],
            e.model,
        ]
    except (ValueError, TypeError) as err:
        raise RecordError(f"label for {e.uid or e.device_ip}: {err}") from None


def label_message_generic(topic: str, e: LogEntry, early: bool = False) -> bytes:
    """The ``IoTClass::label`` (``early``: ``early_label``) frame through the generic codec
    (the reference)."""
    return bj.event_message(topic, EARLY_LABEL_EVENT if early else LABEL_EVENT, [label_values(e)])


def _label_head(event: str) -> str:
    return (
        '{"@data-type":"vector","data":[{"@data-type":"count","data":1},'
        '{"@data-type":"count","data":1},{"@data-type":"vector","data":['
        '{"@data-type":"string","data":"' + event + '"},{"@data-type":"vector","data":['
        '{"@data-type":"vector","data":['
    )


_LABEL_HEAD = _label_head(LABEL_EVENT)
_EARLY_LABEL_HEAD = _label_head(EARLY_LABEL_EVENT)
_LABEL_TAIL = "]}]}]}]}}"
_dumps = json.JSONEncoder(ensure_ascii=False).encode


@lru_cache(maxsize=65536)
def _addr_text(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def _real(x: float) -> str:
    return bj._real_text(float(x))


def label_message(topic: str, e: LogEntry, early: bool = False) -> bytes:
    """The ``IoTClass::label`` frame for one log entry (``early``: ``IoTClass::early_label``,
    the label of an early record): the same bytes as :func:`label_message_generic` (a test
    checks), formatted directly."""
    proto = _PORT_PROTO.get(e.proto, "?")
    try:
        n_flows = int(e.n_flows)
        orig_p, resp_p = int(e.orig_p), int(e.resp_p)
        if not (0 <= n_flows <= bj.COUNT_MAX and 0 <= orig_p <= 65535 and 0 <= resp_p <= 65535):
            raise ValueError("count or port out of range")
        parts = (
            '{"@data-type":"real","data":',
            _real(e.ts),
            '},{"@data-type":"string","data":',
            _dumps(e.uid),
            '},{"@data-type":"address","data":"',
            _addr_text(e.orig_h),
            '"},{"@data-type":"port","data":"',
            f"{orig_p}/{proto}",
            '"},{"@data-type":"address","data":"',
            _addr_text(e.resp_h),
            '"},{"@data-type":"port","data":"',
            f"{resp_p}/{proto}",
            '"},{"@data-type":"string","data":',
            _dumps(e.device_mac or ""),
            '},{"@data-type":"address","data":"',
            _addr_text(e.device_ip),
            '"},{"@data-type":"string","data":',
            _dumps(e.label),
            '},{"@data-type":"real","data":',
            _real(e.confidence),
            '},{"@data-type":"string","data":',
            _dumps(e.strategy),
            '},{"@data-type":"count","data":',
            str(n_flows),
            '},{"@data-type":"boolean","data":',
            "true" if e.trusted else "false",
            '},{"@data-type":"string","data":',
            _dumps(e.reason or "-"),
            '},{"@data-type":"vector","data":[',
            ",".join('{"@data-type":"string","data":' + _dumps(str(g)) + "}" for g in e.top_groups),
            ']},{"@data-type":"string","data":',
            _dumps(e.model),
            "}",
        )
        if not all(isinstance(x, str) for x in (e.uid, e.label, e.strategy, e.model)) or (
            e.reason and not isinstance(e.reason, str)
        ):
            raise TypeError("label fields must be strings")
    except (ValueError, TypeError, bj.BrokerJSONError) as err:
        raise RecordError(f"label for {e.uid or e.device_ip}: {err}") from None
    head = (
        '{"type":"data-message","topic":'
        + _dumps(topic)
        + ","
        + (_EARLY_LABEL_HEAD if early else _LABEL_HEAD)[1:]
    )
    return (head + "".join(parts) + _LABEL_TAIL[:-1]).encode("utf-8", "surrogateescape")


RecordId = tuple[str, str, str, float]  # uid, device MAC ("" when none), device IP, start


def record_ids_generic(ids: Iterable[RecordId]) -> list:
    """``vector of IoTClass::RecordId`` as Broker values (the reference for the encoders)."""
    return [[uid, mac, ipaddress.ip_address(ip), float(start)] for uid, mac, ip, start in ids]


def _ids_text(ids: Iterable[RecordId]) -> str:
    return ",".join(
        '{"@data-type":"vector","data":[{"@data-type":"string","data":'
        + _dumps(uid)
        + '},{"@data-type":"string","data":'
        + _dumps(mac)
        + '},{"@data-type":"address","data":"'
        + _addr_text(ip)
        + '"},{"@data-type":"real","data":'
        + _real(start)
        + "}]}"
        for uid, mac, ip, start in ids
    )


def _event_text(topic: str, event: str, args: str) -> bytes:
    return (
        '{"type":"data-message","topic":' + _dumps(topic) + ',"@data-type":"vector","data":['
        '{"@data-type":"count","data":1},{"@data-type":"count","data":1},'
        '{"@data-type":"vector","data":[{"@data-type":"string","data":"' + event + '"},'
        '{"@data-type":"vector","data":[' + args + "]}]}]}"
    ).encode("utf-8", "surrogateescape")


def ack_message(topic: str, ids: Iterable[RecordId]) -> bytes:
    """``IoTClass::ack(ids)``: the bridge is done with these records (labelled, their label
    held back by the log policy, or unusable); Zeek stops keeping them. The same bytes as
    the generic codec (a test checks)."""
    return _event_text(topic, ACK_EVENT, '{"@data-type":"vector","data":[' + _ids_text(ids) + "]}")


def shed_message(topic: str, ids: Iterable[RecordId], reason: str) -> bytes:
    """``IoTClass::shed(ids, reason)``: the bridge dropped these records unlabelled."""
    return _event_text(
        topic,
        SHED_EVENT,
        '{"@data-type":"vector","data":['
        + _ids_text(ids)
        + ']},{"@data-type":"string","data":'
        + _dumps(reason)
        + "}",
    )


def hello_message(topic: str, bridge: str, endpoint: str) -> bytes:
    return bj.event_message(topic, HELLO_EVENT, [bridge, endpoint])


def drained_message(topic: str, records: int, labels: int) -> bytes:
    return bj.event_message(topic, DRAINED_EVENT, [bj.Count(records), bj.Count(labels)])


@dataclass
class Verdict:
    """What a scorer says about one record (the label fields of iot_class.log)."""

    label: str
    confidence: float
    strategy: str = "flow"
    n_flows: int = 1
    trusted: bool = True
    reason: str = "-"
    top_groups: list[str] = field(default_factory=list)
    model: str = ""


def log_entry(r: FlowRecord, v: Any) -> LogEntry:
    """The iot_class.log entry of record *r* labelled *v* (a :class:`Verdict` or any object
    with ``label`` and ``confidence``, optionally the other Verdict fields)."""
    orig_h, orig_p, resp_h, resp_p = r.conn_id()
    return LogEntry(
        ts=r.start,
        uid=r.uid,
        orig_h=orig_h,
        orig_p=orig_p,
        resp_h=resp_h,
        resp_p=resp_p,
        proto=proto_name(r.proto),
        device_mac=r.device_mac,
        device_ip=r.device_ip,
        label=str(v.label),
        confidence=float(v.confidence),
        strategy=str(getattr(v, "strategy", "flow")),
        n_flows=int(getattr(v, "n_flows", 1)),
        trusted=bool(getattr(v, "trusted", True)),
        reason=str(getattr(v, "reason", "-") or "-"),
        top_groups=[str(g) for g in getattr(v, "top_groups", [])],
        model=str(getattr(v, "model", "")),
    )


@dataclass(frozen=True)
class Welcome:
    """Zeek's capture settings, from ``IoTClass::welcome``."""

    schema_version: int
    node: str
    window_s: float
    packets: int
    payload_bytes: int
    offline: bool


def control_event(obj: Any) -> bj.Event | None:
    """A decoded non-flow iotcls event (welcome, drain), or None for anything else."""
    try:
        msg = bj.decode_message(obj)
    except bj.BrokerJSONError:
        return None
    return bj.decode_event(msg.data) if isinstance(msg, bj.DataMessage) else None


def welcome_from(ev: bj.Event) -> Welcome:
    a = ev.args
    types = (bj.Count, str, bj.Timespan, bj.Count, bj.Count, bool)
    if len(a) != 6 or not all(isinstance(x, t) for x, t in zip(a, types)):
        raise RecordError(f"{WELCOME_EVENT}: unexpected arguments {list(a)!r}"[:200])
    try:
        window_s = a[2].seconds
    except OverflowError:
        raise RecordError(f"{WELCOME_EVENT}: window of {a[2].ns} ns out of range"[:200]) from None
    return Welcome(int(a[0]), a[1], window_s, int(a[3]), int(a[4]), a[5])


def drain_from(ev: bj.Event) -> int:
    if len(ev.args) != 1 or not isinstance(ev.args[0], bj.Count):
        raise RecordError(f"{DRAIN_EVENT}: expected one count, got {list(ev.args)!r}"[:200])
    return int(ev.args[0])


def records_in(objs: Iterable[Any]) -> list[FlowRecord]:
    """Final flow records of several parsed messages, ``IoTClass::flow`` and the final ones
    of ``IoTClass::flows`` (skips other events and early records); for tests and tools."""
    out: list[FlowRecord] = []
    for o in objs:
        name = event_name(o)
        if name == FLOW_EVENT:
            out.append(flow_record(o))
        elif name == FLOWS_EVENT:
            packed = map(packed_flow_record, packed_records(o))
            out += [r for r, early in packed if not early]
    return out
