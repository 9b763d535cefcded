"""Columnar form of many flow records, the shape the hot paths work in.

The pcap reader produces a :class:`FlowTable` directly (numpy all the way); the bridge turns
the :class:`~iotcls.schema.FlowRecord` objects it decodes from Zeek into one with
:meth:`FlowTable.from_records`. The matrix layout reads nothing else, so both sensors give the
same matrices by construction.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields
from functools import lru_cache
from itertools import chain

import numpy as np

from .dhcp import is_dhcp, put_views
from .schema import FlowRecord


def ip_to_bytes(ip: str) -> bytes:
    """16 bytes per address; IPv4 as an IPv4-mapped IPv6 address (::ffff:a.b.c.d)."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


@lru_cache(maxsize=65536)
def _ip16(ip: str) -> bytes:
    return ip_to_bytes(ip)


def _ips16(ips: list[str]) -> np.ndarray:
    """(n, 16) uint8 addresses; the same few addresses recur, so their parse is cached."""
    return np.frombuffer(b"".join([_ip16(ip) for ip in ips]), np.uint8).reshape(len(ips), 16)


def bytes_to_ip(b: bytes) -> str:
    if b[:12] == b"\x00" * 10 + b"\xff\xff":
        return str(ipaddress.IPv4Address(b[12:]))
    return str(ipaddress.IPv6Address(b))


