"""Learning from the flow store: ``iotcls train STORE --labels devices.csv`` (anew, and
fine-tuning with ``--from``) and ``iotcls evaluate STORE``, as real processes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from iotcls.bundle import ModelBundle
from iotcls.finetune import session_split
from iotcls.schema import PROTO_UDP, FlowRecord
from iotcls.store import read_stores, segment_paths
from iotcls.testing.synth import device_ip, device_mac, synthetic_records
from test_store import dns_query, record


def iotcls(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "iotcls", *map(str, args)], capture_output=True, text=True
    )


def labelled_store(tmp_path):
    """8 devices the default model labelled (devices 0-3 trusted as WeMoSwitch), listed by
    iotcls inventory; the operator labels device 5 Thermostat, a type the model lacks. Device
    5 also asks DNS for its maker's cloud (``frontdoor.nest.com``)."""
    store = tmp_path / "store"
    recs = synthetic_records(640, devices=8, seed=4)
    recs.append(
        FlowRecord(
            device_mac=device_mac(5),
            device_ip=device_ip(5),
            device_port=40000,
            remote_ip="192.168.0.1",
            remote_port=53,
            proto=PROTO_UDP,
            start=recs[-1].start + 1.0,
            last=recs[-1].start + 1.0,
            total_bytes=60,
            total_packets=1,
            offsets=[0.0],
            sizes=[60],
            directions=[1],
            payloads=[dns_query("frontdoor.nest.com")],
            uid="Cnest",
            device_is_orig=True,
        )
    )
    record(store, recs, labels=lambda r: ("WeMoSwitch", int(r.device_mac[-1]) < 4))
    csv_path = tmp_path / "devices.csv"
    assert iotcls("inventory", store, "-o", csv_path).returncode == 0
    rows = list(csv.DictReader(csv_path.open()))
    for r in rows:
        if r["device"] == "02:00:00:00:00:05":
            r["label"] = "Thermostat"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return store, csv_path


@pytest.mark.e2e
def test_finetune_from_the_default_model_adds_a_type_and_says_where_its_data_came_from(tmp_path):
    store, devices = labelled_store(tmp_path)
    out = tmp_path / "site.pt"
    r = iotcls(
        "train",
        store,
        "--labels",
        devices,
        "--from",
        "default-model",
        "-o",
        out,
        "--epochs",
        "1",
        "--threads",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert "1 new: Thermostat" in r.stdout and "fine-tuned from default-model@" in r.stdout
    b, base = ModelBundle.load(out), ModelBundle.load()
    assert b.classes == [*base.classes, "Thermostat"]  # the head grew; known types kept their place
    m = b.metadata
    assert m["finetuned_from"]["sha256"] == base.sha256 and m["classes_added"] == ["Thermostat"]
    assert m["data"]["labels_file"]["path"] == str(devices.resolve())
    assert m["data"]["stores"][0]["segments"] == [p.name for p in segment_paths(store)]
    assert m["data"]["class_counts"] == {"Thermostat": 81} and m["data"]["records"] == 641
    assert b.trust is not None and b.trust["classes"] == b.classes  # refitted for 28 classes
    assert b.trust.get("dhcp_needed", []) == base.trust.get("dhcp_needed", [])  # rule 7 kept
    # rule 9's map: the base's, and the names of the records the operator labelled
    assert b.trust["dns_names"] == {**base.trust["dns_names"], "Thermostat": ["nest.com"]}
    assert b.trust["fitted_on"] == "fine-tuning sessions"
    # the base model's split is kept (evaluate keeps scoring its held-out captures)
    assert set(base.metadata["split"]["test"]) <= set(m["split"]["test"])
    ev = iotcls(
        "evaluate",
        store,
        "--labels",
        devices,
        "--model",
        out,
        "--all",
        "--json",
        "--out",
        tmp_path / "ev",
        "--quiet",
    )
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout.splitlines()[-1])


@pytest.mark.e2e
def test_train_anew_from_a_store_and_captures_refuse_unlabelled_data(tmp_path):
    store, devices = labelled_store(tmp_path)
    rows = list(csv.DictReader(devices.open()))
    for r in rows:
        if r["device"] == "02:00:00:00:00:02":
            r["label"] = "WeMoSwitch"
    with devices.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "anew.pt"
    r = iotcls("train", store, "--labels", devices, "-o", out, "--epochs", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    b = ModelBundle.load(out)
    assert b.classes == ["Thermostat", "WeMoSwitch"] and b.metadata["data"]["stores"]
    # no label filled in: one line saying what to do
    bare = tmp_path / "bare.csv"
    assert iotcls("inventory", store, "-o", bare).returncode == 0
    r = iotcls("train", store, "--labels", bare, "--from", "default-model", "-o", out)
    assert r.returncode == 2 and "fill in the label column" in r.stderr


def test_session_split_keeps_few_sessions_for_training():
    caps = np.array(
        ["a1", "a2", "a3", "b1", "b2", "b3", "b4", "b5", "u1", "u2", "u3", "u4"], object
    )
    labels = np.array(["A"] * 3 + ["B"] * 5 + [""] * 4, object)
    s = session_split(caps, labels, 0, 0.15)
    assert {"a1", "a2", "a3"} <= set(s.train) and s.test == []
    assert len(set(s.val) & {"b1", "b2", "b3", "b4", "b5"}) == 1
    assert len(set(s.val) & {"u1", "u2", "u3", "u4"}) == 1
    assert read_stores([]).table is not None


def test_reload_finds_the_serve_bridge_not_its_scorers(tmp_path):
    from iotcls.commands.reload import serve_processes

    for pid, argv in {
        100: ["python3", "-m", "iotcls", "serve", "--config", "s.yaml"],
        101: ["python3", "-m", "iotcls", "serve", "--scorer-only", "--connect", "x"],
        102: ["/opt/iotcls/bin/iotcls", "serve"],
        103: ["bash"],
        104: ["python3", "-m", "iotcls", "inventory", "serve"],
    }.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (tmp_path / "self").mkdir()
    assert [p for p, _ in serve_processes(tmp_path)] == [100, 102]
