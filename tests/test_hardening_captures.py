"""Hostile captures (the hardening issue): each reproducible case, then the class of bug.

Every capture here is written at test time; the real ones are rewritten from the IoT Sentinel
captures in ../shared (skipped, naming the path, where absent).
"""

import random
import struct
import tracemalloc

import numpy as np
import pytest

from iotcls import pcapgen as g
from iotcls.cli import main
from iotcls.flows import (
    MAX_WINDOW_S,
    DeviceSelector,
    FlowBuilder,
    capture_flows,
    capture_flows_many,
)
from iotcls.pcap import TS_LIMIT_NS, CaptureReader, PacketBatch, _Iface, _ticks_to_ns
from iotcls.testing.shared import require, sentinel_capture

DEV = "02:00:00:00:00:01"
SEL = DeviceSelector.from_lists([DEV], [])
T0 = 1_700_000_000 * 10**9  # ns


def frame(i: int = 0) -> bytes:
    return g.ether(
        DEV,
        "02:00:00:00:00:02",
        g.ipv4("192.168.1.10", "8.8.8.8", 17, g.udp(40000 + i, 53, b"q" * 20)),
    )


def blk(btype: int, body: bytes, e: str = "<") -> bytes:
    return g._block(e, btype, body)


SHB = blk(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))


