"""The pcap sensor against a real Zeek 8.2.2's per-packet view of six IoT Sentinel captures.

``../shared/fixtures/zeek-8.2.2/captures/<Device>_<capture>/packets.jsonl`` holds, for every IP packet Zeek
tied to a connection, the connection's uid and 5-tuple, the packet's direction and IP length
(recorded with ``packets.zeek``, Zeek's ``new_packet`` event). Our uids differ, so packets are
compared per connection by unordered 5-tuple + protocol: same packets in the same order, same
directions, same IP lengths. Then the records: grouping Zeek's packets by the device-side key
and cutting 60 s windows must give the records the sensor builds.

Zeek's timestamps in these files are ``network_time()``, which never goes backwards: a packet
stamped earlier than the one before it shows the later time. Times are therefore compared
within 1 ms.
"""

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from iotcls.flows import DeviceSelector, _ip16_to_str, capture_flows
from iotcls.pcap import CaptureReader
from iotcls.testing.shared import require, sentinel_dir, zeek_fixtures_dir

FIXTURES = require(zeek_fixtures_dir() / "captures", module=True)
DATA = require(sentinel_dir(), module=True)
CAPTURES = sorted(p.name for p in FIXTURES.iterdir() if (p / "packets.jsonl").exists())
PROTO = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}


def test_six_captures_present():
    assert len(CAPTURES) == 6


def pcap_of(name: str) -> Path:
    device, capture = name.split("_", 1)
    return require(DATA / device / f"{capture}.pcap")


def zeek_packets(name: str) -> list[dict]:
    with (FIXTURES / name / "packets.jsonl").open() as f:
        return [json.loads(line) for line in f]


def conn_key(proto, a, b):
    return (proto, *sorted([a, b]))


@pytest.mark.parametrize("name", CAPTURES)
def test_same_packets_per_connection(name):
    zeek = defaultdict(list)
    for p in zeek_packets(name):
        o = (p["orig_h"], p["orig_p"]["port"])
        r = (p["resp_h"], p["resp_p"]["port"])
        src, dst = (o, r) if p["is_orig"] else (r, o)
        zeek[conn_key(p["proto"], src, dst)].append((src, p["ip_len"], p["ts"]))
    ours = defaultdict(list)
    for b in CaptureReader(pcap_of(name)).batches():
        for i in range(len(b)):
            src = (_ip16_to_str(b.src_hi[i], b.src_lo[i]), int(b.sport[i]))
            dst = (_ip16_to_str(b.dst_hi[i], b.dst_lo[i]), int(b.dport[i]))
            proto = PROTO.get(int(b.proto[i]), "other")
            ours[conn_key(proto, src, dst)].append((src, int(b.ip_len[i]), b.ts_ns[i] / 1e9))
    assert sorted(ours) == sorted(zeek)
    for k in zeek:
        z, o = zeek[k], ours[k]
        assert [(s, n) for s, n, _ in o] == [(s, n) for s, n, _ in z], k
        assert np.allclose([t for *_, t in o], [t for *_, t in z], rtol=0, atol=1e-3), k


def zeek_records(name: str, mac: str, window_s: float = 60.0, n: int = 10) -> list[tuple]:
    """Records built from Zeek's packets: device side from the connection's L2 addresses."""
    keys = defaultdict(list)
    for p in zeek_packets(name):
        o = (p["orig_h"], p["orig_p"]["port"])
        r = (p["resp_h"], p["resp_p"]["port"])
        for dev_is_orig in (True, False):
            if p.get("orig_l2" if dev_is_orig else "resp_l2") != mac:
                continue
            dev, rem = (o, r) if dev_is_orig else (r, o)
            d = int(p["is_orig"] == dev_is_orig)
            keys[(dev, rem, p["proto"])].append((p["ts"], p["ip_len"], d))
    out = []
    for (dev, rem, proto), pkts in keys.items():
        windows = []
        for t, size, d in pkts:
            if not windows or t >= windows[-1][0] + window_s:
                windows.append([t, []])
            windows[-1][1].append((t, size, d))
        for start, w in windows:
            out.append(
                (
                    dev,
                    rem,
                    proto,
                    len(w),
                    sum(s for _, s, _ in w),
                    tuple(s for _, s, _ in w[:n]),
                    tuple(d for *_, d in w[:n]),
                    start,
                )
            )
    return sorted(out)


@pytest.mark.parametrize("name", CAPTURES)
def test_same_records_as_zeek_packets_give(name):
    device = name.split("_", 1)[0]
    mac = (DATA / device / "_iotdevice-mac.txt").read_text().strip()
    cf = capture_flows(pcap_of(name), DeviceSelector.from_lists([mac]))
    ours = sorted(
        (
            (r.device_ip, r.device_port),
            (r.remote_ip, r.remote_port),
            PROTO.get(r.proto, "other"),
            r.total_packets,
            r.total_bytes,
            tuple(r.sizes),
            tuple(r.directions),
            r.start,
        )
        for r in cf.table.records()
    )
    want = zeek_records(name, mac)
    assert len(ours) == len(want) > 0
    for a, b in zip(ours, want):
        assert a[:-1] == b[:-1]
        assert abs(a[-1] - b[-1]) < 1e-3


