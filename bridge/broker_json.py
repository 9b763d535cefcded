"""Broker's JSON data model (WebSocket API v1), both directions, as Zeek actually speaks it.

Every Broker value is a JSON object ``{"@data-type": T, "data": D}``. This module maps them to
Python values and back:

============== ============================== ===============================================
``@data-type`` Python                         JSON ``data``
============== ============================== ===============================================
none           ``None``                       ``{}``
boolean        ``bool``                       ``true`` / ``false``
count          :class:`Count` (an ``int``)    JSON integer >= 0 (never ``1.0``)
integer        :class:`Integer` (an ``int``)  JSON integer
real           ``float``                      JSON number with a decimal point
string         ``str``                        JSON string (raw bytes: see below)
enum-value     :class:`Enum` (a ``str``)      JSON string
address        ``IPv4Address``/``IPv6Address`` ``"192.168.1.10"``, ``"2001:db8::1"``
subnet         ``IPv4Network``/``IPv6Network`` ``"10.0.0.0/8"``
port           :class:`Port`                  ``"8080/tcp"`` (tcp, udp, icmp or ``?``)
timestamp      :class:`Timestamp` (ns)        ``"2023-11-14T22:13:20.123"`` (UTC, ms)
timespan       :class:`Timespan` (ns)         ``"1500ms"`` (ns, us, ms, s, min, h, d)
vector         ``list`` (``tuple`` inside     array of values
               sets and table keys)
set            ``frozenset``                  array of values
table          ``dict``                       array of ``{"key": .., "value": ..}``
============== ============================== ===============================================

Encoding a plain ``int`` gives ``count`` when it is >= 0, else ``integer``; wrap it in
:class:`Integer` (or :class:`Count`) where Zeek declares the other type, because Zeek refuses
an ``integer`` where it declares ``count`` ("failed to create Zeek event").

Zeek events travel as ``[count 1, count 1, [name, [args...], metadata?]]``
(:class:`Event`); metadata is a vector of ``[count key, value]`` pairs (key 1: network time).

What Zeek 8.2 sends (../shared/fixtures/zeek-8.2.2/websocket): reals printed with ``%f`` (six
decimals, so a real keeps microseconds but not less), timestamps truncated to milliseconds,
and **strings as raw bytes**: Zeek escapes only ``\\ " \\b \\f \\n \\r \\t \\v`` and writes every
other byte as is, so a frame can be invalid UTF-8 and invalid JSON (``\\v``). :func:`parse_frame`
still reads such frames: bytes that are not UTF-8 become lone surrogates (``surrogateescape``),
and :func:`string_bytes` gives back the exact bytes Zeek sent.
"""

from __future__ import annotations

import calendar
import ipaddress
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from . import safejson

__all__ = [
    "Ack",
    "BrokerJSONError",
    "Count",
    "DataMessage",
    "Enum",
    "ErrorMessage",
    "Event",
    "Integer",
    "Port",
    "Timespan",
    "Timestamp",
    "decode",
    "decode_event",
    "decode_message",
    "dumps",
    "encode",
    "encode_event",
    "event_message",
    "parse_frame",
    "render_zeek",
    "string_bytes",
]

COUNT_MAX = 2**64 - 1
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
PORT_PROTOS = ("tcp", "udp", "icmp", "?")
TIMESPAN_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "min": 60_000_000_000,
    "h": 3_600_000_000_000,
    "d": 86_400_000_000_000,
}
NETWORK_TIMESTAMP = 1  # metadata key Zeek uses for an event's network time


class BrokerJSONError(ValueError):
    """A value or message that is not valid Broker JSON; the message names what and where."""


# -- typed values ----------------------------------------------------------------------------
class Count(int):
    """A Broker ``count``: unsigned 64-bit."""

    def __new__(cls, value: int = 0) -> Count:
        v = int(value)
        if not 0 <= v <= COUNT_MAX:
            raise BrokerJSONError(f"count out of range: {v}")
        return super().__new__(cls, v)

    def __repr__(self) -> str:
        return f"Count({int(self)})"


