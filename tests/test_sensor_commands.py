"""``iotcls extract`` and ``iotcls inspect`` end to end, and the sample capture the tests merge
from ../shared (tests/conftest.py)."""

import json

import numpy as np

from iotcls import pcapgen as g
from iotcls.cli import main
from iotcls.dataset import Dataset

DEV = "aa:bb:cc:00:00:01"
GW = "02:00:00:00:00:fe"


def write_set(tmp_path):
    (tmp_path / "caps").mkdir()
    p = g.write_pcap(
        tmp_path / "caps" / "one.pcap",
        [
            (1000.0, g.ether(DEV, GW, g.ipv4("10.0.0.1", "1.1.1.1", 17, g.udp(5000, 53, b"q")))),
            (1000.5, g.ether(GW, DEV, g.ipv4("1.1.1.1", "10.0.0.1", 17, g.udp(53, 5000, b"ans")))),
            (1001.0, g.ether(DEV, GW, g.ipv4("10.0.0.1", "2.2.2.2", 6, g.tcp(6000, 443, b"\x16")))),
        ],
    )
    m = tmp_path / "m.csv"
    m.write_text(f"pcap,mac,label\ncaps/one.pcap,{DEV},camera\n")
    return p, m


def test_extract_manifest(tmp_path, capsys):
    _, m = write_set(tmp_path)
    out = tmp_path / "d.npz"
    assert main(["extract", str(m), "-o", str(out), "-q", "--layout", "paper"]) == 0
    text = capsys.readouterr().out
    assert "files:    1 (0 unreadable)" in text and "records:  2" in text
    assert "camera" in text and "warnings: 0" in text
    ds = Dataset.load(out)
    assert ds.labels.tolist() == ["camera", "camera"] and ds.layout.payload_mode == "stream"
    assert ds.matrices.shape == (2, 6, ds.layout.width)


def test_extract_unreadable_file_is_an_error_but_the_rest_is_kept(tmp_path, capsys):
    p, _ = write_set(tmp_path)
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"\x00" * 40)
    out = tmp_path / "d.npz"
    rc = main(["extract", str(bad), str(p), "--devices", DEV, "-o", str(out), "-q"])
    cap = capsys.readouterr()
    assert rc == 1 and f"iotcls extract: error: {bad}: not a pcap or pcapng file" in cap.err
    assert "files:    2 (1 unreadable)" in cap.out
    assert len(Dataset.load(out)) == 2


def test_extract_layout_file_and_errors(tmp_path, capsys):
    p, _ = write_set(tmp_path)
    lay = tmp_path / "l.yaml"
    lay.write_text("history: 2\npackets: 4\npayload_mode: none\n")
    out = tmp_path / "d.npz"
    assert (
        main(
            [
                "extract",
                str(p),
                "--local-nets",
                "10.0.0.0/8",
                "--layout",
                str(lay),
                "-o",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    assert Dataset.load(out).matrices.shape[1:] == (3, 13 + 12)
    lay.write_text("history: [\n")
    assert (
        main(
            ["extract", str(p), "--local-nets", "10.0.0.0/8", "--layout", str(lay), "-o", str(out)]
        )
        == 2
    )
    assert "--layout" in capsys.readouterr().err
    assert main(["extract", str(p), "-o", str(out)]) == 2
    assert "needs --devices" in capsys.readouterr().err


def test_inspect_table_and_json(tmp_path, capsys):
    p, _ = write_set(tmp_path)
    assert main(["inspect", str(p), "--devices", DEV]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if DEV in ln]
    assert len(lines) == 2
    assert "10.0.0.1:5000" in lines[0] and "1.1.1.1:53" in lines[0] and " udp " in lines[0]
    assert "+0↑29 +500↓31" in lines[0] and lines[0].rstrip().endswith("71")
    assert main(["inspect", str(p), "--devices", DEV, "--json", "--limit", "1"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    r = json.loads(line)
    assert (r["device_ip"], r["remote_port"], r["sizes"], r["directions"]) == (
        "10.0.0.1",
        53,
        [29, 31],
        [1, 0],
    )
    assert r["payloads"] == ["71", "616e73"] and r["uid"].startswith("C")


def test_inspect_missing_file(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none.pcap"), "--devices", DEV]) == 1
    assert "cannot open" in capsys.readouterr().err


def test_sample_is_small_and_complete(sample):
    assert sample.pcap.stat().st_size < 1_000_000
    assert len(sample.devices) == 8
    from iotcls.flows import DeviceSelector, capture_flows

    cf = capture_flows(sample.pcap, DeviceSelector.from_lists(sample.macs))
    assert cf.stats.warnings == [] and cf.error == ""
    assert set(np.unique(cf.table.device_mac)) == set(sample.macs)


def test_sample_is_written_identically(sample, tmp_path):
    from iotcls.testing.shared import write_sample

    again = write_sample(tmp_path)
    assert again.pcap.read_bytes() == sample.pcap.read_bytes()
    assert again.devices == sample.devices
