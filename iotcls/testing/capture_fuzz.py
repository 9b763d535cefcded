"""Seeded mutation fuzzing of the capture reader: the engine behind ``tests/test_fuzz_captures.py``
(bounded, in CI) and ``benchmarks/fuzz_captures.py`` (the long run).

Why structure-aware: random bit flips alone rarely get past a pcapng block's length check, so
most mutations aim at the fields that steer a reader: record and block lengths, interface ids,
option codes and lengths, ``if_tsresol``/``if_tsoffset``, timestamps, and the order of the
blocks themselves (deleted, duplicated, swapped, spliced in from another capture). Seeds are
small synthetic captures covering every link type and both byte orders, plus, where the IoT
Sentinel data is present, the first records of real captures in both formats.

One input runs the sensor's whole pcap path (:func:`run_one`): every batch the reader gives,
the flow builder over them with every endpoint a device, and the matrices of the records. An
input *crashes* when anything but :class:`~iotcls.pcap.PcapError` escapes, or when a batch
breaks an invariant the later steps rely on (times in range, offsets inside the buffer, buffers
sized by the file).
"""

from __future__ import annotations

import random
import struct
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import pcapgen as g
from ..flows import DeviceSelector, FlowBuilder
from ..flowtable import FlowTable
from ..layout import MatrixLayout
from ..pcap import _PAD, MIN_READ, TS_LIMIT_NS, CaptureReader, PacketBatch, PcapError

FORMATS = ("pcap", "pcapng")
_SHB = 0x0A0D0D0A
# 16/32/64-bit values that sit on the edges of what a reader computes with
_EDGES = (
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    11,
    12,
    15,
    16,
    19,
    20,
    28,
    31,
    32,
    63,
    64,
    127,
    128,
    255,
    256,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x10000,
    1 << 18,
    (1 << 18) + 1,
    16 << 20,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    1 << 62,
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
)


# --------------------------------------------------------------------------------------------
# seeds


def _frames() -> list[bytes]:
    """Ethernet frames of every kind the reader parses (and a few it skips)."""
    a, b = "02:00:00:00:00:01", "02:00:00:00:00:02"
    v4 = g.ipv4("192.168.1.10", "93.184.216.34", 6, g.tcp(40000, 443, b"\x16\x03\x01hello"))
    return [
        g.ether(a, b, v4),
        g.ether(b, a, g.ipv4("93.184.216.34", "192.168.1.10", 6, g.tcp(443, 40000, b"x" * 40))),
        g.ether(a, b, g.ipv4("192.168.1.10", "8.8.8.8", 17, g.udp(5353, 53, b"\x12\x34" * 9))),
        g.ether(a, b, g.ipv4("192.168.1.10", "8.8.8.8", 1, g.icmp(8, 0, b"ping"))),
        g.ether(
            a,
            b,
            g.ipv4(
                "192.168.1.10",
                "8.8.8.8",
                17,
                g.udp(68, 67, b"\x01" * 240),
                options=b"\x94\x04\x00\x00",
            ),
        ),
        g.ether(
            a,
            b,
            g.ipv4(
                "192.168.1.10",
                "8.8.8.8",
                17,
                g.udp(1, 2, b"frag" * 4),
                ident=7,
                more_fragments=True,
            ),
        ),
        g.ether(a, b, g.ipv4("192.168.1.10", "8.8.8.8", 17, b"tail", ident=7, frag_offset=24)),
        g.ether(
            a,
            b,
            g.ipv6(
                "fe80::1",
                "2001:db8::2",
                17,
                g.udp(546, 547, b"v6"),
                ext=[(0, b"\x01\x04\x00\x00\x00\x00"), (60, b"")],
            ),
        ),
        g.ether(a, b, g.ipv6("fe80::1", "ff02::1", 58, g.icmp(135, 0, b"\x00" * 20))),
        g.ether(a, b, g.ipv6("fe80::1", "2001:db8::2", 6, g.tcp(1, 2), ext=[(44, b"\x00" * 7)])),
        g.ether(a, b, v4, vlans=(100, 200), tpid=0x88A8),
        g.ether(a, b, b"\x00\x01\x08\x00\x06\x04\x00\x01" + b"\x00" * 20, ethertype=0x0806),
    ]