class Integer(int):
    """A Broker ``integer``: signed 64-bit."""

    def __new__(cls, value: int = 0) -> Integer:
        v = int(value)
        if not INT_MIN <= v <= INT_MAX:
            raise BrokerJSONError(f"integer out of range: {v}")
        return super().__new__(cls, v)

    def __repr__(self) -> str:
        return f"Integer({int(self)})"


class Enum(str):
    """A Broker ``enum-value`` (Zeek enums travel by name, e.g. ``tcp``)."""

    def __repr__(self) -> str:
        return f"Enum({str(self)!r})"


@dataclass(frozen=True, slots=True)
class Port:
    number: int
    proto: str  # tcp, udp, icmp or "?"

    def __post_init__(self) -> None:
        if not 0 <= self.number <= 65535 or self.proto not in PORT_PROTOS:
            raise BrokerJSONError(f"invalid port {self.number}/{self.proto}")

    def __str__(self) -> str:
        return f"{self.number}/{self.proto}"

    @classmethod
    def parse(cls, s: str) -> Port:
        num, sep, proto = s.partition("/")
        if not sep or not num.isdigit():
            raise BrokerJSONError(f"invalid port {s!r}")
        return cls(int(num), proto)


@dataclass(frozen=True, slots=True, order=True)
class Timestamp:
    """Nanoseconds since the epoch (UTC). On the wire: ISO 8601, milliseconds."""

    ns: int

    @property
    def seconds(self) -> float:
        return self.ns / 1_000_000_000

    @classmethod
    def from_seconds(cls, s: float) -> Timestamp:
        return cls(round(s * 1_000_000_000))

    def iso(self) -> str:
        """As Broker writes it: whole seconds, then milliseconds, truncated."""
        secs, rest = divmod(self.ns, 1_000_000_000)
        tm = _gmtime(secs)
        return f"{tm}.{rest // 1_000_000:03d}"

    @classmethod
    def parse(cls, s: str) -> Timestamp:
        m = _TS_RE.match(s)
        if not m:
            raise BrokerJSONError(f"invalid timestamp {s!r}")
        y, mo, d, h, mi, sec, frac, zone = m.groups()
        try:
            secs = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(sec), 0, 0, 0))
        except (ValueError, OverflowError):
            raise BrokerJSONError(f"invalid timestamp {s!r}") from None
        if not (
            1 <= int(mo) <= 12
            and 1 <= int(d) <= 31
            and int(h) < 24
            and int(mi) < 60
            and int(sec) < 61
        ):
            raise BrokerJSONError(f"invalid timestamp {s!r}")
        ns = int((frac or "").ljust(9, "0")[:9] or 0)
        if zone and zone != "Z":
            sign = -1 if zone[0] == "-" else 1
            hh, mm = int(zone[1:3]), int(zone[-2:])
            secs -= sign * (hh * 3600 + mm * 60)
        return cls(secs * 1_000_000_000 + ns)


@dataclass(frozen=True, slots=True, order=True)
class Timespan:
    """A duration in nanoseconds (Zeek ``interval``)."""

    ns: int

    @property
    def seconds(self) -> float:
        return self.ns / 1_000_000_000

    @classmethod
    def from_seconds(cls, s: float) -> Timespan:
        return cls(round(s * 1_000_000_000))

    def text(self) -> str:
        """As Broker writes it: the coarsest of ns, us, ms, s that loses nothing."""
        v = self.ns
        if v == 0:
            return "0s"
        for unit, next_unit in (("ns", 1000), ("us", 1000), ("ms", 1000)):
            if v % next_unit:
                return f"{v}{unit}"
            v //= next_unit
        return f"{v}s"

    @classmethod
    def parse(cls, s: str) -> Timespan:
        m = _SPAN_RE.match(s)
        if not m:
            raise BrokerJSONError(f"invalid timespan {s!r}")
        num, unit = m.groups()
        scale = TIMESPAN_UNITS_NS[unit]
        if "." in num:
            return cls(int(Decimal(num) * scale))
        return cls(int(num) * scale)


