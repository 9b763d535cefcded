"""The Suricata sensor: the Lua output script in a real Suricata, its records against the
pcap sensor's, and ``iotcls serve`` turning them into EVE label lines."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port
from iotcls.bridge.core import FlowAssembler
from iotcls.bridge.suricata import DatagramError, community_id, parse_datagram, parse_line
from iotcls.bundle import ModelBundle
from iotcls.flows import DeviceSelector, capture_flows
from iotcls.flowtable import FlowTable
from iotcls.layout import MatrixLayout
from iotcls.logschema import FIELD_NAMES
from iotcls.predict import Predictor
from iotcls.testing.shared import sentinel_dir
from tiny_model import tiny_bundle

DATA = sentinel_dir()  # ../shared, or $IOTCLS_SHARED
NETS = "10.0.0.0/8,192.168.0.0/16"
# an ICMP error Suricata files under a UDP flow, IGMP (no Suricata flow), pseudo-packets
CAPTURES = [
    "D-LinkCam/Setup-A-1-STA.pcap",
    "WeMoLink/Setup-A-1-STA.pcap",
    "TP-LinkPlugHS110/Setup-A-1-STA.pcap",
]
SURICATA = shutil.which("suricata")
needs_suricata = pytest.mark.skipif(SURICATA is None, reason="suricata is not installed")
needs_data = pytest.mark.skipif(
    not (DATA / CAPTURES[0]).is_file(), reason=f"the IoT Sentinel captures are not in {DATA}"
)
LAYOUT = MatrixLayout(history=2, packets=4, payload_bytes=4)
CLASSES = ["cam", "plug", "hub", "bulb"]


def iotcls(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "iotcls", *args], capture_output=True, text=True, timeout=60, **kw
    )


def install_script(tmp: Path, sock: Path, serve_yaml: Path | None = None) -> str:
    """``iotcls suricata-config --install``: returns the outputs snippet it printed."""
    cfg = serve_yaml or tmp / "serve.yaml"
    if serve_yaml is None:
        cfg.write_text(
            json.dumps(
                {"zeek": {"enabled": False}, "suricata": {"enabled": True, "socket": str(sock)}}
            )
        )
    r = iotcls(
        "suricata-config", "--config", str(cfg), "--local-nets", NETS, "--install", str(tmp / "lua")
    )
    assert r.returncode == 0, r.stderr
    return "\n".join(ln for ln in r.stdout.splitlines() if not ln.startswith("#"))


def run_suricata(
    tmp: Path, pcap: Path, outputs: str, eve: bool = False, env: dict | None = None
) -> str:
    """``suricata -r`` with a minimal configuration: no rules, the given Lua output and
    optionally eve.json flow events (with Community IDs). Returns its output."""
    logs = tmp / "suricata-logs"
    logs.mkdir(exist_ok=True)
    eve_out = (
        "  - eve-log:\n      enabled: yes\n      filetype: regular\n"
        "      filename: eve.json\n      community-id: yes\n      types: [flow]\n"
    )
    yaml = "%YAML 1.1\n---\n" + outputs.replace(
        "outputs:\n", "outputs:\n" + (eve_out if eve else "")
    )
    (tmp / "suricata.yaml").write_text(yaml)
    r = subprocess.run(
        [
            SURICATA,
            "-c",
            str(tmp / "suricata.yaml"),
            "-r",
            str(pcap),
            "-l",
            str(logs),
            "-k",
            "none",
            "--runmode",
            "single",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "iotcls: flow records to" in out, out  # the script loaded and set up
    return out


def sent_count(out: str, with_early: bool = False) -> tuple[int, int]:
    """(records sent, dropped) from the script's last log line; early records are counted
    among those sent, and left out unless ``with_early`` (when nothing was dropped, every
    early record made was sent)."""
    m = re.search(
        r"iotcls: \d+ packets, (\d+) records sent, (\d+) dropped.*, (\d+) of the "
        r"records made were early ones",
        out,
    )
    assert m, out
    early = 0 if with_early else int(m.group(3))
    return int(m.group(1)) - early, int(m.group(2))


class Receiver:
    """The bridge's end of the socket, in the test: collects the datagrams."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.data: list[bytes] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.data.append(self.sock.recv(65536))
            except TimeoutError:
                pass

    def records(self, n: int) -> list:
        deadline = time.monotonic() + 10
        while sum(d.count(b"\n") + 1 for d in self.data) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        self._t.join()
        self.sock.close()
        lines = [parse_line(line) for d in self.data for line in d.split(b"\n")]
        self.early = [r for r, early in lines if early]  # early records (schema.early_record)
        return [r for r, early in lines if not early]


