"""Datasets: building from capture sets (exact values), row order, save/load and its errors."""

import dataclasses
import zipfile

import numpy as np
import pytest

from iotcls import pcapgen as g
from iotcls.capture import CaptureSpec, sentinel_specs
from iotcls.dataset import (
    Dataset,
    DatasetError,
    _dataset_part,
    build_dataset,
    capture_matrices,
    sensor_options,
)
from iotcls.layout import MatrixLayout
from iotcls.testing.shared import require, sentinel_dir

DATA = sentinel_dir()  # ../shared, or $IOTCLS_SHARED
CAM = "aa:bb:cc:00:00:01"
PLUG = "aa:bb:cc:00:00:02"
GW = "02:00:00:00:00:fe"
T0 = 1_700_000_000.0
LAYOUT = MatrixLayout(history=2, packets=3, payload_bytes=4)


def pkt(t, mac, ip, dport, payload=b"", up=True):
    l4 = g.udp(5000, dport, payload) if up else g.udp(dport, 5000, payload)
    ipl = g.ipv4(ip, "8.8.8.8", 17, l4) if up else g.ipv4("8.8.8.8", ip, 17, l4)
    return (t, g.ether(mac, GW, ipl) if up else g.ether(GW, mac, ipl))


@pytest.fixture
def captures(tmp_path):
    a = g.write_pcap(
        tmp_path / "a.pcap",
        [
            pkt(T0 + 0.0, CAM, "10.0.0.1", 53, b"q1"),
            pkt(T0 + 0.5, PLUG, "10.0.0.2", 53, b"p"),
            pkt(T0 + 1.0, CAM, "10.0.0.1", 53, b"a1", up=False),
            pkt(T0 + 2.0, CAM, "10.0.0.1", 123, b"ntp"),
            pkt(T0 + 2.5, CAM, "10.0.0.1", 53, b"q2"),
            pkt(T0 + 3.0, CAM, "10.0.0.1", 53, b"q3"),
            pkt(T0 + 4.0, CAM, "10.0.0.1", 443, b""),
        ],
    )
    b = g.write_pcap(tmp_path / "b.pcap", [pkt(T0 + 9.0, PLUG, "10.0.0.2", 80, b"x")])
    return [
        CaptureSpec(a, "a", {CAM: "camera", PLUG: ""}),
        CaptureSpec(b, "b", {PLUG: "plug"}),
    ]


def test_build_exact(captures):
    ds = build_dataset(captures, LAYOUT, progress=False)
    assert len(ds) == 4 and ds.matrices.shape == (4, 3, LAYOUT.width)
    assert ds.labels.tolist() == ["camera", "camera", "camera", "plug"]
    assert ds.devices.tolist() == [CAM, CAM, CAM, PLUG]
    assert ds.captures.tolist() == ["a", "a", "a", "b"]
    # capture a, camera: keys by first packet: :53 at 0.0, :123 at 2.0, :443 at 4.0
    assert ds.timestamps.tolist() == [T0, T0 + 2.0, T0 + 4.0, T0 + 9.0]
    assert ds.last.tolist() == [T0 + 3.0, T0 + 2.0, T0 + 4.0, T0 + 9.0]
    assert ds.total_packets.tolist() == [4, 1, 1, 1]
    assert ds.total_bytes.tolist() == [30 + 30 + 30 + 30, 31, 28, 29]
    assert ds.inspected_packets.tolist() == [3, 1, 1, 1]
    assert ds.inspected_bytes.tolist() == [90, 31, 28, 29]
    assert ds.device_first_seen.tolist() == [T0, T0, T0, T0 + 9.0]
    assert ds.capture_packets.tolist() == [7, 7, 7, 1]
    assert ds.capture_bytes.tolist() == [208, 208, 208, 29]  # 4 x 30 + 29 + 31 + 28
    assert len(set(ds.uids.tolist())) == 4 and all(u.startswith("C") for u in ds.uids)
    # the matrix: row 0 the flow itself, row 1 the device's previous flow
    names = LAYOUT.column_names()
    m = ds.matrices[1]
    assert m[0, names.index("rport")] == pytest.approx(123 / 65535)
    assert m[1, names.index("rport")] == pytest.approx(53 / 65535)
    assert m[0, names.index("d00")] == 1 and m[0, names.index("d01")] == 0
    assert not ds.matrices[0, 1:].any()  # first flow: no history
    assert ds.captures_table.ids.tolist() == ["a", "b"]
    assert ds.captures_table.records.tolist() == [3, 1]
    assert ds.captures_table.packets.tolist() == [7, 1]
    assert ds.label_counts() == {"camera": 3, "plug": 1} and ds.classes == ["camera", "plug"]


