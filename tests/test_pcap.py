"""The capture reader on hand-built packets written to real pcap/pcapng files: exact values."""

import struct

import numpy as np
import pytest

from iotcls import pcapgen as g
from iotcls.pcap import CaptureReader, PcapError, int_to_mac, mac_to_int

DEV = "aa:bb:cc:00:00:01"
GW = "02:00:00:00:00:fe"
T0 = 1_700_000_000.25


def read(path, **kw):
    r = CaptureReader(path, **kw)
    batches = list(r.batches())
    return batches, r.stats


def one(path, **kw):
    batches, st = read(path, **kw)
    assert len(batches) == 1
    return batches[0], st


def ip_str(hi, lo):
    from iotcls.flows import _ip16_to_str

    return _ip16_to_str(int(hi), int(lo))


def tcp_frame(payload=b"hello", **kw):
    return g.ether(
        DEV, GW, g.ipv4("192.168.1.10", "93.184.216.34", 6, g.tcp(40000, 443, payload)), **kw
    )


def test_classic_little_endian_usec_exact(tmp_path):
    p = g.write_pcap(tmp_path / "a.pcap", [(T0, tcp_frame()), (T0 + 1.5, tcp_frame(b""))])
    b, st = one(p)
    assert len(b) == 2
    assert b.ts_ns.tolist() == [1_700_000_000_250_000_000, 1_700_000_001_750_000_000]
    assert b.ip_len.tolist() == [45, 40]
    assert b.proto.tolist() == [6, 6]
    assert b.sport.tolist() == [40000, 40000] and b.dport.tolist() == [443, 443]
    assert int_to_mac(b.src_mac[0]) == DEV and int_to_mac(b.dst_mac[0]) == GW
    assert ip_str(b.src_hi[0], b.src_lo[0]) == "192.168.1.10"
    assert ip_str(b.dst_hi[0], b.dst_lo[0]) == "93.184.216.34"
    assert b.l4_len.tolist() == [5, 0]
    pay, lens = b.payload(np.array([0, 1]), 8)
    assert lens.tolist() == [5, 0]
    assert pay[0].tobytes() == b"hello\x00\x00\x00" and not pay[1].any()
    assert b.rec_off.tolist() == [24, 24 + 16 + 60]
    assert (st.frames, st.ip_packets, st.ip_bytes, st.warnings) == (2, 2, 85, [])


def test_big_endian_nanosecond(tmp_path):
    ts = 1_700_000_000_123_456_789
    p = g.write_pcap(tmp_path / "b.pcap", [(ts, tcp_frame())], nsec=True, big_endian=True)
    b, _ = one(p)
    assert b.ts_ns.tolist() == [ts]
    assert b.ip_len.tolist() == [45] and b.sport.tolist() == [40000]


def test_ethernet_padding_is_not_payload(tmp_path):
    frame = g.ether(DEV, GW, g.ipv4("10.0.0.2", "10.0.0.1", 17, g.udp(5353, 53, b"ab")))
    assert len(frame) == 60  # 14 + 20 + 8 + 2, padded
    b, _ = one(g.write_pcap(tmp_path / "p.pcap", [(T0, frame)]))
    assert b.ip_len.tolist() == [30]
    pay, lens = b.payload(np.array([0]), 16)
    assert lens.tolist() == [2] and pay[0, :3].tobytes() == b"ab\x00"


@pytest.mark.parametrize("vlans,tpid", [((100,), 0x8100), ((100, 200), 0x88A8), ((7,), 0x9100)])
def test_vlan_tags(tmp_path, vlans, tpid):
    frame = tcp_frame(b"xyz", vlans=vlans, tpid=tpid)
    b, _ = one(g.write_pcap(tmp_path / "v.pcap", [(T0, frame)]))
    assert b.ip_len.tolist() == [43] and b.dport.tolist() == [443]
    assert int_to_mac(b.src_mac[0]) == DEV
    assert b.payload(np.array([0]), 3)[0][0].tobytes() == b"xyz"


def test_ipv4_options_and_udp(tmp_path):
    ip = g.ipv4(
        "10.0.0.5", "224.0.0.251", 17, g.udp(5353, 5353, b"mdns"), options=b"\x94\x04\x00\x00"
    )  # router alert
    b, _ = one(g.write_pcap(tmp_path / "o.pcap", [(T0, g.ether(DEV, GW, ip))]))
    assert b.ip_len.tolist() == [24 + 8 + 4]
    assert (b.sport[0], b.dport[0], b.l4_len[0]) == (5353, 5353, 4)
    assert b.payload(np.array([0]), 4)[0][0].tobytes() == b"mdns"