def _synthetic(fmt: str) -> list[bytes]:
    frames = _frames()
    t0 = 1_700_000_000.0
    pk = [(t0 + 0.37 * i, f) for i, f in enumerate(frames)]
    ip = [f[14:] for f in frames if f[12:14] in (b"\x08\x00", b"\x86\xdd")]
    if fmt == "pcap":
        raw = [(t0 + i, p) for i, p in enumerate(ip)]
        return [
            g.pcap_bytes(pk),
            g.pcap_bytes(pk, nsec=True, big_endian=True),
            g.pcap_bytes([(t, f, len(f) + 100) for t, f in pk], snaplen=48),
            g.pcap_bytes(raw, linktype=101),
            g.pcap_bytes(raw, linktype=228 if ip[0][0] >> 4 == 4 else 229),
            g.pcap_bytes([(t, g.sll(p, "02:00:00:00:00:01")) for t, p in raw], linktype=113),
            g.pcap_bytes([(t, g.sll2(p, "02:00:00:00:00:01")) for t, p in raw], linktype=276),
            g.pcap_bytes(
                [(t, struct.pack("<I", 2 if p[0] >> 4 == 4 else 24) + p) for t, p in raw],
                linktype=0,
            ),
            g.pcap_bytes(
                [(t, struct.pack(">I", 2 if p[0] >> 4 == 4 else 24) + p) for t, p in raw],
                linktype=108,
            ),
        ]
    two = [(t, f, i % 2) for i, (t, f) in enumerate(pk)]
    raw = [(t0 + i, p, 1) for i, p in enumerate(ip)]
    return [
        g.pcapng_bytes(pk),
        g.pcapng_bytes(two, interfaces=((1, 9), (1, 0x80 | 20)), big_endian=True),
        g.pcapng_bytes(two + raw, interfaces=((1, 6), (101, 3))),
        g.pcapng_bytes(pk, simple=True),
        g.pcapng_bytes(pk[:4]) + g.pcapng_bytes(pk[4:], big_endian=True),  # two sections
        _with_tsoffset(g.pcapng_bytes(pk[:6], interfaces=((1, 0x80 | 10),))),
    ]


def _with_tsoffset(data: bytes, offset: int = -3600) -> bytes:
    """``data`` (little-endian, one interface block) with an if_tsoffset option added."""
    blocks = pcapng_blocks(data)
    out = []
    for off, bl in blocks:
        blk = data[off : off + bl]
        if struct.unpack_from("<I", blk, 0)[0] == 1:
            opts = struct.pack("<HHq", 14, 8, offset)
            body = blk[8:-4]
            body = body[:-4] + opts + body[-4:]  # before opt_endofopt
            blk = struct.pack("<II", 1, len(body) + 12) + body + struct.pack("<I", len(body) + 12)
        out.append(blk)
    return b"".join(out)


def _real_records(path: Path, n: int) -> list[tuple[int, bytes]]:
    """(time in ns, frame) of the first ``n`` records of a little-endian usec pcap."""
    b = path.read_bytes()
    out, off = [], 24
    while off + 16 <= len(b) and len(out) < n:
        sec, usec, incl, _ = struct.unpack_from("<IIII", b, off)
        out.append((sec * 1_000_000_000 + usec * 1000, b[off + 16 : off + 16 + incl]))
        off += 16 + incl
    return out


def seeds(fmt: str, real: list[Path] = (), real_records: int = 24) -> list[bytes]:
    """The seed captures of one format: synthetic ones, then the first ``real_records``
    records of each capture in ``real`` (classic pcaps), rewritten as ``fmt``."""
    out = _synthetic(fmt)
    for p in real:
        recs = _real_records(p, real_records)
        if not recs:
            continue
        if fmt == "pcap":
            out.append(g.pcap_bytes(recs))
        else:
            out.append(g.pcapng_bytes([(t, f, 0) for t, f in recs], interfaces=((1, 9),)))
    return out


