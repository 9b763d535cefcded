"""Flow records from hand-built captures (exact values) and from real IoT Sentinel captures."""

import re

import numpy as np
import pytest

from iotcls import pcapgen as g
from iotcls.flows import DeviceSelector, FlowBuilder, capture_flows, make_uids
from iotcls.pcap import CaptureReader
from iotcls.testing.shared import require, sentinel_dir

DEV = "aa:bb:cc:00:00:01"
DEV2 = "aa:bb:cc:00:00:02"
GW = "02:00:00:00:00:fe"
T0 = 1_700_000_000.0
DATA = sentinel_dir()  # ../shared, or $IOTCLS_SHARED


def up(
    t,
    payload=b"",
    sport=40000,
    dport=443,
    proto="tcp",
    src="192.168.1.10",
    dst="93.184.216.34",
    smac=DEV,
    dmac=GW,
):
    l4 = g.tcp(sport, dport, payload) if proto == "tcp" else g.udp(sport, dport, payload)
    return (t, g.ether(smac, dmac, g.ipv4(src, dst, 6 if proto == "tcp" else 17, l4)))


def down(t, payload=b"", **kw):
    kw.setdefault("sport", 443)
    kw.setdefault("dport", 40000)
    kw.setdefault("src", "93.184.216.34")
    kw.setdefault("dst", "192.168.1.10")
    kw.setdefault("smac", GW)
    kw.setdefault("dmac", DEV)
    return up(t, payload, **kw)


def flows(tmp_path, pkts, macs=(DEV,), nets=(), **kw):
    p = g.write_pcap(tmp_path / "f.pcap", pkts)
    cf = capture_flows(p, DeviceSelector.from_lists(macs, nets), **kw)
    assert cf.error == "" and cf.stats.warnings == []
    return cf


def test_one_connection_exact(tmp_path):
    pk = [up(T0, b""), down(T0 + 0.25, b""), up(T0 + 0.5, b"GET /"), down(T0 + 1.0, b"HTTP/1.1")]
    cf = flows(tmp_path, pk, packets=3, payload_bytes=4)
    (r,) = cf.table.records()
    assert (r.device_mac, r.device_ip, r.device_port) == (DEV, "192.168.1.10", 40000)
    assert (r.remote_ip, r.remote_port, r.proto) == ("93.184.216.34", 443, 6)
    assert (r.start, r.last) == (T0, T0 + 1.0)
    assert (r.total_packets, r.total_bytes) == (4, 40 + 40 + 45 + 48)
    assert r.offsets == [0.0, 0.25, 0.5]
    assert r.sizes == [40, 40, 45] and r.directions == [1, 0, 1]
    assert r.payloads == [b"", b"", b"GET "]
    assert re.fullmatch(r"C[0-9A-Za-z]{17}", r.uid) and r.device_is_orig
    assert cf.device_first_seen == {DEV: T0}
    assert cf.builder.device_packets == 4


def test_sixty_second_split_same_uid(tmp_path):
    times = [0.0, 30.0, 59.999999, 60.0, 61.0, 125.0]
    pk = [up(T0 + t, b"x") if i % 2 == 0 else down(T0 + t, b"y") for i, t in enumerate(times)]
    cf = flows(tmp_path, pk)
    recs = cf.table.records()
    assert [r.start for r in recs] == [T0, T0 + 60.0, T0 + 125.0]
    assert [r.total_packets for r in recs] == [3, 2, 1]
    assert [r.total_bytes for r in recs] == [41 * 3, 41 * 2, 41]
    assert recs[0].offsets == pytest.approx([0.0, 30.0, 59.999999], abs=1e-9)
    assert recs[1].offsets == [0.0, 1.0] and recs[1].directions == [0, 1]
    assert recs[0].last == pytest.approx(T0 + 59.999999)
    # one TCP connection (idle 64 s < 5 min): one uid across its windows
    assert len({r.uid for r in recs}) == 1 and all(r.device_is_orig for r in recs)


def test_window_option_and_first_packets_cap(tmp_path):
    pk = [up(T0 + 0.1 * i, bytes([i])) for i in range(25)]
    cf = flows(tmp_path, pk, window_s=1.0, packets=4, payload_bytes=2)
    recs = cf.table.records()
    assert [r.total_packets for r in recs] == [10, 10, 5]
    assert [len(r.sizes) for r in recs] == [4, 4, 4]
    assert recs[1].payloads == [b"\x0a", b"\x0b", b"\x0c", b"\x0d"]
    assert recs[1].offsets == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_udp_idle_past_timeout_is_a_new_connection(tmp_path):
    u = dict(proto="udp", sport=5000, dport=53)
    d = dict(proto="udp", sport=53, dport=5000)
    pk = [up(T0, b"q", **u), down(T0 + 0.1, b"a", **d), down(T0 + 70, b"b", **d)]
    recs = flows(tmp_path, pk).table.records()
    assert len(recs) == 2 and recs[0].uid != recs[1].uid
    assert recs[0].device_is_orig and not recs[1].device_is_orig