@dataclass(frozen=True, slots=True)
class Event:
    """A Zeek event: name, arguments and optional metadata ``[(key, value), ...]``."""

    name: str
    args: tuple
    metadata: tuple | None = None

    def network_time(self) -> Timestamp | None:
        for key, value in self.metadata or ():
            if key == NETWORK_TIMESTAMP and isinstance(value, Timestamp):
                return value
        return None


@dataclass(frozen=True, slots=True)
class DataMessage:
    topic: str
    data: Any  # the decoded value


@dataclass(frozen=True, slots=True)
class Ack:
    endpoint: str
    version: str


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    code: str
    context: str


_TS_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9})\d*)?(Z|[+-]\d{2}:?\d{2})?$"
)
_SPAN_RE = re.compile(r"^(-?\d{1,30}(?:\.\d{1,30})?)(ns|us|ms|s|min|h|d)$")


def _gmtime(secs: int) -> str:
    import time

    try:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    except (OverflowError, OSError, ValueError):
        raise BrokerJSONError(f"timestamp out of range: {secs} s") from None


# -- decoding --------------------------------------------------------------------------------
def _hashable(v: Any) -> Any:
    """Vectors inside sets and table keys become tuples, so they can be members."""
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        raise BrokerJSONError("a table cannot be a set member or table key")
    return v


def decode(obj: Any, where: str = "$") -> Any:
    """One ``{"@data-type", "data"}`` object (as parsed by :mod:`json`) to a Python value."""
    if not isinstance(obj, dict):
        raise BrokerJSONError(
            f"{where}: expected an object with @data-type, got {type(obj).__name__}"
        )
    try:
        dtype, data = obj["@data-type"], obj["data"]
    except KeyError as e:
        raise BrokerJSONError(f"{where}: missing {e.args[0]!r}") from None
    dec = _DECODERS.get(dtype) if isinstance(dtype, str) else None
    if dec is None:
        raise BrokerJSONError(f"{where}: unknown @data-type {dtype!r}"[:200])
    try:
        return dec(data, where)
    except BrokerJSONError:
        raise
    except (ValueError, OverflowError, TypeError) as e:  # the codec raises its own error only
        raise BrokerJSONError(f"{where}: {dtype}: {e}"[:200]) from None


def _expect(data: Any, types: type | tuple, dtype: str, where: str) -> Any:
    if not isinstance(data, types) or (types is not bool and isinstance(data, bool)):
        raise BrokerJSONError(
            f"{where}: {dtype} needs JSON {_json_kind(types)}, got {data!r}"[:200]
        )
    return data


def _json_kind(types: type | tuple) -> str:
    names = {
        bool: "true/false",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in ts)


def _dec_none(data: Any, where: str) -> None:
    if data != {}:
        raise BrokerJSONError(f"{where}: none needs data {{}}, got {data!r}"[:200])
    return None


def _dec_bool(data: Any, where: str) -> bool:
    if not isinstance(data, bool):
        raise BrokerJSONError(f"{where}: boolean needs true/false, got {data!r}"[:200])
    return data


def _dec_count(data: Any, where: str) -> Count:
    return Count(_expect(data, int, "count", where))


def _dec_integer(data: Any, where: str) -> Integer:
    return Integer(_expect(data, int, "integer", where))


def _dec_real(data: Any, where: str) -> float:
    return float(_expect(data, (int, float), "real", where))


def _dec_string(data: Any, where: str) -> str:
    return _expect(data, str, "string", where)


def _dec_enum(data: Any, where: str) -> Enum:
    return Enum(_expect(data, str, "enum-value", where))


def _dec_address(data: Any, where: str):
    try:
        return ipaddress.ip_address(_expect(data, str, "address", where))
    except ValueError:
        raise BrokerJSONError(f"{where}: invalid address {data!r}"[:200]) from None