# --------------------------------------------------------------------------------------------
# structure


def classic_records(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of each whole record of a classic pcap, best effort."""
    if len(data) < 24:
        return []
    big = data[:4] in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d")
    e = ">" if big else "<"
    out, off = [], 24
    while off + 16 <= len(data) and len(out) < 4096:
        incl = struct.unpack_from(e + "I", data, off + 8)[0]
        if off + 16 + incl > len(data):
            break
        out.append((off, 16 + incl))
        off += 16 + incl
    return out


def pcapng_blocks(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of each whole block of a pcapng file, best effort (byte order taken
    from each section header)."""
    out, off, e = [], 0, "<"
    while off + 12 <= len(data) and len(out) < 4096:
        if struct.unpack_from("<I", data, off)[0] == _SHB:
            e = ">" if data[off + 8 : off + 12] == b"\x1a\x2b\x3c\x4d" else "<"
        bl = struct.unpack_from(e + "I", data, off + 4)[0]
        if bl < 12 or bl % 4 or off + bl > len(data):
            break
        out.append((off, bl))
        off += bl
    return out


def _units(data: bytes, fmt: str) -> tuple[bytes, list[tuple[int, int]]]:
    """The part before the first unit (classic: the file header) and the units."""
    if fmt == "pcap":
        return data[:24], classic_records(data)
    return b"", pcapng_blocks(data)


# --------------------------------------------------------------------------------------------
# mutations


def _put(data: bytearray, off: int, value: int, width: int, rng: random.Random) -> None:
    if off < 0 or off + width > len(data):
        return
    order = rng.choice("<>")
    fmt = {2: "H", 4: "I", 8: "Q"}[width]
    data[off : off + width] = struct.pack(order + fmt, value & ((1 << (8 * width)) - 1))


def _edge(rng: random.Random, near: int = 0) -> int:
    if near and rng.random() < 0.3:
        return max(0, near + rng.randint(-8, 8))
    return rng.choice(_EDGES)


def m_bitflip(rng, data: bytearray, fmt, pool) -> None:
    """1 to 8 single-bit flips anywhere (a 4-bit flip of a real capture found a crash)."""
    for _ in range(rng.randint(1, 8)):
        if data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)


def m_nibble(rng, data: bytearray, fmt, pool) -> None:
    """Flip the bits of one nibble inside a unit's first 32 bytes: lengths, ids, times."""
    _, units = _units(bytes(data), fmt)
    if not units:
        return m_bitflip(rng, data, fmt, pool)
    off, n = rng.choice(units)
    i = off + rng.randrange(min(n, 32))
    data[i] ^= rng.choice((0x0F, 0xF0, 0x80, 0x08, 0xFF))


def m_bytes(rng, data: bytearray, fmt, pool) -> None:
    for _ in range(rng.randint(1, 4)):
        if data:
            data[rng.randrange(len(data))] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))


def m_field(rng, data: bytearray, fmt, pool) -> None:
    """An edge value written over a 2-, 4- or 8-byte field at a unit-relative offset."""
    _, units = _units(bytes(data), fmt)
    width = rng.choice((2, 4, 4, 8))
    if units and rng.random() < 0.8:
        off, n = rng.choice(units)
        at = off + rng.randrange(0, max(1, min(n, 40)), 2)
    else:
        at = rng.randrange(max(1, len(data)))
    _put(data, at, _edge(rng), width, rng)


def m_length(rng, data: bytearray, fmt, pool) -> None:
    """A length field edited: a record's captured/original length, a block's leading or
    trailing length, a packet block's captured length, or an option's length."""
    _, units = _units(bytes(data), fmt)
    if not units:
        return m_field(rng, data, fmt, pool)
    off, n = rng.choice(units)
    if fmt == "pcap":
        at = off + rng.choice((8, 12))
    else:
        at = off + rng.choice((4, 4, n - 4, 20, 24, 28, 16, 18, 22))
    _put(data, at, _edge(rng, n), 4 if rng.random() < 0.8 else 2, rng)