def test_mirrored_device_to_device(tmp_path):
    a = dict(src="192.168.1.10", dst="192.168.1.20", smac=DEV, dmac=DEV2, sport=5555, dport=80)
    b = dict(src="192.168.1.20", dst="192.168.1.10", smac=DEV2, dmac=DEV, sport=80, dport=5555)
    pk = [up(T0, b"hi", **a), up(T0 + 0.5, b"there", **b), up(T0 + 0.75, b"", **a)]
    recs = flows(tmp_path, pk, macs=(DEV, DEV2)).table.records()
    assert len(recs) == 2
    r1, r2 = sorted(recs, key=lambda r: r.device_mac)
    assert (r1.device_mac, r1.device_ip, r1.device_port, r1.remote_ip, r1.remote_port) == (
        DEV,
        "192.168.1.10",
        5555,
        "192.168.1.20",
        80,
    )
    assert (r2.device_mac, r2.device_ip, r2.device_port, r2.remote_ip, r2.remote_port) == (
        DEV2,
        "192.168.1.20",
        80,
        "192.168.1.10",
        5555,
    )
    assert r1.directions == [1, 0, 1] and r2.directions == [0, 1, 0]
    assert r1.sizes == r2.sizes == [42, 45, 40]
    assert r1.payloads == r2.payloads == [b"hi", b"there", b""]
    assert r1.uid == r2.uid and r1.device_is_orig and not r2.device_is_orig
    assert r1.total_packets == r2.total_packets == 3


def test_icmp_echo_is_one_record(tmp_path):
    req = (T0, g.ether(DEV, GW, g.ipv4("192.168.1.10", "8.8.8.8", 1, g.icmp(8, 0, b"p" * 8))))
    rep = (
        T0 + 0.02,
        g.ether(GW, DEV, g.ipv4("8.8.8.8", "192.168.1.10", 1, g.icmp(0, 0, b"p" * 8))),
    )
    (r,) = flows(tmp_path, [req, rep]).table.records()
    assert (r.device_port, r.remote_port, r.proto) == (8, 0, 1)
    assert r.directions == [1, 0] and r.sizes == [36, 36] and r.payloads == [b"", b""]


def test_local_nets_selection(tmp_path):
    pk = [
        up(T0, b"a"),  # 192.168.1.10 -> internet: device 192.168.1.10
        up(
            T0 + 1,
            b"b",
            proto="udp",
            dst="192.168.1.255",
            dmac="ff:ff:ff:ff:ff:ff",
            sport=137,
            dport=137,
        ),  # directed broadcast: one record (the sender)
        up(
            T0 + 2,
            b"c",
            proto="udp",
            dst="224.0.0.251",
            dmac="01:00:5e:00:00:fb",
            sport=5353,
            dport=5353,
        ),  # multicast: one record
        up(T0 + 3, b"d", src="8.8.8.8", dst="1.1.1.1", smac=GW, dmac=GW),  # no device
    ]
    cf = flows(tmp_path, pk, macs=(), nets=("192.168.1.0/24",))
    recs = cf.table.records()
    assert [(r.device_ip, r.remote_ip) for r in recs] == [
        ("192.168.1.10", "93.184.216.34"),
        ("192.168.1.10", "192.168.1.255"),
        ("192.168.1.10", "224.0.0.251"),
    ]
    assert {r.device_mac for r in recs} == {DEV}
    assert cf.device_first_seen == {DEV: T0}


def test_local_nets_without_mac_uses_ip(tmp_path):
    ip = g.ipv4("10.1.2.3", "9.9.9.9", 17, g.udp(1, 2, b"z"))
    p = g.write_pcap(tmp_path / "raw.pcap", [(T0, ip)], linktype=101)
    cf = capture_flows(p, DeviceSelector.from_lists(nets=["10.0.0.0/8"]))
    (r,) = cf.table.records()
    assert (r.device_mac, r.device, r.device_ip) == ("", "10.1.2.3", "10.1.2.3")
    assert cf.device_first_seen == {"10.1.2.3": T0}


def test_streaming_chunks_equal_one_pass(tmp_path):
    rng = np.random.default_rng(7)
    pk = []
    t = T0
    for _ in range(3000):
        t += float(rng.exponential(0.2))
        port = int(rng.integers(40000, 40040))
        pay = bytes(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8))
        if rng.random() < 0.5:
            pk.append(up(round(t, 6), pay, sport=port))
        else:
            pk.append(down(round(t, 6), pay, dport=port))
    p = g.write_pcap(tmp_path / "s.pcap", pk)
    sel = DeviceSelector.from_lists([DEV])
    whole = capture_flows(p, sel)
    parts = capture_flows(p, sel, chunk_bytes=8192)
    a, b = whole.table, parts.table
    assert len(a) > 100 and len(a) == len(b)
    ka = np.lexsort((a.device_port, a.start))
    kb = np.lexsort((b.device_port, b.start))
    for name in (
        "start",
        "last",
        "total_bytes",
        "total_packets",
        "n_pkts",
        "offsets",
        "sizes",
        "directions",
        "payload",
        "payload_len",
        "device_port",
        "device_is_orig",
    ):
        assert np.array_equal(getattr(a, name)[ka], getattr(b, name)[kb]), name
    assert a.uid[ka].tolist() == b.uid[kb].tolist()
    assert whole.device_first_seen == parts.device_first_seen


