"""Fast capture reader: classic pcap and pcapng into columnar packet batches.

Why this shape: per-packet Python is the cost that decides whether the sensor keeps up, so
Python touches each record exactly once, in the tightest loop that can find where records
start (:func:`_walk_classic`, :meth:`CaptureReader._walk_pcapng`). Everything else (link
layer, IPv4/IPv6, extension headers, TCP/UDP/ICMP) is parsed by numpy over all the packets of
a chunk at once, from fixed-size gathers at the collected offsets: one method per header
(:meth:`CaptureReader._parse`), each handing the next a small dataclass of columns.

The file is read in chunks of ``chunk_bytes`` (8 MiB by default); a record cut by the end of
a chunk moves to the next one, so memory stays bounded whatever the capture's size. Each chunk
becomes one :class:`PacketBatch` that keeps a reference to its raw bytes, so the flow builder
can copy payload bytes only for the few packets that need them.

Bad input never costs the good packets before it: a truncated or corrupt file, an unknown link
type or a malformed packet produces a one-line warning naming the file and the byte offset (see
:class:`ReadStats`), and reading stops (corrupt framing) or skips the packet (malformed
headers). Only a file that cannot be read at all raises :class:`PcapError`.

Every number a file gives (lengths, interface ids, option lengths, resolutions, offsets, times)
is checked against the block it sits in or the range the next step can carry before it is used:
a packet time must fall in [0, :data:`TS_LIMIT_NS`) (1970 to 2116), which keeps every sum and
difference of times and windows in the flow builder inside int64; a packet outside it (a flipped
bit in a pcapng timestamp, an absurd ``if_tsoffset``) is skipped with a warning like any other
malformed packet, since its framing is intact and the packets after it are good.

Differences from Zeek, on purpose: IPv4/IPv6 fragments are not reassembled; a first fragment
counts as a packet of its own size, later fragments (no transport header) are skipped and
counted in :attr:`ReadStats.fragments`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .columns import Columns

DEFAULT_CHUNK_BYTES = 8 << 20  # measured: as fast as 32 MiB, a third of the memory
_PAD = 256  # zero bytes after a chunk so fixed-size gathers never leave the buffer
MAX_WARNINGS = 10  # per file; the rest are only counted
MAX_RECORD = 1 << 18  # a record larger than this is corrupt framing (snaplen is at most 256 KiB)
MAX_BLOCK = 16 << 20  # pcapng block
MIN_READ = 64 << 10  # what one read asks for past the size the file had when opened
TS_LIMIT_NS = 1 << 62  # packet times lie in [0, this): 2116-02-20; see the module docstring
_NS = 1_000_000_000
_MAX_SEC = TS_LIMIT_NS // _NS  # whole seconds below the limit

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW_BSD = 12
LINKTYPE_RAW_OPENBSD = 14
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
LINKTYPES = {
    LINKTYPE_NULL: "null",
    LINKTYPE_ETHERNET: "ethernet",
    LINKTYPE_RAW_BSD: "raw",
    LINKTYPE_RAW_OPENBSD: "raw",
    LINKTYPE_RAW: "raw",
    LINKTYPE_LOOP: "loop",
    LINKTYPE_LINUX_SLL: "linux-sll",
    LINKTYPE_IPV4: "ipv4",
    LINKTYPE_IPV6: "ipv6",
    LINKTYPE_LINUX_SLL2: "linux-sll2",
}

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
_IPV6_EXT = (0, 43, 44, 51, 60, 135)  # hop-by-hop, routing, fragment, AH, dest. options, mobility

# Zeek's ICMP "counterpart" types (ICMP4_counterpart / ICMP6_counterpart): the responder-side
# port of an ICMP connection; -1 means none, and the code is used instead.
_ICMP4_PEER = np.full(256, -1, np.int32)
for _a, _b in ((8, 0), (13, 14), (15, 16), (10, 9), (17, 18)):
    _ICMP4_PEER[_a], _ICMP4_PEER[_b] = _b, _a
_ICMP6_PEER = np.full(256, -1, np.int32)
for _a, _b in ((128, 129), (133, 134), (135, 136), (130, 131), (139, 140), (144, 145)):
    _ICMP6_PEER[_a], _ICMP6_PEER[_b] = _b, _a

_IS_EXT = np.zeros(256, bool)
_IS_EXT[list(_IPV6_EXT)] = True
_L4_KIND = np.zeros(256, np.int8)  # by IP protocol: 0 other, 1 tcp, 2 udp, 3 icmp/icmpv6
_L4_KIND[[6, 17, 1, 58]] = [1, 2, 3, 3]
_L4_NEED = np.array([0, 20, 8, 8], np.int64)  # header bytes needed: Zeek's minimum lengths

_MAGIC_USEC = 0xA1B2C3D4
_MAGIC_NSEC = 0xA1B23C4D
_PCAPNG_SHB = 0x0A0D0D0A
_PCAPNG_BOM = 0x1A2B3C4D


class PcapError(Exception):
    """The file cannot be read at all (missing, unreadable, not a capture)."""


@dataclass
class ReadStats:
    """What reading one file saw; ``warnings`` holds the first one-line messages."""

    path: str
    frames: int = 0  # records read
    ip_packets: int = 0  # IP packets parsed (including those no device claims)
    ip_bytes: int = 0  # their IP lengths
    non_ip: int = 0  # ARP, EAPOL, LLC...
    malformed: int = 0  # skipped: headers broken or cut
    fragments: int = 0  # skipped: non-first IP fragments
    unknown_link: int = 0  # skipped: link type not supported
    truncated: bool = False  # the file ended inside a record or had corrupt framing
    warnings: list[str] = field(default_factory=list)
    warning_count: int = 0

    def warn(self, offset: int | None, message: str) -> None:
        self.warning_count += 1
        if len(self.warnings) < MAX_WARNINGS:
            where = f"byte {offset}: " if offset is not None else ""
            self.warnings.append(f"{self.path}: {where}{message}")

    def summary_warnings(self) -> list[str]:
        """The kept warnings plus one line for those only counted."""
        extra = self.warning_count - len(self.warnings)
        tail = [f"{self.path}: {extra} more warnings not shown"] if extra > 0 else []
        return self.warnings + tail


@dataclass
class PacketBatch:
    """IP packets of one chunk, columnar. Addresses are (hi, lo) halves of the 16-byte
    IPv4-mapped form, MACs are 48-bit integers (0 when the link layer has none)."""

    buf: np.ndarray  # the chunk's bytes (uint8), payloads are read from here
    ts_ns: np.ndarray  # int64 epoch nanoseconds
    rec_off: np.ndarray  # int64 file offset of the record
    ip_len: np.ndarray  # int64: IPv4 total length, IPv6 payload length + 40
    proto: np.ndarray  # int64 transport protocol (after IPv6 extension headers)
    src_hi: np.ndarray  # uint64
    src_lo: np.ndarray
    dst_hi: np.ndarray
    dst_lo: np.ndarray
    sport: np.ndarray  # int64; ICMP: type; other protocols: 0
    dport: np.ndarray  # int64; ICMP: counterpart type, else code
    src_mac: np.ndarray  # uint64
    dst_mac: np.ndarray  # uint64
    l4_len: np.ndarray  # int64 transport payload length per the headers (Zeek's view)
    pay_off: np.ndarray  # int64 offset of the transport payload in ``buf``
    pay_cap: np.ndarray  # int64 payload bytes actually present in the capture
    cap: np.ndarray | None = None  # int64 capture index, when batches of files are merged

    def __len__(self) -> int:
        return len(self.ts_ns)

    def payload(self, idx: np.ndarray, nbytes: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``nbytes`` payload bytes of packets ``idx`` (zero padded) and their
        lengths."""
        idx = np.asarray(idx, np.int64)
        lens = np.minimum(np.minimum(self.l4_len[idx], self.pay_cap[idx]), nbytes)
        lens = np.maximum(lens, 0)
        out = np.zeros((len(idx), nbytes), np.uint8)
        if len(idx) == 0 or nbytes == 0:
            return out, lens.astype(np.int32)
        k = min(nbytes, int(lens.max()))
        if k == 0:
            return out, lens.astype(np.int32)
        rows = _rows(self.buf, self.pay_off[idx], k)
        out[:, :k] = rows
        short = np.flatnonzero(lens < k)  # zero what lies beyond each payload
        if len(short):
            out[short] *= np.arange(nbytes)[None, :] < lens[short, None]
        return out, lens.astype(np.int32)

    @classmethod
    def empty(cls) -> PacketBatch:
        i = np.zeros(0, np.int64)
        u = np.zeros(0, np.uint64)
        return cls(np.zeros(_PAD, np.uint8), i, i, i, i, u, u, u, u, i, i, u, u, i, i, i)

    def take(self, idx: np.ndarray) -> PacketBatch:
        kw = {
            k: getattr(self, k)[idx]
            for k in self.__dataclass_fields__
            if k != "buf" and getattr(self, k) is not None
        }
        return PacketBatch(buf=self.buf, **kw)

    @classmethod
    def merge(cls, batches: list[PacketBatch], caps: list[int]) -> PacketBatch:
        """One batch of several files' batches, each packet tagged with its file's ``caps``
        entry: lets many small captures share one pass of the flow builder."""
        bufs = [b.buf for b in batches]
        shift = np.cumsum([0] + [len(x) for x in bufs[:-1]])
        names = [k for k in cls.__dataclass_fields__ if k not in ("buf", "cap")]
        kw = {k: np.concatenate([getattr(b, k) for b in batches]) for k in names}
        kw["pay_off"] = np.concatenate([b.pay_off + s for b, s in zip(batches, shift)])
        kw["cap"] = np.repeat(np.asarray(caps, np.int64), [len(b) for b in batches])
        buf = np.concatenate(bufs + [np.zeros(_PAD, np.uint8)])
        return cls(buf=buf, **kw)