def early_record(r):
    from iotcls.schema import early_record as schema_early

    return schema_early(r)


def key(r) -> tuple:
    return (r.key(), round(r.start, 6))


def bridge_table(records: list) -> FlowTable:
    """The table the bridge decodes the script's records into (DHCP payloads become their
    view there, as in the pcap reader)."""
    return FlowAssembler(MatrixLayout()).decode(records).table


# --------------------------------------------------------------------------------------------
# no Suricata needed


def test_datagrams_that_are_not_records_are_refused_with_a_reason():
    good = {
        "v": 1,
        "flow_id": 7,
        "device_ip": "10.0.0.2",
        "device_port": 5,
        "remote_ip": "1.2.3.4",
        "remote_port": 80,
        "proto": 6,
        "start": 10.5,
        "last": 11.0,
        "total_bytes": 100,
        "total_packets": 2,
        "offsets_us": [0, 500000],
        "sizes": [60, 40],
        "directions": [1, 0],
        "payloads": ["abcd", ""],
        "device_is_orig": True,
    }
    r = parse_datagram(json.dumps(good).encode())
    assert (r.key(), r.uid, r.offsets, r.payloads) == (
        ("10.0.0.2", 5, "1.2.3.4", 80, 6),
        "7",
        [0.0, 0.5],
        [b"\xab\xcd", b""],
    )
    for junk, why in (
        (b"\xff\xfe", "not JSON"),
        (b"[1]", "not a JSON object"),
        (json.dumps({**good, "v": 2}).encode(), "record version 2"),
        (json.dumps({**good, "device_ip": "x"}).encode(), "'device_ip' is not an IP"),
        (json.dumps({**good, "sizes": [1]}).encode(), "differ in length"),
        (json.dumps({**good, "payloads": ["zz", ""]}).encode(), "hex strings"),
        (json.dumps({**good, "last": 1.0}).encode(), "not times in order"),
        (json.dumps({**good, "proto": "tcp"}).encode(), "'proto' missing or not int"),
    ):
        with pytest.raises(DatagramError, match=why):
            parse_datagram(junk)


def test_community_id_of_the_spec_examples():
    """The Community ID spec's baseline values (community-id-spec, baseline/)."""
    assert (
        community_id("128.232.110.120", 34855, "66.35.250.204", 80, 6)
        == "1:LQU9qZlK+B5F3KDmev6m5PMibrg="
    )
    assert (
        community_id("66.35.250.204", 80, "128.232.110.120", 34855, 6)
        == "1:LQU9qZlK+B5F3KDmev6m5PMibrg="
    )
    assert (
        community_id("128.232.110.120", 34855, "66.35.250.204", 80, 6, seed=1)
        == "1:3V71V58M3Ksw/yuFALMcW0LAHvc="
    )


@pytest.mark.e2e
def test_suricata_config_prints_the_outputs_snippet_and_installs(tmp_path):
    r = iotcls("suricata-config", "--local-nets", "192.168.0.0/16")
    assert r.returncode == 0, r.stderr
    assert "scripts-dir:" in r.stdout and "- iotcls.lua" in r.stdout
    assert (
        "local_nets = 192.168.0.0/16" in r.stdout
        and "socket = /run/iotcls/suricata.sock" in r.stdout
    )
    assert "#   payload_bytes = 64\n#   dhcp_payload_bytes = 548\n" in r.stdout
    bad = iotcls("suricata-config", "--local-nets", "192.168.0.0/33")
    assert bad.returncode == 2 and "not a network (CIDR): '192.168.0.0/33'" in bad.stderr
    snippet = install_script(tmp_path, tmp_path / "s.sock")
    assert f"scripts-dir: {tmp_path / 'lua'}" in snippet
    assert (tmp_path / "lua" / "iotcls.lua").read_text() == (
        Path(__file__).resolve().parents[1] / "suricata" / "iotcls.lua"
    ).read_text()
    assert (
        f"socket = {tmp_path / 's.sock'}" in (tmp_path / "lua" / "iotcls-suricata.conf").read_text()
    )