@pytest.mark.zeek
@pytest.mark.parametrize("name", CAPTURES)
def test_the_zeek_package_gives_the_sensors_records(name, tmp_path):
    """Where a zeek is installed: the iotcls Zeek package (zeek -r, devices by MAC, records
    taken by an in-process bridge) gives the pcap sensor's records, field by field, except
    Zeek's own orientation (uid, device_is_orig)."""
    from iotcls.schema import FlowRecord
    from test_zeek_scripts import _macs_arg, _rkey, _zeek_with_bridge

    device = name.split("_", 1)[0]
    mac = (DATA / device / "_iotdevice-mac.txt").read_text().strip()
    pcap = pcap_of(name)
    r, got, _, _ = _zeek_with_bridge(pcap, tmp_path, _macs_arg([mac]))
    assert r.returncode == 0, r.stderr
    recs = capture_flows(pcap, DeviceSelector.from_lists([mac])).table.records()
    ours = {_rkey(x): x for x in recs}
    assert sorted(map(_rkey, got)) == sorted(ours) and len(got) > 0
    fields = [f for f in FlowRecord.__dataclass_fields__ if f not in ("uid", "device_is_orig")]
    for z in got:
        assert [getattr(z, f) for f in fields] == [getattr(ours[_rkey(z)], f) for f in fields]


DHCP_CAPTURE = "TP-LinkPlugHS110_Setup-A-1-STA"  # DISCOVER and REQUESTs naming "HS110(EU)"


def _dhcp_rows(t) -> dict[tuple, int]:
    """Rows of the device's DHCP client flows (device port 68) of table *t*, by key."""
    from iotcls.flowtable import bytes_to_ip

    return {
        (
            t.device_mac[i],
            bytes_to_ip(t.device_ip[i].tobytes()),
            bytes_to_ip(t.remote_ip[i].tobytes()),
            int(t.remote_port[i]),
            round(t.start[i], 6),
        ): i
        for i in np.flatnonzero((t.proto == 17) & (t.device_port == 68)).tolist()
    }


def _slot_bytes(t, i: int) -> list[bytes]:
    return [t.payload[i, k, : t.payload_len[i, k]].tobytes() for k in range(t.n_pkts[i])]


@pytest.mark.zeek
def test_the_zeek_package_keeps_whole_dhcp_messages(tmp_path):
    """DHCP packets keep IoTClass::dhcp_payload_bytes, not payload_bytes: the table the
    bridge decodes from Zeek's records of the plug's DHCP flows has the pcap sensor's rows,
    array by array (the DHCP view's bytes and lengths included), and the views hold the host
    name the plug sends in option 12, past byte 240 of the message. With the option set to
    64 the options are cut off and the name is gone."""
    from iotcls.flowtable import FlowTable
    from test_zeek_scripts import _macs_arg, _zeek_with_bridge

    device = DHCP_CAPTURE.split("_", 1)[0]
    mac = (DATA / device / "_iotdevice-mac.txt").read_text().strip()
    pcap = pcap_of(DHCP_CAPTURE)
    want = capture_flows(pcap, DeviceSelector.from_lists([mac])).table
    tables: list = []
    r, _, _, _ = _zeek_with_bridge(pcap, tmp_path, _macs_arg([mac]), tables=tables)
    assert r.returncode == 0, r.stderr
    got = FlowTable.concat(tables, want.packets, want.payload_bytes)
    g, w = _dhcp_rows(got), _dhcp_rows(want)
    assert sorted(g) == sorted(w) and {k[1] for k in g} == {"0.0.0.0", "10.10.10.20"}
    same = [f for f in FlowTable.__dataclass_fields__ if f not in ("uid", "device_is_orig")]
    for k, i in g.items():
        for f in same:
            assert np.array_equal(getattr(got, f)[i], getattr(want, f)[w[k]]), (k, f)
    client = g[next(k for k in g if k[1] == "0.0.0.0")]  # DISCOVER, REQUESTs: from the plug
    assert got.n_pkts[client] == 3
    assert all(b"\x0c\x09HS110(EU)" in v for v in _slot_bytes(got, client))

    tables.clear()
    r, _, _, _ = _zeek_with_bridge(
        pcap, tmp_path, _macs_arg([mac]), "IoTClass::dhcp_payload_bytes=64", tables=tables
    )
    assert r.returncode == 0, r.stderr
    cut = FlowTable.concat(tables, want.packets, want.payload_bytes)
    views = [v for i in _dhcp_rows(cut).values() for v in _slot_bytes(cut, i)]
    assert len(views) == 6 and not any(b"HS110" in v for v in views)