# --------------------------------------------------------------------------------------------
# vectorised field access


def _rows(buf: np.ndarray, off: np.ndarray, width: int) -> np.ndarray:
    """``(len(off), width)`` bytes starting at each offset: one memcpy per row."""
    view = np.ndarray(
        shape=(len(buf) - width + 1,), dtype=np.dtype((np.void, width)), buffer=buf, strides=(1,)
    )
    # garbage offsets of broken packets must not leave the buffer; their rows are ignored
    return view[np.minimum(off, len(buf) - width)].view(np.uint8).reshape(len(off), width)


def _be16(g: np.ndarray, i: int) -> np.ndarray:
    return (g[:, i].astype(np.int64) << 8) | g[:, i + 1]


def _be32(g: np.ndarray, i: int) -> np.ndarray:
    return np.ascontiguousarray(g[:, i : i + 4]).view(">u4").ravel().astype(np.uint64)


def _be64(g: np.ndarray, i: int) -> np.ndarray:
    return np.ascontiguousarray(g[:, i : i + 8]).view(">u8").ravel().astype(np.uint64)


def _mac(g: np.ndarray, i: int) -> np.ndarray:
    z = np.zeros((len(g), 8), np.uint8)
    z[:, 2:] = g[:, i : i + 6]
    return z.view(">u8").ravel().astype(np.uint64)


# --------------------------------------------------------------------------------------------
# record walks: the only per-record Python