def test_builder_emits_closed_windows_early(tmp_path):
    p = g.write_pcap(
        tmp_path / "e.pcap", [up(T0 + i * 10.0, b"x", sport=40000 + i % 3) for i in range(30)]
    )
    fb = FlowBuilder(DeviceSelector.from_lists([DEV]), window_s=60, packets=2, payload_bytes=0)
    emitted = [len(fb.add(b)) for b in CaptureReader(p, chunk_bytes=4096).batches()]
    rest = len(fb.finish())
    assert sum(emitted) > 0 and sum(emitted) + rest == 3 * 5


def test_selector_errors():
    with pytest.raises(ValueError, match="not a MAC"):
        DeviceSelector.from_lists(["zz:zz"])
    with pytest.raises(ValueError, match="not a network"):
        DeviceSelector.from_lists(nets=["10.0.0.0/40"])


def test_uids_stable_and_unordered():
    a = make_uids(
        *(
            np.array([x], dtype=np.uint64 if i in (0, 1, 3, 4) else np.int64)
            for i, x in enumerate((0, 5, 80, 0, 9, 1234, 6, 10**18))
        )
    )
    b = make_uids(
        *(
            np.array([x], dtype=np.uint64 if i in (0, 1, 3, 4) else np.int64)
            for i, x in enumerate((0, 9, 1234, 0, 5, 80, 6, 10**18))
        )
    )
    assert a[0] == b[0] and len(a[0]) == 18 and a[0].startswith("C")


# -- real captures --------------------------------------------------------------------------


def sentinel(name):
    p = DATA / name
    require(p)
    return p


def test_real_capture_record_counts():
    pcap = sentinel("Aria/Setup-A-1-STA.pcap")
    mac = (DATA / "Aria" / "_iotdevice-mac.txt").read_text().strip()
    cf = capture_flows(pcap, DeviceSelector.from_lists([mac]))
    t = cf.table
    assert len(t) == 5 and cf.stats.ip_packets == 40 and cf.stats.frames == 49
    assert int(t.total_packets.sum()) == 40 and int(t.total_bytes.sum()) == 6455
    assert set(t.device_mac) == {"20:f8:5e:ca:91:52"}
    # Zeek's conn.log: the two HTTP connections have 8+9 and 7+6 packets
    tcp = t.take(t.proto == 6)
    assert tcp.total_packets.tolist() == [17, 13] and tcp.total_bytes.tolist() == [2165, 1467]


def test_real_split_and_mirrored_records_happen():
    """Somewhere in real captures a connection outlives 60 s, and two devices talk."""
    split = mirrored = 0
    sel = DeviceSelector.from_lists(nets=["10.0.0.0/8", "192.168.0.0/16"])
    for name in ("HueBridge/Setup-A-1-STA.pcap", "D-LinkCam/Setup-B-1-STA.pcap"):
        t = capture_flows(sentinel(name), sel).table
        uids, counts = np.unique(t.uid.astype(str), return_counts=True)
        keys = [r.key() for r in t.records()]
        for uid in uids[counts > 1]:
            idx = np.flatnonzero(t.uid == uid)
            ks = {keys[i] for i in idx}
            if len(ks) == 1:  # one key, several windows 60 s apart at least
                starts = np.sort(t.start[idx])
                assert (np.diff(starts) >= 60).all()
                split += 1
            else:  # device to device: the same connection seen from both ends
                (a, b) = ks
                assert (a[0], a[1], a[2], a[3]) == (b[2], b[3], b[0], b[1])
                mirrored += 1
    assert split > 0 and mirrored > 0


def test_keys_survive_chunks_that_change_address_family(tmp_path):
    """An IPv4 flow's window stays one record when a chunk in its middle holds IPv6."""
    v6 = (T0 + 1, g.ether(DEV, GW, g.ipv6("fe80::1", "2001:db8::1", 17, g.udp(1, 2, b"x"))))
    pk = [up(T0, b"a")] + [v6] * 60 + [up(T0 + 2, b"b")]
    p = g.write_pcap(tmp_path / "mix.pcap", pk)
    cf = capture_flows(p, DeviceSelector.from_lists([DEV]), chunk_bytes=4096)
    t = cf.table.take(cf.table.proto == 6)
    assert len(t) == 1 and t.total_packets.tolist() == [2]
