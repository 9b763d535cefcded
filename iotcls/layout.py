"""The flow-sequence matrix: column layout, scaling and assembly, declared once.

A matrix holds ``history + 1`` rows: row 0 is the current flow, row ``j`` the device's
``j``-th previous flow (by window start); rows with no flow are zero. Every row has the same
columns, in this order (groups name the feature groups used for explanations):

========== ================================= =============================================
group      columns                           value
========== ================================= =============================================
meta       ``rel_time``                      log1p(seconds since this row's start, seen
                                             from the current flow) / log1p(3600), capped
meta       ``rip0..rip3``, ``rip_v6``        remote IP: IPv4 octets / 255 (IPv6: first four
                                             bytes), zero for private remotes; v6 flag
meta       ``rport``, ``dport``              remote / device port / 65535
meta       ``tcp``, ``udp``, ``icmp``        protocol one-hot (all zero: other)
meta       ``bytes``, ``pkts``               log1p(total) / log1p(1e7), log1p / log1p(1e5)
timing     ``t00..t{P-1}``                   log1p(offset ms) / log1p(window ms)
sizes      ``s00..``                         IP length / 1500
directions ``d00..``                         +1 device to remote, -1 to device, 0 no packet
payload    ``packet`` mode: ``b00_000..``    per packet slot, byte b as (b + 1) / 256, 0 when
                                             the payload is shorter
payload    ``stream`` mode: ``c0000..``      the paper's stream: each packet's bytes between
                                             the delimiters -4 and -8, bytes / 255, padded 0
========== ================================= =============================================

**DHCP unit identity is left out.** DHCPv4 payloads reach the layout as the view of
:mod:`iotcls.dhcp` (header, vendor OUI, option codes and the options that name the type, with
what names one unit removed), made by the record builders. In DHCPv6 (546/547) payloads all
but the message type read as zero. A model that sees unit identity learns MAC addresses: on
the IoT Sentinel captures, 64 payload bytes with them visible lift held-out macro-F1 by about
ten points that do not carry over to a second unit of the same type (docs/model-card.md).

The layout travels inside every model bundle (``to_dict``/``from_dict``, YAML-safe), and
:meth:`MatrixLayout.check_compatible` refuses to feed a model data of another layout.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, fields

import numpy as np
import yaml
from numpy.lib.stride_tricks import sliding_window_view

from .dhcp import identity_of, is_dhcp
from .dns import DNS_PORT, MDNS_PORT, mdns_name, query_domain
from .flowtable import FlowTable
from .schema import (
    DEFAULT_PACKETS,
    DEFAULT_WINDOW_S,
    PRIVATE_NETS,
    PROTO_ICMP,
    PROTO_ICMP6,
    PROTO_TCP,
    PROTO_UDP,
)

LAYOUT_VERSION = 2  # 2: DHCPv4 payloads as iotcls.dhcp views
META_COLUMNS = (
    "rel_time",
    "rip0",
    "rip1",
    "rip2",
    "rip3",
    "rip_v6",
    "rport",
    "dport",
    "tcp",
    "udp",
    "icmp",
    "bytes",
    "pkts",
)
# the remote IP's four octet columns: the layout writes them, the model reads them as byte
# symbols, training moves them (iotcls.train.move_remotes)
REMOTE_IP = slice(META_COLUMNS.index("rip0"), META_COLUMNS.index("rip3") + 1)
# the ports and the UDP flag: the model reads the ports as byte symbols; DHCP dropout and
# rules 6 and 9 read a row's protocol back from them
PORTS = slice(META_COLUMNS.index("rport"), META_COLUMNS.index("dport") + 1)
UDP = META_COLUMNS.index("udp")
NO_NAMES: frozenset[str] = frozenset()
GROUPS = ("meta", "timing", "sizes", "directions", "payload")
STREAM_START = -4.0
STREAM_END = -8.0


class LayoutError(ValueError):
    pass


def _net_masks() -> tuple[np.ndarray, ...]:
    """PRIVATE_NETS as (mask, network) pairs of the high and the low 64 bits of an address."""
    out = []
    for net in PRIVATE_NETS:
        bits = net.prefixlen + (96 if net.version == 4 else 0)
        base = int(net.network_address) | ((0xFFFF << 32) if net.version == 4 else 0)
        m = ((1 << bits) - 1) << (128 - bits) if bits else 0
        out.append((m >> 64, m & ((1 << 64) - 1), base >> 64, base & ((1 << 64) - 1)))
    return tuple(np.array(col, np.uint64) for col in zip(*out))


_M_HI, _M_LO, _B_HI, _B_LO = _net_masks()


def _halves(ip16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 16) addresses as their high and low 64 bits."""
    halves = np.ascontiguousarray(ip16, dtype=np.uint8).view(">u8").astype(np.uint64)
    return halves[:, 0], halves[:, 1]