def _dec_subnet(data: Any, where: str):
    try:
        return ipaddress.ip_network(_expect(data, str, "subnet", where), strict=False)
    except ValueError:
        raise BrokerJSONError(f"{where}: invalid subnet {data!r}"[:200]) from None


def _wrap(fn, where: str):
    try:
        return fn()
    except BrokerJSONError as e:
        raise BrokerJSONError(f"{where}: {e}") from None


def _dec_port(data: Any, where: str) -> Port:
    s = _expect(data, str, "port", where)
    return _wrap(lambda: Port.parse(s), where)


def _dec_timestamp(data: Any, where: str) -> Timestamp:
    s = _expect(data, str, "timestamp", where)
    return _wrap(lambda: Timestamp.parse(s), where)


def _dec_timespan(data: Any, where: str) -> Timespan:
    s = _expect(data, str, "timespan", where)
    return _wrap(lambda: Timespan.parse(s), where)


def _dec_vector(data: Any, where: str) -> list:
    items = _expect(data, list, "vector", where)
    return [decode(x, f"{where}[{i}]") for i, x in enumerate(items)]


def _dec_set(data: Any, where: str) -> frozenset:
    items = _expect(data, list, "set", where)
    return frozenset(_hashable(decode(x, f"{where}[{i}]")) for i, x in enumerate(items))


def _dec_table(data: Any, where: str) -> dict:
    items = _expect(data, list, "table", where)
    out = {}
    for i, kv in enumerate(items):
        w = f"{where}[{i}]"
        if not isinstance(kv, dict) or "key" not in kv or "value" not in kv:
            raise BrokerJSONError(f"{w}: table entries need 'key' and 'value'")
        out[_hashable(decode(kv["key"], f"{w}.key"))] = decode(kv["value"], f"{w}.value")
    return out


_DECODERS = {
    "none": _dec_none,
    "boolean": _dec_bool,
    "count": _dec_count,
    "integer": _dec_integer,
    "real": _dec_real,
    "string": _dec_string,
    "enum-value": _dec_enum,
    "address": _dec_address,
    "subnet": _dec_subnet,
    "port": _dec_port,
    "timestamp": _dec_timestamp,
    "timespan": _dec_timespan,
    "vector": _dec_vector,
    "set": _dec_set,
    "table": _dec_table,
}


def decode_event(value: Any) -> Event | None:
    """The :class:`Event` a decoded data-message value encodes, or None if it is no event."""
    if not (
        isinstance(value, list)
        and len(value) == 3
        and value[0] == 1
        and value[1] == 1
        and type(value[0]) is Count
        and type(value[1]) is Count
    ):
        return None
    body = value[2]
    if not (
        isinstance(body, list)
        and len(body) in (2, 3)
        and isinstance(body[0], str)
        and isinstance(body[1], list)
    ):
        return None
    meta = None
    if len(body) == 3:
        if not isinstance(body[2], list) or not all(
            isinstance(m, list) and len(m) == 2 and type(m[0]) is Count for m in body[2]
        ):
            return None
        meta = tuple((int(k), v) for k, v in body[2])
    return Event(body[0], tuple(body[1]), meta)


def decode_message(obj: Any) -> Ack | ErrorMessage | DataMessage:
    """A parsed WebSocket frame (a JSON object) to an ack, an error or a data message."""
    if not isinstance(obj, dict):
        raise BrokerJSONError(f"message is a JSON {type(obj).__name__}, not an object")
    kind = obj.get("type")
    if kind == "data-message":
        topic = obj.get("topic")
        if not isinstance(topic, str):
            raise BrokerJSONError("data-message without a string topic")
        return DataMessage(topic, decode(obj, topic))
    if kind == "ack":
        ep, ver = obj.get("endpoint"), obj.get("version")
        if not isinstance(ep, str) or not isinstance(ver, str):
            raise BrokerJSONError("ack without endpoint and version strings")
        return Ack(ep, ver)
    if kind == "error":
        code, ctx = obj.get("code"), obj.get("context")
        if not isinstance(code, str):
            raise BrokerJSONError("error message without a code")
        return ErrorMessage(code, ctx if isinstance(ctx, str) else json.dumps(ctx))
    raise BrokerJSONError(f"unknown message type {kind!r}"[:200])