def opt(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\x00" * (-len(value) % 4)


def idb(options: bytes = b"", linktype: int = 1) -> bytes:
    return blk(1, struct.pack("<HHI", linktype, 0, 0) + options + struct.pack("<HH", 0, 0))


def epb(ticks: int, i: int = 0, iface: int = 0) -> bytes:
    f = frame(i)
    return blk(6, struct.pack("<IIIII", iface, ticks >> 32, ticks & 0xFFFFFFFF, len(f), len(f)) + f)


def spb(i: int = 0) -> bytes:
    f = frame(i)
    return blk(3, struct.pack("<I", len(f)) + f)


def read_all(path, chunk_bytes=1 << 20):
    """(packets, reader) after reading every batch; anything raised fails the test."""
    r = CaptureReader(path, chunk_bytes)
    batches = list(r.batches())
    return (PacketBatch.merge(batches, [0] * len(batches)) if batches else PacketBatch.empty()), r


US = 1000  # ns per microsecond tick (the default if_tsresol)


# -- the five pcapng crashes -------------------------------------------------------


def test_simple_packet_block_before_any_interface(tmp_path):
    """Was IndexError in pcap.py _parse: now skipped with the file and offset; the packets
    after the interface block are read."""
    p = tmp_path / "spb.pcapng"
    p.write_bytes(SHB + spb(1) + idb() + epb(T0 // US, 2) + spb(3))
    b, r = read_all(p)
    assert sorted(b.sport.tolist()) == [40002, 40003]
    assert r.stats.warnings == [
        f"{p}: byte 28: pcapng: simple packet block before any interface; skipped"
    ]
    assert r.stats.malformed == 1


@pytest.mark.parametrize("offset", [(1 << 63) - 1, -(1 << 63), 1 << 40])
def test_if_tsoffset_out_of_range_skips_that_interfaces_packets(tmp_path, offset):
    """Was OverflowError: an if_tsoffset of 2**63-1 puts every packet of that interface past
    2116; they are skipped with a warning, the other interface's packets are kept."""
    p = tmp_path / "off.pcapng"
    p.write_bytes(
        SHB
        + idb(opt(14, struct.pack("<q", offset)))
        + idb()
        + epb(T0 // US, 1, iface=0)
        + epb(T0 // US, 2, iface=1)
    )
    b, r = read_all(p)
    assert b.sport.tolist() == [40002]
    assert r.stats.malformed == 1
    assert "packet time out of range (1970 to 2116); packet skipped" in r.stats.warnings[0]


def test_if_tsoffset_within_range_is_applied(tmp_path):
    p = tmp_path / "off.pcapng"
    p.write_bytes(SHB + idb(opt(14, struct.pack("<q", -3600))) + epb(T0 // US))
    b, _ = read_all(p)
    assert b.ts_ns.tolist() == [T0 - 3600 * 10**9]


def test_option_running_past_its_block(tmp_path):
    """Was OverflowError (an 8-byte if_tsoffset read from the next block): the option is
    refused with a warning, the interface keeps its link type and default resolution."""
    p = tmp_path / "opt.pcapng"
    bad = blk(1, struct.pack("<HHI", 1, 0, 0) + struct.pack("<HH", 14, 400))
    p.write_bytes(SHB + bad + epb(T0 // US, 1))
    b, r = read_all(p)
    assert b.ts_ns.tolist() == [T0]
    assert r.stats.warnings == [
        f"{p}: byte 28: pcapng: interface option 14 of 400 bytes runs "
        "past its block; the options after it are ignored"
    ]


@pytest.mark.parametrize("tsresol", [30, 0x80 | 127, 127, 0x80 | 64, 20, 0x80 | 63])
def test_extreme_if_tsresol(tmp_path, tsresol):
    """Was OverflowError for 10**-30 and 2**-127: any resolution converts (here every tick
    count is below a nanosecond... or a second)."""
    p = tmp_path / "res.pcapng"
    p.write_bytes(SHB + idb(opt(9, bytes([tsresol]))) + epb((1 << 64) - 1) + epb(1 << 40, 1))
    b, r = read_all(p)
    assert len(b) == 2 and (b.ts_ns >= 0).all() and (b.ts_ns < TS_LIMIT_NS).all()
    assert not r.stats.warnings


def test_packet_times_2_63_ns_apart(tmp_path):
    """Was OverflowError in flows.py _window_heads: a packet whose tick count has its top bit
    set (as int64: a time before 1970) next to a real one; it is skipped with a warning and
    the records of the others are built."""
    p = tmp_path / "far.pcapng"
    p.write_bytes(
        SHB + idb(opt(9, bytes([9]))) + epb(T0, 1) + epb(T0 + (1 << 63) + 5, 2) + epb(T0 + 10**9, 3)
    )
    cf = capture_flows(p, SEL)
    assert cf.error == "" and sorted(cf.table.remote_port.tolist()) == [53, 53]
    assert cf.stats.warnings == [
        f"{p}: byte 156: packet time out of range (1970 to 2116); packet skipped"
    ]


def real_pcapng(tmp_path, name="real.pcapng", records=200):
    """The first records of a real capture rewritten as pcapng (usec resolution)."""
    src = require(sentinel_capture("Aria", "Setup-A-1-STA"))
    data = src.read_bytes()
    out, off = [], 24
    while off + 16 <= len(data) and len(out) < records:
        sec, usec, incl, _ = struct.unpack_from("<IIII", data, off)
        out.append((sec * 10**9 + usec * 1000, data[off + 16 : off + 16 + incl], 0))
        off += 16 + incl
    p = tmp_path / name
    p.write_bytes(g.pcapng_bytes(out))
    return p


def test_one_4_bit_flip_of_a_real_capture(tmp_path):
    """The issue's case: one 4-bit flip in a timestamp's high word of a real capture."""
    p = real_pcapng(tmp_path)
    good = capture_flows(p, DeviceSelector.from_lists([], ["192.168.0.0/16"]))
    data = bytearray(p.read_bytes())
    first_epb = 28 + 32  # after the section header and the interface block
    data[first_epb + 12 + 3] ^= 0xF0  # the top nibble of the timestamp's high word
    bad = tmp_path / "flipped.pcapng"
    bad.write_bytes(data)
    cf = capture_flows(bad, DeviceSelector.from_lists([], ["192.168.0.0/16"]))
    assert cf.error == "" and cf.stats.malformed == good.stats.malformed + 1
    assert f"byte {first_epb}: packet time out of range" in cf.stats.warnings[0]
    assert len(cf.table) >= len(good.table) - 2


# -- the class: arithmetic on file-provided numbers ----------------------------------------


def test_ticks_to_ns_matches_exact_integer_arithmetic():
    """Every resolution and offset against Python's integers: exact (floor) to the
    nanosecond where the fraction has at most 34 bits, within one below; -1 exactly where
    the time falls outside [0, 2**62)."""
    rng = random.Random(3)
    for _ in range(3000):
        e, pow2 = rng.randrange(128), rng.random() < 0.5
        base = 2**e if pow2 else 10**e
        offset = rng.choice(
            [
                0,
                0,
                -3600,
                rng.randrange(-(1 << 33), 1 << 33),
                rng.randrange(-(1 << 63), 1 << 63),
                (1 << 63) - 1,
                -(1 << 63),
            ]
        )
        want_s = rng.randrange(0, 5 * 10**9)  # around the 2116 limit too
        ticks = rng.choice(
            [
                want_s * base // 1 + rng.randrange(max(base, 1)),
                rng.randrange(1 << 64),
                (1 << 64) - 1,
                0,
            ]
        )
        ticks = min(ticks, (1 << 64) - 1)
        got = int(_ticks_to_ns(np.array([ticks], np.uint64), _Iface(1, e, pow2, offset))[0])
        ref = ticks * 10**9 // base + offset * 10**9
        if not 0 <= ref < TS_LIMIT_NS:
            ref = -1
        if pow2 and e > 34 and ref != -1 and got != -1:
            assert 0 <= ref - got <= 1, (e, pow2, offset, ticks)
        elif pow2 and e > 34 and abs(ref - TS_LIMIT_NS) <= 1:
            continue  # the 1 ns of truncation decided which side of the limit
        else:
            assert got == ref, (e, pow2, offset, ticks)


def test_results_do_not_depend_on_chunk_boundaries(tmp_path):
    """A packet may only name interfaces defined before it in the file, whatever chunk the
    interface block fell in (it once depended on whether both shared a chunk)."""
    body = SHB + idb() + b"".join(epb(T0 // US + i, i, iface=i % 2) for i in range(200))
    body += idb() + b"".join(epb(T0 // US + 300 + i, 300 + i, iface=i % 2) for i in range(200))
    p = tmp_path / "late.pcapng"
    p.write_bytes(body)
    small, rs = read_all(p, 4096)
    big, rb = read_all(p, 1 << 20)
    assert small.sport.tolist() == big.sport.tolist()
    assert rs.stats.malformed == rb.stats.malformed == 100


def test_flow_builder_refuses_out_of_range_times_and_windows():
    b = PacketBatch.empty()
    bad = PacketBatch(**{**b.__dict__, "ts_ns": np.array([-1]), "rec_off": np.zeros(1, int)})
    with pytest.raises(ValueError, match="outside"):
        FlowBuilder(SEL).add(bad)
    for w in (MAX_WINDOW_S * 2, float("inf"), float("nan"), 0.0):
        with pytest.raises(ValueError, match="window must be positive and at most"):
            FlowBuilder(SEL, window_s=w)


@pytest.mark.parametrize("command", ["classify", "inspect", "extract"])
def test_a_window_the_builder_cannot_carry_is_a_cli_error(tmp_path, capsys, command):
    p = g.write_pcap(tmp_path / "x.pcap", [(1.0, frame())])
    extra = {
        "classify": ["-o", str(tmp_path)],
        "inspect": [],
        "extract": ["-o", str(tmp_path / "d.npz")],
    }[command]
    rc = main([command, str(p), "--devices", DEV, "--window", "1e300"] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "window must be positive and at most" in err[0]


# -- a bad capture costs only itself --------------------------------------------------------


def bad_pcapng(tmp_path):
    """Every reported malformation in one file, around good packets."""
    p = tmp_path / "bad.pcapng"
    p.write_bytes(
        SHB
        + spb(1)
        + idb(opt(14, struct.pack("<q", (1 << 63) - 1)))
        + blk(1, struct.pack("<HHI", 1, 0, 0) + struct.pack("<HH", 14, 400))
        + idb(opt(9, bytes([0x80 | 127])))
        + epb(5, 2)
        + epb(T0 // US, 3, iface=1)
        + epb(T0 // US + (1 << 63), 4, iface=1)
    )
    return p


def test_classify_keeps_every_label_of_the_good_captures(tmp_path, capsys):
    """The issue's case: ``classify good.pcap bad.pcapng`` wrote 0 entries (the good
    capture alone gives 6). Now the good capture's labels are all there, and the bad one is
    reported by name and offset."""
    src = require(sentinel_capture("Aria", "Setup-A-1-STA"))
    mac = (src.parent / "_iotdevice-mac.txt").read_text().strip()
    bad = bad_pcapng(tmp_path)
    assert main(["classify", str(src), "--devices", mac, "-o", str(tmp_path / "alone")]) == 0
    alone = (tmp_path / "alone" / "iot_class.log").read_text().splitlines()
    capsys.readouterr()
    rc = main(["classify", str(src), str(bad), "--devices", mac, "-o", str(tmp_path / "both")])
    both = (tmp_path / "both" / "iot_class.log").read_text().splitlines()
    err = capsys.readouterr().err
    assert rc == 0
    body = [x for x in alone if not x.startswith("#")]
    assert len(body) >= 5 and [x for x in both if not x.startswith("#")] == body
    assert f"iotcls: warning: {bad}: byte 28: pcapng: simple packet block" in err
    assert "Traceback" not in err


def test_an_unforeseen_failure_costs_only_its_capture(tmp_path, capsys, monkeypatch):
    """The class, not the case: whatever a capture makes go wrong inside the reader is that
    capture's error (its name and the offset reached), and the other captures' records and
    labels are all kept, on the one-file and the many-small-files paths alike."""
    from iotcls import pcap

    good = g.write_pcap(tmp_path / "good.pcap", [(1.0 + i, frame(i)) for i in range(5)])
    boom = g.write_pcap(tmp_path / "boom.pcap", [(1.0, frame())])
    real_parse = pcap.CaptureReader._parse

    def parse(self, *a, **kw):
        if self.path.endswith("boom.pcap"):
            raise OverflowError("Python int too large to convert to C long")
        return real_parse(self, *a, **kw)

    monkeypatch.setattr(pcap.CaptureReader, "_parse", parse)
    one = capture_flows(boom, SEL)
    assert one.error == (
        f"{boom}: byte 24: cannot read this capture (OverflowError: Python "
        "int too large to convert to C long); skipped"
    )
    many = capture_flows_many([good, boom, good], [SEL] * 3)
    assert [len(c.table) for c in many] == [5, 0, 5]
    assert many[1].error.startswith(f"{boom}: byte 24: cannot read this capture")
    rc = main(["classify", str(good), str(boom), "--devices", DEV, "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and f"iotcls: warning: {boom}: byte 24: cannot read" in err
    log = (tmp_path / "iot_class.log").read_text().splitlines()
    assert len([x for x in log if not x.startswith("#")]) == 5


# -- memory: reads sized by the file ---------------------------------------------------------


def test_header_only_pcap_with_a_1_gib_chunk_allocates_little(tmp_path):
    """The issue's case: a 24-byte pcap in a multi-file extract (the many-small-captures path
    reads with a 1 GiB chunk) allocated the whole chunk."""
    empty = g.write_pcap(tmp_path / "empty.pcap", [])
    assert empty.stat().st_size == 24
    good = g.write_pcap(tmp_path / "good.pcap", [(1.0 + i, frame(i)) for i in range(50)])
    tracemalloc.start()
    try:
        out = capture_flows_many([empty, good, empty], [SEL] * 3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [len(c.table) for c in out] == [0, 50, 0]
    assert peak < 8 << 20, f"{peak:,} bytes at peak"


def test_extract_over_header_only_and_good_captures(tmp_path, capsys):
    empty = g.write_pcap(tmp_path / "empty.pcap", [])
    good = g.write_pcap(tmp_path / "good.pcap", [(1.0 + i, frame(i)) for i in range(50)])
    tracemalloc.start()
    try:
        rc = main(
            [
                "extract",
                str(empty),
                str(good),
                str(empty),
                "--devices",
                DEV,
                "-q",
                "-o",
                str(tmp_path / "d.npz"),
            ]
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rc == 0 and "records:  50" in capsys.readouterr().out
    assert peak < 64 << 20, f"{peak:,} bytes at peak"


def test_a_block_longer_than_the_chunk_costs_linear_reads(tmp_path):
    """A block longer than the chunk grows the read geometrically, not one chunk per round
    (which copied everything carried each time: quadratic in the block's length)."""
    big = g.ether(
        DEV, "02:00:00:00:00:02", g.ipv4("192.168.1.10", "8.8.8.8", 17, g.udp(1, 53, b"z" * 60000))
    )
    p = g.write_pcapng(tmp_path / "big.pcapng", [(1.0, big), (2.0, frame())])
    r = CaptureReader(p, 4096)
    reads = []
    real = r._want
    r._want = lambda remaining, carried: reads.append(real(remaining, carried)) or reads[-1]
    assert sum(len(b) for b in r.batches()) == 2
    assert len(reads) <= 8, reads


def test_classify_a_capture_without_the_devices_flows(tmp_path, capsys):
    """Found on the way: a capture that is read but holds no flow of the selected devices
    made classify raise from the trust layer (an empty batch) with the shipped model."""
    p = g.write_pcap(tmp_path / "other.pcap", [(1.0, frame())])
    rc = main(["classify", str(p), "--devices", "02:00:00:00:00:99", "-o", str(tmp_path)])
    assert rc == 0 and "no flows of the selected devices" in capsys.readouterr().err
