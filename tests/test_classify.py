"""``iotcls classify`` with the shipped default model on the sample capture (IoT Sentinel
setups merged at run time, tests/conftest.py)."""

import json

import pytest

from iotcls.bundle import ModelBundle
from iotcls.cli import main
from iotcls.logschema import FIELD_NAMES, FIELDS


def summary_rows(text: str) -> dict[str, list[str]]:
    lines = text.strip().splitlines()
    assert lines[0].split() == ["device", "ip", "label", "confidence", "trusted", "labels"]
    return {ln.split()[0]: ln.split() for ln in lines[1:]}


@pytest.fixture(scope="module")
def zeek_run(tmp_path_factory, sample):
    out = tmp_path_factory.mktemp("zeek")
    return out, main(
        ["classify", str(sample.pcap), "--devices", sample.devices_arg, "-o", str(out)]
    )


def test_zeek_log(zeek_run, sample):
    truth = sample.devices
    out, rc = zeek_run
    assert rc == 0
    lines = (out / "iot_class.log").read_text().splitlines()
    assert lines[0] == "#separator \\x09"
    assert lines[1:5] == [
        "#set_separator\t,",
        "#empty_field\t(empty)",
        "#unset_field\t-",
        "#path\tiot_class",
    ]
    assert lines[5].startswith("#open\t")
    assert lines[6] == "#fields\t" + "\t".join(FIELD_NAMES)
    assert lines[7] == "#types\t" + "\t".join(t for _, t in FIELDS)
    assert lines[-1].startswith("#close\t")
    body = [ln.split("\t") for ln in lines[8:-1]]
    assert len(body) > 100 and all(len(r) == len(FIELDS) for r in body)
    col = {name: i for i, name in enumerate(FIELD_NAMES)}
    model = ModelBundle.load().name
    ts = [float(r[col["ts"]]) for r in body]
    assert ts == sorted(ts)
    for r in body:
        assert r[col["device_mac"]] in truth
        assert r[col["strategy"]] == "sequence" and r[col["model"]] == model
        assert 0 < float(r[col["confidence"]]) <= 1 and r[col["trusted"]] in ("T", "F")
        assert 1 <= int(r[col["n_flows"]]) <= 6
        assert r[col["proto"]] in ("tcp", "udp", "icmp", "unknown_transport")
        assert r[col["uid"]].startswith("C")
    # most labels are right: these are IoT Sentinel setups the model was trained on or tested on
    right = sum(r[col["label"]] == truth[r[col["device_mac"]]] for r in body)
    assert right / len(body) >= 0.8


def test_summary_table(zeek_run, capsys, sample):
    truth = sample.devices
    main(["classify", str(sample.pcap), "--devices", sample.devices_arg, "-o", str(zeek_run[0])])
    rows = summary_rows(capsys.readouterr().out)
    assert set(rows) == set(truth)
    right = [mac for mac, r in rows.items() if r[2] == truth[mac]]
    assert len(right) >= 7, rows
    for r in rows.values():
        assert 0 < float(r[3]) <= 1 and r[4] in ("yes", "no") and int(r[5]) >= 1
        assert r[1].startswith("10.10.10.")  # the address last seen, not DHCP's 0.0.0.0


def test_the_summary_is_the_same_whatever_the_strategy(tmp_path, capsys, sample):
    """The device table votes over sequence labels as the sequence strategy gives them (DHCP
    refinement and trust rules included), whichever strategy writes the log: ``--strategy
    flow`` used to vote over the model's plain labels (a device the rules leave untrusted came
    out trusted)."""
    tables = {}
    for strategy in ("sequence", "flow", "device"):
        args = ["classify", str(sample.pcap), "--devices", sample.devices_arg]
        assert main(args + ["-o", str(tmp_path / strategy), "--strategy", strategy]) == 0
        tables[strategy] = summary_rows(capsys.readouterr().out.split("\n\n")[-1])
    assert tables["flow"] == tables["sequence"] == tables["device"]
    assert len(tables["sequence"]) == len(sample.devices)


def test_json_log_and_device_strategy(tmp_path, sample):
    assert (
        main(
            [
                "classify",
                str(sample.pcap),
                "--devices",
                sample.devices_arg,
                "-o",
                str(tmp_path),
                "--format",
                "json",
                "--strategy",
                "device",
            ]
        )
        == 0
    )
    entries = [json.loads(ln) for ln in (tmp_path / "iot_class.log").read_text().splitlines()]
    assert entries and all(list(e) == list(FIELD_NAMES) for e in entries)
    assert {e["strategy"] for e in entries} == {"device"}
    assert min(e["n_flows"] for e in entries) == 3  # the vote waits for three sequences
    assert all(
        isinstance(e["top_groups"], list) and isinstance(e["trusted"], bool) for e in entries
    )


def test_errors_are_one_line(tmp_path, capsys, sample):
    pcap, devices = sample.pcap, sample.devices_arg
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    assert (
        main(
            ["classify", str(pcap), "--devices", devices, "--model", str(bad), "-o", str(tmp_path)]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.pt: not a readable model file (not a torch archive)" in err[0]
    assert main(["classify", str(pcap), "-o", str(tmp_path)]) == 2
    assert "--devices" in capsys.readouterr().err
    missing = tmp_path / "missing.pcap"
    assert main(["classify", str(missing), "--devices", devices, "-o", str(tmp_path)]) == 1
    assert "missing.pcap" in capsys.readouterr().err
    assert (tmp_path / "iot_class.log").read_text().splitlines()[-1].startswith("#close")