# -- reading frames --------------------------------------------------------------------------
# Zeek writes \v, which JSON lacks. Escapes are matched pairwise so that "\\v" (an escaped
# backslash, then v) stays as it is.
_ESCAPE_RE = re.compile(rb"\\(.)", re.S)


def _fix_escapes(m: re.Match) -> bytes:
    return b"\\u000b" if m.group(1) == b"v" else m.group(0)


def parse_frame(raw: bytes | str) -> tuple[Any, bool]:
    """Parse one WebSocket frame; returns ``(json_value, lenient)``.

    ``lenient`` is True when the frame was not valid UTF-8 JSON and was read the lenient way
    (raw bytes as surrogates, control characters and ``\\v`` in strings accepted). Raises
    :class:`BrokerJSONError` when even that fails, and for a frame nested deeper than
    :data:`~iotcls.bridge.safejson.MAX_DEPTH` (the parser would recurse out of its stack).
    """
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    try:
        safejson.check_depth(raw)
    except safejson.JSONDepthError as e:
        raise BrokerJSONError(f"not JSON: {e}") from None
    try:
        return json.loads(raw), False
    except (UnicodeDecodeError, ValueError):
        pass
    try:
        fixed = _ESCAPE_RE.sub(_fix_escapes, raw) if b"\\v" in raw else raw
        text = fixed.decode("utf-8", "surrogateescape")
        return json.loads(text, strict=False), True
    except (UnicodeDecodeError, ValueError) as e:
        raise BrokerJSONError(f"not JSON: {e}") from None


def string_bytes(s: str) -> bytes:
    """The exact bytes of a Zeek string as read by :func:`parse_frame`."""
    return s.encode("utf-8", "surrogateescape")