def test_capture_matrices_for_logging(captures):
    cm = capture_matrices(captures[0], LAYOUT)
    assert len(cm.table) == 3 and cm.matrices.shape == (3, 3, LAYOUT.width)
    assert sorted(cm.order.tolist()) == [0, 1, 2]
    assert cm.labels.tolist() == ["camera"] * 3
    conn = [cm.table.record(i).conn_id() for i in cm.order]
    assert conn[0] == ("10.0.0.1", 5000, "8.8.8.8", 53)


def test_unlabelled_spec_keeps_every_selected_device(captures):
    spec = CaptureSpec(captures[0].pcap, "a", {CAM: "", PLUG: ""})
    ds = build_dataset([spec], LAYOUT, progress=False)
    assert ds.labels.tolist() == [""] * 4 and ds.devices.tolist() == [CAM] * 3 + [PLUG]
    spec = CaptureSpec(captures[0].pcap, "a", {}, ("10.0.0.0/24",))
    ds = build_dataset([spec], LAYOUT, progress=False)
    assert ds.devices.tolist() == [CAM] * 3 + [PLUG]


def test_bad_file_does_not_stop_the_build(tmp_path, captures):
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"garbage garbage garbage garbage")
    specs = [CaptureSpec(bad, "bad", {CAM: "camera"})] + captures
    seen = []
    ds = build_dataset(specs, LAYOUT, progress=False, on_capture=lambda cm: seen.append(cm))
    assert len(ds) == 4 and seen[0].flows.error.startswith(f"{bad}: not a pcap")
    assert ds.captures_table.errors.tolist()[0].startswith(f"{bad}: not a pcap")


def test_save_load_roundtrip(tmp_path, captures):
    ds = build_dataset(captures, LAYOUT, progress=False)
    path = tmp_path / "sub" / "d.npz"
    ds.save(path)
    back = Dataset.load(path)
    assert back.layout == LAYOUT
    for f in dataclasses.fields(Dataset):
        if f.name in ("layout", "captures_table"):
            continue
        assert np.array_equal(getattr(back, f.name), getattr(ds, f.name)), f.name
    assert back.captures_table.ids.tolist() == ["a", "b"]
    with zipfile.ZipFile(path) as z:  # plain arrays only: loadable with allow_pickle=False
        assert "layout.npy" in z.namelist()
    ds.save(tmp_path / "c.npz", compress=True)
    assert np.array_equal(Dataset.load(tmp_path / "c.npz").matrices, ds.matrices)


def test_load_errors(tmp_path, captures):
    with pytest.raises(DatasetError, match="dataset file not found"):
        Dataset.load(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="not a dataset file"):
        Dataset.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DatasetError, match="not an iotcls dataset file"):
        Dataset.load(tmp_path / "other.npz")
    ds = build_dataset(captures, LAYOUT, progress=False)
    ds.save(tmp_path / "d.npz")
    with np.load(tmp_path / "d.npz") as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(tmp_path / "v.npz", **{**arrays, "version": np.array(99)})
    with pytest.raises(DatasetError, match="dataset version 99 is not supported"):
        Dataset.load(tmp_path / "v.npz")
    lay = arrays["layout"].item().replace("version: 2", "version: 7")
    np.savez(tmp_path / "l.npz", **{**arrays, "layout": np.array(lay)})
    with pytest.raises(DatasetError, match="layout: version 7 is not supported"):
        Dataset.load(tmp_path / "l.npz")
    np.savez(tmp_path / "s.npz", **{**arrays, "matrices": arrays["matrices"][:, :2]})
    with pytest.raises(DatasetError, match="do not match the layout"):
        Dataset.load(tmp_path / "s.npz")