def m_option(rng, data: bytearray, fmt, pool) -> None:
    """pcapng: an interface block rewritten with hostile options (if_tsresol, if_tsoffset,
    unknown codes, lengths that run past the block); classic: the header's link type."""
    if fmt == "pcap":
        if len(data) >= 24:
            lt = rng.choice((0, 1, 12, 14, 101, 108, 113, 228, 229, 276, rng.randrange(1 << 16)))
            _put(data, 20, lt, 4, rng)
        return
    blocks = pcapng_blocks(bytes(data))
    idbs = [(o, n) for o, n in blocks if struct.unpack_from("<I", data, o)[0] in (1, 1 << 24)]
    if not idbs:
        return m_length(rng, data, fmt, pool)
    off, n = rng.choice(idbs)
    e = ">" if struct.unpack_from("<I", data, off)[0] == 1 << 24 else "<"
    opts = b""
    for _ in range(rng.randint(1, 3)):
        code = rng.choice((9, 9, 14, 14, 2, 0, rng.randrange(1 << 16)))
        if code == 9:
            val = bytes(
                [
                    rng.choice(
                        (
                            0,
                            6,
                            9,
                            19,
                            20,
                            30,
                            63,
                            64,
                            127,
                            0x80,
                            0x80 | 34,
                            0x80 | 35,
                            0x80 | 64,
                            0x80 | 127,
                            rng.randrange(256),
                        )
                    )
                ]
            )
        elif code == 14:
            val = struct.pack(
                e + "q",
                rng.choice(
                    (
                        0,
                        -1,
                        3600,
                        -(1 << 63),
                        (1 << 63) - 1,
                        1 << 32,
                        -(1 << 32),
                        rng.randrange(-(1 << 63), 1 << 63),
                    )
                ),
            )
        else:
            val = bytes(rng.randrange(256) for _ in range(rng.randint(0, 12)))
        length = len(val) if rng.random() < 0.7 else _edge(rng, len(val)) & 0xFFFF
        opts += struct.pack(e + "HH", code, length) + val + b"\x00" * (-len(val) % 4)
    body = bytes(data[off + 8 : off + 16]) + opts + struct.pack(e + "HH", 0, 0)
    blk = struct.pack(e + "II", 1, len(body) + 12) + body + struct.pack(e + "I", len(body) + 12)
    data[off : off + n] = blk


def m_truncate(rng, data: bytearray, fmt, pool) -> None:
    _, units = _units(bytes(data), fmt)
    if units and rng.random() < 0.5:
        off, n = rng.choice(units)
        cut = off + rng.randrange(n + 1)
    else:
        cut = rng.randrange(len(data) + 1)
    del data[cut:]


def m_splice(rng, data: bytearray, fmt, pool) -> None:
    """Units deleted, duplicated, swapped, or spliced in from another seed of the format."""
    head, units = _units(bytes(data), fmt)
    if not units:
        return m_truncate(rng, data, fmt, pool)
    src = bytes(data)
    parts = [src[o : o + n] for o, n in units]
    tail = src[units[-1][0] + units[-1][1] :]
    op = rng.randrange(4)
    i = rng.randrange(len(parts))
    if op == 0:
        del parts[i]
    elif op == 1:
        parts.insert(rng.randrange(len(parts) + 1), parts[i])
    elif op == 2:
        j = rng.randrange(len(parts))
        parts[i], parts[j] = parts[j], parts[i]
    else:
        other = rng.choice(pool)
        oh, ou = _units(other, fmt)
        if ou:
            o, n = rng.choice(ou)
            parts.insert(rng.randrange(len(parts) + 1), other[o : o + n])
    data[:] = head + b"".join(parts) + tail


def m_insert(rng, data: bytearray, fmt, pool) -> None:
    at = rng.randrange(len(data) + 1)
    if rng.random() < 0.5:
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:
        del data[at : at + rng.randint(1, 16)]


MUTATORS: tuple[Callable, ...] = (
    m_bitflip,
    m_nibble,
    m_bytes,
    m_field,
    m_length,
    m_length,
    m_option,
    m_truncate,
    m_splice,
    m_splice,
    m_insert,
)


