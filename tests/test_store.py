"""The flow store (iotcls.store) and the device list the operator edits (iotcls inventory)."""

from __future__ import annotations

import asyncio
import csv
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest

from iotcls.device_inventory import labels_of
from iotcls.flowtable import FlowTable
from iotcls.layout import MatrixLayout
from iotcls.schema import PROTO_UDP, FlowRecord
from iotcls.store import Labels, Recorder, read_stores, segment_paths, sessions, store_dataset
from iotcls.testing.synth import synthetic_records


class _Outcome:  # what the dispatcher's Outcome carries for a label
    def __init__(self, label, trusted, model="m@1"):
        self.label, self.confidence, self.trusted = label, 0.75, trusted
        self.reason, self.model, self.send = "-", model, True


def dhcp_discover(host: bytes, vendor: bytes) -> bytes:
    """A DHCPv4 discover (BOOTP header, magic cookie, options 53, 12, 60, 55)."""
    head = bytes([1, 1, 6, 0]) + bytes(24) + bytes.fromhex("b0c554aabbcc") + bytes(202)
    opts = bytes([53, 1, 1, 12, len(host)]) + host + bytes([60, len(vendor)]) + vendor
    return head + b"\x63\x82\x53\x63" + opts + bytes([55, 6, 1, 3, 6, 12, 15, 28, 255])


def dns_query(name: str, flags: bytes = b"\x01\x00") -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00\x00\x01\x00\x01"
    return b"\x12\x34" + flags + b"\x00\x01\x00\x00\x00\x00\x00\x00" + q


def special_records() -> list[FlowRecord]:
    """A DHCP discover, two DNS queries and an mDNS announcement of device 0
    (synthetic_records' first MAC)."""
    mac, ip = "02:00:00:00:00:00", "192.168.0.0"
    base = dict(
        device_mac=mac,
        device_ip=ip,
        proto=PROTO_UDP,
        total_packets=1,
        offsets=[0.0],
        sizes=[328],
        directions=[1],
        device_is_orig=True,
    )
    return [
        FlowRecord(
            **base,
            device_port=68,
            remote_ip="255.255.255.255",
            remote_port=67,
            start=1_699_999_990.0,
            last=1_699_999_990.0,
            total_bytes=328,
            payloads=[dhcp_discover(b"HS110(EU)", b"udhcp 0.9.9-pre")],
            uid="Cdhcp",
        ),
        *[
            FlowRecord(
                **base,
                device_port=40000 + k,
                remote_ip="192.168.0.254",
                remote_port=53,
                start=1_699_999_991.0 + k,
                last=1_699_999_991.0 + k,
                total_bytes=60,
                payloads=[dns_query("devs.tplinkcloud.com")],
                uid=f"Cdns{k}",
            )
            for k in range(2)
        ],
        FlowRecord(
            **base,
            device_port=5353,
            remote_ip="224.0.0.251",
            remote_port=5353,
            start=1_699_999_995.0,
            last=1_699_999_995.0,
            total_bytes=80,
            payloads=[dns_query("Smart Plug 1A2B._hs110._tcp.local", flags=b"\x84\x00")],
            uid="Cmdns",
        ),
    ]


def record(tmp_path, records, per_segment=100, max_mb=64, labels=None):
    """Records written through a Recorder, a batch of 50 at a time, as serve does."""

    async def main():
        r = Recorder.from_config(_Cfg(tmp_path, per_segment, max_mb), 60.0)
        for i in range(0, len(records), 50):
            batch = records[i : i + 50]
            t = FlowTable.from_records(batch, 10, 64)
            outs = [_Outcome(*(labels or (lambda rec: ("cam", True)))(rec)) for rec in batch]
            r.add(t, Labels.of(outs, "zeek"))
        await r.close()
        return r

    return asyncio.run(main())


class _Cfg:
    def __init__(self, d, per_segment, max_mb):
        self.directory, self.max_mb, self.retention_days = str(d), max_mb, 30.0
        self.segment_records, self.segment_s = per_segment, 300.0


def test_segments_hold_every_record_and_its_label(tmp_path):
    recs = synthetic_records(300, devices=7, seed=1)
    r = record(tmp_path, recs, per_segment=100, labels=lambda rec: ("plug", rec.uid.endswith("0")))
    assert r.stats.records == 300 and r.stats.segments == 3 and r.stats.errors == 0
    assert len(segment_paths(tmp_path)) == 3 and not list(tmp_path.glob(".*.tmp"))
    data = read_stores([tmp_path])
    want = FlowTable.from_records(recs, 10, 64)
    for f in fields(FlowTable):
        assert np.array_equal(getattr(data.table, f.name), getattr(want, f.name)), f.name
    assert data.labels.label.tolist() == ["plug"] * 300
    assert data.labels.trusted.tolist() == [rec.uid.endswith("0") for rec in recs]
    assert set(data.labels.model) == {"m@1"} and set(data.labels.sensor) == {"zeek"}


