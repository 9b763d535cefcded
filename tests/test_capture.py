"""Capture sets: IoT Sentinel layout, manifests, unlabelled pcaps, and their errors."""

import argparse
from pathlib import Path

import pytest

from iotcls.capture import add_capture_arguments, sentinel_specs, specs_from_args
from iotcls.cli import CliError
from iotcls.testing.shared import require, sentinel_dir

DATA = sentinel_dir()  # ../shared, or $IOTCLS_SHARED


def parse(*argv):
    p = argparse.ArgumentParser()
    add_capture_arguments(p)
    return p.parse_args(list(argv))


def specs(*argv):
    return specs_from_args(parse(*argv))


def data():
    require(DATA)
    return DATA


def test_shared_options():
    a = parse(
        "x.pcap",
        "--devices",
        "aa:bb:cc:dd:ee:ff",
        "--local-nets",
        "10.0.0.0/8",
        "--labels",
        "dir",
        "--window",
        "30",
        "--packets",
        "5",
        "--payload-bytes",
        "8",
    )
    assert (a.captures, a.devices, a.local_nets, a.labels) == (
        ["x.pcap"],
        "aa:bb:cc:dd:ee:ff",
        "10.0.0.0/8",
        "dir",
    )
    assert (a.window, a.packets, a.payload_bytes) == (30.0, 5, 8)


def test_sentinel_types_and_dirs():
    by_type = specs(str(data()))
    assert len(by_type) == 414
    assert len({lab for s in by_type for lab in s.labels.values()}) == 27
    by_dir = specs(str(data()), "--labels", "dir")
    assert len({lab for s in by_dir for lab in s.labels.values()}) == 31
    s = next(s for s in by_type if s.capture_id == "EdimaxCam2/Setup-A-1-STA")
    assert s.labels == {"74:da:38:80:79:fc": "EdimaxCam"} and s.labelled
    assert s.pcap == data() / "EdimaxCam2" / "Setup-A-1-STA.pcap"


def test_label_belongs_to_the_capture_not_the_mac():
    hub = "00:17:88:24:76:ff"
    labels = {
        s.capture_id.split("/")[0]: s.labels[hub] for s in specs(str(data())) if hub in s.labels
    }
    assert labels == {"HueBridge": "HueBridge", "HueSwitch": "HueSwitch"}


def test_one_label_directory():
    ss = sentinel_specs(data() / "Aria")
    assert len(ss) > 5 and all(s.labels == {"20:f8:5e:ca:91:52": "Aria"} for s in ss)


def test_sentinel_layout_errors(tmp_path):
    d = tmp_path / "set" / "Cam"
    d.mkdir(parents=True)
    (d / "a.pcap").write_bytes(b"")
    (tmp_path / "set" / "Plug").mkdir()
    (tmp_path / "set" / "Plug" / "_iotdevice-mac.txt").write_text("00:11:22:33:44:55\n")
    (tmp_path / "set" / "Plug" / "b.pcap").write_bytes(b"")
    with pytest.raises(CliError, match=r"Cam: no _iotdevice-mac.txt beside its captures"):
        specs(str(tmp_path / "set"))
    (d / "_iotdevice-mac.txt").write_text("not-a-mac\n")
    with pytest.raises(CliError, match=r"_iotdevice-mac.txt: not a MAC address: 'not-a-mac'"):
        specs(str(tmp_path / "set"))
    (d / "_iotdevice-mac.txt").write_text("AA-BB-CC-DD-EE-01")
    ss = specs(str(tmp_path / "set"))
    assert [(s.capture_id, s.labels) for s in ss] == [
        ("Cam/a", {"aa:bb:cc:dd:ee:01": "Cam"}),
        ("Plug/b", {"00:11:22:33:44:55": "Plug"}),
    ]
    with pytest.raises(CliError, match="needs devices.csv"):
        specs(str(tmp_path / "set"), "--labels", "type")


