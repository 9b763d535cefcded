"""Packets into flow records (:class:`~iotcls.flowtable.FlowTable`), the pcap sensor's half.

The record is defined in :mod:`iotcls.schema`; this module builds it from
:class:`~iotcls.pcap.PacketBatch` chunks without a per-packet Python loop:

1. **Devices.** :class:`DeviceSelector` marks, per packet, whether the source and/or the
   destination is a device (MAC listed, else address inside the local networks). A packet
   becomes one *entry* per device side: device-to-device traffic gives two mirrored entries.
2. **Keys.** An entry's device-side key (device MAC, device IP/port, remote IP/port, protocol)
   is hashed to 64 bits; one sort groups the entries by key, in file order within a key.
   Groups are verified field by field, so a hash collision can never merge two keys.
3. **Windows.** A window starts at a key's first packet; the first packet at or after
   ``start + window_s`` starts the next one. Window heads are found for all keys at once by
   ``searchsorted`` rounds over a per-key running maximum of time (one round per window of the
   longest key, not per packet).
4. **Streaming.** Windows still open at the end of a chunk are carried to the next chunk as
   one aggregate row each (start, totals, first packets), so memory depends on the number of
   live keys, not on the capture's length. A window is emitted once a later window of its key
   started, or once the capture's time passed ``start + window_s``, or at the end.
5. **Connections.** A key's connection continues across windows until it is idle longer than
   Zeek's inactivity timeout (TCP 5 min, others 1 min). Its synthetic ``uid`` ("C" + 17 base62
   characters) hashes the unordered 5-tuple and the connection's first packet time, so both
   mirrored records of a device-to-device connection carry the same uid, and runs agree.
   ``device_is_orig`` says whether the device sent the connection's first packet.

Time is kept as integer nanoseconds inside, so the 60 s boundary is exact for usec and nsec
captures; records carry float seconds as the schema says. Packet times lie in
[0, :data:`~iotcls.pcap.TS_LIMIT_NS`) (the reader skips others) and a window is at most
:data:`MAX_WINDOW_S`, so every time plus a window, every difference of two times and every
packed search key of :func:`_window_heads` stays inside int64.

A capture costs only itself: :func:`capture_flows` turns whatever goes wrong with one file
into that file's ``error`` (naming the file and the byte it was read up to), so that a command
over many captures keeps every other capture's records.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .columns import Columns
from .dhcp import is_dhcp, put_views
from .flowtable import FlowTable
from .pcap import (
    DEFAULT_CHUNK_BYTES,
    TS_LIMIT_NS,
    CaptureReader,
    PacketBatch,
    ReadStats,
    int_to_mac,
    mac_to_int,
)
from .schema import (
    DEFAULT_PACKETS,
    DEFAULT_PAYLOAD_BYTES,
    DEFAULT_WINDOW_S,
    DHCP_PAYLOAD_BYTES,
    PROTO_TCP,
)

NS = 1_000_000_000
TCP_TIMEOUT_NS = 300 * NS  # Zeek's tcp_inactivity_timeout
OTHER_TIMEOUT_NS = 60 * NS  # udp/icmp inactivity timeouts
_U64 = np.uint64
_NEVER = -(1 << 62)  # a time before any packet
MAX_WINDOW_S = (1 << 61) / NS  # about 73 years: see the module docstring
_MAC48 = (1 << 48) - 1
_MASK64 = (1 << 64) - 1
_BASE62 = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", np.uint8)
_BASE62_PAIRS = np.stack(np.meshgrid(_BASE62, _BASE62, indexing="ij"), -1).reshape(-1, 2)
_UID_SEEDS = (0x243F6A8885A308D3, 0x13198A2E03707344)


# --------------------------------------------------------------------------------------------
# device selection


def _ip_halves(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, int]:
    v = int(ip) | (0xFFFF << 32) if ip.version == 4 else int(ip)
    return v >> 64, v & _MASK64


@dataclass(frozen=True)
class DeviceSelector:
    """Which packet endpoints are devices: a listed MAC, or an address in a local network."""

    macs: tuple[int, ...] = ()
    nets: tuple[str, ...] = ()

    @classmethod
    def from_lists(
        cls, macs: Iterable[str] | None = None, nets: Iterable[str] | None = None
    ) -> DeviceSelector:
        """Raises ValueError naming the bad MAC or CIDR."""
        m = tuple(sorted({mac_to_int(x) for x in (macs or ()) if x.strip()}))
        n = []
        for cidr in nets or ():
            cidr = cidr.strip()
            if not cidr:
                continue
            try:
                n.append(str(ipaddress.ip_network(cidr, strict=False)))
            except ValueError:
                raise ValueError(f"not a network (CIDR): {cidr!r}") from None
        return cls(m, tuple(n))

    def __bool__(self) -> bool:
        return bool(self.macs or self.nets)

    @property
    def mac_strings(self) -> list[str]:
        return [int_to_mac(m) for m in self.macs]

    def _in_nets(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        v4 = (hi == 0) & ((lo >> _U64(32)) == _U64(0xFFFF))
        a4 = lo.astype(np.uint32)  # the IPv4 address of mapped addresses
        all4 = bool(v4.all())
        inside = np.zeros(len(hi), bool)
        # multicast and limited broadcast are never devices
        excluded = ((a4 >> 28) == 0xE) | (a4 == 0xFFFFFFFF)
        if not all4:
            excluded &= v4
            excluded |= ~v4 & ((hi >> _U64(56)) == _U64(0xFF))  # ff00::/8
        for cidr in self.nets:
            net = ipaddress.ip_network(cidr)
            if net.version == 4:
                mask = np.uint32(((1 << net.prefixlen) - 1) << (32 - net.prefixlen))
                hit = (a4 & mask) == np.uint32(int(net.network_address))
                inside |= hit if all4 else hit & v4
                if net.prefixlen <= 30:  # directed broadcast: not a device
                    excluded |= a4 == np.uint32(int(net.broadcast_address))
            elif not all4:
                bits = net.prefixlen
                mask = ((1 << bits) - 1) << (128 - bits) if bits else 0
                nh, nl = _ip_halves(net.network_address)
                inside |= (
                    ~v4
                    & ((hi & _U64(mask >> 64)) == _U64(nh))
                    & ((lo & _U64(mask & _MASK64)) == _U64(nl))
                )
        return inside & ~excluded

    def sides(self, b: PacketBatch) -> tuple[np.ndarray, np.ndarray]:
        """(source is a device, destination is a device) per packet."""
        if self.macs:
            macs = np.array(self.macs, np.uint64)  # sorted
            src = macs[np.minimum(np.searchsorted(macs, b.src_mac), len(macs) - 1)] == b.src_mac
            dst = macs[np.minimum(np.searchsorted(macs, b.dst_mac), len(macs) - 1)] == b.dst_mac
            if self.nets:
                src |= self._in_nets(b.src_hi, b.src_lo)
                dst |= self._in_nets(b.dst_hi, b.dst_lo)
            return src, dst
        if self.nets:
            return self._in_nets(b.src_hi, b.src_lo), self._in_nets(b.dst_hi, b.dst_lo)
        return np.zeros(len(b), bool), np.zeros(len(b), bool)


@dataclass(frozen=True)
class CaptureSelectors:
    """Per-capture device MACs for a merged batch (``PacketBatch.cap``), one set of local
    networks for all."""

    per_capture: tuple[DeviceSelector, ...]
    nets: tuple[str, ...] = ()

    @property
    def macs(self) -> bool:
        return any(s.macs for s in self.per_capture)

    def sides(self, b: PacketBatch) -> tuple[np.ndarray, np.ndarray]:
        assert b.cap is not None
        tagged = sorted((i << 48) | m for i, s in enumerate(self.per_capture) for m in s.macs)
        src = np.zeros(len(b), bool)
        dst = np.zeros(len(b), bool)
        if tagged:
            t = np.array(tagged, np.uint64)
            top = b.cap.astype(np.uint64) << _U64(48)
            for side, mac in ((src, b.src_mac), (dst, b.dst_mac)):
                x = top | mac
                side |= t[np.minimum(np.searchsorted(t, x), len(t) - 1)] == x
        if self.nets:
            net = DeviceSelector((), self.nets)
            src |= net._in_nets(b.src_hi, b.src_lo)
            dst |= net._in_nets(b.dst_hi, b.dst_lo)
        return src, dst


# --------------------------------------------------------------------------------------------
# hashing and uids


def _hash(cols: Iterable[np.ndarray], seed: int) -> np.ndarray:
    """64-bit hash of equal-length integer columns (splitmix64-style mixing)."""
    h = None
    for c in cols:
        c = c.astype(np.uint64, copy=False)
        h = (c ^ _U64(seed)) if h is None else (h ^ c)
        h = h * _U64(0x9E3779B97F4A7C15)
        h ^= h >> _U64(32)
    assert h is not None
    h ^= h >> _U64(30)
    h *= _U64(0xBF58476D1CE4E5B9)
    h ^= h >> _U64(27)
    h *= _U64(0x94D049BB133111EB)
    h ^= h >> _U64(31)
    return h


def make_uids(
    a_hi: np.ndarray,
    a_lo: np.ndarray,
    a_port: np.ndarray,
    b_hi: np.ndarray,
    b_lo: np.ndarray,
    b_port: np.ndarray,
    proto: np.ndarray,
    first_ns: np.ndarray,
) -> np.ndarray:
    """Zeek-like connection uids: "C" + 17 base62 characters, from the unordered 5-tuple
    (endpoints a, b in any order) and the connection's first packet time."""
    n = len(a_hi)
    swap = (a_hi > b_hi) | (a_hi == b_hi) & ((a_lo > b_lo) | (a_lo == b_lo) & (a_port > b_port))
    cols = [
        np.where(swap, b_hi, a_hi),
        np.where(swap, b_lo, a_lo),
        np.where(swap, b_port, a_port),
        np.where(swap, a_hi, b_hi),
        np.where(swap, a_lo, b_lo),
        np.where(swap, a_port, b_port),
        proto,
        first_ns,
    ]
    out = np.empty((n, 18), np.uint8)
    out[:, 0] = ord("C")
    col = 1
    for seed, pairs in zip(_UID_SEEDS, (5, 4)):  # 62**10 < 2**64 > 62**8: 10 + 7 digits
        x = _hash(cols, seed)
        for _ in range(pairs):
            if col == 17:  # the last digit alone
                out[:, col] = _BASE62[(x % _U64(62)).astype(np.intp)]
                break
            out[:, col : col + 2] = _BASE62_PAIRS[(x % _U64(3844)).astype(np.intp)]
            x //= _U64(3844)
            col += 2
    return out.view("S18").ravel().astype("U18").astype(object)


