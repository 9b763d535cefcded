"""Early records (iotcls.schema.early_record): one per window, a prefix of the final record,
at the first moment when its first N packets are in or it has been idle for EARLY_IDLE_S."""

import numpy as np
import pytest

from iotcls.schema import EARLY_IDLE_S, FlowRecord, early_cut, early_record


def rec(offsets, total=None, start=1000.0):
    n = len(offsets)
    return FlowRecord(
        device_mac="02:00:00:00:00:01",
        device_ip="10.0.0.2",
        device_port=40000,
        remote_ip="192.0.2.1",
        remote_port=443,
        proto=6,
        start=start,
        last=start + offsets[-1],
        total_bytes=100 * (total or n),
        total_packets=total or n,
        offsets=list(offsets),
        sizes=[100] * n,
        directions=[i % 2 for i in range(n)],
        payloads=[bytes([i]) for i in range(n)],
        uid="C1",
    )


def test_n_packets_in_without_a_gap():
    r = rec([0.1 * i for i in range(10)], total=250)
    e = early_record(r)
    assert e.total_packets == 10 and e.total_bytes == 1000 and e.offsets == r.offsets
    assert e.last == pytest.approx(r.start + 0.9) and e.start == r.start and e.uid == r.uid
    assert early_cut(r.offsets, 250) == (10, pytest.approx(0.9))


def test_an_idle_gap_cuts_before_n_packets():
    r = rec([0, 0.01, 0.02, 30.0, 30.1], total=5)  # DNS-like burst, then silence
    assert early_cut(r.offsets, 5) == (3, pytest.approx(0.02 + EARLY_IDLE_S))
    e = early_record(r)
    assert e.total_packets == 3 and e.sizes == [100] * 3 and e.payloads == r.payloads[:3]
    assert e.last == pytest.approx(r.start + 0.02)


def test_a_short_window_is_early_whole_after_the_idle_time():
    r = rec([0, 0.02], total=2)
    e = early_record(r)
    assert e.total_packets == 2 and e.offsets == r.offsets
    assert early_cut(r.offsets, 2) == (2, pytest.approx(0.02 + EARLY_IDLE_S))


def test_no_early_record_when_the_window_ends_first():
    step = EARLY_IDLE_S / 2  # never idle, fewer than N packets, the idle time runs past 60 s
    steady = rec([step * i for i in range(int(60 / step))])
    assert early_record(steady, packets=len(steady.offsets) + 1) is None
    assert early_record(rec([0.0, EARLY_IDLE_S * 0.9]), window_s=EARLY_IDLE_S) is None
    lone = early_record(rec([0, 59.0]))  # one packet, then 59 s of silence: early, idle
    assert lone.total_packets == 1 and lone.last == 1000.0


def test_the_table_twin_gives_the_schemas_early_records(sample):
    """early.early_table (vectorised) equals schema.early_record, record by record, on the
    real records of the sample capture."""
    from iotcls.early import early_table
    from iotcls.flows import DeviceSelector, capture_flows
    from iotcls.flowtable import FlowTable

    t = capture_flows(sample.pcap, DeviceSelector.from_lists(sample.macs)).table
    et = early_table(t)
    want = [(i, early_record(r)) for i, r in enumerate(t.records())]
    want = [(i, e) for i, e in want if e is not None]
    assert len(want) > 100
    assert et.source.tolist() == [i for i, _ in want]
    got = et.table.records()
    for (_, w), g in zip(want, got):
        assert g == w
    again = FlowTable.from_records([w for _, w in want], t.packets, t.payload_bytes)
    assert np.array_equal(again.payload, et.table.payload)


def test_time_to_label_on_the_sample(sample, tmp_path):
    """The shipped model on the sample: with early records every device has a label within
    seconds of its first packet, without them only after its first window (60 s)."""
    from iotcls.bundle import ModelBundle
    from iotcls.capture import CaptureSpec
    from iotcls.dataset import capture_matrices
    from iotcls.early import capture_device_labels, time_to_label, time_to_label_png
    from iotcls.predict import Predictor

    b = ModelBundle.load()
    p = Predictor(b)
    cm = capture_matrices(CaptureSpec(sample.pcap, "sample", dict(sample.devices)), b.layout)
    early = time_to_label(capture_device_labels(p, cm, early=True))
    late = time_to_label(capture_device_labels(p, cm, early=False))
    assert early["devices"] == late["devices"] == len(sample.devices)
    assert early["first_label_s"]["max"] <= 5.0 and late["first_label_s"]["median"] == 60.0
    at = {row["seconds"]: row for row in early["table"]}
    assert at[5]["labelled"] == 1.0 and at[5]["accuracy"] >= 0.75
    assert {row["seconds"]: row["labelled"] for row in late["table"]}[30] == 0.0
    assert (
        at["final"] == {row["seconds"]: row for row in late["table"]}["final"]
        or at["final"]["accuracy"] >= 0.875
    )
    png = time_to_label_png(early, late, tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_cuts_flows_as_early_records_are_cut(sample):
    """train.cut_packets on a real record's row gives the row of its early record cut at the
    same packet count (schema.early_record), totals included."""
    import torch

    from iotcls.flows import DeviceSelector, capture_flows
    from iotcls.flowtable import FlowTable
    from iotcls.layout import MatrixLayout
    from iotcls.train import cut_packets

    layout = MatrixLayout()
    t = capture_flows(sample.pcap, DeviceSelector.from_lists(sample.macs)).table
    recs = [r for r in t.records() if r.total_packets >= layout.packets]
    full = FlowTable.from_records(recs, t.packets, t.payload_bytes)
    x = torch.from_numpy(layout.encode_rows(full))[:, None, :]
    torch.manual_seed(0)
    cut = cut_packets(x, 1.0, layout, torch.Generator().manual_seed(3))[:, 0].numpy()
    g = layout.group_slices()
    ks = (cut[:, g["directions"]] != 0).sum(axis=1)
    assert len(set(ks.tolist())) > 3  # random cut points
    want = []
    for r, k in zip(recs, ks.tolist()):
        e = early_record(r, packets=k, idle_s=1e9)  # cut after k packets
        want.append(e)
    rows = layout.encode_rows(FlowTable.from_records(want, t.packets, t.payload_bytes))
    np.testing.assert_allclose(cut, rows, atol=1e-5)


def test_device_label_weighs_labels_by_confidence():
    from iotcls.early import DeviceLabels, device_label

    d = DeviceLabels(
        "A",
        0.0,
        np.array([0.5, 1.0, 2.0]),
        np.array(["B", "B", "A"], object),
        np.zeros(3, bool),
        np.array([0.2, 0.25, 0.9]),
    )
    assert device_label(d, np.arange(3))[0] == "A"  # 0.9 outweighs 0.2 + 0.25
    assert device_label(d, np.arange(2)) == ("B", False, 0.225)
    d.trusted[:] = [True, True, False]  # trusted labels first, whatever their confidence
    assert device_label(d, np.arange(3))[:2] == ("B", True)