@dataclass
class FlowTable:
    """n flow records; per-packet arrays hold ``packets`` slots, unused slots are zero."""

    device_mac: np.ndarray  # (n,) object: str, "" when unknown
    device_ip: np.ndarray  # (n, 16) uint8, IPv4-mapped for IPv4
    remote_ip: np.ndarray  # (n, 16) uint8
    device_port: np.ndarray  # (n,) int32
    remote_port: np.ndarray  # (n,) int32
    proto: np.ndarray  # (n,) int16
    start: np.ndarray  # (n,) float64
    last: np.ndarray  # (n,) float64
    total_bytes: np.ndarray  # (n,) int64
    total_packets: np.ndarray  # (n,) int64
    n_pkts: np.ndarray  # (n,) int16: how many packet slots are filled
    offsets: np.ndarray  # (n, P) float64
    sizes: np.ndarray  # (n, P) int32
    directions: np.ndarray  # (n, P) int8
    payload: np.ndarray  # (n, P, B) uint8
    payload_len: np.ndarray  # (n, P) int32
    uid: np.ndarray  # (n,) object: str
    device_is_orig: np.ndarray  # (n,) bool

    def __len__(self) -> int:
        return len(self.start)

    @property
    def packets(self) -> int:
        return self.offsets.shape[1]

    @property
    def payload_bytes(self) -> int:
        return self.payload.shape[2]

    @classmethod
    def empty(cls, packets: int, payload_bytes: int) -> FlowTable:
        return cls.allocate(0, packets, payload_bytes)

    @classmethod
    def allocate(cls, n: int, packets: int, payload_bytes: int) -> FlowTable:
        return cls(
            device_mac=np.full(n, "", dtype=object),
            device_ip=np.zeros((n, 16), np.uint8),
            remote_ip=np.zeros((n, 16), np.uint8),
            device_port=np.zeros(n, np.int32),
            remote_port=np.zeros(n, np.int32),
            proto=np.zeros(n, np.int16),
            start=np.zeros(n, np.float64),
            last=np.zeros(n, np.float64),
            total_bytes=np.zeros(n, np.int64),
            total_packets=np.zeros(n, np.int64),
            n_pkts=np.zeros(n, np.int16),
            offsets=np.zeros((n, packets), np.float64),
            sizes=np.zeros((n, packets), np.int32),
            directions=np.zeros((n, packets), np.int8),
            payload=np.zeros((n, packets, payload_bytes), np.uint8),
            payload_len=np.zeros((n, packets), np.int32),
            uid=np.full(n, "", dtype=object),
            device_is_orig=np.ones(n, bool),
        )

    @classmethod
    def from_records(cls, records: list[FlowRecord], packets: int, payload_bytes: int) -> FlowTable:
        """Records with more packets or payload than the table holds are truncated.

        One Python pass gathers the per-packet lists, numpy scatters them: the bridge turns
        every record Zeek sends into a table here, tens of thousands a second.
        """
        n = len(records)
        t = cls.allocate(n, packets, payload_bytes)
        if n == 0:
            return t
        t.device_mac[:] = [r.device_mac for r in records]
        t.uid[:] = [r.uid for r in records]
        t.device_ip[:] = _ips16([r.device_ip for r in records])
        t.remote_ip[:] = _ips16([r.remote_ip for r in records])
        ks = np.array([min(len(r.offsets), packets) for r in records], np.int64)
        t.n_pkts[:] = ks
        total = int(ks.sum())
        if total:
            rows = np.repeat(np.arange(n), ks)
            cols = np.arange(total) - np.repeat(np.cumsum(ks) - ks, ks)
            cut = slice(0, packets)
            t.offsets[rows, cols] = list(chain.from_iterable(r.offsets[cut] for r in records))
            t.sizes[rows, cols] = list(chain.from_iterable(r.sizes[cut] for r in records))
            t.directions[rows, cols] = list(chain.from_iterable(r.directions[cut] for r in records))
            pays = [p[:payload_bytes] for r in records for p in r.payloads[cut]]
            lens = np.fromiter(map(len, pays), np.int64, total)
            t.payload_len[rows, cols] = lens
            nbytes = int(lens.sum())
            if nbytes:
                base = np.repeat((rows * packets + cols) * payload_bytes, lens)
                within = np.arange(nbytes) - np.repeat(np.cumsum(lens) - lens, lens)
                t.payload.reshape(-1)[base + within] = np.frombuffer(b"".join(pays), np.uint8)
        t.device_port[:] = [r.device_port for r in records]
        t.remote_port[:] = [r.remote_port for r in records]
        t.proto[:] = [r.proto for r in records]
        t.start[:] = [r.start for r in records]
        t.last[:] = [r.last for r in records]
        t.total_bytes[:] = [r.total_bytes for r in records]
        t.total_packets[:] = [r.total_packets for r in records]
        t.device_is_orig[:] = [r.device_is_orig for r in records]
        if payload_bytes:  # DHCP payloads: their view (iotcls.dhcp), not their first bytes
            for i in np.flatnonzero(is_dhcp(t.proto, t.device_port, t.remote_port)).tolist():
                k = int(ks[i])
                put_views(
                    t.payload, t.payload_len, np.full(k, i), np.arange(k), records[i].payloads[:k]
                )
        return t

    def record(self, i: int) -> FlowRecord:
        k = int(self.n_pkts[i])
        return FlowRecord(
            device_mac=str(self.device_mac[i]),
            device_ip=bytes_to_ip(self.device_ip[i].tobytes()),
            device_port=int(self.device_port[i]),
            remote_ip=bytes_to_ip(self.remote_ip[i].tobytes()),
            remote_port=int(self.remote_port[i]),
            proto=int(self.proto[i]),
            start=float(self.start[i]),
            last=float(self.last[i]),
            total_bytes=int(self.total_bytes[i]),
            total_packets=int(self.total_packets[i]),
            offsets=[float(x) for x in self.offsets[i, :k]],
            sizes=[int(x) for x in self.sizes[i, :k]],
            directions=[int(x) for x in self.directions[i, :k]],
            payloads=[self.payload[i, j, : self.payload_len[i, j]].tobytes() for j in range(k)],
            uid=str(self.uid[i]),
            device_is_orig=bool(self.device_is_orig[i]),
        )

    def records(self) -> list[FlowRecord]:
        return [self.record(i) for i in range(len(self))]

    def take(self, index: np.ndarray) -> FlowTable:
        return FlowTable(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def concat(cls, tables: list[FlowTable], packets: int, payload_bytes: int) -> FlowTable:
        tables = [t for t in tables if len(t)]
        if not tables:
            return cls.empty(packets, payload_bytes)
        return cls(
            **{f.name: np.concatenate([getattr(t, f.name) for t in tables]) for f in fields(cls)}
        )

    def device_keys(self) -> np.ndarray:
        """The identity a device's history is kept under: its MAC, else its IP."""
        keys = self.device_mac.copy()
        missing = keys == ""
        for i in np.flatnonzero(missing):
            keys[i] = bytes_to_ip(self.device_ip[i].tobytes())
        return keys