def _private_mask(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Which of the IPv4-mapped/IPv6 addresses (see _halves) lie in a private network."""
    return (((hi[:, None] & _M_HI) == _B_HI) & ((lo[:, None] & _M_LO) == _B_LO)).any(1)


DHCP6_PORTS = (546, 547)


def blank_unit_identity(t: FlowTable) -> np.ndarray:
    """The records' payload bytes with DHCPv6's unit-identifying bytes zeroed (a copy when
    any). DHCPv4 payloads are already unit-free views (:mod:`iotcls.dhcp`)."""
    dhcp6 = is_dhcp(t.proto, t.device_port, t.remote_port, DHCP6_PORTS)
    if not dhcp6.any():
        return t.payload
    payload = t.payload.copy()
    payload[dhcp6, :, 1:] = 0
    return payload


_BYTE_VALUE = (np.arange(256, dtype=np.float32) + 1.0) / 256.0  # packet mode's (b + 1) / 256


def rel_time(dt: np.ndarray | float) -> np.ndarray:
    """Scaled age of a history row relative to the current flow (the ``rel_time`` column)."""
    return np.minimum(np.log1p(np.maximum(dt, 0.0)) / np.log1p(3600.0), 1.0)


@dataclass(frozen=True)
class MatrixLayout:
    history: int = 5
    packets: int = DEFAULT_PACKETS
    payload_mode: str = "packet"  # "packet" | "stream" | "none"
    payload_bytes: int = 64  # per packet, packet mode (chosen by measurement, model card)
    stream_bytes: int = 1000  # stream mode
    window_s: float = DEFAULT_WINDOW_S
    version: int = LAYOUT_VERSION

    def __post_init__(self) -> None:
        if self.payload_mode not in ("packet", "stream", "none"):
            raise LayoutError(
                f"layout: payload_mode must be packet, stream or none, not {self.payload_mode!r}"
            )
        for name in ("history", "packets", "payload_bytes", "stream_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise LayoutError(f"layout: {name} must be a non-negative integer, not {v!r}")
        if self.packets < 1:
            raise LayoutError("layout: packets must be at least 1")
        if not self.window_s > 0:
            raise LayoutError(f"layout: window_s must be positive, not {self.window_s!r}")

    # -- presets and serialisation ---------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> MatrixLayout:
        if name == "default":
            return cls()
        if name == "paper":
            return cls(history=5, packets=10, payload_mode="stream", stream_bytes=1000)
        if name == "no-payload":
            return cls(payload_mode="none")
        raise LayoutError(f"layout: unknown preset {name!r} (default, paper, no-payload)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MatrixLayout:
        if not isinstance(d, dict):
            raise LayoutError(f"layout: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LayoutError(f"layout: unknown keys {sorted(unknown)}")
        if d.get("version", LAYOUT_VERSION) != LAYOUT_VERSION:
            raise LayoutError(
                f"layout: version {d.get('version')} is not supported (this is {LAYOUT_VERSION}: "
                "retrain the model with this iotcls)"
            )
        return cls(**d)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> MatrixLayout:
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise LayoutError(f"layout: not valid YAML: {e}") from None
        return cls.from_dict(d)

    def check_compatible(self, other: MatrixLayout, what: str = "data") -> None:
        if self != other:
            diff = {
                f.name: (getattr(self, f.name), getattr(other, f.name))
                for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)
            }
            raise LayoutError(f"layout mismatch between model and {what}: {diff}")

    # -- columns -----------------------------------------------------------------------
    def timing_value(self, offsets_ms: np.ndarray) -> np.ndarray:
        """A packet's time offset (ms) as its ``timing`` column holds it: a log scale on
        which the window's end is 1."""
        return np.log1p(offsets_ms) / np.log1p(self.window_s * 1000.0)

    def offset_ms(self, timing: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`timing_value`: a ``timing`` column back in milliseconds."""
        return np.expm1(timing * np.log1p(self.window_s * 1000.0))

    @property
    def rows(self) -> int:
        return self.history + 1

    @property
    def payload_width(self) -> int:
        if self.payload_mode == "packet":
            return self.packets * self.payload_bytes
        if self.payload_mode == "stream":
            return self.stream_bytes
        return 0

    @property
    def width(self) -> int:
        return len(META_COLUMNS) + 3 * self.packets + self.payload_width

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.width)

    def group_slices(self) -> dict[str, slice]:
        m, p = len(META_COLUMNS), self.packets
        return {
            "meta": slice(0, m),
            "timing": slice(m, m + p),
            "sizes": slice(m + p, m + 2 * p),
            "directions": slice(m + 2 * p, m + 3 * p),
            "payload": slice(m + 3 * p, self.width),
        }

    def column_names(self) -> list[str]:
        p = self.packets
        names = list(META_COLUMNS)
        names += [f"t{i:02d}" for i in range(p)]
        names += [f"s{i:02d}" for i in range(p)]
        names += [f"d{i:02d}" for i in range(p)]
        if self.payload_mode == "packet":
            names += [f"b{i:02d}_{j:03d}" for i in range(p) for j in range(self.payload_bytes)]
        elif self.payload_mode == "stream":
            names += [f"c{i:04d}" for i in range(self.stream_bytes)]
        return names

    def required_payload_bytes(self) -> int:
        """How many payload bytes per packet a sensor must keep for this layout."""
        if self.payload_mode == "packet":
            return self.payload_bytes
        if self.payload_mode == "stream":
            return max(0, self.stream_bytes - 2)
        return 0

    # -- encoding ------------------------------------------------------------------------
    def encode_rows(self, t: FlowTable) -> np.ndarray:
        """One row per record, ``rel_time`` left zero (it depends on the matrix)."""
        n, p = len(t), self.packets
        if t.packets < p:
            raise LayoutError(f"layout needs {p} packets per flow, the records hold {t.packets}")
        need = self.required_payload_bytes()
        if self.payload_mode == "packet" and t.payload_bytes < need:
            raise LayoutError(
                f"layout needs {need} payload bytes per packet, the records hold {t.payload_bytes}"
            )
        if n == 0:
            return np.zeros((n, self.width), np.float32)
        out = np.empty((n, self.width), np.float32)  # every column is written below
        out[:, 0] = 0.0
        rip = t.remote_ip.astype(np.float32)
        hi, lo = _halves(t.remote_ip)
        v4 = (hi == 0) & ((lo >> np.uint64(32)) == 0xFFFF)  # ::ffff:a.b.c.d
        octets = np.where(v4[:, None], rip[:, 12:16], rip[:, 0:4]) / 255.0
        octets[_private_mask(hi, lo)] = 0.0
        out[:, REMOTE_IP] = octets
        out[:, 5] = ~v4
        out[:, 6] = t.remote_port / 65535.0
        out[:, 7] = t.device_port / 65535.0
        out[:, 8] = t.proto == PROTO_TCP
        out[:, 9] = t.proto == PROTO_UDP
        out[:, 10] = (t.proto == PROTO_ICMP) | (t.proto == PROTO_ICMP6)
        out[:, 11] = np.log1p(t.total_bytes) / np.log1p(1e7)
        out[:, 12] = np.log1p(t.total_packets) / np.log1p(1e5)
        g = self.group_slices()
        present = np.arange(p)[None, :] < t.n_pkts[:, None]
        offs_ms = np.clip(t.offsets[:, :p] * 1000.0, 0.0, None)
        out[:, g["timing"]] = self.timing_value(offs_ms) * present
        out[:, g["sizes"]] = t.sizes[:, :p] / 1500.0 * present
        out[:, g["directions"]] = np.where(present, np.where(t.directions[:, :p] == 1, 1, -1), 0)
        payload = blank_unit_identity(t)
        if self.payload_mode == "packet" and self.payload_bytes:
            # per byte value a table look-up, times a row of 1s (as long as the payload) then 0s
            b = self.payload_bytes
            filled = np.clip(np.where(present, t.payload_len[:, :p], 0), 0, b)
            ones_zeros = sliding_window_view(np.repeat(np.uint8([1, 0]), b), b)[b - filled]
            values = np.take(_BYTE_VALUE, payload[:, :p, :b])  # take: faster than indexing
            out[:, g["payload"]] = (values * ones_zeros).reshape(n, p * b)
        elif self.payload_mode == "stream":
            out[:, g["payload"]] = self._stream(t, payload)
        return out

    def _stream(self, t: FlowTable, payload: np.ndarray) -> np.ndarray:
        """The paper's payload stream: [-4, bytes..., -8] per packet, then zero padding."""
        n, p, width = len(t), self.packets, self.stream_bytes
        plen = np.where(np.arange(p)[None, :] < t.n_pkts[:, None], t.payload_len[:, :p], -2)
        seg = plen + 2  # delimiters; absent packets (-2) take no room
        ends = np.cumsum(seg, axis=1)
        starts = ends - seg
        pos = np.arange(width)
        out = np.zeros((n, width), np.float32)
        for j in range(p):  # p is small; vectorised over records and bytes
            s, ln = starts[:, j : j + 1], plen[:, j : j + 1]
            rel = pos[None, :] - s
            has = ln >= 0
            out[(rel == 0) & has] = STREAM_START / 255.0
            out[(rel == ln + 1) & has] = STREAM_END / 255.0
            inside = (rel >= 1) & (rel <= ln) & has
            src = np.clip(rel - 1, 0, t.payload_bytes - 1)
            vals = np.take_along_axis(payload[:, j, :], src, axis=1) / 255.0
            out[inside] = vals[inside]
        return out

    def assemble(
        self, rows: np.ndarray, starts: np.ndarray, devices: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Matrices for every record; history is the device's previous records by start.

        Returns ``(matrices, order)``: ``matrices[i]`` belongs to record ``order[i]``
        (records sorted by device, then start, then input position).
        """
        n, k = len(rows), self.history
        dev_codes = np.unique(devices, return_inverse=True)[1] if n else np.zeros(0, int)
        order = np.lexsort((np.arange(n), starts, dev_codes))
        r, s, d = rows[order], starts[order], dev_codes[order]
        mats = np.zeros((n, k + 1, self.width), np.float32)
        mats[:, 0] = r
        for j in range(1, min(k, n - 1) + 1):  # row j of record i: record i - j, same device
            mats[j:, j] = r[:-j]
            mats[j:, j, 0] = rel_time(s[j:] - s[:-j])
            other = np.flatnonzero(d[j:] != d[:-j]) + j
            mats[other, j] = 0.0
        return mats, order

    def _sent_payloads(self, rows: np.ndarray, idx: np.ndarray) -> list[list[bytes]]:
        """Per row ``idx`` of the encoded ``rows``, the payload bytes of the packets the device
        sent, in order, as the row holds them (packet mode: ``payload_bytes`` each,
        zero-padded). Decoded for all the rows at once: the bridge calls this per batch."""
        g, p, b = self.group_slices(), self.packets, self.payload_bytes
        pay = rows[idx][:, g["payload"]].reshape(len(idx), p, b)
        raw = (np.rint(pay * 256.0) - 1.0).clip(0, 255).astype(np.uint8)
        sent = rows[idx][:, g["directions"]] > 0
        return [[raw[k, j].tobytes() for j in np.flatnonzero(sent[k])] for k in range(len(idx))]

    def _udp_to(self, rows: np.ndarray, port: int) -> np.ndarray:
        """Indices of the encoded UDP rows whose remote port is ``port`` (packet mode only:
        the other modes keep no per-packet bytes to read back)."""
        if self.payload_mode != "packet" or not self.payload_bytes or not len(rows):
            return np.zeros(0, np.intp)
        return np.flatnonzero(
            (rows[:, UDP] > 0) & (np.rint(rows[:, PORTS.start] * 65535.0) == port)
        )

    def dhcp_identities(self, rows: np.ndarray) -> np.ndarray:
        """Per encoded row, the DHCP identity (:func:`iotcls.dhcp.identity_of`) of the flow's
        first client message, or None: what trust rule 6 compares with the label's class.
        Read back from the row, so it works wherever only matrices are at hand."""
        rows = np.asarray(rows)
        out = np.full(len(rows), None, object)
        if self.payload_mode != "packet" or not self.payload_bytes or not len(rows):
            return out
        ports = np.rint(rows[:, PORTS] * 65535.0)  # rport, dport
        dhcp = is_dhcp(np.where(rows[:, UDP] > 0, PROTO_UDP, 0), ports[:, 0], ports[:, 1])
        idx = np.flatnonzero(dhcp)
        for i, views in zip(idx.tolist(), self._sent_payloads(rows, idx)):
            for view in views:
                out[i] = identity_of(view)
                if out[i] is not None:
                    break
        return out

    def dns_names(self, rows: np.ndarray) -> np.ndarray:
        """Per encoded row, the names (:mod:`iotcls.dns`) the device used in it, a frozenset,
        empty for other flows: the registered domains its DNS queries ask for, the names its
        mDNS messages carry. What trust rule 9 compares with the label's class. Read back
        from the row, as :meth:`dhcp_identities`."""
        rows = np.asarray(rows)
        out = np.full(len(rows), NO_NAMES, object)
        for port, name_of in ((DNS_PORT, query_domain), (MDNS_PORT, mdns_name)):
            idx = self._udp_to(rows, port)
            for i, sent in zip(idx.tolist(), self._sent_payloads(rows, idx)):
                names = frozenset(filter(None, map(name_of, sent)))
                if names:
                    out[i] = names
        return out

    def matrices(self, t: FlowTable) -> tuple[np.ndarray, np.ndarray]:
        """Encode and assemble a whole table: ``(matrices, order)`` as in :meth:`assemble`."""
        return self.assemble(self.encode_rows(t), t.start, t.device_keys())


class SequenceAssembler:
    """Online twin of :meth:`MatrixLayout.assemble` for records arriving one batch at a time.

    Keeps, per device, the ``history`` latest encoded rows by start. A record's history is
    the device's previous records by (start, arrival) among those seen so far, so a stream
    fed in start order gives exactly the matrices of the offline path. Devices beyond
    ``max_devices`` are forgotten least recently used first, which bounds memory.

    The bridge runs every record through here, so a batch is done with grouped numpy
    operations, not a loop per record. Each device owns a *ring*: up to ``history`` entries
    in ascending (start, arrival) order, each a start and the *cell* of a row pool holding
    its encoded row. Arrival breaks ties, so an entry kept earlier sorts before an equal
    start arriving later: no arrival counter is stored. The matrices, most of the memory
    traffic, are filled by one gather from the pool, whose tail holds a zero row and the
    batch's own rows, so each of their rows is written once.
    """

    CHUNK = 4096  # records done at a time: bounds the pool's room for a batch's rows

    def __init__(self, layout: MatrixLayout, max_devices: int = 100_000):
        self.layout = layout
        self.max_devices = max_devices
        k = layout.history
        self._slots: OrderedDict[str, int] = OrderedDict()  # device -> ring, least recent first
        self._free: list[int] = []  # rings of forgotten devices
        self._used = 0  # rings handed out
        # per ring, k-major (numpy works along the long axis): the entries' starts, ascending,
        # the first _count valid; the cells of all k positions, a permutation of range(k)
        self._count = np.zeros(0, np.intp)
        self._start = np.zeros((k, 0), np.float64)
        self._cell = np.zeros((k, 0), np.intp)
        # pool rows: ring r's cell c at r * k + c, then the zero row, then a batch's rows
        self._pool = np.zeros((1, layout.width), np.float32)

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def _zero(self) -> int:
        return len(self._count) * self.layout.history

    def add(self, rows: np.ndarray, starts: np.ndarray, devices: list[str]) -> np.ndarray:
        k, n = self.layout.history, len(rows)
        if n == 0 or self.max_devices < 1:  # none kept: no record has history
            mats = np.zeros((n, k + 1, self.layout.width), np.float32)
            mats[:, 0] = rows
            return mats
        mats = np.empty((n, k + 1, self.layout.width), np.float32)
        starts = np.asarray(starts, np.float64)
        # no more than max_devices records at a time: then a device, once touched, stays
        # until the chunk is done (only untouched ones make way for new devices)
        step = min(n, self.max_devices, self.CHUNK)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            self._add_chunk(mats[lo:hi], rows[lo:hi], starts[lo:hi], devices[lo:hi])
        return mats

    def peek(self, rows: np.ndarray, starts: np.ndarray, devices: list[str]) -> np.ndarray:
        """Matrices for records that do not join their device's history (early records: their
        final record will): each row, then the device's stored entries that start no later
        than it, newest first, as :meth:`add` would give it; nothing is stored."""
        k, n = self.layout.history, len(rows)
        mats = np.zeros((n, k + 1, self.layout.width), np.float32)
        mats[:, 0] = rows
        slots = np.array([self._slots.get(d, -1) for d in devices], np.intp)
        i = np.flatnonzero(slots >= 0)
        if not len(i):
            return mats
        s, t = slots[i], np.asarray(starts, np.float64)[i]
        ka = np.arange(k)[:, None]
        stored = self._start[:, s]
        b = ((ka < self._count[s]) & (stored <= t)).sum(0)  # entries below: a prefix
        j, col = np.nonzero(ka < b)  # j-th newest entry of record col
        pos = b[col] - 1 - j
        mats[i[col], j + 1] = self._pool[s[col] * k + self._cell[pos, s[col]]]
        mats[i[col], j + 1, 0] = rel_time(t[col] - stored[pos, col])
        return mats

    def _add_chunk(
        self, mats: np.ndarray, rows: np.ndarray, starts: np.ndarray, devices: list[str]
    ) -> None:
        n = len(rows)
        slot = self._touch(devices)
        if len(self._pool) < self._zero + 1 + n:
            self._resize(len(self._count), n)
        base = self._zero + 1
        self._pool[base : base + n] = rows
        # A record that starts before an earlier one of its device in the chunk goes into the
        # middle of that device's ring: cut the chunk there, so in each part every device's
        # records come in start order (what _add_ordered relies on).
        by_dev = np.argsort(slot, kind="stable")
        sd, ss = slot[by_dev], starts[by_dev]
        back = (sd[1:] == sd[:-1]) & (ss[1:] < ss[:-1])
        cuts = [0, *np.unique(by_dev[1:][back]).tolist(), n] if back.any() else [0, n]
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            self._add_ordered(mats[lo:hi], starts[lo:hi], slot[lo:hi], base + lo)

    def _touch(self, devices: list[str]) -> np.ndarray:
        """Each record's ring, its device touched as the record arrives: a new device makes
        the least recently used one forgotten. (A device of the chunk can be forgotten only
        before its first record there: it then starts afresh, as one record at a time.)"""
        slots, free, rings = self._slots, self._free, []
        fresh: list[int] = []
        get, to_end, ring_of = slots.get, slots.move_to_end, rings.append  # once, not per record
        for name in devices:
            s = get(name)
            if s is None:
                if len(slots) >= self.max_devices:
                    free.append(slots.popitem(last=False)[1])
                s = slots[name] = free.pop() if free else self._new_ring()
                fresh.append(s)
            else:
                to_end(name)
            ring_of(s)
        self._count[fresh] = 0
        return np.array(rings, np.intp)

    def _new_ring(self) -> int:
        if self._used == len(self._count):
            cap = len(self._count)
            cap += min(max(64, cap), max(1, self.max_devices - cap))
            self._resize(cap, len(self._pool) - self._zero - 1)
        self._used += 1
        return self._used - 1

    def _resize(self, rings: int, batch_rows: int) -> None:
        old, k = len(self._count), self.layout.history
        more = rings - old
        self._count = np.concatenate([self._count, np.zeros(more, np.intp)])
        self._start = np.concatenate([self._start, np.zeros((k, more))], axis=1)
        cells = np.broadcast_to(np.arange(k)[:, None], (k, more))
        self._cell = np.concatenate([self._cell, cells], axis=1)
        pool = np.zeros((rings * k + 1 + batch_rows, self.layout.width), np.float32)
        pool[: old * k] = self._pool[: old * k]
        self._pool = pool

    def _add_ordered(
        self, mats: np.ndarray, starts: np.ndarray, slot: np.ndarray, base: int
    ) -> None:
        """Matrices for records whose device's records (here) come in start order, their
        rows at pool rows ``base...``; then the rings updated.

        Record i's history is the part below it of its device's ring as it stands when i
        arrives: the top k of the ring before (E) and the device's earlier records here (R,
        all below i). The A stored entries above i stay in that top k, so the history is the
        k - A newest of the stored entries below i and of R: a merge of the newest k from
        each side. Arrays are (k, records): candidate ``a`` is the a-th newest of its side.
        """
        n, k = len(starts), self.layout.history
        by = np.argsort(slot, kind="stable")  # each device's records in order
        ss = slot[by]
        head = np.concatenate(([True], ss[1:] != ss[:-1]))
        first = np.flatnonzero(head)  # by positions where each device's records begin
        ka, rec = np.arange(k)[:, None], np.arange(n)
        cnt = self._count[slot]
        stored = self._start[:, slot]
        b = ((ka < cnt) & (stored <= starts)).sum(0)  # stored entries below: a prefix
        e_ok, e_pos = ka < b, np.maximum(b - 1 - ka, 0)
        e_start = stored[e_pos, rec]
        src = np.full((k + 1, n), self._zero, np.intp)  # pool row of each matrix row
        src[0] = base + rec
        age = np.zeros((k, n))  # seconds since each history row's start (0: none)
        if len(first) == n:  # one record per device: its history is the stored part below it
            a, i = np.nonzero(e_ok)
            j = a
        else:
            at = np.empty(n, np.intp)
            at[by] = rec  # record -> its by position
            q = at - first[(np.cumsum(head) - 1)[at]]  # earlier records of the device here
            r_ok, r_idx = ka < q, by[np.maximum(at - 1 - ka, 0)]
            r_start = starts[r_idx]
            # rank in the merge: own index + the other side's candidates that are newer
            # (a record arrived later, so it is newer than a stored entry of equal start)
            e_rank = ka + (r_ok[None] & (r_start[None] >= e_start[:, None])).sum(1)
            r_rank = ka + (e_ok[None] & (e_start[None] > r_start[:, None])).sum(1)
            room = k - cnt + b
            a, i = np.nonzero(r_ok & (r_rank < room))
            j = r_rank[a, i]
            src[j + 1, i] = base + r_idx[a, i]
            age[j, i] = starts[i] - r_start[a, i]
            a, i = np.nonzero(e_ok & (e_rank < room))
            j = e_rank[a, i]
        src[j + 1, i] = slot[i] * k + self._cell[e_pos[a, i], slot[i]]
        age[j, i] = starts[i] - e_start[a, i]
        np.take(self._pool, src.T.ravel(), axis=0, out=mats.reshape(n * (k + 1), -1), mode="clip")
        mats[:, 1:, 0] = rel_time(age).T
        self._update_rings(starts, by, first, ss[first], base)

    def _update_rings(
        self, starts: np.ndarray, by: np.ndarray, first: np.ndarray, slots: np.ndarray, base: int
    ) -> None:
        """Each ring becomes the top k of itself and its device's records here (in start
        order, so their newest k suffice). The entries kept from the ring are its newest and
        keep their cells; new rows take the cells of the dropped and unused positions."""
        k, g = self.layout.history, len(slots)
        ka = np.arange(k)[:, None]
        m = np.concatenate((first[1:], [len(by)])) - first  # records per device
        cnt, e_start, e_cell = self._count[slots], self._start[:, slots], self._cell[:, slots]
        e_ok, r_ok = ka < cnt, ka < m
        r_idx = by[np.maximum(first + m - 1 - ka, 0)]  # newest first
        r_start = starts[r_idx]
        e_rank = (cnt - 1 - ka) + (r_ok[None] & (r_start[None] >= e_start[:, None])).sum(1)
        r_rank = ka + (e_ok[None] & (e_start[None] > r_start[:, None])).sum(1)
        new_cnt = np.minimum(k, cnt + m)
        e_keep, r_keep = e_ok & (e_rank < k), r_ok & (r_rank < k)
        # free cells: positions cnt.. then 0.. (those dropped), x-th at position (cnt + x) % k
        free = np.take_along_axis(e_cell, (cnt + ka) % k, 0)
        new_start, new_cell = np.zeros((k, g)), np.empty((k, g), np.intp)
        t, c = np.nonzero(e_keep)
        pos = new_cnt[c] - 1 - e_rank[t, c]
        new_start[pos, c], new_cell[pos, c] = e_start[t, c], e_cell[t, c]
        x, c = np.nonzero(r_keep)  # a prefix of each device's newest
        pos = new_cnt[c] - 1 - r_rank[x, c]
        cell = free[x, c]
        new_start[pos, c], new_cell[pos, c] = r_start[x, c], cell
        self._pool[slots[c] * k + cell] = self._pool[base + r_idx[x, c]]
        p, c = np.nonzero(ka >= new_cnt)  # unused positions keep the cells left over
        new_cell[p, c] = free[r_keep.sum(0)[c] + p - new_cnt[c], c]
        self._start[:, slots], self._cell[:, slots] = new_start, new_cell
        self._count[slots] = new_cnt