def mutate(rng: random.Random, seed: bytes, fmt: str, pool: list[bytes]) -> bytes:
    """One to three stacked mutations of ``seed``."""
    data = bytearray(seed)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
        rng.choice(MUTATORS)(rng, data, fmt, pool)
    return bytes(data)


# --------------------------------------------------------------------------------------------
# running one input

_LAYOUT = MatrixLayout(history=2, packets=4, payload_bytes=8)
_SELECTOR = DeviceSelector.from_lists([], ["0.0.0.0/0", "::/0"])  # every endpoint a device


class InvariantError(AssertionError):
    """A batch the reader gave breaks what the flow builder relies on."""


def _check_batch(b: PacketBatch, size: int) -> None:
    n = len(b)
    if any(len(getattr(b, k)) != n for k in ("rec_off", "ip_len", "proto", "sport", "pay_off")):
        raise InvariantError("batch columns differ in length")
    if len(b.buf) > max(size, MIN_READ) + _PAD:
        raise InvariantError(f"batch buffer of {len(b.buf)} bytes for a {size}-byte file")
    if not n:
        return
    if b.ts_ns.min() < 0 or b.ts_ns.max() >= TS_LIMIT_NS:
        raise InvariantError(f"packet time {int(b.ts_ns.min())}..{int(b.ts_ns.max())} ns")
    if b.rec_off.min() < 0 or b.rec_off.max() >= size:
        raise InvariantError("record offset outside the file")
    if b.ip_len.min() < 0 or b.pay_off.min() < 0 or b.pay_cap.min() < 0:
        raise InvariantError("negative length or offset")
    read = b.pay_cap > 0  # PacketBatch.payload reads at most pay_cap bytes from pay_off
    if read.any() and (b.pay_off + b.pay_cap)[read].max() > len(b.buf):
        raise InvariantError("payload runs past the batch buffer")


def run_one(path: Path, chunk_bytes: int = 1 << 20) -> tuple[int, int]:
    """Read ``path`` through the sensor's pcap path; returns (packets, records). Raises
    whatever the code under test raises, except PcapError (an unreadable file is an
    answer, not a crash)."""
    size = path.stat().st_size
    reader = CaptureReader(path, chunk_bytes)
    builder = FlowBuilder(
        _SELECTOR, _LAYOUT.window_s, _LAYOUT.packets, _LAYOUT.required_payload_bytes()
    )
    packets, tables = 0, []
    try:
        batches = list(reader.batches())
    except PcapError:
        return 0, 0
    for i, b in enumerate(batches):
        _check_batch(b, size)
        packets += len(b)
        tables.append(builder.add(b, last=i == len(batches) - 1))
    if not batches:
        tables.append(builder.finish())
    t = FlowTable.concat(tables, _LAYOUT.packets, _LAYOUT.required_payload_bytes())
    mats, _ = _LAYOUT.matrices(t)
    if not np.isfinite(mats).all():
        raise InvariantError("matrices hold NaN or infinity")
    reader.stats.summary_warnings()
    return packets, len(t)


def crash_kind(e: BaseException) -> str:
    """The exception type and the innermost iotcls frame: one crash class per bug."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "iotcls" in f.filename]
    where = f"{Path(frames[-1].filename).name}:{frames[-1].name}" if frames else "?"
    return f"{type(e).__name__} in {where}"


def inputs(fmt: str, pool: list[bytes], n: int, seed: int):
    """``n`` seeded inputs of a format: (index, bytes, chunk size). Every 16th is a seed
    itself; about one in eight reads with the smallest chunk, so chunk seams are hit."""
    rng = random.Random(f"{seed}:{fmt}")
    for i in range(n):
        base = pool[i % len(pool)] if i % 16 == 0 else rng.choice(pool)
        data = base if i % 16 == 0 else mutate(rng, base, fmt, pool)
        chunk = rng.choice((4096, 1 << 20, 1 << 20, 1 << 20, 1 << 20, 1 << 20, 1 << 20, 1 << 30))
        yield i, data, chunk