# -- encoding --------------------------------------------------------------------------------
def encode(value: Any) -> dict:
    """A Python value to its ``{"@data-type", "data"}`` object (see the module table)."""
    if value is None:
        return {"@data-type": "none", "data": {}}
    if isinstance(value, bool):
        return {"@data-type": "boolean", "data": value}
    if isinstance(value, Count):
        return {"@data-type": "count", "data": int(value)}
    if isinstance(value, Integer):
        return {"@data-type": "integer", "data": int(value)}
    if isinstance(value, int):
        if value >= 0:
            return {"@data-type": "count", "data": int(Count(value))}
        return {"@data-type": "integer", "data": int(Integer(value))}
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BrokerJSONError(f"real {value!r} has no JSON form")
        return {"@data-type": "real", "data": value}
    if isinstance(value, Enum):
        return {"@data-type": "enum-value", "data": str(value)}
    if isinstance(value, str):
        return {"@data-type": "string", "data": value}
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return {"@data-type": "address", "data": str(value)}
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return {"@data-type": "subnet", "data": str(value)}
    if isinstance(value, Port):
        return {"@data-type": "port", "data": str(value)}
    if isinstance(value, Timestamp):
        return {"@data-type": "timestamp", "data": value.iso()}
    if isinstance(value, Timespan):
        return {"@data-type": "timespan", "data": value.text()}
    if isinstance(value, Event):
        return encode(encode_event(value.name, value.args, value.metadata))
    if isinstance(value, (list, tuple)):
        return {"@data-type": "vector", "data": [encode(v) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {"@data-type": "set", "data": [encode(v) for v in value]}
    if isinstance(value, dict):
        return {
            "@data-type": "table",
            "data": [{"key": encode(k), "value": encode(v)} for k, v in value.items()],
        }
    raise BrokerJSONError(f"no Broker type for a Python {type(value).__name__}")


def encode_event(name: str, args: Iterable[Any], metadata: Iterable | None = None) -> list:
    """The Broker vector of a Zeek event (pass the result to :func:`encode`)."""
    body: list = [name, list(args)]
    if metadata is not None:
        body.append([[Count(k), v] for k, v in metadata])
    return [Count(1), Count(1), body]


def _real_text(x: float) -> str:
    """A JSON number that Broker reads as a real: always with a decimal point."""
    if not math.isfinite(x):
        raise BrokerJSONError(f"real {x!r} has no JSON form")
    r = repr(float(x))
    if "e" in r or "E" in r:
        r = format(Decimal(r), "f")
    return r if "." in r else r + ".0"


def _dump(node: dict, out: list[str]) -> None:
    t, d = node["@data-type"], node["data"]
    out.append('{"@data-type":"')
    out.append(t)
    out.append('","data":')
    if t in ("vector", "set"):
        out.append("[")
        for i, x in enumerate(d):
            if i:
                out.append(",")
            _dump(x, out)
        out.append("]")
    elif t == "table":
        out.append("[")
        for i, kv in enumerate(d):
            if i:
                out.append(",")
            out.append('{"key":')
            _dump(kv["key"], out)
            out.append(',"value":')
            _dump(kv["value"], out)
            out.append("}")
        out.append("]")
    elif t == "real":
        out.append(_real_text(d))
    elif t == "none":
        out.append("{}")
    else:
        out.append(json.dumps(d, ensure_ascii=False))
    out.append("}")


def dumps(topic: str, value: Any) -> bytes:
    """A data message as a client sends it: compact UTF-8 JSON, reals with a decimal point.

    Strings read from Zeek with raw bytes (lone surrogates) go back as those bytes.
    """
    out = ['{"type":"data-message","topic":', json.dumps(topic, ensure_ascii=False), ","]
    body: list[str] = []
    _dump(encode(value), body)
    out.append(body[0][1:])  # '"@data-type":"...' without the opening brace ...
    out.extend(body[1:])  # ... which the message object already has
    return "".join(out).encode("utf-8", "surrogateescape")


def event_message(
    topic: str, name: str, args: Iterable[Any], metadata: Iterable | None = None
) -> bytes:
    """A Zeek event as a client sends it, ready for the WebSocket."""
    return dumps(topic, encode_event(name, args, metadata))


# -- Zeek's own rendering (for tests, fakes and benchmarks) ----------------------------------
def _zeek_string(s: str) -> bytes:
    b = s.encode("utf-8", "surrogateescape")
    return (
        b'"'
        + b.replace(b"\\", b"\\\\")
        .replace(b"\b", b"\\b")
        .replace(b"\f", b"\\f")
        .replace(b"\n", b"\\n")
        .replace(b"\r", b"\\r")
        .replace(b"\t", b"\\t")
        .replace(b"\v", b"\\v")
        .replace(b'"', b'\\"')
        + b'"'
    )


def _render(node: dict, out: list[bytes]) -> None:
    t, d = node["@data-type"], node["data"]
    out.append(b'{"@data-type":"' + t.encode() + b'","data":')
    if t in ("vector", "set"):
        out.append(b"[")
        for i, x in enumerate(d):
            if i:
                out.append(b",")
            _render(x, out)
        out.append(b"]")
    elif t == "table":
        out.append(b"[")
        for i, kv in enumerate(d):
            if i:
                out.append(b",")
            out.append(b'{"key":')
            _render(kv["key"], out)
            out.append(b',"value":')
            _render(kv["value"], out)
            out.append(b"}")
        out.append(b"]")
    elif t == "real":
        out.append(b"%f" % d)
    elif t == "none":
        out.append(b"{}")
    elif t == "boolean":
        out.append(b"true" if d else b"false")
    elif t in ("count", "integer"):
        out.append(b"%d" % d)
    else:
        out.append(_zeek_string(d))
    out.append(b"}")


def render_zeek(topic: str, value: Any) -> bytes:
    """A data message byte for byte as Zeek 8.2 sends it (Broker's ``json::v1::encode``)."""
    out = [b'{"type":"data-message","topic":', _zeek_string(topic), b","]
    body: list[bytes] = []
    _render(encode(value), body)
    out.append(body[0][1:])
    out.extend(body[1:])
    return b"".join(out)