def _walk_classic(b: bytearray, pos: int, size: int, big: bool) -> tuple[list[int], int, bool]:
    """Record offsets from ``pos``; returns (offsets, where it stopped, corrupt?)."""
    unpack = struct.Struct(">I" if big else "<I").unpack_from
    offs: list[int] = []
    append = offs.append
    end = size - 16
    lim = MAX_RECORD
    while pos <= end:
        incl = unpack(b, pos + 8)[0]
        if incl > lim:
            return offs, pos, True
        nxt = pos + 16 + incl
        if nxt > size:
            break
        append(pos)
        pos = nxt
    return offs, pos, False


@dataclass
class _Iface:
    linktype: int
    tsresol: int  # the if_tsresol exponent (0..127): 10**-e or, with ts_pow2, 2**-e seconds
    ts_pow2: bool
    ts_offset: int  # if_tsoffset seconds, any int64: range-checked per packet


@dataclass
class _Section:
    """One section header's byte order and interface table. ``idb_at`` holds the file
    offset of each interface block, so that a packet may only name the interfaces defined
    before it, whatever the chunk boundaries (:meth:`known_ifaces`)."""

    big: bool
    ifaces: list[_Iface] = field(default_factory=list)
    idb_at: list[int] = field(default_factory=list)

    def known_ifaces(self, rec_at: np.ndarray) -> np.ndarray:
        """Per packet block at file offsets ``rec_at``: how many interfaces precede it."""
        return np.searchsorted(np.asarray(self.idb_at, np.int64), rec_at)


@dataclass
class _BlockWalk:
    """One chunk's pcapng blocks: its packet blocks' offsets by section (enhanced, simple),
    where the walk stopped, why if the framing is corrupt, and the section it ended in."""

    groups: list[tuple[_Section, list[int], list[int]]]
    stop: int
    corrupt: str
    section: _Section | None


def _parse_idb(b: bytearray, off: int, bl: int, big: bool) -> tuple[_Iface, str]:
    """The interface of the block at ``off`` (length ``bl``, checked by the caller) and a
    problem ("" when none). An option whose length runs past the block ends the options: the
    link type before them is still good, so the interface is kept with the defaults."""
    e = ">" if big else "<"
    linktype = struct.unpack_from(e + "H", b, off + 8)[0]
    iface = _Iface(linktype, 6, False, 0)
    p, end = off + 16, off + bl - 4
    while p + 4 <= end:
        code, length = struct.unpack_from(e + "HH", b, p)
        if code == 0:
            break
        if p + 4 + length > end:
            return iface, f"pcapng: interface option {code} of {length} bytes runs past its block"
        if code == 9 and length >= 1:
            v = b[p + 4]
            iface.ts_pow2, iface.tsresol = bool(v & 0x80), v & 0x7F
        elif code == 14 and length >= 8:
            iface.ts_offset = struct.unpack_from(e + "q", b, p + 4)[0]
        p += 4 + ((length + 3) & ~3)
    return iface, ""


# --------------------------------------------------------------------------------------------
# what each header step hands to the next: columns, one entry per packet


@dataclass
class _Records(Columns):
    """A chunk's packet records: where each starts in the buffer, its captured and wire
    lengths, its time (ns) and its file offset."""

    off: np.ndarray
    cap: np.ndarray
    wire: np.ndarray
    ts: np.ndarray
    rec: np.ndarray

    def __len__(self) -> int:
        return len(self.off)


@dataclass
class _LinkLayer(Columns):
    """The IP packets of a chunk, past their link layer."""

    r: _Records
    l3: np.ndarray  # int64: the IP header's offset in the record
    smac: np.ndarray  # uint64, 0 when the link layer has none
    dmac: np.ndarray
    is4: np.ndarray  # bool: IPv4, else IPv6


@dataclass
class _IPHeader(Columns):
    """What the IP header (and IPv6's extension headers) say."""

    g: np.ndarray  # (n, 40) the header's first bytes: the addresses are read from here
    ip_len: np.ndarray  # int64: IPv4 total length, IPv6 payload length + 40
    proto: np.ndarray  # int64: transport protocol
    l4: np.ndarray  # int64: the transport header's offset in the record
    rem: np.ndarray  # int64: bytes after the IP (and extension) headers
    bad: np.ndarray  # bool: malformed, skip
    nonfirst: np.ndarray  # bool: a later fragment, skip
    all4: bool


@dataclass
class _Transport(Columns):
    sport: np.ndarray  # int64; ICMP: type; other protocols: 0
    dport: np.ndarray  # int64; ICMP: counterpart type, else code
    th: np.ndarray  # int64: transport header length (other: 0, ICMP: all of it)
    l4_len: np.ndarray  # int64: transport payload length per the headers
    skip: np.ndarray  # bool: packets no batch carries


# --------------------------------------------------------------------------------------------
# the reader


