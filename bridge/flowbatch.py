"""Many ``IoTClass::flow`` frames straight into one :class:`~iotcls.flowtable.FlowTable`.

One decode path per frame, and one fallback:

* **the path**: a frame in the plain shape Zeek sends (:func:`match_flow`: one regex match per
  frame, which is what proves the shape) is queued as it is, and its batch is decoded at
  once (:func:`decode_batch`). The vectors of all records are joined into one byte string,
  Broker's per-element wrapping is stripped with a few ``bytes.replace`` and
  ``bytes.translate`` calls, and numbers and hex payloads are read with numpy. Each step
  checks the text is exactly what Broker renders.
* **the fallback**: a frame the path does not take (not the plain shape: an escape, event
  metadata; or a value the batch decoder declines: another time unit, a number out of the
  table's range) is parsed as JSON and decoded by :func:`records.flow_record
  <iotcls.bridge.records.flow_record>`, which names the bad field when there is one. A batch
  the path declines is halved until the frames it declines stand alone, so an odd frame
  costs only itself.

Both give the same table for the same frames (tests check it on real and on mutated frames).
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from iotcls.dhcp import is_dhcp, put_views
from iotcls.flowtable import FlowTable, bytes_to_ip, ip_to_bytes
from iotcls.schema import FlowRecord

from . import broker_json as bj
from . import records as rc


class RawFlow:
    """A frame that matched the plain ``IoTClass::flow`` shape, not decoded yet."""

    __slots__ = ("raw", "groups")

    def __init__(self, raw: bytes, groups: tuple):
        self.raw, self.groups = raw, groups

    @property
    def start(self) -> float:
        """The decoded window start (what held records are ordered by)."""
        try:
            return rc._time(float(self.groups[7]))
        except (ValueError, OverflowError):
            return float("inf")  # decoding will reject it


def match_flow(raw: bytes) -> RawFlow | None:
    """The frame as a :class:`RawFlow`, or None when it is not in the plain shape (parse it
    as JSON then). Costs one regex match: the rest is done per batch. The envelope, the same
    for every flow event on a topic without escapes, is compared as bytes and the regex
    starts at the record. It accepts what ``_BATCH_RE`` accepts, with the same groups."""
    if raw.startswith(_ENV_HEAD):
        end = raw.find(b'"', len(_ENV_HEAD))  # the topic's end, if it is followed by the tail
        topic = raw[len(_ENV_HEAD) : end]
        if raw.startswith(_ENV_TAIL, end) and b"\\" not in topic:
            m = _BODY_RE.fullmatch(raw, end + len(_ENV_TAIL))
            if m is None or raw.count(b"[", m.end(10), m.start(15)) != 4:  # one per vector
                return None
            return RawFlow(raw, (topic, *m.groups()))
    m = _BATCH_RE.fullmatch(raw)
    return None if m is None else RawFlow(raw, m.groups())


@dataclass
class Decoded:
    """A batch decoded: the table of the items that decoded (in item order), which items
    those are, and an error message per item that did not."""

    table: FlowTable
    index: list[int]
    errors: list[tuple[int, str]]


def decode_batch(items: Sequence[Any], packets: int, payload_bytes: int) -> Decoded:
    """FlowRecords and RawFlows, in order, to one FlowTable (records truncated to the
    table's packets and payload bytes, as :meth:`FlowTable.from_records` does)."""
    plain = [i for i, x in enumerate(items) if isinstance(x, RawFlow)]
    parts: list[tuple[FlowTable, list[int]]] = []
    declined: list[int] = []
    _plain_tables(items, plain, packets, payload_bytes, parts, declined)
    if len(plain) == len(items) and not declined and len(parts) == 1:
        return Decoded(*parts[0], [])  # the usual batch: all plain, decoded at once
    rest = sorted(declined + [i for i, x in enumerate(items) if not isinstance(x, RawFlow)])
    recs: list[FlowRecord] = []
    index: list[int] = []
    errors: list[tuple[int, str]] = []
    for i in rest:
        x = items[i]
        if isinstance(x, RawFlow):
            try:
                x = fallback_record(x.raw)
            except rc.RecordError as e:
                errors.append((i, str(e)))
                continue
        recs.append(x)
        index.append(i)
    parts.append(_records_table(recs, index, packets, payload_bytes, errors))
    errors.sort()
    tables = [t for t, _ in parts]
    rows = [i for _, idx in parts for i in idx]
    table = tables[0] if len(tables) == 1 else FlowTable.concat(tables, packets, payload_bytes)
    order = np.argsort(np.asarray(rows, np.int64), kind="stable")
    if len(order) and np.any(order != np.arange(len(order))):
        table = table.take(order)
    return Decoded(table, sorted(rows), errors)


def _plain_tables(
    items: Sequence[Any],
    idx: list[int],
    packets: int,
    payload_bytes: int,
    parts: list,
    declined: list[int],
) -> None:
    """The path: the tables of the plain frames ``items[idx]``, appended to ``parts`` with
    their item numbers. A run the batch decoder declines is halved until each frame it
    declines stands alone; those go to ``declined`` (for the fallback)."""
    if not idx:
        return
    t = _fast_table([items[i].groups for i in idx], packets, payload_bytes)
    if t is not None:
        parts.append((t, idx))
    elif len(idx) == 1:
        declined.append(idx[0])
    else:
        mid = len(idx) // 2
        _plain_tables(items, idx[:mid], packets, payload_bytes, parts, declined)
        _plain_tables(items, idx[mid:], packets, payload_bytes, parts, declined)


def _records_table(
    recs: list[FlowRecord],
    index: list[int],
    packets: int,
    payload_bytes: int,
    errors: list[tuple[int, str]],
) -> tuple[FlowTable, list[int]]:
    """The table of decoded records (item numbers ``index``); a record holding a value the
    table cannot hold is left out with an error."""
    try:
        return FlowTable.from_records(recs, packets, payload_bytes), index
    except (OverflowError, ValueError):  # a value the table cannot hold: find it
        keep_recs, keep_idx = [], []
        for i, r in zip(index, recs):
            try:
                FlowTable.from_records([r], packets, payload_bytes)
            except (OverflowError, ValueError) as e:
                errors.append((i, f"{rc.FLOW_EVENT}: {e}"))
                continue
            keep_recs.append(r)
            keep_idx.append(i)
        return FlowTable.from_records(keep_recs, packets, payload_bytes), keep_idx


def fallback_record(raw: bytes) -> FlowRecord:
    """The fallback: one frame parsed as JSON and decoded by :func:`records.flow_record`
    (raises :class:`records.RecordError` naming what is wrong)."""
    try:
        obj, _ = bj.parse_frame(raw)
    except (ValueError, bj.BrokerJSONError) as e:
        raise rc.RecordError(f"{rc.FLOW_EVENT}: unreadable frame: {e}") from None
    return rc.flow_record(obj)


# -- the batch path ----------------------------------------------------------------------------
# The plain shape again, but each vector captured without its first element's head and its
# last element's tail (None: an empty vector): what is left between elements is exactly
# Broker's separator, which one replace per batch turns into one byte.
def _vec(head: bytes, tail: bytes) -> bytes:
    return (
        rb'\{"@data-type":"vector","data":\[(?:'
        + re.escape(head)
        + rb"([^\[\]]*)"
        + re.escape(tail)
        + rb")?\]\}"
    )


_H_SPAN, _H_COUNT, _H_STRING = (
    b'{"@data-type":"%s","data":' % t for t in (b"timespan", b"count", b"string")
)
_BATCH_RE = re.compile(
    rc._FLOW_RE.pattern.replace(
        b",".join([rc._F_VEC] * 4),
        b",".join(
            [
                _vec(_H_SPAN + b'"', b'"}'),
                _vec(_H_COUNT, b"}"),
                _vec(_H_COUNT, b"}"),
                _vec(_H_STRING + b'"', b'"}'),
            ]
        ),
    ),
    re.S,
)
assert _BATCH_RE.pattern != rc._FLOW_RE.pattern
_ENV_HEAD = b'{"type":"data-message","topic":"'
_ENV_TAIL = (
    b'","@data-type":"vector","data":[{"@data-type":"count","data":1},'
    b'{"@data-type":"count","data":1},{"@data-type":"vector","data":['
    b'{"@data-type":"string","data":"IoTClass::flow"},{"@data-type":"vector","data":['
    b'{"@data-type":"vector","data":['
)
# The record after the envelope. The vectors, most of a frame, are matched as runs of
# anything but "]": the regex engine crosses a run of one excluded byte about twice as fast
# as of a set, so match_flow counts their "["s apart (groups 10 and 15 lie around them).
_BODY_RE = re.compile(
    _BATCH_RE.pattern[_BATCH_RE.pattern.index(rc._F_MAC) :].replace(rb"([^\[\]]*)", rb"([^\]]*)"),
    re.S,
)
assert _BODY_RE.groups == 16 and _BODY_RE.pattern.count(rb"([^\]]*)") == 4
# the envelope part of the regex is literal but for the topic: these bytes are what it matches
assert re.fullmatch(
    _BATCH_RE.pattern[: _BATCH_RE.pattern.index(rc._F_MAC)],
    _ENV_HEAD + b"zeek/iotcls/flows" + _ENV_TAIL,
    re.S,
)
_SEP_SPAN = b'"},' + _H_SPAN + b'"'
_SEP_COUNT = b"}," + _H_COUNT
_SEP_STRING = b'"},' + _H_STRING + b'"'
_ESEP, _RSEP = 0, 1  # element and record separator bytes
# The count separator's first byte, "}", occurs in it once and none of its bytes is a digit:
# it becomes "\x00" and the rest goes (the text is right if this undone gives it back).
_COUNT_TO_NUL = bytes.maketrans(b"}", b"\x00"), _SEP_COUNT[1:]
assert _SEP_COUNT[:1] == b"}" and not set(_SEP_COUNT[1:]) & set(b"}0123456789\x00\x01")
_DIGITS = b"0123456789"
_HEX = b"0123456789abcdef"
_UNITS = b"nums"
_POW10_INT = 10 ** np.arange(10, dtype=np.int64)
_SPAN_SCALE = np.full(256, -1, np.int64)  # by the byte before a timespan's final "s"
_SPAN_SCALE[[110, 117, 109]] = [0, 3, 6]  # ns, us, ms
_SPAN_SCALE[48:58] = 9  # a digit: seconds
_I32, _I16 = 2**31 - 1, 2**15 - 1


def _joined(inners: tuple, sep: bytes, alphabet: bytes):
    """All records' vectors as one text, elements split at ``\\x00``, records at ``\\x01``,
    and which records have a non-empty vector; None when the text holds anything but
    *alphabet* between separators."""
    n = len(inners)
    if None in inners:
        has = np.fromiter((x is not None for x in inners), bool, n)
        big = b"\x01".join([x or b"" for x in inners])
    else:
        has, big = None, b"\x01".join(inners)
    if b"\x00" in big:  # (a "\x01" in a vector makes one record too many: _layout checks)
        return None
    if sep == _SEP_COUNT:  # a translate, checked by undoing it, is cheaper than replace
        r = big.translate(*_COUNT_TO_NUL)
        if r.replace(b"\x00", sep) != big:
            return None
    else:
        r = big.replace(sep, b"\x00")
    if r.translate(None, alphabet + b"\x00\x01"):
        return None
    return r, has


def _layout(r: bytes, has: np.ndarray | None, n: int):
    """Slot lengths (text between separators), each slot's record, elements per record;
    None when the text holds other than n records."""
    a = np.frombuffer(r, np.uint8)
    seps = np.flatnonzero(a <= _RSEP)
    lens = _gaps(seps, len(a)) - 1
    rs = np.flatnonzero(a[seps] == _RSEP)
    if len(rs) != n - 1:
        return None
    k = _gaps(rs, len(seps))  # slots per record
    if has is None:
        return lens, None, k
    rec = np.repeat(np.arange(n), k)
    return lens, has[rec], np.where(has, k, 0)


def _gaps(x: np.ndarray, end: int) -> np.ndarray:
    """np.diff of -1, x..., end (without np.diff's overhead: this runs per vector)."""
    edges = np.concatenate(([-1], x, [end]))
    return edges[1:] - edges[:-1]


_TO_COMMA = bytes.maketrans(b"\x00\x01", b",,")


_LEADING_ZERO = re.compile(rb"(?:^|[\x00\x01])0[0-9]")


def _ints(r: bytes, count: int) -> np.ndarray | None:
    """Separated digit strings (checked: 1 to 15 digits each) -> int64."""
    try:
        v = np.fromstring(r.translate(_TO_COMMA), dtype=np.int64, sep=",")
    except ValueError:
        return None
    return v if len(v) == count else None


def _numbers(inners: tuple, n: int):
    """Count vectors -> (values int64, count per record)."""
    j = _joined(inners, _SEP_COUNT, _DIGITS)
    if j is None:
        return None
    r, has = j
    lay = _layout(r, has, n)
    if lay is None:
        return None
    lens, full, k = lay
    if full is not None:  # empty vectors: their placeholder slots go
        if np.any(lens[full] == 0) or np.any(lens[~full] != 0):
            return None
        r = b"\x00".join([x for x in inners if x is not None]).replace(_SEP_COUNT, b"\x00")
        lens = lens[full]
    if len(lens) == 0:
        return np.zeros(0, np.int64), k
    if lens.min() < 1 or lens.max() > 15:
        return None
    if _LEADING_ZERO.search(r):  # "07" is not a JSON number: the generic path refuses it
        return None
    v = _ints(r, len(lens))
    return None if v is None else (v, k)


def _spans(inners: tuple, n: int):
    """Timespan vectors (``123ns``, ``4us``, ``5ms``, ``0s``: Broker picks the unit) ->
    (ns int64, count per record)."""
    j = _joined(inners, _SEP_SPAN, _DIGITS + _UNITS)
    if j is None:
        return None
    r, has = j
    if has is not None:  # empty vectors: decode the others, give these no elements
        sub = _spans(tuple(x for x in inners if x is not None), int(has.sum()))
        if sub is None:
            return sub
        k = np.zeros(n, np.int64)
        k[has] = sub[1]
        return sub[0], k
    lay = _layout(r, None, n)
    if lay is None:
        return None
    lens, _, k = lay
    if lens.min() < 2:
        return None
    a = np.frombuffer(r, np.uint8)
    ends = np.cumsum(lens + 1) - 1  # each slot's terminating separator (or the end)
    if np.any(a[ends - 1] != 115):  # "s"
        return None
    unit = a[ends - 2]
    scale = _SPAN_SCALE[unit]
    suffix = 1 + (unit > 57)  # "s" after a digit, else "ns", "us", "ms"
    ndig = lens - suffix
    digits = r.translate(None, _UNITS)
    if (
        np.any(scale < 0)
        or np.any(ndig < 1)
        or np.any(ndig + scale > 18)
        or len(r) - len(digits) != int(suffix.sum())
    ):
        return None
    v = _ints(digits, len(lens))
    if v is None:
        return None
    return v * _POW10_INT[scale], k


def _scalars(col: tuple) -> np.ndarray | None:
    """Digit strings (each 1 to 19 digits, per the regex) -> int64, or None if one is long."""
    if max(map(len, col)) > 15:
        return None
    return _ints(b"\x00".join(col), len(col))


def _payloads(inners: tuple, k: np.ndarray, n: int):
    """Hex string vectors -> (bytes of all elements concatenated, byte length per element)."""
    j = _joined(inners, _SEP_STRING, _HEX)
    if j is None:
        return None
    r, has = j
    lay = _layout(r, has, n)
    if lay is None or not np.array_equal(lay[2], k):
        return None
    lens, full, _ = lay
    if full is not None:
        lens = lens[full]
    if np.any(lens & 1):
        return None
    blob = binascii.unhexlify(r.translate(None, b"\x00\x01"))
    return np.frombuffer(blob, np.uint8), lens // 2


def _fast_table(groups: list[tuple], packets: int, payload_bytes: int) -> FlowTable | None:
    n = len(groups)
    # one name per column, in the event's field order (one line: the formatter would make it 19)
    _, mac, dip, dport, rip, rport, proto, start, last, tbytes, tpkts, offs, sizes, dirs, pays, uid, orig = zip(*groups)  # fmt: skip
    sz = _numbers(sizes, n)
    if sz is None:
        return None
    sizes_v, k = sz
    dr = _numbers(dirs, n)
    of = _spans(offs, n)
    if dr is None or of is None or not (np.array_equal(dr[1], k) and np.array_equal(of[1], k)):
        return None
    dirs_v, offs_ns = dr[0], of[0]
    if (len(sizes_v) and sizes_v.max() > _I32) or (len(dirs_v) and dirs_v.max() > 1):
        return None
    pl = _payloads(pays, k, n)
    if pl is None:
        return None
    blob, plens = pl
    ints = [_scalars(c) for c in (dport, rport, proto, tbytes, tpkts)]
    if any(x is None for x in ints):
        return None
    dport_v, rport_v, proto_v, tbytes_v, tpkts_v = ints
    if dport_v.max() > _I32 or rport_v.max() > _I32 or proto_v.max() > _I16:
        return None
    try:
        dips, rips = _ips(dip), _ips(rip)
        macs = list(map(bytes.decode, mac))
        uids = list(map(bytes.decode, uid))
        times = _times(np.array(list(map(float, start + last))))
    except (ValueError, UnicodeDecodeError, OverflowError):
        return None

    t = FlowTable.allocate(n, packets, payload_bytes)
    t.device_mac[:] = macs
    t.uid[:] = uids
    t.device_ip[:] = dips
    t.remote_ip[:] = rips
    t.device_port[:] = dport_v
    t.remote_port[:] = rport_v
    t.proto[:] = proto_v
    t.start[:], t.last[:] = times[:n], times[n:]
    t.total_bytes[:] = tbytes_v
    t.total_packets[:] = tpkts_v
    t.device_is_orig[:] = [o == b"true" for o in orig]
    t.n_pkts[:] = np.minimum(k, packets)
    total = int(k.sum())
    if total:
        rows = np.repeat(np.arange(n), k)
        cols_ = np.arange(total) - np.repeat(np.cumsum(k) - k, k)
        keep = cols_ < packets
        r_, c_ = rows[keep], cols_[keep]
        t.offsets[r_, c_] = ((offs_ns[keep] + 500) // 1000 * 1000) / 1e9
        t.sizes[r_, c_] = sizes_v[keep]
        t.directions[r_, c_] = dirs_v[keep]
        src0 = (np.cumsum(plens) - plens)[keep]
        lens = np.minimum(plens[keep], payload_bytes)
        t.payload_len[r_, c_] = lens
        if len(blob) and payload_bytes:  # each element's first bytes, zeroed past its end
            b = payload_bytes
            first = sliding_window_view(np.concatenate([blob, np.zeros(b, np.uint8)]), b)[src0]
            first *= sliding_window_view(np.repeat(np.uint8([1, 0]), b), b)[b - lens]  # 1s, 0s
            t.payload.reshape(-1, b)[r_ * packets + c_] = first
            dh = np.flatnonzero(is_dhcp(proto_v[r_], dport_v[r_], rport_v[r_]))
            if len(dh):  # DHCP: the view of the whole message (iotcls.dhcp)
                full = plens[keep]
                msgs = [blob[s : s + n].tobytes() for s, n in zip(src0[dh], full[dh])]
                put_views(t.payload, t.payload_len, r_[dh], c_[dh], msgs)
    return t


def _times(x: np.ndarray) -> np.ndarray:
    """records._time on an array: to whole microseconds (half to even, as round()), then
    ``sec + usec / 1e6`` as Zeek forms a packet time."""
    if not np.all((x >= 0.0) & (x <= rc.MAX_TIME_S)):  # as records._time: one by one there
        raise OverflowError("time out of range")
    us = np.round(x * 1e6)
    sec, usec = np.divmod(us.astype(np.int64), 1_000_000)
    return sec.astype(np.float64) + usec / 1e6


@lru_cache(maxsize=65536)
def _zeek_ip16(raw: bytes) -> bytes:
    """An address as Zeek writes it to the table's 16 bytes (ValueError if it is none)."""
    return ip_to_bytes(rc._ip(raw))


def _ips(col: tuple) -> np.ndarray:
    return np.frombuffer(b"".join(map(_zeek_ip16, col)), np.uint8).reshape(len(col), 16)


@lru_cache(maxsize=65536)
def _ip_text(b: bytes) -> str:
    return bytes_to_ip(b)


def head_record(t: FlowTable, i: int) -> FlowRecord:
    """Row *i* of *t* as a FlowRecord without its packets: what a label needs (the
    connection, the device, the window start)."""
    return FlowRecord(
        device_mac=str(t.device_mac[i]),
        device_ip=_ip_text(t.device_ip[i].tobytes()),
        device_port=int(t.device_port[i]),
        remote_ip=_ip_text(t.remote_ip[i].tobytes()),
        remote_port=int(t.remote_port[i]),
        proto=int(t.proto[i]),
        start=float(t.start[i]),
        last=float(t.last[i]),
        total_bytes=int(t.total_bytes[i]),
        total_packets=int(t.total_packets[i]),
        uid=str(t.uid[i]),
        device_is_orig=bool(t.device_is_orig[i]),
    )
