"""deploy/: the Splunk, Elastic and systemd files parse, name only real log fields, and work.

The log's columns are iotcls/logschema.py's FIELDS; every file here is checked against them,
and the Elastic ingest pipeline is executed (tests/ingest_sim.py) on a log that
``iotcls classify`` wrote.
"""

import argparse
import configparser
import json
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from ingest_sim import SUPPORTED, simulate
from iotcls.cli import main
from iotcls.logschema import FIELD_NAMES

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PIPELINE_FILE = DEPLOY / "elastic" / "zeek.iot_class.json"

# Where each log column ends up in Elasticsearch. A new column fails
# test_pipeline_handles_every_column until the pipeline (and this table) handle it.
ECS_OF = {
    "ts": "@timestamp",
    "uid": "zeek.session_id",
    "id.orig_h": "source.ip",
    "id.orig_p": "source.port",
    "id.resp_h": "destination.ip",
    "id.resp_p": "destination.port",
    "proto": "network.transport",
    "device_mac": "host.mac",
    "device_ip": "host.ip",
    "label": "iot_class.label",
    "confidence": "iot_class.confidence",
    "strategy": "iot_class.strategy",
    "n_flows": "iot_class.n_flows",
    "trusted": "iot_class.trusted",
    "reason": "iot_class.reason",
    "top_groups": "iot_class.top_groups",
    "model": "iot_class.model",
}
# ECS fields the pipeline may write (ECS 8.11), with the allowed values where ECS has a list.
ECS_FIELDS = {
    "@timestamp",
    "source.ip",
    "source.port",
    "destination.ip",
    "destination.port",
    "network.transport",
    "host.ip",
    "host.mac",
    "event.kind",
    "event.category",
    "event.type",
    "event.module",
    "event.dataset",
    "ecs.version",
    "related.ip",
    "error.message",
}
ECS_ALLOWED = {
    "event.kind": {
        "alert",
        "asset",
        "enrichment",
        "event",
        "metric",
        "state",
        "pipeline_error",
        "signal",
    },
    "event.category": {"host", "network"},  # the two that fit; ECS has more
    "event.type": {"info", "connection", "protocol", "change"},
}


@pytest.fixture(scope="module")
def json_log(tmp_path_factory, sample):
    out = tmp_path_factory.mktemp("json")
    args = ["classify", str(sample.pcap), "--devices", sample.devices_arg, "-o", str(out)]
    assert main(args + ["--format", "json"]) == 0
    lines = (out / "iot_class.log").read_text().splitlines()
    assert len(lines) > 100
    return lines


def zeek_json(line: str) -> str:
    """The line as Zeek's JSON writer would have it: an unset reason is omitted."""
    d = json.loads(line)
    if d.get("reason") == "-":
        del d["reason"]
    return json.dumps(d, separators=(",", ":"))