class CaptureReader:
    """Iterate over :class:`PacketBatch` chunks of one capture file.

    ``CaptureReader(path).batches()`` raises :class:`PcapError` before yielding anything when
    the file cannot be read; later problems go to :attr:`stats` as warnings.
    """

    def __init__(self, path: str | Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.path = str(path)
        self.chunk_bytes = max(int(chunk_bytes), 1 << 12)
        self.stats = ReadStats(self.path)
        self.format = ""
        self.linktypes: set[int] = set()
        self.position = 0  # file offset of the chunk being parsed: where a failure happened

    # -- framing -----------------------------------------------------------------------
    def batches(self) -> Iterator[PacketBatch]:
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise PcapError(f"{self.path}: cannot open: {e.strerror or e}") from None
        with f:
            try:
                head = f.read(24)
            except OSError as e:
                raise PcapError(f"{self.path}: cannot read: {e.strerror or e}") from None
            if len(head) < 4:
                raise PcapError(f"{self.path}: not a pcap or pcapng file (too short)")
            magic_le = struct.unpack("<I", head[:4])[0]
            if magic_le == _PCAPNG_SHB:
                self.format = "pcapng"
                f.seek(0)
                yield from self._pcapng(f)
                return
            for big in (False, True):
                magic = struct.unpack(">I" if big else "<I", head[:4])[0]
                if magic in (_MAGIC_USEC, _MAGIC_NSEC):
                    break
            else:
                raise PcapError(f"{self.path}: not a pcap or pcapng file (magic {head[:4].hex()})")
            if len(head) < 24:
                raise PcapError(f"{self.path}: pcap file header cut short ({len(head)} bytes)")
            e = ">" if big else "<"
            linktype = struct.unpack_from(e + "I", head, 20)[0] & 0x0FFFFFFF
            self.format = "pcap-nsec" if magic == _MAGIC_NSEC else "pcap"
            self.linktypes.add(linktype)
            yield from self._classic(f, big, magic == _MAGIC_NSEC, linktype)

    def _chunks(self, f, first_offset: int):
        """Yield (buffer, size, file offset of buffer[0], eof) with leftovers carried over.

        The buffer is fresh for every chunk (batches keep theirs) and sized by what is left
        of the file, never by the chunk alone: a header-only capture read with a 1 GiB chunk
        (the many-small-captures path) must not allocate 1 GiB. Past the size the file had
        when opened (it may still grow), reads ask for :data:`MIN_READ`; only a file of
        unknown size (a pipe) reads whole chunks."""
        try:
            remaining: int | None = max(os.fstat(f.fileno()).st_size - first_offset, 0)
        except (OSError, AttributeError, ValueError):
            remaining = None
        leftover = b""
        base = first_offset
        while True:
            want = self._want(remaining, len(leftover))
            cap = len(leftover) + want
            arr = bytearray(cap + _PAD)
            arr[: len(leftover)] = leftover
            try:
                n = f.readinto(memoryview(arr)[len(leftover) : cap]) or 0
            except OSError as e:
                self.stats.truncated = True
                self.stats.warn(base + len(leftover), f"read error: {e.strerror or e}")
                n = 0
            if remaining is not None:
                remaining -= n
            size = len(leftover) + n
            eof = n < want or (remaining is not None and remaining <= 0 and self._at_eof(f))
            self.position = base
            consumed = yield arr, size, base, eof
            if eof:
                return
            leftover = bytes(arr[consumed:size])
            base += consumed

    def _want(self, remaining: int | None, carried: int) -> int:
        """Bytes to ask for next (see :meth:`_chunks`). At least as many as are carried over:
        a block longer than the chunk then costs a doubling of reads, not one read (and one
        copy of all that was carried) per chunk, which is quadratic in the block's length."""
        step = max(self.chunk_bytes, carried)
        if remaining is None:
            return step
        return min(step, remaining if remaining > 0 else MIN_READ)

    @staticmethod
    def _at_eof(f) -> bool:
        try:
            return not f.peek(1)
        except (OSError, AttributeError, ValueError):
            return False

    def _classic(self, f, big: bool, nsec: bool, linktype: int) -> Iterator[PacketBatch]:
        st = self.stats
        gen = self._chunks(f, 24)
        item = next(gen)
        while True:
            arr, size, base, eof = item
            offs, stop, corrupt = _walk_classic(arr, 0, size, big)
            if offs:
                buf = np.frombuffer(arr, np.uint8)
                off = np.array(offs, np.int64)
                hdr = _rows(buf, off, 16).view(">u4" if big else "<u4").astype(np.int64)
                frac = hdr[:, 1] if nsec else hdr[:, 1] * 1000
                ts = hdr[:, 0] * 1_000_000_000 + frac
                st.frames += len(off)
                batch = self._parse(
                    buf,
                    off + 16,
                    hdr[:, 2],
                    np.maximum(hdr[:, 3], hdr[:, 2]),
                    ts,
                    off + base,
                    linktype,
                )
                if len(batch):
                    yield batch
            if corrupt:
                incl = struct.unpack_from(">I" if big else "<I", arr, stop + 8)[0]
                st.truncated = True
                st.warn(
                    base + stop,
                    f"corrupt record header (captured length {incl}); stopped reading this file",
                )
                gen.close()
                return
            if eof:
                if stop < size:
                    st.truncated = True
                    st.warn(base + stop, f"file ends inside a record ({size - stop} bytes left)")
                return
            item = gen.send(stop)

    def _pcapng(self, f) -> Iterator[PacketBatch]:
        st = self.stats
        gen = self._chunks(f, 0)
        item = next(gen)
        section: _Section | None = None
        last_ts = 0
        while True:
            arr, size, base, eof = item
            walk = self._walk_pcapng(arr, size, base, section)
            section = walk.section
            buf = np.frombuffer(arr, np.uint8)
            for sec, e_offs, s_offs in walk.groups:
                batch, last_ts = self._pcapng_packets(buf, base, sec, e_offs, s_offs, last_ts)
                if batch is not None and len(batch):
                    yield batch
            pos = walk.stop
            if walk.corrupt:
                st.truncated = True
                st.warn(base + pos, walk.corrupt + "; stopped reading this file")
                gen.close()
                return
            if eof:
                if pos < size:
                    st.truncated = True
                    st.warn(base + pos, f"file ends inside a block ({size - pos} bytes left)")
                return
            item = gen.send(pos)

    def _walk_pcapng(
        self, arr: bytearray, size: int, base: int, section: _Section | None
    ) -> _BlockWalk:
        """The blocks of one chunk, from its start: packet blocks collected by section, each
        section and interface block read as it comes. Stops at the first block the chunk
        does not hold whole, or at corrupt framing (``corrupt`` says which)."""
        st = self.stats
        pos = 0
        # packets grouped by section (byte order and interface table change with it)
        groups: list[tuple[_Section, list[int], list[int]]] = []
        epbs: list[int] = []
        spbs: list[int] = []
        corrupt = ""
        unpack = struct.Struct(">II" if section and section.big else "<II").unpack_from
        while pos + 12 <= size:
            bt, bl = unpack(arr, pos)
            if bt == 6 and section is not None:
                if bl < 32 or bl % 4 or bl > MAX_BLOCK:
                    corrupt = f"pcapng: bad block length {bl}"
                    break
                if pos + bl > size:
                    break
                epbs.append(pos)
                pos += bl
                continue
            if bt == _PCAPNG_SHB:
                bom = struct.unpack_from("<I", arr, pos + 8)[0]
                if bom not in (_PCAPNG_BOM, 0x4D3C2B1A):
                    corrupt = "pcapng: bad byte-order magic"
                    break
                big = bom != _PCAPNG_BOM
                unpack = struct.Struct(">II" if big else "<II").unpack_from
                bl = unpack(arr, pos)[1]
                if bl < 28 or bl % 4 or bl > MAX_BLOCK:
                    corrupt = f"pcapng: bad section header length {bl}"
                    break
                if pos + bl > size:
                    break
                if epbs or spbs:
                    groups.append((section, epbs, spbs))  # type: ignore[arg-type]
                    epbs, spbs = [], []
                section = _Section(big)
                pos += bl
                continue
            if section is None:
                corrupt = "pcapng: expected a section header block"
                break
            if bl < 12 or bl % 4 or bl > MAX_BLOCK:
                corrupt = f"pcapng: bad block length {bl}"
                break
            if pos + bl > size:
                break
            if bt == 3:
                if bl < 16:
                    corrupt = "pcapng: simple packet block too short"
                    break
                spbs.append(pos)
            elif bt == 1:
                if bl < 20:
                    corrupt = "pcapng: interface block too short"
                    break
                iface, problem = _parse_idb(arr, pos, bl, section.big)
                if problem:
                    st.warn(base + pos, problem + "; the options after it are ignored")
                section.ifaces.append(iface)
                section.idb_at.append(base + pos)
                self.linktypes.add(iface.linktype)
            pos += bl
        if epbs or spbs:
            groups.append((section, epbs, spbs))  # type: ignore[arg-type]
        return _BlockWalk(groups, pos, corrupt, section)

    def _pcapng_packets(
        self,
        buf: np.ndarray,
        base: int,
        sec: _Section,
        e_offs: list[int],
        s_offs: list[int],
        last_ts: int,
    ) -> tuple[PacketBatch | None, int]:
        """One section's enhanced (``e_offs``) and simple (``s_offs``) packet blocks of a
        chunk. A block naming an interface not defined before it is skipped with a warning
        (its framing is fine); a simple packet takes the time of the packet before it."""
        st = self.stats
        u4 = ">u4" if sec.big else "<u4"
        eo = np.array(e_offs, np.int64)
        so = np.array(s_offs, np.int64)
        st.frames += len(eo) + len(so)
        eh = _rows(buf, eo, 28).view(u4).astype(np.int64)  # type len if tshi tslo cap orig
        iface = eh[:, 2]
        ticks = (eh[:, 3].astype(np.uint64) << np.uint64(32)) | eh[:, 4].astype(np.uint64)
        ecap, eorig = eh[:, 5], eh[:, 6]
        known = sec.known_ifaces(eo + base)
        ok = (ecap <= eh[:, 1] - 32) & (iface < known)
        for i in np.flatnonzero(~ok)[:MAX_WARNINGS]:
            what = "unknown interface" if iface[i] >= known[i] else "bad captured length"
            st.warn(base + int(eo[i]), f"pcapng: enhanced packet block with {what}; skipped")
        st.malformed += int((~ok).sum())
        eo, iface, ticks, ecap, eorig = eo[ok], iface[ok], ticks[ok], ecap[ok], eorig[ok]
        ts = np.zeros(len(eo), np.int64)
        lt = np.zeros(len(eo), np.int64)
        for k in np.unique(iface):
            m = iface == k
            itf = sec.ifaces[int(k)]
            lt[m] = itf.linktype
            ts[m] = _ticks_to_ns(ticks[m], itf)
        if len(so):
            orphan = sec.known_ifaces(so + base) == 0
            if orphan.any():
                st.warn(
                    base + int(so[np.argmax(orphan)]),
                    "pcapng: simple packet block before any interface; skipped",
                )
                st.malformed += int(orphan.sum())
                so = so[~orphan]
        if len(so):
            sh = _rows(buf, so, 12).view(u4).astype(np.int64)
            sorig = sh[:, 2]
            scap = np.minimum(sorig, sh[:, 1] - 16)
            # no timestamp: a simple packet takes the time of the packet before it
            prev = np.searchsorted(eo, so) - 1
            sts = np.full(len(so), last_ts, np.int64)
            if len(eo):
                sts = np.where(prev >= 0, ts[np.maximum(prev, 0)], last_ts)
            order = np.argsort(np.concatenate([eo, so]), kind="stable")
            data = np.concatenate([eo + 28, so + 12])[order]
            rec = np.concatenate([eo, so])[order]
            cap = np.concatenate([ecap, scap])[order]
            wire = np.concatenate([eorig, sorig])[order]
            ts = np.concatenate([ts, sts])[order]
            lt = np.concatenate([lt, np.full(len(so), sec.ifaces[0].linktype)])[order]
        else:
            data, rec, cap, wire = eo + 28, eo, ecap, eorig
        if len(ts):
            last_ts = int(ts[-1])
        if not len(data):
            return None, last_ts
        uniq = np.unique(lt)
        linktype: int | np.ndarray = int(uniq[0]) if len(uniq) == 1 else lt
        batch = self._parse(buf, data, cap, np.maximum(wire, cap), ts, rec + base, linktype)
        return batch, last_ts

    # -- headers -----------------------------------------------------------------------
    def _parse(
        self,
        buf: np.ndarray,
        off: np.ndarray,
        cap: np.ndarray,
        wire: np.ndarray,
        ts: np.ndarray,
        rec: np.ndarray,
        linktype: int | np.ndarray,
    ) -> PacketBatch:
        """Link layer, then IP, then transport, all vectorised over the chunk's records; each
        step returns what it read as a small dataclass of columns. First, packets whose time
        lies outside [0, TS_LIMIT_NS) are skipped (module docstring): later steps may then add
        and subtract times and windows freely."""
        r, linktype = self._in_time(_Records(off, cap, wire, ts, rec), linktype)
        link = self._link_layer(buf, r, linktype)
        if link is None:
            return PacketBatch.empty()
        ip = self._ip_header(buf, link)
        if not ip.all4:
            self._ipv6_extensions(buf, link, ip)
        l4 = self._transport(buf, link, ip)
        return self._batch(buf, link, ip, l4)

    def _in_time(
        self, r: _Records, linktype: int | np.ndarray
    ) -> tuple[_Records, int | np.ndarray]:
        """The records whose time lies in [0, TS_LIMIT_NS), and their link types."""
        late = (r.ts < 0) | (r.ts >= TS_LIMIT_NS)
        if not late.any():
            return r, linktype
        self._malformed(r.rec, late, "packet time out of range (1970 to 2116)")
        keep = np.flatnonzero(~late)
        if not isinstance(linktype, (int, np.integer)):
            linktype = linktype[keep]
        return r.take(keep), linktype

    def _link_layer(
        self, buf: np.ndarray, r: _Records, linktype: int | np.ndarray
    ) -> _LinkLayer | None:
        """The IP packets among the records, read past their link layer; None when none is
        left (or the link type is unknown)."""
        st = self.stats
        n = len(r)
        if isinstance(linktype, (int, np.integer)):
            l3, et, smac, dmac, bad2 = _link(buf, r.off, r.cap, int(linktype))
            if bad2 is None:
                st.unknown_link += n
                st.warn(
                    int(r.rec[0]) if n else None,
                    f"unknown link type {int(linktype)}; {n} packets skipped",
                )
                return None
            unknown = np.zeros(n, bool)
        else:
            l3, et, smac, dmac, bad2, unknown = self._mixed_links(buf, r, linktype)
        self._malformed(r.rec, bad2, "frame shorter than its link-layer header")
        is4 = (et == ETH_IPV4) & ~bad2
        is6 = (et == ETH_IPV6) & ~bad2
        ip = is4 | is6
        st.non_ip += int((~ip & ~bad2 & ~unknown).sum())
        link = _LinkLayer(r, l3, smac, dmac, is4)
        keep = np.flatnonzero(ip)
        if len(keep) < n:
            link = link.take(keep)
        return link if len(link.r) else None

    def _mixed_links(self, buf: np.ndarray, r: _Records, linktype: np.ndarray) -> tuple:
        """:func:`_link` per link type, for a chunk whose packets have several (pcapng);
        adds a last item: the packets of unknown link types."""
        st = self.stats
        n = len(r)
        l3 = np.zeros(n, np.int64)
        et = np.zeros(n, np.int64)
        smac = np.zeros(n, np.uint64)
        dmac = np.zeros(n, np.uint64)
        bad2 = np.zeros(n, bool)
        unknown = np.zeros(n, bool)
        for k in np.unique(linktype):
            m = np.flatnonzero(linktype == k)
            got = _link(buf, r.off[m], r.cap[m], int(k))
            if got[4] is None:
                unknown[m] = True
                st.unknown_link += len(m)
                st.warn(int(r.rec[m[0]]), f"unknown link type {int(k)}; {len(m)} packets skipped")
                continue
            l3[m], et[m], smac[m], dmac[m], bad2[m] = got
        return l3, et, smac, dmac, bad2, unknown

    def _ip_header(self, buf: np.ndarray, link: _LinkLayer) -> _IPHeader:
        """IPv4 and IPv6 fixed headers; IPv6 packets reread the same 40 bytes."""
        r, l3, is4 = link.r, link.l3, link.is4
        g = _rows(buf, r.off + l3, 40)
        ver = g[:, 0] >> 4
        all4 = bool(is4.all())
        ihl = (g[:, 0] & 15).astype(np.int64) << 2
        tot = _be16(g, 2)
        proto = g[:, 9].astype(np.int64)
        bad4 = (ver != 4) | (ihl < 20) | (tot < ihl) | (r.cap < l3 + np.maximum(ihl, 20))
        if all4:
            ip_len = tot
            hlen = ihl
            bad = bad4
            nonfirst = (_be16(g, 6) & 0x1FFF) != 0
        else:
            plen = _be16(g, 4)
            ip_len = np.where(is4, tot, plen + 40)
            hlen = np.where(is4, ihl, 40)
            bad = np.where(is4, bad4, (ver != 6) | (r.cap < l3 + 40))
            proto = np.where(is4, proto, g[:, 6])
            nonfirst = is4 & ((_be16(g, 6) & 0x1FFF) != 0)
        self._malformed(r.rec, bad, "malformed IP header")
        cut = ~bad & (r.wire < l3 + ip_len)
        if cut.any():
            self._malformed(r.rec, cut, "IP packet longer than the frame")
            bad |= cut
        return _IPHeader(g, ip_len, proto, l3 + hlen, ip_len - hlen, bad, nonfirst, all4)

    def _ipv6_extensions(self, buf: np.ndarray, link: _LinkLayer, ip: _IPHeader) -> None:
        """Past the IPv6 extension headers, in place: a few vectorised rounds over the
        packets that have them (``l4``, ``rem``, ``proto``, ``bad``, ``nonfirst`` move)."""
        r = link.r
        ext = ~link.is4 & ~ip.bad & _IS_EXT[ip.proto]
        for _ in range(8):
            m = np.flatnonzero(ext)
            if not len(m):
                break
            short = r.cap[m] < ip.l4[m] + 8
            e = _rows(buf, r.off[m] + ip.l4[m], 8)
            nh = ip.proto[m]
            hl = e[:, 1].astype(np.int64)
            size = np.where(nh == 44, 8, np.where(nh == 51, (hl + 2) * 4, (hl + 1) * 8))
            ip.nonfirst[m] |= (nh == 44) & ((_be16(e, 2) >> 3) != 0)
            ip.l4[m] += size
            ip.rem[m] -= size
            ip.proto[m] = e[:, 0]
            broken = short | (ip.rem[m] < 0)
            ip.bad[m[broken]] = True
            self._malformed(r.rec[m], broken, "malformed IPv6 extension header")
            ext[m] = ~broken & _IS_EXT[e[:, 0]] & ~ip.nonfirst[m]

    def _transport(self, buf: np.ndarray, link: _LinkLayer, ip: _IPHeader) -> _Transport:
        """Ports (ICMP: type and counterpart), transport header and payload lengths, and
        which packets to skip (broken, cut, or a later fragment)."""
        r, rem, l4 = link.r, ip.rem, ip.l4
        skip = ip.bad | ip.nonfirst
        if ip.nonfirst.any():
            self.stats.fragments += int((ip.nonfirst & ~ip.bad).sum())
        kind = _L4_KIND[ip.proto]  # 0 other, 1 tcp, 2 udp, 3 icmp
        need = _L4_NEED[kind]
        short = ~skip & ((rem < need) | (r.cap < l4 + need))
        if short.any():
            self._malformed(r.rec, short, "transport header cut short")
            skip |= short
        g4 = _rows(buf, r.off + l4, 16)
        sport = _be16(g4, 0)
        dport = _be16(g4, 2)
        tcp = kind == 1
        udp = kind == 2
        doff = (g4[:, 12] >> 4).astype(np.int64) << 2
        badtcp = ~skip & tcp & ((doff < 20) | (doff > rem))
        if badtcp.any():
            self._malformed(r.rec, badtcp, "malformed TCP header")
            skip |= badtcp
        ports = tcp | udp
        th = np.where(tcp, doff, 8)  # transport header length (other: 0, ICMP: all of it)
        l4_len = np.where(tcp, rem - doff, np.maximum(_be16(g4, 4) - 8, 0))
        if not ports.all():
            icmp = kind == 3
            itype = g4[:, 0].astype(np.int64)
            peer = np.where(link.is4, _ICMP4_PEER[itype], _ICMP6_PEER[itype])
            peer = np.where(peer >= 0, peer, g4[:, 1])
            sport = np.where(ports, sport, np.where(icmp, itype, 0))
            dport = np.where(ports, dport, np.where(icmp, peer, 0))
            th = np.where(ports, th, np.where(icmp, rem, 0))
            l4_len = np.where(ports, l4_len, np.where(icmp, 0, rem))
        return _Transport(sport, dport, th, l4_len, skip)

    def _batch(
        self, buf: np.ndarray, link: _LinkLayer, ip: _IPHeader, l4: _Transport
    ) -> PacketBatch:
        """The batch of the packets no step skipped, with their addresses."""
        if l4.skip.any():
            good = np.flatnonzero(~l4.skip)
            link, ip, l4 = link.take(good), ip.take(good), l4.take(good)
        r, g, n = link.r, ip.g, len(link.r)
        self.stats.ip_packets += n
        self.stats.ip_bytes += int(ip.ip_len.sum())
        mapped = np.uint64(0xFFFF << 32)
        src_lo = mapped | _be32(g, 12)
        dst_lo = mapped | _be32(g, 16)
        src_hi = np.zeros(n, np.uint64)
        dst_hi = np.zeros(n, np.uint64)
        if not bool(link.is4.all()):
            v6 = np.flatnonzero(~link.is4)
            g6 = g[v6]
            src_hi[v6], src_lo[v6] = _be64(g6, 8), _be64(g6, 16)
            dst_hi[v6], dst_lo[v6] = _be64(g6, 24), _be64(g6, 32)
        pay = ip.l4 + l4.th
        return PacketBatch(
            buf=buf,
            ts_ns=r.ts,
            rec_off=r.rec,
            ip_len=ip.ip_len,
            proto=ip.proto,
            src_hi=src_hi,
            src_lo=src_lo,
            dst_hi=dst_hi,
            dst_lo=dst_lo,
            sport=l4.sport,
            dport=l4.dport,
            src_mac=link.smac,
            dst_mac=link.dmac,
            l4_len=l4.l4_len,
            pay_off=r.off + pay,
            pay_cap=np.maximum(np.minimum(r.cap, link.l3 + ip.ip_len) - pay, 0),
        )

    def _malformed(self, rec: np.ndarray, mask: np.ndarray, what: str) -> None:
        k = int(mask.sum())
        if not k:
            return
        self.stats.malformed += k
        shown = min(k, max(0, MAX_WARNINGS - len(self.stats.warnings)))
        for i in np.flatnonzero(mask)[:shown]:
            self.stats.warn(int(rec[i]), f"{what}; packet skipped")
        self.stats.warning_count += k - shown


def _ticks_to_ns(ticks: np.ndarray, itf: _Iface) -> np.ndarray:
    """Epoch nanoseconds (int64) of uint64 ``ticks`` of interface ``itf``; -1 where the time
    falls outside [0, TS_LIMIT_NS) (``_parse`` skips those packets).

    Why whole seconds first: every if_tsresol (10**-0 to 10**-127, 2**-0 to 2**-127) and every
    if_tsoffset must convert without overflow, so the seconds are range-checked before they
    are scaled, and a binary fraction from at most 34 bits (2**34 * 10**9 < 2**64): exact
    (floor) for every resolution up to 2**-34, within a nanosecond below that."""
    e = itf.tsresol
    if itf.ts_pow2:
        sec = ticks >> np.uint64(e) if e < 64 else np.zeros_like(ticks)
        frac = ticks - (sec << np.uint64(e)) if e < 64 else ticks
        if e > 34:  # keep the top 34 bits of the fraction: the product below fits
            frac = frac >> np.uint64(e - 34) if e - 34 < 64 else np.zeros_like(frac)
        sub = (frac * np.uint64(_NS)) >> np.uint64(min(e, 34))
    else:
        if e > 19:  # 10**e > 2**64: no tick reaches a second
            sec, frac = np.zeros_like(ticks), ticks
        else:
            per_s = np.uint64(10**e)
            sec, frac = ticks // per_s, ticks % per_s
        if e <= 9:
            sub = frac * np.uint64(10 ** (9 - e))
        elif e - 9 > 19:  # finer than 10**-28 s: no tick count reaches a nanosecond
            sub = np.zeros_like(frac)
        else:
            sub = frac // np.uint64(10 ** (e - 9))
    whole = _plus_offset(sec, itf.ts_offset)
    ns = whole * _NS + sub.astype(np.int64)
    good = (whole >= 0) & (whole <= _MAX_SEC) & (ns < TS_LIMIT_NS)
    return np.where(good, ns, -1)


def _plus_offset(sec: np.ndarray, offset: int) -> np.ndarray:
    """``sec + offset`` exactly for uint64 seconds and an int64 offset, as int64 clipped to
    [-1, _MAX_SEC + 1]: -1 and _MAX_SEC + 1 stand for "before 1970" and "too late"."""
    top = _MAX_SEC + 1
    if offset >= 0:
        return np.minimum(sec, np.uint64(top)).astype(np.int64) + min(offset, top)
    back = np.uint64(-offset)
    ahead = sec >= back
    diff = np.where(ahead, sec - np.where(ahead, back, sec), 0)
    return np.where(ahead, np.minimum(diff, np.uint64(top)).astype(np.int64), -1)


def _link(
    buf: np.ndarray, off: np.ndarray, cap: np.ndarray, linktype: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(l3 offset, ethertype, src MAC, dst MAC, too short) for one link type; the last item
    is None for a link type this reader does not know."""
    n = len(off)
    zmac = np.zeros(n, np.uint64)
    if linktype == LINKTYPE_ETHERNET:
        g = _rows(buf, off, 26)
        et = _be16(g, 12)
        l3 = np.full(n, 14, np.int64)
        for k in range(4):
            tag = (et == 0x8100) | (et == 0x88A8) | (et == 0x9100)
            if not tag.any():
                break
            if k == 3:  # more tags than we read: not IP as far as we can tell
                et = np.where(tag, 0, et)
                break
            et = np.where(tag, _be16(g, 16 + 4 * k), et)
            l3 += 4 * tag
        sixteen = np.uint64(16)
        return l3, et, _be64(g, 6) >> sixteen, _be64(g, 0) >> sixteen, cap < l3
    if linktype in (
        LINKTYPE_RAW,
        LINKTYPE_RAW_BSD,
        LINKTYPE_RAW_OPENBSD,
        LINKTYPE_IPV4,
        LINKTYPE_IPV6,
    ):
        v = buf[off] >> 4
        et = np.where(v == 4, ETH_IPV4, np.where(v == 6, ETH_IPV6, 0))
        if linktype == LINKTYPE_IPV4:
            et = np.where(v == 4, ETH_IPV4, 0)
        elif linktype == LINKTYPE_IPV6:
            et = np.where(v == 6, ETH_IPV6, 0)
        return np.zeros(n, np.int64), et.astype(np.int64), zmac, zmac, cap < 1
    if linktype in (LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2):
        sll2 = linktype == LINKTYPE_LINUX_SLL2
        g = _rows(buf, off, 20)
        et = _be16(g, 0) if sll2 else _be16(g, 14)
        halen = g[:, 11].astype(np.int64) if sll2 else _be16(g, 4)
        smac = np.where(halen == 6, _mac(g, 12 if sll2 else 6), zmac)
        l3 = np.full(n, 20 if sll2 else 16, np.int64)
        return l3, et, smac, zmac, cap < l3
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        g = _rows(buf, off, 4)
        fam = np.ascontiguousarray(g).view(">u4" if linktype == LINKTYPE_LOOP else "<u4")
        fam = fam.ravel().astype(np.int64)
        if linktype == LINKTYPE_NULL:  # host byte order of the capturing machine
            fam = np.where(fam > 0xFFFF, fam.astype(">u4").view("<u4").astype(np.int64), fam)
        et = np.where(fam == 2, ETH_IPV4, np.where(np.isin(fam, (10, 24, 28, 30)), ETH_IPV6, 0))
        return np.full(n, 4, np.int64), et.astype(np.int64), zmac, zmac, cap < 4
    return zmac.astype(np.int64), zmac.astype(np.int64), zmac, zmac, None


def read_capture(
    path: str | Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[Iterator[PacketBatch], ReadStats]:
    """``(batches, stats)``; iterate the batches, read ``stats`` afterwards."""
    reader = CaptureReader(path, chunk_bytes)
    return reader.batches(), reader.stats


def mac_to_int(mac: str) -> int:
    parts = mac.strip().lower().replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {mac!r}")
    return int("".join(parts), 16)


def int_to_mac(v: int) -> str:
    h = f"{int(v):012x}"
    return ":".join(h[i : i + 2] for i in range(0, 12, 2))