def test_other_protocol_ports_zero_payload_after_ip(tmp_path):
    igmp = bytes([0x16, 0, 0, 0, 224, 0, 0, 22])
    ip = g.ipv4("10.0.0.5", "224.0.0.22", 2, igmp, options=b"\x94\x04\x00\x00")
    b, _ = one(g.write_pcap(tmp_path / "i.pcap", [(T0, g.ether(DEV, GW, ip))]))
    assert (b.proto[0], b.sport[0], b.dport[0], b.ip_len[0], b.l4_len[0]) == (2, 0, 0, 32, 8)
    assert b.payload(np.array([0]), 8)[0][0].tobytes() == igmp


@pytest.mark.parametrize(
    "itype,code,sport,dport",
    [(8, 0, 8, 0), (0, 0, 0, 8), (3, 1, 3, 1), (13, 0, 13, 14), (11, 0, 11, 0)],
)
def test_icmp_ports_as_zeek(tmp_path, itype, code, sport, dport):
    ip = g.ipv4("10.0.0.5", "8.8.8.8", 1, g.icmp(itype, code, b"x" * 20))
    b, _ = one(g.write_pcap(tmp_path / "c.pcap", [(T0, g.ether(DEV, GW, ip))]))
    assert (b.proto[0], b.sport[0], b.dport[0]) == (1, sport, dport)
    assert b.ip_len[0] == 48 and b.l4_len[0] == 0  # ICMP payload is empty, as in Zeek
    assert b.payload(np.array([0]), 8)[1].tolist() == [0]


def test_ipv6_extension_headers_and_icmpv6(tmp_path):
    mld = g.icmp(143, 0, b"\x00" * 20)
    hbh = g.ipv6("::", "ff02::16", 58, mld, ext=[(0, b"\x05\x02\x00\x00\x01\x00")])
    tcp6 = g.ipv6(
        "fe80::1",
        "2001:db8::2",
        6,
        g.tcp(1234, 80, b"GET"),
        ext=[(60, b"\x01\x04\x00\x00\x00\x00"), (43, b"\x00" * 6)],
    )
    ns = g.ipv6("fe80::1", "ff02::1:ff00:2", 58, g.icmp(135, 0, b"\x00" * 20))
    frames = [(T0, g.ether(DEV, "33:33:00:00:00:16", x)) for x in (hbh, tcp6, ns)]
    b, st = one(g.write_pcap(tmp_path / "v6.pcap", frames))
    assert b.proto.tolist() == [58, 6, 58]
    assert b.ip_len.tolist() == [len(hbh), len(tcp6), len(ns)]
    assert b.ip_len[0] == 40 + 8 + 28  # payload length + 40, extension header included
    assert b.sport.tolist() == [143, 1234, 135] and b.dport.tolist() == [0, 80, 136]
    assert ip_str(b.src_hi[0], b.src_lo[0]) == "::"
    assert ip_str(b.dst_hi[1], b.dst_lo[1]) == "2001:db8::2"
    assert b.payload(np.array([1]), 3)[0][0].tobytes() == b"GET"
    assert st.malformed == 0


def test_fragments(tmp_path):
    first = g.ipv4(
        "10.0.0.5", "8.8.8.8", 17, g.udp(1000, 53, b"a" * 24), ident=7, more_fragments=True
    )
    second = g.ipv4("10.0.0.5", "8.8.8.8", 17, b"b" * 16, ident=7, frag_offset=32)
    frag6 = g.ipv6("fe80::1", "fe80::2", 17, b"c" * 16, ext=[(44, b"\x00\x00\x08\x00\x00\x00\x09")])
    frames = [(T0, g.ether(DEV, GW, x)) for x in (first, second, frag6)]
    b, st = one(g.write_pcap(tmp_path / "f.pcap", frames))
    assert len(b) == 1 and b.sport.tolist() == [1000] and b.ip_len.tolist() == [52]
    assert st.fragments == 2 and st.malformed == 0


def test_linux_sll_and_sll2(tmp_path):
    ip = g.ipv4("10.0.0.5", "1.1.1.1", 17, g.udp(5000, 53, b"q"))
    for linktype, frame in ((113, g.sll(ip, DEV, pkttype=4)), (276, g.sll2(ip, DEV, 4))):
        b, _ = one(g.write_pcap(tmp_path / f"s{linktype}.pcap", [(T0, frame)], linktype=linktype))
        assert int_to_mac(b.src_mac[0]) == DEV and b.dst_mac[0] == 0
        assert (b.ip_len[0], b.sport[0], b.dport[0]) == (29, 5000, 53)