@pytest.mark.e2e
def test_a_damaged_segment_is_skipped_and_named_the_rest_is_read(tmp_path):
    record(tmp_path, synthetic_records(300, devices=7, seed=1), per_segment=100)
    segs = segment_paths(tmp_path)
    segs[1].write_bytes(segs[1].read_bytes()[:500])  # torn by a bad disk
    (tmp_path / "seg-99999999T999999-1-000001.npz").write_bytes(b"not a zip at all")
    warnings: list[str] = []
    data = read_stores([tmp_path], warn=warnings.append)
    assert len(data) == 200 and len(data.segments) == 2
    assert (
        len(warnings) == 2
        and str(segs[1]) in warnings[0]
        and "not a readable segment" in warnings[0]
    )
    assert "seg-99999999T999999-1-000001.npz" in warnings[1]
    # the command line says the same in one line per file, and goes on
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "iotcls",
            "inventory",
            str(tmp_path),
            "-o",
            str(tmp_path / "devices.csv"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("iotcls: warning: skipped") == 2 and str(segs[1]) in out.stderr
    assert "from 200 records in 2 segments, 2 skipped" in out.stdout


def test_the_size_cap_deletes_the_oldest_segments(tmp_path):
    record(tmp_path, synthetic_records(4000, devices=7, seed=1), per_segment=200, max_mb=1)
    segs = segment_paths(tmp_path)
    total = sum(p.stat().st_size for p in segs)
    assert 2 <= len(segs) < 20 and total <= (1 << 20) + max(p.stat().st_size for p in segs)
    data = read_stores([tmp_path])
    assert data.table.uid[-1] == "C00000000000003999"  # the newest records are the ones kept
    assert data.table.uid[0] != "C00000000000000000"


@pytest.mark.e2e
def test_inventory_round_trip_keeps_what_the_operator_wrote(tmp_path):
    store = tmp_path / "store"
    recs = special_records() + synthetic_records(120, devices=3, seed=2)
    record(
        store,
        recs,
        labels=lambda rec: (
            ("TP-LinkPlugHS110", True) if rec.device_mac.endswith(":00") else ("WeMoSwitch", False)
        ),
    )
    out = tmp_path / "devices.csv"
    cmd = [sys.executable, "-m", "iotcls", "inventory", str(store), "-o", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "3 devices (3 new), 0 labelled by you" in first.stdout
    rows = {r["device"]: r for r in csv.DictReader(out.open())}
    d0 = rows["02:00:00:00:00:00"]
    assert d0["dhcp_host"] == "HS110(EU)" and d0["dhcp_vendor"] == "udhcp 0.9.9-pre"
    assert d0["dns_names"] == "devs.tplinkcloud.com" and d0["label"] == ""
    assert d0["current_label"] == "TP-LinkPlugHS110" and d0["trusted"] == "T"
    assert d0["mdns_names"] == "smart plug 1a2b._hs110._tcp.local"
    assert d0["addresses"] == "192.168.0.0" and d0["records"] == str(4 + 40)
    assert d0["first_seen"] == "2023-11-14T22:13:10Z"
    # the shipped model learnt this identity from the TP-Link HS110: a suggestion
    assert d0["suggested"] == "TP-LinkPlugHS110" and "DHCP identity" in d0["suggested_by"]
    assert d0["mac_vendor"] == "(locally administered)"
    assert rows["02:00:00:00:00:01"]["trusted_share"] == "0.00"
    # the operator labels two devices and adds a column of their own
    with out.open() as f:
        reader = csv.DictReader(f)
        cols, edited = [*reader.fieldnames, "room"], list(reader)
    for r in edited:
        r["room"] = "lab"
        if r["device"] == "02:00:00:00:00:01":
            r["label"] = "Thermostat"
        if r["device"] == "02:00:00:00:00:02":
            r["label"] = "WeMoSwitch"
    edited.append({c: "" for c in cols} | {"device": "aa:bb:cc:00:00:01", "label": "Kettle"})
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(edited)
    # more records arrive; the inventory runs again
    record(store, synthetic_records(30, devices=3, seed=3, start=1_800_000_000.0))
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "4 devices (0 new), 3 labelled by you" in again.stdout
    rows = {r["device"]: r for r in csv.DictReader(out.open())}
    assert rows["02:00:00:00:00:01"]["label"] == "Thermostat"
    assert rows["02:00:00:00:00:02"]["label"] == "WeMoSwitch"
    assert rows["aa:bb:cc:00:00:01"]["label"] == "Kettle"  # gone from the store, kept
    assert {r["room"] for r in rows.values()} == {"lab", ""}
    assert rows["02:00:00:00:00:01"]["records"] == str(40 + 10)  # observations renewed
    assert rows["02:00:00:00:00:01"]["last_seen"].startswith("2027-01-15")
    assert labels_of(out) == {
        "02:00:00:00:00:01": "Thermostat",
        "02:00:00:00:00:02": "WeMoSwitch",
        "aa:bb:cc:00:00:01": "Kettle",
    }


@pytest.mark.e2e
def test_inventory_refuses_a_file_that_is_not_a_device_list(tmp_path):
    record(tmp_path / "s", synthetic_records(10, devices=2, seed=1))
    (tmp_path / "x.csv").write_text("pcap,mac,label\na.pcap,aa:bb:cc:dd:ee:ff,x\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "iotcls",
            "inventory",
            str(tmp_path / "s"),
            "-o",
            str(tmp_path / "x.csv"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"iotcls inventory: error: {tmp_path / 'x.csv'}: no 'device' "
        "column: not an iotcls device list"
    )


def test_sessions_split_on_silence_and_length():
    dev = np.array(["a"] * 5 + ["b"] * 2, object)
    t = np.array([0.0, 100.0, 800.0, 900.0, 4500.0, 0.0, 10.0]) + 1_700_000_000.0
    s = sessions(dev, t)
    assert len(set(s[:2])) == 1 and s[1] != s[2] and s[2] == s[3] and s[3] != s[4]
    assert s[5] == s[6] and s[5].startswith("store:b@2023")


def test_store_dataset_labels_devices_by_the_operators_list(tmp_path):
    recs = synthetic_records(200, devices=4, seed=5)
    record(tmp_path, recs)
    lay = MatrixLayout(history=2, packets=10, payload_bytes=16)
    ds, served = store_dataset(read_stores([tmp_path]), lay, {"02:00:00:00:00:01": "plug"})
    assert len(ds) == 200 and ds.matrices.shape == (200, 3, lay.width)
    assert (ds.labels == "plug").sum() == 50 and set(
        ds.labels[ds.devices != "02:00:00:00:00:01"]
    ) == {""}
    assert served.label.tolist() == ["cam"] * 200
    # a device's history is its own previous records, as classify assembles it
    t = FlowTable.from_records(recs, 10, 64)
    mats, _ = lay.matrices(t)
    assert np.array_equal(
        np.sort(ds.matrices.reshape(200, -1), 0), np.sort(mats.reshape(200, -1), 0)
    )
    with pytest.raises(ValueError, match="the layout needs 20 of 64"):
        store_dataset(read_stores([tmp_path]), MatrixLayout(packets=20), {})


def test_store_dataset_samples_whole_sessions_of_unlabelled_devices(tmp_path):
    recs = synthetic_records(400, devices=4, seed=6)
    for k, r in enumerate(recs):  # device 3's records in 10 sessions an hour apart
        if r.device_mac.endswith(":03"):
            r.start = r.last = 1_700_000_000.0 + (k // 40) * 3600.0 + k
    record(tmp_path, recs)
    lay = MatrixLayout(history=2, packets=10, payload_bytes=16)
    ds, served = store_dataset(
        read_stores([tmp_path]), lay, {"02:00:00:00:00:00": "cam"}, max_unlabelled=150
    )
    assert (ds.labels == "cam").sum() == 100  # every record of the labelled device
    other = ds.captures[ds.labels == ""]
    assert 150 <= len(other) < 250 and len(served) == len(ds)
    whole = {c: n for c, n in zip(*np.unique(ds.captures, return_counts=True))}
    full = {
        c: n
        for c, n in zip(
            *np.unique(
                sessions(
                    np.array([r.device_mac for r in recs], object),
                    np.array([r.start for r in recs]),
                ),
                return_counts=True,
            )
        )
    }
    assert all(whole[c] == full[c] for c in whole)  # sessions are taken whole


def test_an_unwritable_store_directory_is_one_line_at_start(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"^record.directory .*file/store: cannot write there: "):
        Recorder.from_config(_Cfg(tmp_path / "file" / "store", 100, 1), 60.0)
    (tmp_path / "ok" / ".seg-x.npz.tmp").parent.mkdir()
    (tmp_path / "ok" / ".seg-x.npz.tmp").write_bytes(b"half a segment")  # a crash left it
    Recorder.from_config(_Cfg(tmp_path / "ok", 100, 1), 60.0)
    assert list((tmp_path / "ok").iterdir()) == []
