"""Build packets and write pcap/pcapng files by hand: for tests, the bundled sample and the
benchmarks. Checksums are left zero (Zeek runs with ``-C`` and the sensor ignores them)."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from pathlib import Path

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", "").replace("-", ""))


def tcp(
    sport: int,
    dport: int,
    payload: bytes = b"",
    flags: int = 0x18,
    seq: int = 0,
    ack: int = 0,
    options: bytes = b"",
) -> bytes:
    options += b"\x00" * (-len(options) % 4)
    doff = (20 + len(options)) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, 65535, 0, 0)
    return hdr + options + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp(icmp_type: int, code: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack("!BBHI", icmp_type, code, 0, 0) + payload


def ipv4(
    src: str,
    dst: str,
    proto: int,
    l4: bytes,
    options: bytes = b"",
    ident: int = 0,
    frag_offset: int = 0,
    more_fragments: bool = False,
    ttl: int = 64,
    total_length: int | None = None,
) -> bytes:
    options += b"\x00" * (-len(options) % 4)
    ihl = 5 + len(options) // 4
    tot = total_length if total_length is not None else ihl * 4 + len(l4)
    frag = (frag_offset // 8) | (0x2000 if more_fragments else 0)
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        tot,
        ident,
        frag,
        ttl,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return hdr + options + l4


def ipv6(src: str, dst: str, nh: int, l4: bytes, ext: Iterable[tuple[int, bytes]] = ()) -> bytes:
    """``ext``: extension headers as (header type, body after the next-header byte); bodies
    are padded to the header's unit (8 bytes; AH: 4)."""
    chain = list(ext)
    body = b""
    types = [t for t, _ in chain] + [nh]
    for i, (t, data) in enumerate(chain):
        nxt = types[i + 1]
        if t == 44:  # fragment header: fixed 8 bytes
            body += bytes([nxt]) + data[:7].ljust(7, b"\x00")
            continue
        unit = 4 if t == 51 else 8
        raw = bytes([nxt, 0]) + data
        raw += b"\x00" * (-len(raw) % unit)
        hlen = len(raw) // unit - (2 if t == 51 else 1)
        body += raw[:1] + bytes([hlen]) + raw[2:]
    payload = body + l4
    first = types[0]
    return (
        struct.pack("!IHBB", 6 << 28, len(payload), first, 64)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + payload
    )


def ether(
    src_mac: str,
    dst_mac: str,
    payload: bytes,
    ethertype: int | None = None,
    vlans: Iterable[int] = (),
    tpid: int = 0x8100,
    pad: bool = True,
) -> bytes:
    if ethertype is None:
        ethertype = ETH_IPV6 if payload[:1] and payload[0] >> 4 == 6 else ETH_IPV4
    tags = b"".join(struct.pack("!HH", tpid if i == 0 else 0x8100, v) for i, v in enumerate(vlans))
    frame = mac_bytes(dst_mac) + mac_bytes(src_mac) + tags + struct.pack("!H", ethertype)
    frame += payload
    if pad and len(frame) < 60:
        frame += b"\x00" * (60 - len(frame))
    return frame


def sll(
    payload: bytes,
    src_mac: str = "",
    pkttype: int = 0,
    ethertype: int | None = None,
) -> bytes:
    if ethertype is None:
        ethertype = ETH_IPV6 if payload[0] >> 4 == 6 else ETH_IPV4
    addr = mac_bytes(src_mac) if src_mac else b""
    return (
        struct.pack("!HHH", pkttype, 1, len(addr))
        + addr.ljust(8, b"\x00")
        + struct.pack("!H", ethertype)
        + payload
    )


def sll2(
    payload: bytes, src_mac: str = "", pkttype: int = 0, ethertype: int | None = None
) -> bytes:
    if ethertype is None:
        ethertype = ETH_IPV6 if payload[0] >> 4 == 6 else ETH_IPV4
    addr = mac_bytes(src_mac) if src_mac else b""
    return (
        struct.pack("!HHIHBB", ethertype, 0, 1, 1, pkttype, len(addr))
        + addr.ljust(8, b"\x00")
        + payload
    )


def _to_ns(ts: float | int) -> int:
    """Integer nanoseconds from float seconds (to the microsecond) or integer nanoseconds."""
    if isinstance(ts, (int,)) and not isinstance(ts, bool):
        return ts
    sec = int(ts // 1)
    return sec * 1_000_000_000 + round((ts - sec) * 1e6) * 1000


def _ts_parts(ts: float | int, nsec: bool) -> tuple[int, int]:
    sec, frac = divmod(_to_ns(ts), 1_000_000_000)
    return sec, frac if nsec else frac // 1000


def pcap_bytes(
    packets: Iterable[tuple[float | int, bytes]],
    linktype: int = 1,
    nsec: bool = False,
    big_endian: bool = False,
    snaplen: int = 65535,
) -> bytes:
    """A classic pcap file; a packet may be (ts, frame) or (ts, frame, wire length)."""
    e = ">" if big_endian else "<"
    magic = 0xA1B23C4D if nsec else 0xA1B2C3D4
    out = [struct.pack(e + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)]
    for p in packets:
        ts, frame = p[0], p[1]
        wire = p[2] if len(p) > 2 else len(frame)  # type: ignore[misc]
        frame = frame[:snaplen]
        sec, frac = _ts_parts(ts, nsec)
        out.append(struct.pack(e + "IIII", sec, frac, len(frame), wire) + frame)
    return b"".join(out)


def write_pcap(path: str | Path, packets: Iterable[tuple[float | int, bytes]], **kw) -> Path:
    path = Path(path)
    path.write_bytes(pcap_bytes(packets, **kw))
    return path


def _block(e: str, btype: int, body: bytes) -> bytes:
    body += b"\x00" * (-len(body) % 4)
    n = 12 + len(body)
    return struct.pack(e + "II", btype, n) + body + struct.pack(e + "I", n)


def pcapng_bytes(
    packets: Iterable[tuple],
    interfaces: Iterable[tuple[int, int]] = ((1, 6),),
    big_endian: bool = False,
    simple: bool = False,
) -> bytes:
    """A pcapng file with one section. ``interfaces``: (link type, if_tsresol byte);
    ``packets``: (ts, frame, interface id); ``simple``: write Simple Packet Blocks (no time,
    interface 0) instead."""
    e = ">" if big_endian else "<"
    out = [_block(e, 0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1))]
    resol = []
    for linktype, tsresol in interfaces:
        opts = struct.pack(e + "HH", 9, 1) + bytes([tsresol, 0, 0, 0]) + struct.pack(e + "HH", 0, 0)
        out.append(_block(e, 1, struct.pack(e + "HHI", linktype, 0, 0) + opts))
        resol.append(tsresol)
    for p in packets:
        ts, frame = p[0], p[1]
        iface = p[2] if len(p) > 2 else 0
        if simple:
            out.append(_block(e, 3, struct.pack(e + "I", len(frame)) + frame))
            continue
        r = resol[iface]
        ns = _to_ns(ts)
        if r & 0x80:
            ticks = (ns << (r & 0x7F)) // 1_000_000_000
        else:
            ticks = ns * 10 ** (r - 9) if r > 9 else ns // 10 ** (9 - r)
        body = (
            struct.pack(e + "IIIII", iface, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), len(frame))
            + frame
        )
        out.append(_block(e, 6, body))
    return b"".join(out)


def write_pcapng(path: str | Path, packets: Iterable[tuple], **kw) -> Path:
    path = Path(path)
    path.write_bytes(pcapng_bytes(packets, **kw))
    return path