def ns_to_s(ns: np.ndarray) -> np.ndarray:
    """Float seconds as Zeek forms them (seconds + fraction), not ns / 1e9 (which rounds the
    nanosecond count to 53 bits first)."""
    ns = np.asarray(ns, np.int64)
    return (ns // NS).astype(np.float64) + (ns % NS) / 1e9


def _to16(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    return np.stack([hi, lo], 1).astype(">u8").view(np.uint8).reshape(len(hi), 16)


def _macs_to_str(macs: np.ndarray) -> np.ndarray:
    out = np.full(len(macs), "", dtype=object)
    if len(macs):
        uniq, inv = np.unique(macs, return_inverse=True)
        names = np.array([int_to_mac(int(m)) if m else "" for m in uniq], dtype=object)
        out = names[inv]
    return out


def _ip16_to_str(hi: int, lo: int) -> str:
    v = (int(hi) << 64) | int(lo)
    if v >> 32 == 0xFFFF:
        return str(ipaddress.IPv4Address(v & 0xFFFFFFFF))
    return str(ipaddress.IPv6Address(v))


# --------------------------------------------------------------------------------------------
# the builder


_KEY_FIELDS = ("dev_mac", "dev_hi", "dev_lo", "rem_hi", "rem_lo", "dev_port", "rem_port", "proto")


@dataclass
class _FirstPackets(Columns):
    """The first P packets of each window (m windows)."""

    t: np.ndarray  # (m, P) int64 ns
    size: np.ndarray  # (m, P) int32
    dir: np.ndarray  # (m, P) int8
    pay: np.ndarray  # (m, P, B) uint8
    plen: np.ndarray  # (m, P) int32

    @classmethod
    def zeros(cls, m: int, packets: int, payload_bytes: int) -> _FirstPackets:
        return cls(
            np.zeros((m, packets), np.int64),
            np.zeros((m, packets), np.int32),
            np.zeros((m, packets), np.int8),
            np.zeros((m, packets, payload_bytes), np.uint8),
            np.zeros((m, packets), np.int32),
        )


@dataclass
class _Open:
    """Windows still open after a chunk: one aggregate row each, sorted by key hash."""

    h: np.ndarray
    h2: np.ndarray  # second, independent hash
    key: dict[str, np.ndarray]
    start: np.ndarray
    last: np.ndarray
    nbytes: np.ndarray
    npkts: np.ndarray
    nfirst: np.ndarray
    first: _FirstPackets
    cstart: np.ndarray  # connection first packet, ns
    dorig: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.h)

    @classmethod
    def empty(cls, packets: int, payload_bytes: int) -> _Open:
        i = np.zeros(0, np.int64)
        u = np.zeros(0, np.uint64)
        words = ("dev_mac", "dev_hi", "dev_lo", "rem_hi", "rem_lo")  # uint64 key fields
        return cls(
            h=u,
            h2=u,
            key={k: (u if k in words else i) for k in _KEY_FIELDS},
            start=i,
            last=i,
            nbytes=i,
            npkts=i,
            nfirst=i,
            first=_FirstPackets.zeros(0, packets, payload_bytes),
            cstart=i,
            dorig=np.zeros(0, bool),
        )


# What one batch hands from phase to phase in FlowBuilder._step (module docstring, 1 to 5).


@dataclass
class _Entries:
    """Phase 1: the batch's device-side entries (one per packet and device side)."""

    pk: np.ndarray  # packet index in the batch
    d: np.ndarray  # int8 direction: 1 the device sent it
    key: dict[str, np.ndarray]  # the device-side key, _KEY_FIELDS
    ts: np.ndarray  # int64 ns
    ip_len: np.ndarray


@dataclass
class _Rows:
    """The merged rows: the open windows' aggregate rows first (``v`` of them), then the
    entries."""

    open: _Open
    key: dict[str, np.ndarray]
    t: np.ndarray  # window start (open) or packet time (entry), ns
    tl: np.ndarray  # last packet, ns
    nb: np.ndarray  # bytes
    v: int
    n: int

    @classmethod
    def merge(cls, ow: _Open, ent: _Entries) -> _Rows:
        key = {k: np.concatenate([ow.key[k], ent.key[k]]) for k in _KEY_FIELDS}
        return cls(
            ow,
            key,
            np.concatenate([ow.start, ent.ts]),
            np.concatenate([ow.last, ent.ts]),
            np.concatenate([ow.nbytes, ent.ip_len]),
            len(ow),
            len(ow) + len(ent.pk),
        )


@dataclass
class _Groups:
    """Phase 2: the rows in key order (``o``), one group per key, row order kept inside."""

    o: np.ndarray  # sort order of the rows
    H: np.ndarray  # first hash, sorted
    h2: np.ndarray  # second hash, in the same order
    T: np.ndarray  # time, in the same order
    gs: np.ndarray  # first sorted row of each group
    gid: np.ndarray  # group of each sorted row


@dataclass
class _Windows:
    """Phase 3: one entry per window, in sorted-row order (``row_*``: per sorted row)."""

    src: np.ndarray  # merged-row index of the window's head
    start: np.ndarray
    last: np.ndarray
    nbytes: np.ndarray
    npkts: np.ndarray
    nfirst: np.ndarray  # first packets kept
    group: np.ndarray
    islast: np.ndarray  # the key's last window in this batch
    gfirst: np.ndarray  # the key's first window in this batch
    vhead: np.ndarray  # headed by an open window's row
    vid: np.ndarray  # that open window (0 otherwise)
    base: np.ndarray  # first packets the open window already holds, minus one
    hidx: np.ndarray  # sorted-row index of the head
    row_wid: np.ndarray  # window of each sorted row
    row_is_v: np.ndarray  # the sorted row is an open window's

    def __len__(self) -> int:
        return len(self.src)


@dataclass
class _Connections:
    """Phase 5: each window's connection, and the connection table's view of the keys."""

    cstart: np.ndarray  # connection first packet, ns
    dorig: np.ndarray  # bool: the device sent it
    gh: np.ndarray  # hash of each group
    kt_pos: np.ndarray  # its place in the connection table
    kt_found: np.ndarray  # bool: it is there


@dataclass
class BuilderStats:
    device_packets: int = 0  # entries: packets seen from a device's side (mirrored twice)
    device_bytes: int = 0
    records: int = 0


def check_window(window_s: float) -> None:
    """ValueError unless ``0 < window_s <= MAX_WINDOW_S`` (NaN and infinity included)."""
    if not 0 < window_s <= MAX_WINDOW_S:
        raise ValueError(
            f"window must be positive and at most {MAX_WINDOW_S:.0f} s, not {window_s!r}"
        )


class FlowBuilder:
    """Feed :class:`PacketBatch` chunks in file order; get closed records back.

    ``add(batch)`` returns the records that the batch closed, ``finish()`` the rest.
    ``device_first_seen`` maps a device (MAC, else IP) to its first packet time.
    """

    def __init__(
        self,
        selector: DeviceSelector | CaptureSelectors,
        window_s: float = DEFAULT_WINDOW_S,
        packets: int = DEFAULT_PACKETS,
        payload_bytes: int = DEFAULT_PAYLOAD_BYTES,
    ):
        check_window(window_s)
        if packets < 1 or payload_bytes < 0:
            raise ValueError("packets must be at least 1 and payload bytes not negative")
        self.selector = selector
        self.window_ns = int(round(window_s * NS))
        self.packets = int(packets)
        self.payload_bytes = int(payload_bytes)
        self.stats = BuilderStats()
        self._open = _Open.empty(self.packets, self.payload_bytes)
        # connection state per key: hash, last packet, connection start, device is orig
        self._kt_h = np.zeros(0, np.uint64)
        self._kt_last = np.zeros(0, np.int64)
        self._kt_cstart = np.zeros(0, np.int64)
        self._kt_dorig = np.zeros(0, bool)
        self._tmax = _NEVER
        self._first_seen: dict[tuple[int, int, int], int] = {}
        self._seed = 0x5EED
        # merged captures (PacketBatch.cap): per capture, entries of the last batch, and the
        # capture index of each record of the last table returned
        self.cap_device_packets = np.zeros(0, np.int64)
        self.cap_device_bytes = np.zeros(0, np.float64)
        self.emitted_caps = np.zeros(0, np.int64)

    # -- public -----------------------------------------------------------------------
    @property
    def device_first_seen(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for by_dev in self.device_first_seen_by_capture().values():
            for name, t in by_dev.items():
                out[name] = min(out.get(name, np.inf), t)
        return out

    def device_first_seen_by_capture(self) -> dict[int, dict[str, float]]:
        """Capture index (``PacketBatch.cap``, 0 for one capture) -> device -> first packet."""
        out: dict[int, dict[str, float]] = {}
        for (mac, hi, lo), t in self._first_seen.items():
            m48 = mac & _MAC48
            name = int_to_mac(m48) if m48 else _ip16_to_str(hi, lo)
            d = out.setdefault(mac >> 48, {})
            d[name] = min(d.get(name, np.inf), float(ns_to_s(np.array([t]))[0]))
        return out

    def add(self, b: PacketBatch, last: bool = False) -> FlowTable:
        """Records closed by this batch; ``last=True`` also closes the rest (as ``finish``).
        Packet times outside [0, TS_LIMIT_NS) are refused (ValueError): the reader never
        gives them, and the window arithmetic relies on it."""
        if len(b):
            lo, hi = int(b.ts_ns.min()), int(b.ts_ns.max())
            if lo < 0 or hi >= TS_LIMIT_NS:
                raise ValueError(
                    f"flow builder: packet time {lo if lo < 0 else hi} ns is "
                    f"outside [0, {TS_LIMIT_NS})"
                )
            self._tmax = max(self._tmax, hi)
        return self._step(b, final=last)

    def finish(self) -> FlowTable:
        return self._step(PacketBatch.empty(), final=True)

    # -- internals --------------------------------------------------------------------
    def _entries(self, b: PacketBatch) -> tuple[np.ndarray, np.ndarray]:
        """(packet index, direction) of each device-side entry, in file order; a packet
        between two devices gives two entries (source side first)."""
        sd, dd = self.selector.sides(b)
        pk = np.flatnonzero(sd | dd)
        d = sd[pk].view(np.int8)
        both = np.flatnonzero(sd & dd)
        if len(both):
            at = np.searchsorted(pk, both, side="right")
            pk = np.insert(pk, at, both)
            d = np.insert(d, at, np.zeros(len(both), np.int8))
        return pk, d

    def _step(self, b: PacketBatch, final: bool) -> FlowTable:
        """One batch through the phases of the module docstring: the devices' entries and
        their keys, merged after the open windows; rows grouped by key; windows; their first
        packets; their connections. Then the windows that are done become records and the
        rest stay open."""
        ent = self._device_entries(b)
        if ent is None:
            return FlowTable.empty(self.packets, self.payload_bytes)
        rows = _Rows.merge(self._open, ent)
        grp = self._group(rows)
        win = self._windows(rows, grp)
        first = self._first_packets(b, ent, rows, grp, win)
        conn = self._connections(ent, rows, grp, win)
        return self._close(rows, grp, win, first, conn, final)

    def _device_entries(self, b: PacketBatch) -> _Entries | None:
        """The batch's entries with their device-side keys; None when there is nothing to do
        (no entry, no open window)."""
        pk, d = self._entries(b)
        e = len(pk)
        self.stats.device_packets += e
        if e:
            self.stats.device_bytes += int(b.ip_len[pk].sum())
        if e == 0 and len(self._open) == 0:
            return None
        out_dir = d.astype(bool)
        key = {
            "dev_mac": np.where(out_dir, b.src_mac[pk], b.dst_mac[pk]),
            "dev_hi": np.where(out_dir, b.src_hi[pk], b.dst_hi[pk]),
            "dev_lo": np.where(out_dir, b.src_lo[pk], b.dst_lo[pk]),
            "rem_hi": np.where(out_dir, b.dst_hi[pk], b.src_hi[pk]),
            "rem_lo": np.where(out_dir, b.dst_lo[pk], b.src_lo[pk]),
            "dev_port": np.where(out_dir, b.sport[pk], b.dport[pk]),
            "rem_port": np.where(out_dir, b.dport[pk], b.sport[pk]),
            "proto": b.proto[pk],
        }
        if self.selector.nets and not self.selector.macs:
            # local-nets mode: the device's own frame MAC where the link layer has one, but
            # never a group address (a broadcast DHCP answer must not make a second key)
            m = key["dev_mac"]
            key["dev_mac"] = np.where((m >> _U64(40)) & _U64(1), _U64(0), m)
        if b.cap is not None:
            # merged small captures: the capture index rides in the MAC word's top 16 bits,
            # so keys, devices and connections never meet across captures
            cap = b.cap[pk]
            key["dev_mac"] = key["dev_mac"] | (cap.astype(np.uint64) << _U64(48))
            n_caps = len(getattr(self.selector, "per_capture", ()))
            self.cap_device_packets = np.bincount(cap, minlength=n_caps)
            self.cap_device_bytes = np.bincount(cap, weights=b.ip_len[pk], minlength=n_caps)
        return _Entries(pk, d, key, b.ts_ns[pk], b.ip_len[pk])

    def _group(self, rows: _Rows) -> _Groups:
        """Rows grouped by key, in row order within a key.

        Two independent 64-bit hashes: the first groups, the second proves the groups
        (different keys agreeing on both is a 2**-128 event); if it ever happens, all hashes
        change seed and the connection table starts afresh."""
        ow, v, n = rows.open, rows.v, rows.n
        while True:
            e1, e2 = self._key_hashes({k: a[v:] for k, a in rows.key.items()}, self._seed)
            h = np.concatenate([ow.h, e1]) if v else e1
            o = _group_order(h)
            H = h[o]
            gflag = np.empty(n, bool)
            gflag[0] = True
            np.not_equal(H[1:], H[:-1], out=gflag[1:])
            h2 = (np.concatenate([ow.h2, e2]) if v else e2)[o]
            if not (h2[1:] != h2[:-1])[~gflag[1:]].any():
                break
            self._seed += 1
            ow.h, ow.h2 = self._key_hashes(ow.key, self._seed)
            self._kt_h = self._kt_h[:0]
            for name in ("_kt_last", "_kt_cstart", "_kt_dorig"):
                setattr(self, name, getattr(self, name)[:0])
        return _Groups(o, H, h2, rows.t[o], np.flatnonzero(gflag), np.cumsum(gflag) - 1)

    def _windows(self, rows: _Rows, grp: _Groups) -> _Windows:
        """The windows of the grouped rows: their heads, totals and place in their key."""
        P, ow, v, n = self.packets, rows.open, rows.v, rows.n
        o = grp.o
        heads = _window_heads(grp.T, grp.gid, grp.gs, self.window_ns)
        hidx = np.flatnonzero(heads)
        nw = len(hidx)
        is_v = o < v
        w_src = o[hidx]  # merged-row index of each window's head
        w_rows = np.diff(np.append(hidx, n))
        w_vhead = is_v[hidx]
        w_vid = np.where(w_vhead, w_src, 0)
        w_pkts = w_rows - w_vhead + np.where(w_vhead, ow.npkts[w_vid] if v else 0, 0)
        base = np.where(w_vhead, (ow.nfirst[w_vid] if v else 0) - 1, 0)
        w_group = grp.gid[hidx]
        change = w_group[1:] != w_group[:-1]
        w_islast = np.empty(nw, bool)
        w_islast[:-1], w_islast[-1] = change, True
        w_gfirst = np.empty(nw, bool)
        w_gfirst[1:], w_gfirst[0] = change, True
        return _Windows(
            src=w_src,
            start=grp.T[hidx],
            last=np.maximum.reduceat(rows.tl[o], hidx),
            nbytes=np.add.reduceat(rows.nb[o], hidx),
            npkts=w_pkts,
            nfirst=np.minimum(P, w_rows - w_vhead + np.where(w_vhead, base + 1, 0)),
            group=w_group,
            islast=w_islast,
            gfirst=w_gfirst,
            vhead=w_vhead,
            vid=w_vid,
            base=base,
            hidx=hidx,
            row_wid=np.cumsum(heads) - 1,
            row_is_v=is_v,
        )

    def _first_packets(
        self, b: PacketBatch, ent: _Entries, rows: _Rows, grp: _Groups, win: _Windows
    ) -> _FirstPackets:
        """Each window's first packets: an open window's stored ones, then the entries
        ranked after them."""
        P, B, v, n = self.packets, self.payload_bytes, rows.v, rows.n
        f = _FirstPackets.zeros(len(win), P, B)
        if v:
            wv = np.flatnonzero(win.vhead)
            src, ow = win.vid[wv], rows.open.first
            f.t[wv], f.size[wv], f.dir[wv] = ow.t[src], ow.size[src], ow.dir[src]
            f.pay[wv], f.plen[wv] = ow.pay[src], ow.plen[src]
        wid = win.row_wid
        rank = np.arange(n) - win.hidx[wid] + win.base[wid]
        sel = np.flatnonzero(~win.row_is_v & (rank < P))
        if not len(sel):
            return f
        sw, sr = wid[sel], rank[sel]
        ei = grp.o[sel] - v  # entry index
        pki = ent.pk[ei]
        f.t[sw, sr] = ent.ts[ei]
        f.size[sw, sr] = b.ip_len[pki]
        f.dir[sw, sr] = ent.d[ei]
        if B:
            pay, plen = b.payload(pki, B)
            f.pay[sw, sr] = pay
            f.plen[sw, sr] = plen
            dh = np.flatnonzero(is_dhcp(b.proto[pki], b.sport[pki], b.dport[pki]))
            if len(dh):  # DHCP: the view of the whole message (iotcls.dhcp)
                raw, rlen = b.payload(pki[dh], DHCP_PAYLOAD_BYTES)
                put_views(
                    f.pay,
                    f.plen,
                    sw[dh],
                    sr[dh],
                    [raw[i, : rlen[i]].tobytes() for i in range(len(dh))],
                )
        return f

    def _connections(self, ent: _Entries, rows: _Rows, grp: _Groups, win: _Windows) -> _Connections:
        """Each window's connection: an open window's, a known key's (if not idle too long),
        or the previous window's; otherwise the head packet starts a new one."""
        ow, v, nw = rows.open, rows.v, len(win)
        proto_w = rows.key["proto"][win.src]
        timeout = np.where(proto_w == PROTO_TCP, TCP_TIMEOUT_NS, OTHER_TIMEOUT_NS)
        prev_last = np.full(nw, _NEVER, np.int64)
        prev_last[1:] = np.where(win.gfirst[1:], prev_last[1:], win.last[:-1])
        gh = grp.H[grp.gs]
        kt_pos = np.searchsorted(self._kt_h, gh)
        kt_found = kt_pos < len(self._kt_h)
        kt_found[kt_found] = self._kt_h[kt_pos[kt_found]] == gh[kt_found]
        wf = np.flatnonzero(win.gfirst & ~win.vhead)
        g_of_wf = win.group[wf]
        known = kt_found[g_of_wf]
        prev_last[wf[known]] = self._kt_last[kt_pos[g_of_wf[known]]]
        new_conn = ~win.vhead & (win.start - prev_last > timeout)
        w_cstart = np.zeros(nw, np.int64)
        w_dorig = np.zeros(nw, bool)
        if v:
            w_cstart[win.vhead] = ow.cstart[win.vid[win.vhead]]
            w_dorig[win.vhead] = ow.dorig[win.vid[win.vhead]]
        from_kt = wf[known & ~new_conn[wf]]
        kp = kt_pos[win.group[from_kt]]
        w_cstart[from_kt] = self._kt_cstart[kp]
        w_dorig[from_kt] = self._kt_dorig[kp]
        w_cstart[new_conn] = win.start[new_conn]
        head_entry = np.maximum(win.src - v, 0)
        w_dorig[new_conn] = ent.d[head_entry[new_conn]] == 1 if len(ent.pk) else False
        defined = win.vhead | new_conn | win.gfirst
        fill = np.maximum.accumulate(np.where(defined, np.arange(nw), 0))
        return _Connections(w_cstart[fill], w_dorig[fill], gh, kt_pos, kt_found)

    def _close(
        self,
        rows: _Rows,
        grp: _Groups,
        win: _Windows,
        first: _FirstPackets,
        conn: _Connections,
        final: bool,
    ) -> FlowTable:
        """Windows that are done become records (by start); the others stay open, and the
        connection table and the devices' first packets learn this batch."""
        closed = ~win.islast | final | (win.start + self.window_ns <= self._tmax)
        keep = np.flatnonzero(win.islast & ~closed)
        head = win.hidx[keep]
        self._open = _Open(
            h=grp.H[head],
            h2=grp.h2[head],
            key={k: rows.key[k][win.src[keep]] for k in _KEY_FIELDS},
            start=win.start[keep],
            last=win.last[keep],
            nbytes=win.nbytes[keep],
            npkts=win.npkts[keep],
            nfirst=win.nfirst[keep],
            first=first.take(keep),
            cstart=conn.cstart[keep],
            dorig=conn.dorig[keep],
        )
        il = win.islast
        self._update_keys(
            conn.gh,
            win.last[il],
            conn.cstart[il],
            conn.dorig[il],
            conn.kt_pos,
            conn.kt_found,
            final,
        )
        self._note_first_seen(rows.key, grp.o, grp.gs, grp.T)
        cw = np.flatnonzero(closed)
        cw = cw[np.argsort(win.start[cw], kind="stable")]
        return self._table(cw, rows.key, win, first, conn)

    @staticmethod
    def _key_hashes(key: dict[str, np.ndarray], seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Two independent hashes of each key. A key's hashes depend on its own fields only
        (open windows and the connection table keep them across chunks): IPv4 keys pack both
        addresses into one word, and hash under other seeds than the six-word form."""
        ports = (
            (key["dev_port"].astype(np.uint64) << _U64(24))
            | (key["rem_port"].astype(np.uint64) << _U64(8))
            | key["proto"].astype(np.uint64)
        )
        dh, dl, rh, rl = key["dev_hi"], key["dev_lo"], key["rem_hi"], key["rem_lo"]
        mac = key["dev_mac"]
        seeds = (seed, ~seed & _MASK64)
        top, b32 = _U64(0xFFFF), _U64(32)
        v4 = ((dh | rh) == 0) & ((dl >> b32) == top) & ((rl >> b32) == top)
        if v4.all():
            both = (dl << _U64(32)) | (rl & _U64(0xFFFFFFFF))
            w = [mac, both, ports]
            return _hash(w, seeds[0] ^ 0x4444), _hash(w, seeds[1] ^ 0x4444)
        w = [mac, dh, dl, rh, rl, ports]
        h1, h2 = _hash(w, seeds[0]), _hash(w, seeds[1])
        if v4.any():
            i = np.flatnonzero(v4)
            w = [mac[i], (dl[i] << _U64(32)) | (rl[i] & _U64(0xFFFFFFFF)), ports[i]]
            h1[i], h2[i] = _hash(w, seeds[0] ^ 0x4444), _hash(w, seeds[1] ^ 0x4444)
        return h1, h2

    def _update_keys(self, gh, g_last, g_cstart, g_dorig, kt_pos, kt_found, final) -> None:
        if final:
            self._kt_h = np.zeros(0, np.uint64)
            return
        stale = np.zeros(len(self._kt_h), bool)
        stale[kt_pos[kt_found]] = True  # replaced by this batch's state
        keep = ~stale & (self._kt_last >= self._tmax - TCP_TIMEOUT_NS)
        h = np.concatenate([self._kt_h[keep], gh])
        o = np.argsort(h, kind="stable")
        self._kt_h = h[o]
        self._kt_last = np.concatenate([self._kt_last[keep], g_last])[o]
        self._kt_cstart = np.concatenate([self._kt_cstart[keep], g_cstart])[o]
        self._kt_dorig = np.concatenate([self._kt_dorig[keep], g_dorig])[o]

    def _note_first_seen(self, allkey, o, gs, T) -> None:
        if not len(gs):
            return
        src = o[gs]
        mac = allkey["dev_mac"][src]
        no_mac = (mac & _U64(_MAC48)) == 0
        hi = np.where(no_mac, allkey["dev_hi"][src], _U64(0))
        lo = np.where(no_mac, allkey["dev_lo"][src], _U64(0))
        first = np.minimum.reduceat(T, gs)
        dh = _hash([mac, hi, lo], 0)
        uniq, idx, inv = np.unique(dh, return_index=True, return_inverse=True)
        mins = np.full(len(uniq), -_NEVER, np.int64)
        np.minimum.at(mins, inv.ravel(), first)
        fs = self._first_seen
        for m, a, c, t in zip(mac[idx].tolist(), hi[idx].tolist(), lo[idx].tolist(), mins.tolist()):
            if t < fs.get((m, a, c), t + 1):
                fs[(m, a, c)] = t

    def _table(
        self,
        cw: np.ndarray,
        allkey: dict[str, np.ndarray],
        w: _Windows,
        f: _FirstPackets,
        c: _Connections,
    ) -> FlowTable:
        """The records of the windows ``cw``, in that order."""
        m = len(cw)
        P, B = self.packets, self.payload_bytes
        if m == 0:
            return FlowTable.empty(P, B)
        self.stats.records += m
        src = w.src[cw]
        k = {name: allkey[name][src] for name in _KEY_FIELDS}
        start = w.start[cw]
        nf = w.nfirst[cw]
        present = np.arange(P)[None, :] < nf[:, None]
        offs = np.where(present, (f.t[cw] - start[:, None]) / NS, 0.0)
        cstart = c.cstart[cw]
        uid = make_uids(
            k["dev_hi"],
            k["dev_lo"],
            k["dev_port"],
            k["rem_hi"],
            k["rem_lo"],
            k["rem_port"],
            k["proto"],
            cstart,
        )
        self.emitted_caps = (k["dev_mac"] >> _U64(48)).astype(np.int64)
        return FlowTable(
            device_mac=_macs_to_str(k["dev_mac"] & _U64(_MAC48)),
            device_ip=_to16(k["dev_hi"], k["dev_lo"]),
            remote_ip=_to16(k["rem_hi"], k["rem_lo"]),
            device_port=k["dev_port"].astype(np.int32),
            remote_port=k["rem_port"].astype(np.int32),
            proto=k["proto"].astype(np.int16),
            start=ns_to_s(start),
            last=ns_to_s(w.last[cw]),
            total_bytes=w.nbytes[cw].astype(np.int64),
            total_packets=w.npkts[cw].astype(np.int64),
            n_pkts=nf.astype(np.int16),
            offsets=offs,
            sizes=np.where(present, f.size[cw], 0).astype(np.int32),
            directions=np.where(present, f.dir[cw], 0).astype(np.int8),
            payload=f.pay[cw],
            payload_len=np.where(present, f.plen[cw], 0).astype(np.int32),
            uid=uid,
            device_is_orig=c.dorig[cw].copy(),
        )


def _group_order(h: np.ndarray) -> np.ndarray:
    """Sort order grouping equal hashes, keeping input order within a group.

    The usual case sorts one unique 64-bit value per row (top 40 hash bits, then the row
    number): a quicksort, three times faster than a stable sort. If two different hashes
    share their top 40 bits, the full stable sort runs instead."""
    n = len(h)
    if n < (1 << 24):
        comp = (h & _U64(~((1 << 24) - 1) & _MASK64)) | np.arange(n, dtype=np.uint64)
        o = np.argsort(comp)
        hs = h[o]
        top = comp[o] >> _U64(24)
        if np.array_equal(hs[1:] != hs[:-1], top[1:] != top[:-1]):
            return o
    return np.argsort(h, kind="stable")


def _window_heads(T: np.ndarray, gid: np.ndarray, gs: np.ndarray, W: int) -> np.ndarray:
    """Rows that start a window: a group's first row, then the first row at or after the
    current window's start + W, in rounds over all groups at once.

    Within a group the search runs over the running maximum of time, offset by the group's
    rank so that one ``searchsorted`` over the whole array stays inside each group."""
    n = len(T)
    heads = np.zeros(n, bool)
    if n == 0:
        return heads
    heads[gs] = True
    ge = np.append(gs[1:], n)
    tmin = int(T.min())
    span = int(T.max()) - tmin + W + 1
    per_block = max(1, (1 << 62) // span)
    for b0 in range(0, len(gs), per_block):
        g0, g1 = b0, min(len(gs), b0 + per_block)
        r0, r1 = int(gs[g0]), int(ge[g1 - 1])
        rel = (gid[r0:r1] - g0).astype(np.int64) * span + (T[r0:r1] - tmin)
        C = np.maximum.accumulate(rel)
        p = gs[g0:g1] - r0
        end = ge[g0:g1] - r0
        g = np.arange(g1 - g0, dtype=np.int64)
        # groups that fit in one window need no search at all
        last_c = C[end - 1] - g * span
        live = last_c >= (T[r0 + p] - tmin) + W
        p, end, g = p[live], end[live], g[live]
        while len(p):
            thr = g * span + (T[r0 + p] - tmin) + W
            nxt = np.searchsorted(C, thr, side="left")
            ok = nxt < end
            p, end, g = nxt[ok], end[ok], g[ok]
            heads[r0 + p] = True
    return heads


# --------------------------------------------------------------------------------------------
# whole captures


@dataclass
class CaptureFlows:
    """Everything the sensor learnt from one capture."""

    table: FlowTable
    stats: ReadStats
    builder: BuilderStats
    device_first_seen: dict[str, float] = field(default_factory=dict)
    error: str = ""  # non-empty: the file could not be read at all


def _with_last(batches: Iterator[PacketBatch]) -> Iterator[tuple[PacketBatch, bool]]:
    """(batch, is it the last) with one batch of lookahead: a small capture costs one step."""
    prev = None
    for b in batches:
        if prev is not None:
            yield prev, False
        prev = b
    if prev is not None:
        yield prev, True


def iter_capture_flows(
    path: str | Path,
    selector: DeviceSelector,
    window_s: float = DEFAULT_WINDOW_S,
    packets: int = DEFAULT_PACKETS,
    payload_bytes: int = DEFAULT_PAYLOAD_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[tuple[FlowTable, CaptureReader, FlowBuilder]]:
    """Stream a capture's records chunk by chunk (bounded memory); raises PcapError."""
    reader = CaptureReader(path, chunk_bytes)
    builder = FlowBuilder(selector, window_s, packets, payload_bytes)
    done = False
    for batch, last in _with_last(reader.batches()):
        t = builder.add(batch, last)
        done = last
        if len(t) or last:
            yield t, reader, builder
    if not done:
        yield builder.finish(), reader, builder


def capture_flows(
    path: str | Path,
    selector: DeviceSelector,
    window_s: float = DEFAULT_WINDOW_S,
    packets: int = DEFAULT_PACKETS,
    payload_bytes: int = DEFAULT_PAYLOAD_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> CaptureFlows:
    """All records of one capture, ordered by window start. Never raises for a bad file:
    ``error`` says why nothing could be read, ``stats.warnings`` what went wrong later."""
    from .pcap import PcapError

    reader = CaptureReader(path, chunk_bytes)
    builder = FlowBuilder(selector, window_s, packets, payload_bytes)
    tables = []
    error = ""
    done = False
    try:
        for batch, last in _with_last(reader.batches()):
            tables.append(builder.add(batch, last))
            done = last
        if not done:
            tables.append(builder.finish())
    except PcapError as e:
        error = str(e)
    except Exception as e:  # noqa: BLE001 - a bad capture must cost only itself
        error = read_failure(reader, e)
        builder = FlowBuilder(selector, window_s, packets, payload_bytes)  # nothing of it kept
        tables = []
    t = FlowTable.concat(tables, packets, payload_bytes)
    if len(t) > 1 and (np.diff(t.start) < 0).any():
        t = t.take(np.argsort(t.start, kind="stable"))
    return CaptureFlows(t, reader.stats, builder.stats, builder.device_first_seen, error)


def read_failure(reader: CaptureReader, e: BaseException) -> str:
    """The one-line ``error`` of a capture whose reading failed in a way the reader did not
    foresee: the file, the chunk's offset and the exception, so that the capture is skipped
    and reported while the others go on (a sensor's input is hostile by definition)."""
    what = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return (
        f"{reader.path}: byte {reader.position}: cannot read this capture "
        f"({type(e).__name__}{': ' + what if what else ''}); skipped"
    )


def capture_flows_many(
    paths: list[str | Path],
    selectors: list[DeviceSelector],
    window_s: float = DEFAULT_WINDOW_S,
    packets: int = DEFAULT_PACKETS,
    payload_bytes: int = DEFAULT_PAYLOAD_BYTES,
) -> list[CaptureFlows]:
    """:func:`capture_flows` for many small captures in one pass of the flow builder (the
    fixed cost of a pass is most of the cost of a capture of a few hundred packets). Each
    capture is read whole, so keep them small; all selectors must share their local nets.
    Gives the same records as one :func:`capture_flows` per capture."""
    from .pcap import PcapError

    nets = {s.nets for s in selectors}
    if len(nets) > 1:
        raise ValueError("capture_flows_many: the captures' local networks differ")
    readers, errors, batches, caps = [], [], [], []
    for i, path in enumerate(paths):
        reader = CaptureReader(path, max(DEFAULT_CHUNK_BYTES, 1 << 30))
        readers.append(reader)
        mine: list[PacketBatch] = []
        try:
            mine = list(reader.batches())
            errors.append("")
        except PcapError as e:
            errors.append(str(e))
        except Exception as e:  # noqa: BLE001 - a bad capture must cost only itself
            errors.append(read_failure(reader, e))
            mine = []
        batches += mine
        caps += [i] * len(mine)
    sel = CaptureSelectors(tuple(selectors), next(iter(nets)) if nets else ())
    builder = FlowBuilder(sel, window_s, packets, payload_bytes)
    try:
        if batches:
            table = builder.add(PacketBatch.merge(batches, caps), last=True)
            tcaps = builder.emitted_caps
        else:
            table, tcaps = FlowTable.empty(packets, payload_bytes), np.zeros(0, np.int64)
    except Exception:  # noqa: BLE001 - one capture's packets broke the shared pass
        return [
            capture_flows(p, s, window_s, packets, payload_bytes) for p, s in zip(paths, selectors)
        ]
    order = np.lexsort((table.start, tcaps))  # by capture, then start (stable)
    table, tcaps = table.take(order), tcaps[order]
    bounds = np.searchsorted(tcaps, np.arange(len(paths) + 1))
    first = builder.device_first_seen_by_capture()
    dev_pk = np.zeros(len(paths), np.int64)
    dev_by = np.zeros(len(paths), np.int64)
    dev_pk[: len(builder.cap_device_packets)] = builder.cap_device_packets
    dev_by[: len(builder.cap_device_bytes)] = builder.cap_device_bytes
    out = []
    for i in range(len(paths)):
        t = table.take(np.arange(bounds[i], bounds[i + 1]))
        bs = BuilderStats(int(dev_pk[i]), int(dev_by[i]), len(t))
        out.append(CaptureFlows(t, readers[i].stats, bs, first.get(i, {}), errors[i]))
    return out
