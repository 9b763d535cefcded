"""The matrix layout on hand-built records: exact values, history, presets, the online twin."""

from collections import OrderedDict

import numpy as np
import pytest

from iotcls.flowtable import FlowTable
from iotcls.layout import LayoutError, MatrixLayout, SequenceAssembler, rel_time
from iotcls.schema import FlowRecord


def rec(start, remote="93.184.216.34", dev="aa:bb:cc:dd:ee:01", **kw):
    base = dict(
        device_mac=dev,
        device_ip="192.168.1.20",
        device_port=50000,
        remote_ip=remote,
        remote_port=443,
        proto=6,
        start=start,
        last=start + 0.5,
        total_bytes=1500,
        total_packets=3,
        offsets=[0.0, 0.001, 0.5],
        sizes=[60, 1400, 40],
        directions=[1, 0, 1],
        payloads=[b"", b"\x16\x03\x01", b"\xff"],
    )
    base.update(kw)
    return FlowRecord(**base)


def test_row_values_exact():
    lay = MatrixLayout(history=2, packets=4, payload_bytes=2)
    t = FlowTable.from_records([rec(100.0)], packets=4, payload_bytes=8)
    row = lay.encode_rows(t)[0]
    names = lay.column_names()
    v = dict(zip(names, row))
    assert len(row) == lay.width == 13 + 12 + 8
    assert v["rel_time"] == 0
    assert v["rip0"] == pytest.approx(93 / 255) and v["rip3"] == pytest.approx(34 / 255)
    assert v["rip_v6"] == 0
    assert v["rport"] == pytest.approx(443 / 65535) and v["dport"] == pytest.approx(50000 / 65535)
    assert (v["tcp"], v["udp"], v["icmp"]) == (1, 0, 0)
    assert v["bytes"] == pytest.approx(np.log1p(1500) / np.log1p(1e7))
    assert v["pkts"] == pytest.approx(np.log1p(3) / np.log1p(1e5))
    assert v["t00"] == 0 and v["t01"] == pytest.approx(np.log1p(1.0) / np.log1p(60000))
    assert v["t03"] == 0 and v["s03"] == 0 and v["d03"] == 0
    assert v["s01"] == pytest.approx(1400 / 1500)
    assert [v["d00"], v["d01"], v["d02"]] == [1, -1, 1]
    assert [v["b00_000"], v["b00_001"]] == [0, 0]  # no payload
    assert [v["b01_000"], v["b01_001"]] == pytest.approx([0x17 / 256, 0x04 / 256])
    assert [v["b02_000"], v["b02_001"]] == pytest.approx([1.0, 0.0])


def test_private_remote_zeroed_v4_and_v6():
    lay = MatrixLayout(history=0, packets=2, payload_mode="none")
    recs = [
        rec(0, remote="10.1.2.3"),
        rec(0, remote="172.31.0.1"),
        rec(0, remote="fe80::1"),
        rec(0, remote="2001:db8::1"),
        rec(0, remote="172.32.0.1"),
        rec(0, remote="0.0.0.0"),
    ]
    rows = lay.encode_rows(FlowTable.from_records(recs, 10, 0))
    assert (rows[[0, 1, 2, 5], 1:5] == 0).all()
    assert rows[3, 1:5] == pytest.approx(np.array([0x20, 0x01, 0x0D, 0xB8]) / 255)
    assert rows[3, 5] == 1 and rows[2, 5] == 1
    assert rows[4, 1] == pytest.approx(172 / 255)


def test_history_rows_and_padding():
    lay = MatrixLayout(history=2, packets=2, payload_mode="none")
    recs = [
        rec(10.0, remote_port=1),
        rec(0.0, remote_port=2),
        rec(5.0, dev="other", remote_port=3),
        rec(70.0, remote_port=4),
    ]
    t = FlowTable.from_records(recs, 10, 0)
    mats, order = lay.matrices(t)
    by_port = {int(round(m[0, 6] * 65535)): m for m in mats}
    port = lambda row: int(round(row[6] * 65535))  # noqa: E731
    m4 = by_port[4]
    assert [port(m4[0]), port(m4[1]), port(m4[2])] == [4, 1, 2]
    assert m4[1, 0] == pytest.approx(rel_time(60.0)) and m4[2, 0] == pytest.approx(rel_time(70.0))
    assert (by_port[2][1:] == 0).all()  # first flow of the device: no history
    assert (by_port[3][1:] == 0).all()  # another device's flows never leak in
    assert sorted(order) == [0, 1, 2, 3]