# --------------------------------------------------------------------------------------------
# a real Suricata


@needs_suricata
@needs_data
@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.e2e
def test_suricata_records_equal_the_pcap_sensors(tmp_path, capture):
    """Every record Suricata's script sends, decoded by the bridge, equals the pcap reader's
    record of the same key and window (offsets to a microsecond, sizes, directions, payloads
    and DHCP views, totals, who originated); the pcap reader's extra records are IGMP only,
    which Suricata keeps no flow for (the one documented difference)."""
    sock = tmp_path / "s.sock"
    rx = Receiver(sock)
    out = run_suricata(tmp_path, DATA / capture, install_script(tmp_path, sock))
    sent, dropped = sent_count(out, with_early=True)
    got = rx.records(sent)
    assert dropped == 0 and len(got) + len(rx.early) == sent > 0
    early = bridge_table(rx.early).records()
    got = bridge_table(got).records()
    want = capture_flows(
        DATA / capture, DeviceSelector.from_lists(nets=NETS.split(","))
    ).table.records()
    # the early records are the schema's early records of the pcap reader's (same rule)
    E = {key(r): early_record(r) for r in want}
    assert early and len({key(r) for r in early}) == len(early)
    for a in early:
        b = E[key(a)]
        assert b is not None, key(a)
        assert (a.total_packets, a.sizes, a.directions, a.payloads) == (
            b.total_packets,
            b.sizes,
            b.directions,
            b.payloads,
        ), key(a)
    assert len(early) >= sum(e is not None for k, e in E.items() if k[0][4] != 2) - 3
    S, P = {key(r): r for r in got}, {key(r): r for r in want}
    assert len(S) == len(got)
    assert set(S) <= set(P)
    assert {k[0][4] for k in set(P) - set(S)} <= {2}  # IGMP
    assert len(S) >= len(P) - 3
    for k, a in S.items():
        b = P[k]
        assert (a.last, a.total_bytes, a.total_packets) == pytest.approx(
            (b.last, b.total_bytes, b.total_packets), abs=1e-6
        ), k
        assert (a.sizes, a.directions, a.payloads, a.device_is_orig) == (
            b.sizes,
            b.directions,
            b.payloads,
            b.device_is_orig,
        ), k
        np.testing.assert_allclose(a.offsets, b.offsets, atol=1e-6)
        assert a.uid.isdigit() and a.device_mac == ""  # Suricata's flow id; no MACs in Lua


def _dhcp_client_rows(t: FlowTable) -> dict[tuple, int]:
    """Rows of DHCP client flows (device port 68), by key and window start."""
    return {key(t.record(i)): i for i in np.flatnonzero((t.proto == 17) & (t.device_port == 68))}


@needs_suricata
@needs_data
@pytest.mark.e2e
def test_suricata_keeps_whole_dhcp_messages(tmp_path):
    """DHCP packets keep dhcp_payload_bytes, not payload_bytes: the script sends the plug's
    whole DHCP messages (548 bytes from the client, 300 from the server), and the table the
    bridge decodes from them has the pcap reader's rows for its DHCP client flows, array by
    array (the DHCP view's bytes and lengths included; no MAC from Suricata), with the host
    name the plug sends in option 12, past byte 240. The DISCOVER and REQUESTs come from
    0.0.0.0, a device here by ``devices``. With dhcp_payload_bytes = 64 the name is gone."""
    capture = DATA / "TP-LinkPlugHS110/Setup-A-1-STA.pcap"
    sock = tmp_path / "s.sock"
    rx = Receiver(sock)
    out = run_suricata(
        tmp_path, capture, install_script(tmp_path, sock), env={"IOTCLS_DEVICES": "0.0.0.0"}
    )
    assert "64 payload bytes, 548 of DHCP" in out
    sent, dropped = sent_count(out)
    raw = rx.records(sent)
    assert dropped == 0 and len(raw) == sent > 0
    dhcp_raw = [r for r in raw if r.proto == 17 and 68 in (r.device_port, r.remote_port)]
    assert sorted({len(p) for r in dhcp_raw for p in r.payloads}) == [300, 548]

    want = capture_flows(
        capture, DeviceSelector.from_lists(nets=NETS.split(",") + ["0.0.0.0/32"])
    ).table
    got = bridge_table(raw)
    g, w = _dhcp_client_rows(got), _dhcp_client_rows(want)
    assert sorted(g) == sorted(w) and {k[0][0] for k in g} == {"0.0.0.0", "10.10.10.20"}
    same = [f for f in FlowTable.__dataclass_fields__ if f not in ("uid", "device_mac")]
    for k, i in g.items():
        for f in same:
            a, b = getattr(got, f)[i], getattr(want, f)[w[k]]
            if f == "offsets":
                np.testing.assert_allclose(a, b, atol=1e-6)
            else:
                assert np.array_equal(a, b), (k, f)
    client = g[next(k for k in g if k[0][0] == "0.0.0.0")]
    views = [
        got.payload[client, j, : got.payload_len[client, j]].tobytes()
        for j in range(got.n_pkts[client])
    ]
    assert len(views) == 3 and all(b"\x0c\x09HS110(EU)" in v for v in views)

    rx = Receiver(tmp_path / "s2.sock")
    run_suricata(
        tmp_path,
        capture,
        install_script(tmp_path, tmp_path / "s2.sock"),
        env={"IOTCLS_DEVICES": "0.0.0.0", "IOTCLS_DHCP_PAYLOAD_BYTES": "64"},
    )
    cut = [r for r in rx.records(sent) if r.proto == 17 and 68 in (r.device_port, r.remote_port)]
    assert len(cut) == len(dhcp_raw) and {len(p) for r in cut for p in r.payloads} == {64}
    assert not any(b"HS110" in p for r in cut for p in r.payloads)


