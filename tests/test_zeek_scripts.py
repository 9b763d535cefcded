"""The iotcls Zeek package: formatting and parsing (zeekscript), its records against the Python
schemas, ``iotcls zeek-install``, and, where a ``zeek`` binary exists, Zeek itself."""

import asyncio
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from iotcls.testing.fake_zeek import zeek_events, zeek_records
from iotcls import cli
from iotcls.bridge import records as rc
from iotcls.commands import zeek_install
from iotcls.logschema import FIELDS
from iotcls.schema import FlowRecord

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "zeek-scripts" / "iotcls"
SCRIPTS = sorted(PKG.glob("*.zeek"))
BIN = Path(sys.executable).parent
MAIN = (PKG / "main.zeek").read_text()
RECORDS = zeek_records(MAIN)
EVENTS = zeek_events(MAIN)
ZEEK = shutil.which("zeek")
needs_zeek = pytest.mark.skipif(ZEEK is None, reason="zeek binary not found")


def test_the_package_has_its_files():
    assert [p.name for p in SCRIPTS] == ["__load__.zeek", "main.zeek"]
    assert "@load ./main" in (PKG / "__load__.zeek").read_text()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_zeek_format_leaves_the_file_as_it_is(script):
    r = subprocess.run([str(BIN / "zeek-format"), str(script)], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == script.read_text(), f"run: zeek-format -i {script}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_zeek_script_parses(script):
    r = subprocess.run([str(BIN / "zeek-script"), "parse", "-q", str(script)],
                       capture_output=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


def test_info_record_is_the_iot_class_log_schema():
    """IoTClass::Info's &log columns, flattened as Zeek's writers flatten them."""
    zeek_to_log = {"time": "time", "string": "string", "addr": "addr", "port": "port",
                   "transport_proto": "enum", "double": "double", "count": "count",
                   "bool": "bool", "vector of string": "vector[string]"}  # fmt: skip
    cols = []
    for name, ztype in RECORDS["Info"]:
        if ztype == "conn_id":  # orig_h, orig_p, resp_h, resp_p are its &log fields
            cols += [("id.orig_h", "addr"), ("id.orig_p", "port"), ("id.resp_h", "addr"),
                     ("id.resp_p", "port")]  # fmt: skip
        else:
            cols.append((name, zeek_to_log[ztype]))
    assert tuple(cols) == FIELDS
    info = re.search(r"type Info: record \{(.*?)\};", MAIN, re.S).group(1)
    assert info.count("&log") == len(RECORDS["Info"])  # every column is logged
    assert 'Log::create_stream(IoTClass::LOG, [$columns=Info' in MAIN
    assert '$path="iot_class"' in MAIN


def test_flow_record_mirrors_the_schema_and_the_decoder():
    zeek = RECORDS["FlowRecord"]
    assert [n for n, _ in zeek] == list(FlowRecord.__dataclass_fields__)
    assert [n for n, _ in zeek] == [n for n, _ in rc.FLOW_FIELDS]
    broker = {"string": "string", "addr": "address", "count": "count", "double": "real",
              "bool": "boolean", "vector of interval": "vector", "vector of count": "vector",
              "vector of string": "vector"}  # fmt: skip
    assert [broker[t] for _, t in zeek] == [t for _, t in rc.FLOW_FIELDS]
    assert dict(zeek)["offsets"] == "vector of interval"  # ns on the wire, not ms timestamps
    assert dict(zeek)["start"] == dict(zeek)["last"] == "double"


def test_label_record_and_events_match_the_bridge():
    broker = {"double": "real", "string": "string", "addr": "address", "port": "port",
              "count": "count", "bool": "boolean", "vector of string": "vector"}  # fmt: skip
    assert [(n, broker[t]) for n, t in RECORDS["Label"]] == list(rc.LABEL_FIELDS)
    assert EVENTS[rc.FLOW_EVENT] == [("rec", "FlowRecord")]
    assert EVENTS[rc.LABEL_EVENT] == [("l", "Label")]
    assert EVENTS[rc.HELLO_EVENT] == [("bridge", "string"), ("endpoint", "string")]
    assert EVENTS[rc.DRAINED_EVENT] == [("records", "count"), ("labels", "count")]
    assert EVENTS[rc.DRAIN_EVENT] == [("records", "count")]
    assert [t for _, t in EVENTS[rc.WELCOME_EVENT]] == [
        "count", "string", "interval", "count", "count", "bool"]


def test_defaults_agree_with_the_python_side():
    from iotcls.config import ZeekConfig
    from iotcls.schema import DEFAULT_PACKETS, DEFAULT_PAYLOAD_BYTES, DEFAULT_WINDOW_S

    def default(name):
        return re.search(rf"(?:option|const) {name}(?:: [^=]+)? = ([^;&]+?)\s*(?:&redef)?;",
                         MAIN).group(1)  # fmt: skip

    assert default("window_length") == f"{DEFAULT_WINDOW_S:.0f}sec"
    assert default("packets") == str(DEFAULT_PACKETS)
    assert default("payload_bytes") == str(DEFAULT_PAYLOAD_BYTES)
    cfg = ZeekConfig()
    assert default("records_topic") == json.dumps(cfg.topics[0])
    assert default("labels_topic") == json.dumps(cfg.label_topic)
    assert cfg.url == f"ws://{default('websocket_address')}:" \
        f"{default('websocket_port').split('/')[0]}/v1/messages/json"  # fmt: skip


def test_version_switches_and_backend():
    """Cluster::listen_websocket from 7.2 ($listen_addr from 7.2.2), Broker's before; a
    backend is loaded when none is set (else Zeek never acks)."""
    assert '@if ( Version::at_least("7.2.2") )' in MAIN
    assert "Cluster::listen_websocket([$listen_addr=websocket_address," in MAIN
    assert "Cluster::listen_websocket([$listen_host=cat(websocket_address)," in MAIN
    assert "Broker::listen_websocket(cat(websocket_address), websocket_port)" in MAIN
    assert re.search(r"@ifdef \( Cluster::CLUSTER_BACKEND_NONE \)\n@if \( Cluster::backend == "
                     r"Cluster::CLUSTER_BACKEND_NONE \)\n@load frameworks/cluster/backend/broker",
                     MAIN)  # fmt: skip


def test_zkg_meta_points_at_the_scripts():
    meta = (ROOT / "zkg.meta").read_text()
    assert meta.startswith("[package]")
    script_dir = re.search(r"^script_dir = (.+)$", meta, re.M).group(1).strip()
    assert (ROOT / script_dir / "__load__.zeek").is_file()


# -- iotcls zeek-install ----------------------------------------------------------------------
def write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def no_zeek_env(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("ZEEKPATH", raising=False)
    return empty


def test_install_copies_and_reinstalls(tmp_path, capsys, no_zeek_env):
    site = tmp_path / "site"
    site.mkdir()
    assert cli.main(["zeek-install", "--zeek-site", str(site)]) == 0
    out = capsys.readouterr().out
    target = site / "iotcls"
    assert f"to {target}" in out and "zeek -i eth0 iotcls" in out
    assert sorted(p.name for p in target.glob("*.zeek")) == ["__load__.zeek", "main.zeek"]
    assert (target / "main.zeek").read_bytes() == (PKG / "main.zeek").read_bytes()
    assert cli.main(["zeek-install", "--zeek-site", str(site)]) == 0  # replaces its own
    assert f"removed the previous {target}" in capsys.readouterr().out
    assert cli.main(["zeek-install", "--zeek-site", str(site), "--link"]) == 0
    assert target.is_symlink() and target.resolve() == PKG.resolve()
    assert cli.main(["zeek-install", "--zeek-site", str(site)]) == 0  # link -> copy again
    assert not target.is_symlink() and (target / "__load__.zeek").is_file()


def test_install_refuses_a_foreign_directory_without_force(tmp_path, capsys, no_zeek_env):
    site = tmp_path / "site"
    (site / "iotcls").mkdir(parents=True)
    (site / "iotcls" / "__load__.zeek").write_text("# someone else's\n")
    assert cli.main(["zeek-install", "--zeek-site", str(site)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"iotcls zeek-install: error: {site / 'iotcls'} exists and was not "
                           "installed by iotcls; use --force to replace it")  # fmt: skip
    assert cli.main(["zeek-install", "--zeek-site", str(site), "--force"]) == 0
    assert (site / "iotcls" / "main.zeek").is_file()


def test_install_without_zeek_is_one_clear_error(capsys, no_zeek_env):
    assert cli.main(["zeek-install"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("iotcls zeek-install: error: Zeek not found") and "--zeek-site" in err
    assert "\n" not in err


def test_install_finds_the_site_dir_like_zeek_does(tmp_path, capsys, no_zeek_env, monkeypatch):
    site = tmp_path / "prefix" / "share" / "zeek" / "site"
    site.mkdir(parents=True)
    # zeek --help prints its ZEEKPATH (Zeek's src/Options.cc)
    write_exe(no_zeek_env / "zeek", "#!/bin/sh\necho '    $ZEEKPATH                       | "
              f"file search path (.:{site}:{site.parent}/policy:{site.parent}/builtin-plugins)'\n")
    assert zeek_install.find_site_dir() == (site, f"the ZEEKPATH of {no_zeek_env / 'zeek'} --help")
    other = tmp_path / "other-site"
    other.mkdir()
    write_exe(no_zeek_env / "zeek-config", f"#!/bin/sh\n[ \"$1\" = --site_dir ] && echo {other}\n")
    assert cli.main(["zeek-install"]) == 0
    assert f"Zeek site directory: {other} (from {no_zeek_env / 'zeek-config'} --site_dir)" in \
        capsys.readouterr().out  # fmt: skip
    (no_zeek_env / "zeek-config").unlink()
    (no_zeek_env / "zeek").unlink()
    monkeypatch.setenv("ZEEKPATH", f".:{site}:/nowhere/policy")
    assert zeek_install.find_site_dir() == (site, "the ZEEKPATH environment variable")


def test_scripts_come_from_one_place():
    assert zeek_install.scripts_dir().resolve() == PKG.resolve()


# -- with Zeek ---------------------------------------------------------------------------------
@needs_zeek
@pytest.mark.parametrize("bare", [False, True], ids=["default", "bare"])
def test_zeek_parses_the_package(bare):
    cmd = [ZEEK, "-a"] + (["-b"] if bare else []) + [str(PKG)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_zeek
def test_zeek_end_to_end_on_a_real_capture(tmp_path):
    """zeek -r capture iotcls, the bridge beside it: every record Zeek publishes is labelled
    and logged in iot_class.log, Zeek exits by itself after the drain, and the records equal
    the pcap sensor's where both end a window the same way."""
    from iotcls.bridge.core import Bridge, attach, run
    from iotcls.bridge.records import Verdict
    from iotcls.flows import DeviceSelector, capture_flows
    from iotcls.layout import MatrixLayout

    pcap = Path(__file__).parent / "fixtures" / "captures" / "D-LinkCam_Setup-B-1-STA.pcap"
    nets = ["10.0.0.0/8", "192.168.0.0/16"]
    port = _free_port()
    got = []

    def scorer(mats, table):
        got.extend(table.records())
        return [Verdict("D-LinkCam", 0.9) for _ in range(len(mats))]

    layout = MatrixLayout()
    bridge = Bridge(layout, scorer)
    client = attach(bridge, f"ws://127.0.0.1:{port}/v1/messages/json",
                    reconnect_min_s=0.1, reconnect_max_s=0.5)  # fmt: skip
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(run(bridge, client),))
    thread.start()
    try:
        cmd = [ZEEK, "-C", "-r", str(pcap), str(PKG), f"IoTClass::websocket_port={port}/tcp",
               "IoTClass::device_nets={" + ",".join(nets) + "}", "IoTClass::hold_timeout=60sec"]
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    finally:
        loop.call_soon_threadsafe(client.stop)
        thread.join(30)
    assert r.returncode == 0, r.stderr
    assert "were not classified" not in r.stderr and "did not confirm" not in r.stderr
    log_lines = [ln for ln in (tmp_path / "iot_class.log").read_text().splitlines()
                 if not ln.startswith("#")]  # fmt: skip
    assert len(log_lines) == len(got) == bridge.stats.labels > 0
    pcap_recs = capture_flows(pcap, DeviceSelector.from_lists(nets=nets)).table.records()

    def key(x):
        return (x.device_ip, x.device_port, x.remote_ip, x.remote_port, x.proto, x.start)

    twins = {key(x): x for x in pcap_recs}
    same = [z for z in got if key(z) in twins]
    assert len(same) >= 0.8 * len(got)
    for z in same:
        p = twins[key(z)]
        assert (z.offsets, z.sizes, z.directions, z.payloads, z.device_mac) == \
            (p.offsets, p.sizes, p.directions, p.payloads, p.device_mac)  # fmt: skip
    rows_z = layout.encode_rows(bridge.assembler.table(same))
    rows_p = layout.encode_rows(bridge.assembler.table([twins[key(z)] for z in same]))
    # totals may differ where Zeek ends a window at connection end; everything else agrees
    cols = [i for i, n in enumerate(layout.column_names()) if n not in ("bytes", "pkts")]
    assert np.array_equal(rows_z[:, cols], rows_p[:, cols])