def test_online_assembler_matches_offline():
    lay = MatrixLayout(history=3, packets=3, payload_bytes=4)
    rng = np.random.default_rng(0)
    recs = [
        rec(float(s), dev=f"d{rng.integers(3)}", remote_port=int(i))
        for i, s in enumerate(rng.uniform(0, 1000, 40))
    ]
    t = FlowTable.from_records(recs, 10, 8)
    offline, order = lay.matrices(t)
    rows = lay.encode_rows(t)
    asm = SequenceAssembler(lay)
    by_start = np.argsort(t.start, kind="stable")
    online = np.zeros_like(offline)
    for i in by_start:
        online[i] = asm.add(rows[i : i + 1], t.start[i : i + 1], [t.device_keys()[i]])[0]
    np.testing.assert_allclose(online[order], offline)


class OneByOne:
    """The online assembler's meaning, one record at a time and plainly: a device keeps the
    ``history`` newest of the records it has seen by (start, arrival); a record's history is
    the part of that below it, newest first; devices beyond ``max_devices`` are forgotten
    least recently used first. SequenceAssembler must give exactly this, batch by batch."""

    def __init__(self, layout: MatrixLayout, max_devices: int):
        self.k, self.max_devices = layout.history, max_devices
        self.kept: OrderedDict[str, list] = OrderedDict()
        self.arrived = 0

    def add(self, row: np.ndarray, start: float, dev: str) -> np.ndarray:
        kept = self.kept.get(dev)
        if kept is None:
            kept = self.kept[dev] = []
            if len(self.kept) > self.max_devices:
                self.kept.popitem(last=False)
        else:
            self.kept.move_to_end(dev)
        key = (start, self.arrived)
        self.arrived += 1
        mat = np.zeros((self.k + 1, len(row)), np.float32)
        mat[0] = row
        below = [e for e in kept if e[0] < key]  # at most k: kept holds k
        for j, ((k_start, _), r) in enumerate(reversed(below), 1):
            mat[j] = r
            mat[j, 0] = rel_time(start - k_start)
        kept.append((key, row))
        kept.sort(key=lambda e: e[0])
        del kept[: max(0, len(kept) - self.k)]
        return mat


@pytest.mark.parametrize(
    "history,max_devices", [(5, 100), (3, 3), (2, 1), (1, 2), (0, 4), (5, 6), (4, 17)]
)
def test_online_assembler_batches_equal_one_record_at_a_time(history, max_devices):
    """Random batches: devices interleaved and repeated, starts out of order and tied, more
    devices than max_devices (forgetting inside a batch's span), batch sizes 1 to 80."""
    lay = MatrixLayout(history=history, packets=2, payload_mode="none")
    rng = np.random.default_rng(history * 100 + max_devices)
    asm, ref = SequenceAssembler(lay, max_devices=max_devices), OneByOne(lay, max_devices)
    names = [f"dev{i}" for i in range(100)]
    t = 0.0
    for _ in range(60):
        n = int(rng.integers(1, 81))
        rows = rng.random((n, lay.width), dtype=np.float32)
        rows[:, 0] = 0
        t += float(rng.integers(0, 5))
        # mostly rising starts, some far back, many ties (whole seconds)
        starts = t + rng.integers(-3, 6, n) - 50.0 * (rng.random(n) < 0.1)
        few = int(rng.choice([1, 3, 12, 0]))  # devices to draw from; 0: each record another
        picks = rng.integers(0, few, n) if few else rng.permutation(len(names))[:n]
        devs = [names[i] for i in picks]
        got = asm.add(rows, starts, devs)
        want = np.stack([ref.add(rows[i], float(starts[i]), devs[i]) for i in range(n)])
        np.testing.assert_array_equal(got, want)
        assert len(asm) == len(ref.kept)