def flat(doc: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --- Elastic -------------------------------------------------------------------------------


def pipeline() -> dict:
    return json.loads(PIPELINE_FILE.read_text())


def log_fields_referenced(p: dict) -> set[str]:
    """The log columns the processors name (iot_class.<column>, dot_expander fields)."""
    names = set()
    for proc in p["processors"]:
        ((ptype, o),) = proc.items()
        if ptype == "dot_expander":
            names.add(o["field"])
        for key in ("field", "target_field"):
            v = o.get(key, "")
            if v.startswith("iot_class.") and v != "iot_class":
                names.add(v[len("iot_class.") :])
    return names


def test_pipeline_is_sane():
    p = pipeline()
    assert PIPELINE_FILE.stem == "zeek.iot_class"
    types = [next(iter(proc)) for proc in p["processors"]]
    assert set(types) <= SUPPORTED, set(types) - SUPPORTED
    assert p["on_failure"] and p["description"].startswith("zeek.iot_class")
    referenced = log_fields_referenced(p)
    # every column named is a real one (id is the object dot_expander makes of id.*)
    assert referenced - {"id"} <= set(FIELD_NAMES), referenced - set(FIELD_NAMES)
    written = set()
    for proc in p["processors"]:
        ((ptype, o),) = proc.items()
        if ptype in ("set", "append"):
            written.add(o["field"])
        elif ptype in ("rename", "date") and not o["target_field"].startswith("iot_class"):
            written.add(o["target_field"])
        if ptype == "set" and o["field"] in ECS_ALLOWED:
            vals = o["value"] if isinstance(o["value"], list) else [o["value"]]
            assert set(vals) <= ECS_ALLOWED[o["field"]], o
    assert written - {"zeek.session_id"} <= ECS_FIELDS, written - ECS_FIELDS
    dataset = [
        proc["set"]
        for proc in p["processors"]
        if proc.get("set", {}).get("field") == "event.dataset"
    ]
    assert [d["value"] for d in dataset] == ["zeek.iot_class"]


def test_pipeline_handles_every_column():
    assert set(ECS_OF) == set(FIELD_NAMES)
    moved = {k for k, v in ECS_OF.items() if not v.startswith("iot_class.")}
    referenced = log_fields_referenced(pipeline())
    assert moved <= referenced, moved - referenced


def test_pipeline_on_classified_log(json_log):
    p = pipeline()
    for line in json_log:
        src = json.loads(line)
        out = simulate(p, {"message": zeek_json(line)})
        assert "error" not in out, out["error"]
        f = flat(out)
        for column, target in ECS_OF.items():
            if column not in src or (column == "reason" and src[column] == "-"):
                assert target not in f, (column, target)
                continue
            got, want = f[target], src[column]
            if column == "ts":
                t = datetime.fromtimestamp(want, timezone.utc)
                assert got == t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
            elif column == "device_mac":
                assert got == want.upper().replace(":", "-")  # ECS: AA-BB-CC-DD-EE-FF
            else:
                assert got == want, (column, got, want)
        assert "message" not in out and set(out["iot_class"]) <= set(FIELD_NAMES)
        assert out["event"]["dataset"] == "zeek.iot_class" and out["event"]["kind"] == "event"
        assert set(out["related"]["ip"]) == {src["id.orig_h"], src["id.resp_h"]}
        assert set(f) - {t for t in ECS_OF.values()} <= ECS_FIELDS | {"related.ip"}


def test_pipeline_iso_timestamps_and_failures(json_log):
    """Security Onion's Zeek writes ISO 8601 times; a bad line is kept and marked."""
    d = json.loads(json_log[0])
    d["ts"] = "2023-11-14T22:13:21.161637Z"
    out = simulate(pipeline(), {"message": json.dumps(d)})
    assert out["@timestamp"] == "2023-11-14T22:13:21.161Z"
    bad = simulate(pipeline(), {"message": '{"ts": "yesterday"}'})
    assert bad["event"]["kind"] == "pipeline_error"
    assert "date" in bad["error"]["message"] and bad["message"] == '{"ts": "yesterday"}'


@pytest.mark.parametrize("name", ["filebeat.yml", "elastic-agent.yml"])
def test_filestream_inputs(name):
    doc = yaml.safe_load((DEPLOY / "elastic" / name).read_text())
    if name == "filebeat.yml":
        (inp,) = doc["filebeat.inputs"]
        stream = inp
    else:
        (inp,) = doc["inputs"]
        (stream,) = inp["streams"]
        assert stream["data_stream"]["dataset"] == "zeek.iot_class"
    assert inp["type"] == "filestream" and inp["id"]
    assert stream["pipeline"] == PIPELINE_FILE.stem
    assert all(p.endswith("/iot_class.log") for p in stream["paths"])


# --- Splunk --------------------------------------------------------------------------------


def splunk_conf(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(
        interpolation=None, delimiters=("=",), comment_prefixes=("#",), strict=True
    )
    cp.optionxform = str  # Splunk keys are case-sensitive
    cp.read_string((DEPLOY / "splunk" / name).read_text())
    return cp


def test_splunk_props(json_log):
    props = splunk_conf("props.conf")
    st = props["bro:iot_class:json"]
    assert st["KV_MODE"] == "json" and st["SHOULD_LINEMERGE"] == "false"
    # the timestamp: TIME_PREFIX (a PCRE that Python's re reads the same) then %s.%6N
    assert st["TIME_FORMAT"] == "%s.%6N"
    for line in json_log[:20]:
        m = re.search(st["TIME_PREFIX"], line)
        assert m and m.end() <= 10
        stamp = re.match(r"(\d+)\.(\d{1,6})", line[m.end() :])
        assert stamp and len(stamp.group(0)) <= int(st["MAX_TIMESTAMP_LOOKAHEAD"])
        ts = json.loads(line)["ts"]
        assert float(stamp.group(0)) == pytest.approx(ts, abs=1e-6)
    aliases = {}
    for key, value in st.items():
        if key.startswith("FIELDALIAS-"):
            for src, dst in re.findall(r"(\S+)\s+AS\s+(\S+)", value):
                aliases[dst] = src
    assert set(aliases.values()) <= set(FIELD_NAMES), set(aliases.values()) - set(FIELD_NAMES)
    assert aliases["src"] == aliases["src_ip"] == "device_ip"
    assert aliases["src_mac"] == aliases["mac"] == "device_mac"


def test_splunk_inputs():
    inputs = splunk_conf("inputs.conf")
    props = splunk_conf("props.conf")
    monitors = [s for s in inputs.sections() if s.startswith("monitor://")]
    assert monitors
    for s in monitors:
        assert s.endswith("/iot_class.log")
        assert inputs[s]["sourcetype"] in props.sections()
        assert inputs[s]["disabled"] == "false"


# --- systemd -------------------------------------------------------------------------------

UNITS = ["iotcls.service", "iotcls-scorer.service"]


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=False, comment_prefixes=("#",))
    cp.optionxform = str
    cp.read_string((DEPLOY / "systemd" / name).read_text())
    return cp


@pytest.mark.parametrize("name", UNITS)
def test_unit_hardening(name):
    svc = unit(name)["Service"]
    assert svc["User"] == svc["Group"] == "iotcls"
    assert svc["Restart"] == "on-failure" and svc["NoNewPrivileges"] == "yes"
    assert svc["ProtectSystem"] == "strict" and svc["ProtectHome"] == "yes"
    assert svc["ReadWritePaths"] == "/var/lib/iotcls" and svc["CapabilityBoundingSet"] == ""
    assert "MemoryDenyWriteExecute" not in svc  # PyTorch's oneDNN JIT needs W+X pages
    argv = svc["ExecStart"].split()
    assert argv[:2] == ["/opt/iotcls/bin/iotcls", "serve"]
    # the options it passes exist
    from iotcls.commands import serve

    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    known = {s for a in p._actions for s in a.option_strings}
    assert {a for a in argv if a.startswith("--")} <= known
    user = (DEPLOY / "systemd" / "iotcls.sysusers.conf").read_text()
    assert re.search(r"^u iotcls - .* /var/lib/iotcls ", user, re.M)


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", UNITS)
def test_unit_verifies(tmp_path, name):
    """systemd's own checks: verify (with ExecStart pointing at this venv's iotcls, since
    verify insists the program exists) and the offline security exposure score (at most 3.0
    of 10; --threshold counts in tenths)."""
    text = (DEPLOY / "systemd" / name).read_text()
    exe = Path(sys.executable).with_name("iotcls")
    assert exe.exists()
    (tmp_path / name).write_text(text.replace("/opt/iotcls/bin/iotcls", str(exe)))
    res = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    sec = subprocess.run(
        [
            SYSTEMD_ANALYZE,
            "security",
            "--offline=true",
            "--threshold=30",
            "--no-pager",
            str(tmp_path / name),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in sec.stderr and "unrecognized" in sec.stderr:
        pytest.skip("systemd-analyze too old for security --offline (systemd < 252)")
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", sec.stdout)
    assert sec.returncode == 0 and score and float(score.group(1)) <= 3.0, sec.stdout[-800:]