def test_sensor_options_follow_the_layout():
    lay, w, p, pb = sensor_options(MatrixLayout.preset("paper"), None, None, None)
    assert (w, p, pb) == (60.0, 10, 998) and lay == MatrixLayout.preset("paper")
    lay, w, p, pb = sensor_options(MatrixLayout(payload_bytes=16), 30, 5, 4)
    assert (lay.window_s, lay.packets, w, p, pb) == (30.0, 5, 30.0, 5, 16)


def test_real_captures_every_flow_of_the_mac_gets_its_label():
    require(DATA)
    specs = [
        s
        for d in ("Aria", "HueBridge", "HueSwitch", "EdimaxCam2")
        for s in sentinel_specs(DATA / d)
    ][::3]
    ds = build_dataset(specs, MatrixLayout(), progress=False)
    label_of = {s.capture_id: next(iter(s.labels.values())) for s in specs}
    mac_of = {s.capture_id: next(iter(s.labels)) for s in specs}
    assert len(ds) > 500
    assert ds.labels.tolist() == [label_of[c] for c in ds.captures.tolist()]
    assert ds.devices.tolist() == [mac_of[c] for c in ds.captures.tolist()]
    assert set(ds.labels.tolist()) == {"Aria", "HueBridge", "HueSwitch", "EdimaxCam"}
    # rows: by capture, then by device and start within a capture
    caps = ds.captures.tolist()
    firsts = [caps.index(c) for c in dict.fromkeys(caps)]
    assert firsts == sorted(firsts) and len(set(caps)) == len(specs)
    for c in set(caps):
        t = ds.timestamps[ds.captures == c]
        assert (np.diff(t) >= 0).all()
    assert (ds.device_first_seen <= ds.timestamps).all()
    assert (ds.inspected_packets == np.minimum(ds.total_packets, 10)).all()


def test_grouped_small_captures_equal_one_by_one(tmp_path):
    """build_dataset runs small captures through one builder pass; rows must not change."""
    require(DATA)
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"not a capture at all, not at all")
    specs = sentinel_specs(DATA)[::12]
    specs.insert(3, CaptureSpec(bad, "bad", {"aa:bb:cc:dd:ee:ff": "x"}))
    grouped = build_dataset(specs, LAYOUT, progress=False)
    single = Dataset.concat(
        [_dataset_part(capture_matrices(s, LAYOUT), LAYOUT) for s in specs], LAYOUT
    )
    assert len(grouped) == len(single) > 300
    for f in dataclasses.fields(Dataset):
        if f.name in ("layout", "captures_table"):
            continue
        a, b = getattr(grouped, f.name), getattr(single, f.name)
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), f.name
    for f in dataclasses.fields(grouped.captures_table):
        a, b = getattr(grouped.captures_table, f.name), getattr(single.captures_table, f.name)
        assert np.array_equal(a, b), f.name
    assert grouped.captures_table.errors[3].startswith(f"{bad}: not a pcap")
    # unlabelled, selected by local networks: mirrored device-to-device records too
    nets = [
        CaptureSpec(s.pcap, s.capture_id, {}, ("10.0.0.0/8", "192.168.0.0/16")) for s in specs[:12]
    ]
    a = build_dataset(nets, LAYOUT, progress=False)
    b = Dataset.concat([_dataset_part(capture_matrices(s, LAYOUT), LAYOUT) for s in nets], LAYOUT)
    assert np.array_equal(a.matrices, b.matrices) and a.uids.tolist() == b.uids.tolist()
    assert a.devices.tolist() == b.devices.tolist()