@needs_suricata
@needs_data
@pytest.mark.e2e
def test_without_a_bridge_suricata_runs_on_and_counts_the_drops(tmp_path):
    out = run_suricata(
        tmp_path, DATA / CAPTURES[0], install_script(tmp_path, tmp_path / "none.sock")
    )
    sent, dropped = sent_count(out, with_early=True)
    assert sent == 0 and dropped > 0
    assert out.count("iotcls: dropping records: cannot send to the bridge") == 1


def _labels_offline(records, model_path):
    """What ``iotcls classify``'s path gives for these records: offline matrices, the same
    Predictor."""
    recs = sorted(records, key=lambda r: r.start)
    t = FlowTable.from_records(recs, LAYOUT.packets, LAYOUT.required_payload_bytes())
    mats, order = LAYOUT.matrices(t)
    p = Predictor(ModelBundle.load(model_path)).predict(mats)
    return {key(recs[i]): (p.label[k], float(p.confidence[k])) for k, i in enumerate(order)}


@needs_suricata
@needs_data
@pytest.mark.e2e
def test_end_to_end_serve_writes_eve_labels(tmp_path):
    """Suricata -> the Lua script -> ``iotcls serve`` (Suricata only) -> a scorer -> EVE
    lines: one label per record (log policy all), the offline path's label, EVE's flow_id
    and community_id, the iot_class.log field names; garbage on the socket is refused and
    counted while labelling goes on."""
    capture = DATA / CAPTURES[0]
    model = str(tiny_bundle(LAYOUT, CLASSES, seed=5).save(tmp_path / "m.pt"))
    sock, eve_log = tmp_path / "run" / "iotcls.sock", tmp_path / "suricata-logs" / "iot_class.json"
    port = free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        json.dumps(
            {
                "zeek": {"enabled": False},
                "suricata": {
                    "enabled": True,
                    "socket": str(sock),
                    "eve_log": str(eve_log),
                    "community_id": True,
                },
                "bridge": {"bind": ["tcp://127.0.0.1:*"]},
                "scorers": {"count": 1, "model": model, "device": "cpu"},
                "log": {"policy": "all"},
                "metrics": {"enabled": True, "port": port},
            }
        )
    )
    err = tmp_path / "serve.err"
    serve = subprocess.Popen(
        [sys.executable, "-m", "iotcls", "serve", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=err.open("w"),
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while "connected: model" not in err.read_text():
            assert serve.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.1)
        junk = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        junk.sendto(b"\x00garbage, not a record", str(sock))
        junk.sendto(b'{"v": 1}', str(sock))
        out = run_suricata(
            tmp_path,
            capture,
            install_script(tmp_path, sock, cfg),
            eve=True,
            env={"IOTCLS_REORDER_S": "0"},
        )
        sent, dropped = sent_count(out)
        assert dropped == 0 and sent > 0

        def finals() -> int:  # EVE lines of final records: early ones say "early": true
            return sum('"early":true' not in x for x in eve_log.read_text().splitlines())

        while not eve_log.is_file() or finals() < sent:
            assert serve.poll() is None and time.monotonic() < deadline + 60, err.read_text()
            time.sleep(0.1)
        metrics = _metrics(port)
        serve.send_signal(signal.SIGTERM)
        stdout, _ = serve.communicate(timeout=60)
    finally:
        if serve.poll() is None:
            serve.kill()
    assert serve.returncode == 0, err.read_text()
    assert "zeek off; suricata " in stdout
    lines = [json.loads(x) for x in eve_log.read_text().splitlines()]
    early = [e for e in lines if e["iot_class"].get("early")]
    lines = [e for e in lines if "early" not in e["iot_class"]]
    assert len(lines) == sent and len(early) > 0  # early labels too, marked as such
    assert {e["iot_class"]["device_ip"] for e in early} <= {
        e["iot_class"]["device_ip"] for e in lines
    }
    flows = {}
    for x in (tmp_path / "suricata-logs" / "eve.json").read_text().splitlines():
        ev = json.loads(x)
        flows[ev["flow_id"]] = ev
    want = capture_flows(capture, DeviceSelector.from_lists(nets=NETS.split(","))).table.records()
    want = [r for r in want if r.proto != 2]  # IGMP: no Suricata flow (see the parity test)
    for r in want:  # Suricata's Lua API has no MACs: a device is known by its address
        r.device_mac = ""
    assert sorted({e["iot_class"]["device_ip"] for e in lines}) == sorted(
        {r.device_ip for r in want}
    )
    offline = _labels_offline(want, model)
    fields = set(FIELD_NAMES) - {
        "ts",
        "uid",
        "id.orig_h",
        "id.orig_p",
        "id.resp_h",
        "id.resp_p",
        "proto",
        "device_mac",
    }
    seen = set()
    for e in lines:
        assert e["event_type"] == "iot_class" and set(e["iot_class"]) == fields
        c = e["iot_class"]
        dev_is_src = c["device_ip"] == e["src_ip"]
        k = (
            (
                c["device_ip"],
                e["src_port"] if dev_is_src else e["dest_port"],
                e["dest_ip"] if dev_is_src else e["src_ip"],
                e["dest_port"] if dev_is_src else e["src_port"],
                {"TCP": 6, "UDP": 17, "ICMP": 1, "IPv6-ICMP": 58}[e["proto"]],
            ),
            None,
        )
        starts = [s for s in offline if s[0] == k[0]]
        assert starts, e
        st = min(starts, key=lambda s: abs(_epoch(e["timestamp"]) - s[1]))
        assert abs(_epoch(e["timestamp"]) - st[1]) < 1e-5
        seen.add(st)
        label, conf = offline[st]
        assert c["label"] == label and c["confidence"] == pytest.approx(conf, rel=1e-5)
        assert c["strategy"] == "sequence" and c["model"].startswith("m@")
        ev = flows.get(e["flow_id"])
        if ev is not None and e["proto"] != "ICMP":  # Suricata's own flow event of this flow
            assert (ev["src_ip"], ev["src_port"], ev["dest_ip"], ev["dest_port"]) == (
                e["src_ip"],
                e["src_port"],
                e["dest_ip"],
                e["dest_port"],
            )
            assert e["community_id"] == ev["community_id"]
    assert len(seen) == len(lines) == len(offline)
    assert metrics['iotcls_messages_rejected_total{kind="malformed",socket="suricata"}'] == 1
    assert metrics['iotcls_messages_rejected_total{kind="bad_field",socket="suricata"}'] == 1
    assert "rejected a datagram on the Suricata socket: not JSON" in err.read_text()


def _epoch(ts: str) -> float:
    import datetime as dt

    return dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


def _metrics(port: int) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# --------------------------------------------------------------------------------------------
# the intake's edge: every field checked, one bad record never costs the good ones


class SuricataServe:
    """``iotcls serve`` for Suricata only, as a subprocess; records are sent straight to its
    socket, as the Lua script sends them."""

    def __init__(self, tmp: Path, model: str, sock: Path | None = None, port: int | None = None):
        self.tmp = tmp
        self.sock = sock or tmp / "run" / "iotcls.sock"
        self.eve = tmp / "iot_class.json"
        self.port = port or free_port()
        self.cfg = tmp / "serve.yaml"
        self.cfg.write_text(
            json.dumps(
                {
                    "zeek": {"enabled": False},
                    "suricata": {
                        "enabled": True,
                        "socket": str(self.sock),
                        "eve_log": str(self.eve),
                    },
                    "bridge": {"bind": ["tcp://127.0.0.1:*"]},
                    "scorers": {"count": 1, "model": model, "device": "cpu"},
                    "log": {"policy": "all"},
                    "metrics": {"enabled": True, "port": self.port},
                }
            )
        )
        self.err = tmp / "serve.err"
        self.out = tmp / "serve.out"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iotcls", "serve", "--config", str(self.cfg)],
            stdout=self.out.open("w"),
            stderr=self.err.open("w"),
        )

    def ready(self, timeout: float = 60) -> SuricataServe:
        deadline = time.monotonic() + timeout
        while "connected: model" not in self.err.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.err.read_text()
            time.sleep(0.05)
        return self

    def send(self, *lines: bytes) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.sendto(b"\n".join(lines), str(self.sock))
        s.close()

    def labels(self) -> list[dict]:
        if not self.eve.is_file():
            return []
        return [json.loads(x) for x in self.eve.read_text().splitlines()]

    def until(self, cond, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert self.proc.poll() is None, self.err.read_text()
            assert time.monotonic() < deadline, (
                f"timed out waiting for {what}\n" + self.err.read_text()
            )
            time.sleep(0.05)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(tiny_bundle(LAYOUT, CLASSES, seed=5).save(tmp_path_factory.mktemp("m") / "m.pt"))


def _datagrams(n: int, seed: int, start_uid: int = 1) -> list:
    from iotcls.testing.synth import synthetic_records

    recs = synthetic_records(n, devices=3, seed=seed, packets=4, payload_bytes=4)
    for k, r in enumerate(recs):
        r.uid = str(start_uid + k)  # Suricata's flow id
    return recs


@pytest.mark.e2e
def test_intake_checks_every_field_and_refuses_one_record_at_a_time(tmp_path, model_path):
    """Each datagram carries good records and one bad one (30k-deep JSON, an offset of
    10^400, a start of 1e300 or -1e18, negative byte and packet counts, ...): the bad record
    is refused with a counted reason, every good record beside it is labelled, the device of
    the negative count labels its next records, nothing is shed, the live-record gauge goes
    back to 0, and a record that arrives twice is labelled once."""
    from iotcls.bridge.suricata import record_datagram

    recs = _datagrams(40, seed=21)
    good = [json.loads(record_datagram(r)) for r in recs]
    dump = lambda d: json.dumps(d).encode()  # noqa: E731
    bad = [
        (b"[" * 30000, "malformed"),
        (b'{"v": 1, "x": ' + b"[" * 30000, "malformed"),
        (dump({**good[0], "offsets_us": [0, 10**400]}), "bad_field"),
        (dump({**good[0], "start": 1e300, "last": 1e300}), "bad_field"),
        (dump({**good[0], "start": -1e18}), "bad_field"),
        (dump({**good[0], "last": 1e300}), "bad_field"),
        (dump({**good[0], "total_bytes": -1}), "bad_field"),
        (dump({**good[0], "total_packets": -1}), "bad_field"),
        (dump({**good[0], "sizes": [-5] * len(good[0]["sizes"])}), "bad_field"),
        (dump({**good[0], "directions": [2] * len(good[0]["directions"])}), "bad_field"),
        (dump({**good[0], "device_port": 70000}), "bad_field"),
        (dump({**good[0], "flow_id": -1}), "bad_field"),
        (dump({**good[0], "start": float("nan")}), "bad_field"),
        (dump({**good[0], "offsets_us": [-1] * len(good[0]["offsets_us"])}), "bad_field"),
        (dump({**good[0], "v": 2}), "version"),
    ]
    serve = SuricataServe(tmp_path, model_path).ready()
    try:
        sent = 0
        for k, (junk, _) in enumerate(bad):  # one bad line between two good ones
            serve.send(record_datagram(recs[2 * k]), junk, record_datagram(recs[2 * k + 1]))
            sent += 2
        # the device of the record with total_bytes -1: its next records label as usual
        for r in recs[sent:]:
            serve.send(record_datagram(r))
        serve.send(record_datagram(recs[0]))  # again: a duplicate
        serve.until(lambda: len(serve.labels()) >= len(recs), "a label per good record")
        serve.until(
            lambda: (
                _metrics(serve.port).get(
                    'iotcls_messages_rejected_total{kind="duplicate",socket="suricata"}'
                )
                == 1
            ),
            "the duplicate counted",
        )
        serve.until(lambda: _metrics(serve.port)["iotcls_live_records"] == 0, "live records 0")
        m = _metrics(serve.port)
        assert serve.stop() == 0, serve.err.read_text()
    finally:
        serve.kill()
    labels = serve.labels()
    assert sorted(e["flow_id"] for e in labels) == sorted(int(r.uid) for r in recs)
    assert all(0.0 <= e["iot_class"]["confidence"] <= 1.0 for e in labels)
    kinds = {}
    for _, kind in bad:
        kinds[kind] = kinds.get(kind, 0) + 1
    for kind, n in kinds.items():
        assert m[f'iotcls_messages_rejected_total{{kind="{kind}",socket="suricata"}}'] == n, kind
    assert m["iotcls_records_in_total"] == len(recs) and m["iotcls_labels_out_total"] == len(recs)
    assert not any(k.startswith("iotcls_records_shed_total") and v for k, v in m.items())
    err = serve.err.read_text()
    assert "rejected a datagram on the Suricata socket: not a record: nested" in err
    assert "Traceback" not in err


def test_the_intake_refuses_what_the_matrix_code_cannot_take():
    """parse_datagram: ranges and finiteness, one line each, huge numbers not printed."""
    from iotcls.bridge.suricata import record_datagram

    r = json.loads(record_datagram(_datagrams(1, seed=1)[0]))
    for over, why in (
        (
            {"offsets_us": [10**400]},
            "'offsets_us' holds a 1329-bit integer, not in 0..9007199254740992",
        ),
        ({"start": 1e300, "last": 1e300}, "'start' is 1e+300, not a time"),
        ({"start": -1e18}, "'start' is -1e+18, not a time"),
        ({"total_bytes": -1}, "'total_bytes' is -1, not in 0..9223372036854775807"),
        ({"total_packets": 2**64}, "'total_packets' is a 65-bit integer"),
        ({"remote_port": -1}, "'remote_port' is -1, not in 0..65535"),
        ({"proto": 256}, "'proto' is 256, not in 0..255"),
        ({"sizes": [1] * 2000}, "'sizes' has 2000 entries, at most 1024"),
        ({"payloads": ["00" * 70000]}, "'payloads' must hold hex strings of at most 65535 bytes"),
    ):
        with pytest.raises(DatagramError, match=re.escape(why)) as e:
            parse_datagram(json.dumps({**r, **over}).encode())
        assert e.value.kind == "bad_field" and len(str(e.value)) < 200
    with pytest.raises(DatagramError, match="nested 30000 levels deep") as e:
        parse_datagram(b"[" * 30000)
    assert e.value.kind == "malformed"


@pytest.mark.e2e
def test_a_second_serve_on_the_same_socket_or_metrics_port_is_refused(tmp_path, model_path):
    """A second ``iotcls serve`` with the first's Suricata socket refuses to start, naming
    the socket and the process holding it (it used to unlink the live socket, and the first
    silently received nothing); one with the first's metrics port names the address. The
    first serves on."""
    from iotcls.bridge.suricata import record_datagram

    for d in "abc":
        (tmp_path / d).mkdir()
    first = SuricataServe(tmp_path / "a", model_path)
    try:
        first.ready()
        second = SuricataServe(tmp_path / "b", model_path, sock=first.sock)
        assert second.proc.wait(60) == 2
        err = second.err.read_text().strip().splitlines()
        assert len(err) == 1, err
        assert f"the Suricata socket {first.sock} is in use by process {first.proc.pid} (" in err[0]
        third = SuricataServe(tmp_path / "c", model_path, port=first.port)
        assert third.proc.wait(60) == 2
        err = third.err.read_text().strip().splitlines()
        assert err == [
            f"iotcls serve: error: cannot serve metrics on "
            f"http://127.0.0.1:{first.port}/metrics: Address already in use"
        ], err
        assert first.sock.exists()
        rec = _datagrams(1, seed=5)[0]
        first.send(record_datagram(rec))
        first.until(lambda: len(first.labels()) == 1, "the first still labels")
        assert first.stop() == 0
    finally:
        first.kill()