@pytest.mark.parametrize("linktype", [101, 12, 14, 228, 229])
def test_raw_ip(tmp_path, linktype):
    v4 = g.ipv4("10.0.0.5", "1.1.1.1", 6, g.tcp(1, 2))
    v6 = g.ipv6("fe80::1", "fe80::2", 17, g.udp(3, 4))
    b, st = one(g.write_pcap(tmp_path / "r.pcap", [(T0, v4), (T0, v6)], linktype=linktype))
    want = {228: [2], 229: [4]}.get(linktype, [2, 4])
    assert b.dport.tolist() == want and b.src_mac.tolist() == [0] * len(want)
    assert st.non_ip == 2 - len(want)


def test_null_loopback(tmp_path):
    v4 = g.ipv4("127.0.0.1", "127.0.0.1", 17, g.udp(1, 2))
    frames = [
        (T0, struct.pack("<I", 2) + v4),
        (T0, struct.pack("<I", 30) + g.ipv6("::1", "::1", 17, g.udp(3, 4))),
    ]
    b, _ = one(g.write_pcap(tmp_path / "n.pcap", frames, linktype=0))
    assert b.dport.tolist() == [2, 4]


def test_pcapng_interfaces_resolutions_and_endianness(tmp_path):
    eth = tcp_frame()
    raw = g.ipv4("10.0.0.9", "1.2.3.4", 17, g.udp(7, 8, b"zz"))
    ts1 = 1_700_000_000_000_001_000
    ts2 = 1_700_000_000_123_456_789
    for big in (False, True):
        p = g.write_pcapng(
            tmp_path / f"n{big}.pcapng",
            [(ts1, eth, 0), (ts2, raw, 1)],
            interfaces=[(1, 6), (101, 9)],
            big_endian=big,
        )
        b, st = one(p)
        assert b.ts_ns.tolist() == [ts1, ts2]
        assert b.dport.tolist() == [443, 8] and b.ip_len.tolist() == [45, 30]
        assert int_to_mac(b.src_mac[0]) == DEV and b.src_mac[1] == 0
        assert st.frames == 2 and st.warnings == []


def test_pcapng_power_of_two_resolution_and_simple_packets(tmp_path):
    ts = 1_700_000_000_500_000_000
    p = g.write_pcapng(tmp_path / "p2.pcapng", [(ts, tcp_frame(), 0)], interfaces=[(1, 0x80 | 20)])
    b, _ = one(p)
    assert b.ts_ns.tolist() == [ts]
    p = g.write_pcapng(tmp_path / "spb.pcapng", [(0, tcp_frame())], simple=True)
    b, st = one(p)
    assert b.dport.tolist() == [443] and st.frames == 1


def test_truncated_file_keeps_earlier_packets(tmp_path):
    data = g.pcap_bytes([(T0 + i, tcp_frame()) for i in range(5)])
    p = tmp_path / "t.pcap"
    p.write_bytes(data[:-30])
    batches, st = read(p)
    assert sum(len(b) for b in batches) == 4
    assert st.truncated
    cut_at = 24 + 4 * 76
    assert st.warnings == [f"{p}: byte {cut_at}: file ends inside a record (46 bytes left)"]


def test_corrupt_record_header_stops_with_offset(tmp_path):
    data = bytearray(g.pcap_bytes([(T0 + i, tcp_frame()) for i in range(4)]))
    struct.pack_into("<I", data, 24 + 2 * 76 + 8, 10_000_000)  # third record's caplen
    p = tmp_path / "c.pcap"
    p.write_bytes(bytes(data))
    batches, st = read(p)
    assert sum(len(b) for b in batches) == 2
    assert st.truncated and len(st.warnings) == 1
    assert st.warnings[0].startswith(f"{p}: byte {24 + 2 * 76}: corrupt record header")


def test_malformed_packet_skipped_with_offset(tmp_path):
    bad = bytearray(tcp_frame())
    bad[14] = 0x43  # IHL 3
    frames = [(T0, tcp_frame()), (T0 + 1, bytes(bad)), (T0 + 2, tcp_frame())]
    b, st = one(g.write_pcap(tmp_path / "m.pcap", frames))
    assert len(b) == 2 and st.malformed == 1
    assert st.warnings == [
        f"{tmp_path / 'm.pcap'}: byte {24 + 76}: malformed IP header; packet skipped"
    ]