def test_manifest(tmp_path):
    (tmp_path / "caps").mkdir()
    m = tmp_path / "m.csv"
    m.write_text(
        "pcap,mac,label\ncaps/one.pcap,AA:BB:CC:DD:EE:01,cam\n"
        "caps/one.pcap,aa:bb:cc:dd:ee:02,\n/abs/two.pcap,aa:bb:cc:dd:ee:03,plug\n"
    )
    ss = specs(str(m))
    assert [(s.pcap, s.capture_id, s.labels) for s in ss] == [
        (
            tmp_path / "caps" / "one.pcap",
            "caps/one",
            {"aa:bb:cc:dd:ee:01": "cam", "aa:bb:cc:dd:ee:02": ""},
        ),
        (Path("/abs/two.pcap"), "/abs/two", {"aa:bb:cc:dd:ee:03": "plug"}),
    ]


@pytest.mark.parametrize(
    "text,error",
    [
        ("pcap,mac\na.pcap,aa:bb:cc:dd:ee:01\n", "manifest lacks column(s) label"),
        ("pcap,mac,label\na.pcap,xx,cam\n", "line 2: not a MAC address: 'xx'"),
        ("pcap,mac,label\n,aa:bb:cc:dd:ee:01,cam\n", "line 2: empty pcap"),
        ("pcap,mac,label\n", "manifest has no rows"),
        (
            "pcap,mac,label\na.pcap,aa:bb:cc:dd:ee:01,x\na.pcap,aa:bb:cc:dd:ee:01,y\n",
            "line 3: aa:bb:cc:dd:ee:01 has two labels",
        ),
    ],
)
def test_manifest_errors(tmp_path, text, error):
    m = tmp_path / "m.csv"
    m.write_text(text)
    with pytest.raises(CliError) as e:
        specs(str(m))
    assert str(e.value) == f"{m}: {error}" or error in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_manifest(tmp_path):
    with pytest.raises(CliError, match="manifest not found"):
        specs(str(tmp_path / "nope.csv"))


def test_unlabelled(tmp_path):
    (tmp_path / "a.pcap").write_bytes(b"")
    (tmp_path / "b.pcapng").write_bytes(b"")
    with pytest.raises(CliError, match="an unlabelled capture needs --devices"):
        specs(str(tmp_path / "a.pcap"))
    ss = specs(str(tmp_path), "--devices", "AA:BB:CC:DD:EE:0F,aa:bb:cc:dd:ee:10")
    assert [s.pcap.name for s in ss] == ["a.pcap", "b.pcapng"]
    assert ss[0].labels == {"aa:bb:cc:dd:ee:0f": "", "aa:bb:cc:dd:ee:10": ""}
    assert not ss[0].labelled
    ss = specs(str(tmp_path / "a.pcap"), "--local-nets", "192.168.0.0/16, 10.0.0.0/8")
    assert ss[0].local_nets == ("192.168.0.0/16", "10.0.0.0/8") and ss[0].labels == {}
    assert ss[0].selector().nets == ("192.168.0.0/16", "10.0.0.0/8")
    with pytest.raises(CliError, match=r"--local-nets: not a network \(CIDR\): '10.0.0.0/33'"):
        specs(str(tmp_path / "a.pcap"), "--local-nets", "10.0.0.0/33")
    with pytest.raises(CliError, match="--devices: not a MAC address"):
        specs(str(tmp_path / "a.pcap"), "--devices", "aa:bb")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CliError, match="no captures here"):
        specs(str(tmp_path / "empty"), "--devices", "aa:bb:cc:dd:ee:ff")


def test_duplicate_capture_ids_made_unique(tmp_path):
    (tmp_path / "a.pcap").write_bytes(b"")
    ss = specs(str(tmp_path / "a.pcap"), str(tmp_path / "a.pcap"), "--devices", "aa:bb:cc:dd:ee:ff")
    assert [s.capture_id for s in ss] == [str(tmp_path / "a"), str(tmp_path / "a") + "#1"]