def test_online_assembler_in_start_order_equals_offline_in_any_batches():
    """A stream fed in start order, in batches of any size, gives the offline matrices."""
    lay = MatrixLayout(history=4, packets=3, payload_bytes=4)
    rng = np.random.default_rng(7)
    recs = [
        rec(float(s), dev=f"d{rng.integers(5)}", remote_port=int(i))
        for i, s in enumerate(rng.integers(0, 300, 400))
    ]
    t = FlowTable.from_records(recs, 10, 8)
    offline, order = lay.matrices(t)
    by_start = np.argsort(t.start, kind="stable")
    rows, keys = lay.encode_rows(t)[by_start], list(t.device_keys()[by_start])
    asm = SequenceAssembler(lay)
    asm.CHUNK = 16  # batches of up to 60 records: several chunks each
    online = np.zeros_like(offline)
    lo = 0
    while lo < len(recs):
        hi = lo + int(rng.integers(1, 60))
        online[by_start[lo:hi]] = asm.add(rows[lo:hi], t.start[by_start[lo:hi]], keys[lo:hi])
        lo = hi
    np.testing.assert_array_equal(online[order], offline)


def test_paper_stream_preset():
    lay = MatrixLayout.preset("paper")
    assert lay.payload_mode == "stream" and lay.history == 5 and lay.packets == 10
    t = FlowTable.from_records([rec(0.0)], packets=10, payload_bytes=998)
    row = lay.encode_rows(t)[0]
    pay = row[lay.group_slices()["payload"]] * 255
    assert pay[:9] == pytest.approx([-4, -8, -4, 0x16, 3, 1, -8, -4, 0xFF])
    assert pay[9] == pytest.approx(-8) and (pay[10:] == 0).all()


def test_layout_yaml_round_trip_and_mismatch():
    lay = MatrixLayout(history=3, payload_bytes=32)
    assert MatrixLayout.from_yaml(lay.to_yaml()) == lay
    with pytest.raises(LayoutError, match="payload_bytes"):
        lay.check_compatible(MatrixLayout())
    with pytest.raises(LayoutError, match="unknown keys"):
        MatrixLayout.from_dict({"histroy": 3})
    with pytest.raises(LayoutError, match="payload_mode"):
        MatrixLayout(payload_mode="bytes")


def test_record_rejects_ragged_packets():
    with pytest.raises(ValueError, match="differ in length"):
        rec(0.0, sizes=[1])


def test_table_round_trip():
    r = rec(3.0, remote="2001:db8::5")
    t = FlowTable.from_records([r], packets=10, payload_bytes=64)
    assert t.record(0) == r


def test_dhcp6_unit_identity_is_blanked():
    """DHCPv6 payloads keep only their message type; other payloads are untouched. (DHCPv4
    payloads arrive as unit-free views: tests/test_dhcp.py.)"""
    lay = MatrixLayout(history=0, packets=2, payload_bytes=48)
    msg = bytes(range(1, 49))  # byte i holds i + 1
    dhcp6 = rec(
        10.0,
        remote="ff02::1:2",
        proto=17,
        device_port=546,
        remote_port=547,
        offsets=[0.0],
        sizes=[120],
        directions=[1],
        payloads=[msg],
    )
    other = rec(
        20.0,
        proto=17,
        device_port=5000,
        remote_port=53,
        offsets=[0.0],
        sizes=[76],
        directions=[1],
        payloads=[msg],
    )
    t = FlowTable.from_records([dhcp6, other], packets=2, payload_bytes=48)
    rows = lay.encode_rows(t)
    pay = lay.group_slices()["payload"]
    got = np.rint(rows[:, pay][:, :48] * 256 - 1).astype(int)  # packet 0, as byte values
    assert got[1].tolist() == list(range(1, 49))  # not DHCP: untouched
    assert got[0].tolist() == [1] + [0] * 47  # message type, then zero bytes (not absent)
    assert t.payload[0, 0, 4] == 5  # the records themselves keep what was on the wire

    paper = MatrixLayout(history=0, packets=2, payload_mode="stream", stream_bytes=60)
    stream = np.rint(paper.encode_rows(t)[0, paper.group_slices()["payload"]] * 255).astype(int)
    assert stream[0] == -4 and stream[1] == 1 and stream[2:49].tolist() == [0] * 47


def test_old_layout_version_is_refused():
    d = MatrixLayout().to_dict() | {"version": 1}
    with pytest.raises(LayoutError, match="version 1 is not supported.*retrain"):
        MatrixLayout.from_dict(d)