def test_ip_longer_than_frame_and_snaplen(tmp_path):
    # snaplen cut: captured 54 bytes of a 45-byte IP packet's 59-byte frame -> kept, payload cut
    frame = tcp_frame(b"abcdefghij")
    p = g.write_pcap(tmp_path / "s.pcap", [(T0, frame)], snaplen=56)
    b, st = one(p)
    assert b.ip_len.tolist() == [50] and b.l4_len.tolist() == [10]
    pay, lens = b.payload(np.array([0]), 16)
    assert lens.tolist() == [2] and pay[0, :2].tobytes() == b"ab"
    # wire length shorter than the IP total length: malformed (Zeek: truncated_IP)
    short = g.ether(
        DEV,
        GW,
        g.ipv4("10.0.0.1", "10.0.0.2", 17, g.udp(1, 2, b"x" * 40), total_length=200),
        pad=False,
    )
    _, st = read(g.write_pcap(tmp_path / "short.pcap", [(T0, short)]))
    assert st.malformed == 1 and "longer than the frame" in st.warnings[0]


def test_unknown_link_type_warns(tmp_path):
    p = g.write_pcap(tmp_path / "u.pcap", [(T0, b"\x00" * 40)], linktype=147)
    batches, st = read(p)
    assert batches == [] and st.unknown_link == 1
    assert st.warnings == [f"{p}: byte 24: unknown link type 147; 1 packets skipped"]


def test_not_a_capture_and_missing_file(tmp_path):
    p = tmp_path / "x.pcap"
    p.write_bytes(b"hello world, not a pcap at all")
    with pytest.raises(PcapError, match="not a pcap or pcapng file"):
        read(p)
    with pytest.raises(PcapError, match="cannot open"):
        read(tmp_path / "missing.pcap")
    (tmp_path / "e.pcap").write_bytes(b"")
    with pytest.raises(PcapError, match="too short"):
        read(tmp_path / "e.pcap")


def test_non_ip_counted(tmp_path):
    arp = g.ether(DEV, "ff:ff:ff:ff:ff:ff", b"\x00\x01" + b"\x00" * 26, ethertype=0x0806)
    _, st = read(g.write_pcap(tmp_path / "arp.pcap", [(T0, arp), (T0, tcp_frame())]))
    assert (st.frames, st.non_ip, st.ip_packets) == (2, 1, 1)


def test_small_chunks_give_the_same_packets(tmp_path):
    rng = np.random.default_rng(3)
    frames = [
        (
            T0 + i * 0.01,
            tcp_frame(bytes(rng.integers(0, 256, int(rng.integers(0, 900)), dtype=np.uint8))),
        )
        for i in range(400)
    ]
    p = g.write_pcap(tmp_path / "big.pcap", frames)
    whole, _ = read(p)
    parts, st = read(p, chunk_bytes=4096)
    assert len(parts) > 10 and st.warnings == []
    for name in ("ts_ns", "ip_len", "rec_off", "l4_len"):
        assert np.array_equal(
            np.concatenate([getattr(b, name) for b in parts]), getattr(whole[0], name)
        )
    a = np.concatenate([b.payload(np.arange(len(b)), 64)[0] for b in parts])
    assert np.array_equal(a, whole[0].payload(np.arange(400), 64)[0])


def test_mac_helpers():
    assert mac_to_int("AA-BB-CC-00-00-01") == 0xAABBCC000001
    assert int_to_mac(0xAABBCC000001) == "aa:bb:cc:00:00:01"
    with pytest.raises(ValueError):
        mac_to_int("aa:bb")


def test_pcapng_two_sections_of_different_byte_order_and_small_chunks(tmp_path):
    a = g.pcapng_bytes([(T0 + i, tcp_frame(), 0) for i in range(30)], interfaces=[(1, 6)])
    raw = g.ipv4("10.0.0.9", "1.2.3.4", 17, g.udp(7, 8, b"zz"))
    b = g.pcapng_bytes(
        [(T0 + 100 + i, raw, 0) for i in range(30)], interfaces=[(101, 9)], big_endian=True
    )
    p = tmp_path / "two.pcapng"
    p.write_bytes(a + b)
    for chunk in (1 << 20, 4096):
        batches, st = read(p, chunk_bytes=chunk)
        dport = np.concatenate([x.dport for x in batches]).tolist()
        assert dport == [443] * 30 + [8] * 30 and st.warnings == [] and st.frames == 60
    data = bytearray(a)
    last = len(data) - 92  # the last enhanced packet block: 28 + 60 bytes of frame + 4
    struct.pack_into("<I", data, last + 4, 7)  # its length: not a multiple of 4
    p.write_bytes(bytes(data))
    batches, st = read(p)
    assert sum(len(x) for x in batches) == 29 and st.truncated
    assert st.warnings == [
        f"{p}: byte {last}: pcapng: bad block length 7; stopped reading this file"
    ]
