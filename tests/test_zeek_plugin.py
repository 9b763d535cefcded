"""The native capture plugin (zeek-plugin/, ``IoTClass::Capture``) against the script capture
(capture.zeek) and the pcap sensor, with a real Zeek.

The plugin is built once per session from zeek-plugin/ into a temporary directory with the
Zeek under test's ``zeek-config`` (``IOTCLS_ZEEK_PLUGIN=DIR`` uses a plugin built before, the
directory holding its ``__zeek_plugin__``), and Zeek finds it through ``ZEEK_PLUGIN_PATH``.
The script capture runs in the same Zeek without it.

Two ways of reading records: through an in-process bridge, as test_zeek_scripts.py does
(records as the bridge decodes them, compared with the pcap sensor's), and, to compare the
native capture with the script capture record by record, from a ``flow_policy`` hook that
prints each published record as JSON with the network time it was published at (no bridge:
no WebSocket server, no offline hold).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from iotcls.flows import DeviceSelector, capture_flows
from iotcls.schema import FlowRecord
from iotcls.testing import zeek as zeek_testing
from iotcls.testing.shared import require, sentinel_capture, sentinel_dir, zeek_fixtures_dir
from iotcls.testing.zeek import find_zeek

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "zeek-scripts" / "iotcls"
PLUGIN_SRC = ROOT / "zeek-plugin"
PLUGIN_ENV = "IOTCLS_ZEEK_PLUGIN"
ZEEK = find_zeek()
needs_zeek = pytest.mark.zeek
FIELDS = [f for f in FlowRecord.__dataclass_fields__ if f not in ("uid", "device_is_orig")]
NO_BRIDGE = ("IoTClass::hold_offline=F", "IoTClass::websocket_listen=F")

# Prints every published record, early or final, and when (network time), as one JSON line.
PRINT_RECORDS = """
hook IoTClass::flow_policy(rec: IoTClass::FlowRecord, early: bool)
	{
	print fmt("iotcls-record %.6f %s %s", network_time(), early ? "early" : "final",
		to_json(rec));
	}
"""


# -- the plugin ----------------------------------------------------------------------------
def _zeek_config() -> str | None:
    beside = Path(ZEEK).parent / "zeek-config" if ZEEK else None
    if beside and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("zeek-config")


@pytest.fixture(scope="session")
def plugin_dir(tmp_path_factory) -> Path:
    """The built plugin: a directory with ``__zeek_plugin__``, for ZEEK_PLUGIN_PATH."""
    given = os.environ.get(PLUGIN_ENV)
    if given:
        path = Path(given)
        if not (path / "__zeek_plugin__").is_file():
            pytest.fail(f"${PLUGIN_ENV}={given} holds no __zeek_plugin__", pytrace=False)
        return path
    zeek_config = _zeek_config()
    missing = [
        what
        for what, ok in (
            (f"zeek-config (beside {ZEEK} or on PATH)", zeek_config),
            ("cmake", shutil.which("cmake")),
            ("a C++ compiler (c++)", shutil.which("c++") or shutil.which("g++")),
            ("make", shutil.which("make")),
        )
        if not ok
    ]
    if missing:
        pytest.skip(f"cannot build the native plugin: no {', '.join(missing)}")
    build = tmp_path_factory.mktemp("zeek-plugin") / "build"
    log = build.parent / "build.log"
    with log.open("w") as out:
        for cmd in (
            [str(PLUGIN_SRC / "configure"), f"--zeek-config={zeek_config}", f"--builddir={build}"],
            ["make", "-C", str(build), f"-j{min(os.cpu_count() or 1, 4)}"],
        ):
            r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=1800)
            if r.returncode != 0:
                pytest.fail(
                    f"building the plugin failed ({' '.join(cmd)}):\n{log.read_text()[-4000:]}",
                    pytrace=False,
                )
    assert (build / "__zeek_plugin__").read_text().strip() == "IoTClass::Capture"
    return build


def _plugin_installed() -> bool:
    """Whether this Zeek finds the plugin by itself (in its plugin dir): then there is no
    script capture to compare with."""
    env = {k: v for k, v in os.environ.items() if k != "ZEEK_PLUGIN_PATH"}
    r = subprocess.run([ZEEK, "-N", "IoTClass::Capture"], capture_output=True, env=env, timeout=60)
    return r.returncode == 0


@pytest.fixture
def native(plugin_dir, monkeypatch):
    """Zeek runs with the plugin (ZEEK_PLUGIN_PATH) in this test."""
    monkeypatch.setenv("ZEEK_PLUGIN_PATH", str(plugin_dir))
    return plugin_dir


def _env(plugin: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ZEEK_PLUGIN_PATH"}
    if plugin is not None:
        env["ZEEK_PLUGIN_PATH"] = str(plugin)
    return env


def _printed_records(
    pcap: Path, cwd: Path, plugin: Path | None, *args: str, checksums: bool = False
) -> tuple[subprocess.CompletedProcess, list]:
    """``zeek [-C] -r pcap iotcls`` without a bridge: (result, [(publish time, record)]),
    each record with ``early`` added (whether it is an early record)."""
    script = cwd / "print-records.zeek"
    script.write_text(PRINT_RECORDS)
    cmd = [
        ZEEK,
        *([] if checksums else ["-C"]),
        "-r",
        str(pcap),
        str(PKG),
        str(script),
        *NO_BRIDGE,
        *args,
    ]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env(plugin), timeout=600)
    recs = []
    for line in r.stdout.splitlines():
        if line.startswith("iotcls-record "):
            _, t, kind, rec = line.split(" ", 3)
            recs.append((float(t), dict(json.loads(rec), early=kind == "early")))
    return r, recs


def _same_as_script(
    pcap: Path,
    tmp_path: Path,
    plugin: Path,
    *args: str,
    checksums: bool = False,
    returncode: int = 0,
) -> list[dict]:
    """Runs the native and the script capture on *pcap*: both exit with *returncode* and
    publish the same records (all fields but uid), the native one no later (network time)
    than the script one. Returns the native records."""
    if _plugin_installed():
        pytest.skip(
            "the plugin is installed in this Zeek's plugin dir: no script capture to compare with"
        )
    (tmp_path / "native").mkdir()
    (tmp_path / "script").mkdir()
    rn, native = _printed_records(pcap, tmp_path / "native", plugin, *args, checksums=checksums)
    rs, script = _printed_records(pcap, tmp_path / "script", None, *args, checksums=checksums)
    assert rn.returncode == returncode, rn.stderr
    assert rs.returncode == returncode, rs.stderr
    assert "capture in the native plugin" in (tmp_path / "native" / "reporter.log").read_text()
    assert "capture in script land" in (tmp_path / "script" / "reporter.log").read_text()

    def strip(rec):
        return json.dumps({k: v for k, v in rec.items() if k != "uid"}, sort_keys=True)

    assert Counter(strip(r) for _, r in native) == Counter(strip(r) for _, r in script)
    when = {}
    for t, r in script:
        when.setdefault(strip(r), []).append(t)
    for t, r in sorted(native, key=lambda x: x[0]):
        assert t <= min(when[strip(r)]) + 1e-6, (t, r)
    return [r for _, r in native]


def _same_as_sensor(got: list[FlowRecord], pcap: Path, selector: DeviceSelector) -> None:
    from test_zeek_scripts import _rkey

    recs = capture_flows(pcap, selector).table.records()
    ours = {_rkey(x): x for x in recs}
    assert sorted(map(_rkey, got)) == sorted(ours) and len(got) > 0
    for z in got:
        want = ours[_rkey(z)]
        assert [getattr(z, f) for f in FIELDS] == [getattr(want, f) for f in FIELDS], _rkey(z)


def _mac_of(device: str) -> str:
    return (sentinel_dir() / device / "_iotdevice-mac.txt").read_text().strip().lower()


def _captures() -> list[str]:
    d = zeek_fixtures_dir() / "captures"
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if (p / "packets.jsonl").exists())


# -- loading -------------------------------------------------------------------------------
@needs_zeek
def test_the_plugin_builds_and_zeek_lists_it(native):
    r = subprocess.run(
        [ZEEK, "-NN", "IoTClass::Capture"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "IoTClass::Capture" in r.stdout
    assert "[Analyzer] IoTClass_Capture (enabled)" in r.stdout
    assert "IoTClass::__native_flush" in r.stdout


LOADED = r"""
event zeek_init()
	{
	print fmt("deliver-all %s %s", udp_content_deliver_all_orig, udp_content_deliver_all_resp);
	# An event prints with the bodies of its handlers, if it has any.
	print fmt("handled new_packet %s", /\{/ in fmt("%s", new_packet));
	print fmt("handled tcp_packet %s", /\{/ in fmt("%s", tcp_packet));
	print fmt("handled udp_contents %s", /\{/ in fmt("%s", udp_contents));
	terminate();
	}
"""


@needs_zeek
@pytest.mark.parametrize("bare", [False, True], ids=["default", "bare"])
def test_the_package_loads_the_native_capture(native, tmp_path, bare):
    """With the plugin the package loads capture-native.zeek, not capture.zeek: no handler
    for new_packet, tcp_packet or udp_contents, and UDP contents are not turned on. ``-b``
    activates no dynamic plugin by itself: naming it on the command line does."""
    probe = tmp_path / "probe.zeek"
    probe.write_text(LOADED)
    cmd = [
        ZEEK,
        *(["-b", "IoTClass::Capture"] if bare else []),
        str(PKG),
        *NO_BRIDGE,
        "misc/loaded-scripts",
        str(probe),
    ]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded = (tmp_path / "loaded_scripts.log").read_text()
    assert "iotcls/capture-native.zeek" in loaded and "iotcls/capture.zeek" not in loaded
    assert "deliver-all F F" in r.stdout
    if bare:  # nothing else in a bare Zeek handles these
        for name in ("new_packet", "tcp_packet", "udp_contents"):
            assert f"handled {name} F" in r.stdout, r.stdout

    # and without the plugin: the script capture, with its per-packet handlers
    r = subprocess.run(
        [ZEEK, "-b", str(PKG), *NO_BRIDGE, "misc/loaded-scripts", str(probe)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(None),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "iotcls/capture.zeek" in (tmp_path / "loaded_scripts.log").read_text()
    assert "deliver-all T T" in r.stdout
    assert "handled new_packet T" in r.stdout and "handled udp_contents T" in r.stdout


# -- parity with the pcap sensor and with the script capture -------------------------------
@needs_zeek
@pytest.mark.parametrize("name", _captures())
def test_native_records_equal_the_sensors_and_the_scripts(name, native, tmp_path):
    """The six captures Zeek 8.2.2's own view was recorded for, devices by MAC: the plugin's
    records, as the bridge receives them, are the pcap sensor's field by field (but Zeek's
    uid and orientation), and the script capture's (all fields but uid)."""
    from test_zeek_scripts import _macs_arg, _zeek_with_bridge

    device, capture = name.split("_", 1)
    pcap = require(sentinel_capture(device, capture))
    mac = _mac_of(device)
    (tmp_path / "bridge").mkdir()
    r, got, _, _ = _zeek_with_bridge(pcap, tmp_path / "bridge", _macs_arg([mac]))
    assert r.returncode == 0, r.stderr
    _same_as_sensor(got, pcap, DeviceSelector.from_lists([mac]))
    _same_as_script(pcap, tmp_path, native, _macs_arg([mac]))


def _sentinel_devices() -> list[str]:
    d = sentinel_dir()
    return (
        sorted(p.name for p in d.iterdir() if (p / "_iotdevice-mac.txt").is_file())
        if d.is_dir()
        else []
    )


@needs_zeek
@pytest.mark.parametrize("device", _sentinel_devices())
def test_native_records_of_each_sentinel_device(device, native, tmp_path):
    """One real capture of each IoT Sentinel device (its first, by name), the device by MAC:
    the plugin's records are the script capture's and the pcap sensor's."""
    pcap = sorted((sentinel_dir() / device).glob("*.pcap"))[0]
    mac = _mac_of(device)
    from test_zeek_scripts import _macs_arg

    got = _same_as_script(pcap, tmp_path, native, _macs_arg([mac]))
    finals = sorted(
        (
            round(r["start"], 3),
            r["remote_ip"],
            r["remote_port"],
            r["proto"],
            r["total_packets"],
            r["total_bytes"],
        )
        for r in got
        if not r["early"]
    )
    assert finals, f"no records of {device} in {pcap.name}"
    sensor = capture_flows(pcap, DeviceSelector.from_lists([mac])).table.records()
    assert finals == sorted(
        (round(r.start, 3), r.remote_ip, r.remote_port, r.proto, r.total_packets, r.total_bytes)
        for r in sensor
    )


@needs_zeek
def test_native_zeek_and_serve_log_what_classify_writes(native, tmp_path, sample):
    """The deployment with the plugin: ``iotcls serve`` and ``zeek -r sample.pcap iotcls``
    log the labels ``iotcls classify`` writes (the script capture's test, run with the
    plugin on ZEEK_PLUGIN_PATH), and Zeek says the native capture is the active one."""
    from test_zeek_scripts import test_zeek_and_iotcls_serve_log_what_classify_writes as e2e

    e2e(tmp_path, sample)
    reporter = (tmp_path / "zeek" / "reporter.log").read_text()
    assert "capture in the native plugin (IoTClass::Capture)" in reporter


@needs_zeek
def test_native_records_of_the_sample_by_mac(native, tmp_path, sample):
    """Several devices by MAC in one capture: 288 records, as the sensor and the script
    capture have them, with windows continued across restarted connections (DNS, mDNS), ICMP
    connections open at the trace's end, IGMP payloads from the raw IP payload and the DHCP
    discovers of eight devices in one 0.0.0.0 connection split by source MAC."""
    from test_zeek_scripts import _macs_arg, _zeek_with_bridge

    (tmp_path / "bridge").mkdir()
    r, got, _, _ = _zeek_with_bridge(sample.pcap, tmp_path / "bridge", _macs_arg(sample.macs))
    assert r.returncode == 0, r.stderr
    assert len(got) == 288
    _same_as_sensor(got, sample.pcap, DeviceSelector.from_lists(sample.macs))
    assert {x.proto for x in got} == {1, 2, 6, 17, 58}
    assert any(x.proto == 2 and any(x.payloads) for x in got)
    dhcp = [x for x in got if x.proto == 17 and x.device_port == 68 and x.device_ip == "0.0.0.0"]
    assert len({x.device_mac for x in dhcp}) > 1
    native_recs = _same_as_script(sample.pcap, tmp_path, native, _macs_arg(sample.macs))
    assert sum(not x["early"] for x in native_recs) == 288
    assert sum(x["early"] for x in native_recs) > 100


@needs_zeek
def test_packed_records_are_the_per_record_ones(native, tmp_path, sample):
    """The native capture's default, packed records published in batches (IoTClass::flows),
    and one FlowRecord event per record (IoTClass::native_batch=0) give the bridge the same
    records, final and early, field by field (but Zeek's uid, random in each run)."""
    from test_zeek_scripts import _macs_arg, _zeek_with_bridge

    seen = {}
    for mode, args in (("packed", ()), ("per-record", ("IoTClass::native_batch=0",))):
        (tmp_path / mode).mkdir()
        early: list = []
        r, got, bridge, _ = _zeek_with_bridge(
            sample.pcap, tmp_path / mode, _macs_arg(sample.macs), *args, early=early
        )
        assert r.returncode == 0, r.stderr
        reporter = (tmp_path / mode / "reporter.log").read_text()
        packed = "flow records packed, one script event per 100" in reporter
        assert packed == (mode == "packed"), reporter
        assert bridge.stats.bad_records == 0
        seen[mode] = tuple(sorted(repr(replace(x, uid="")) for x in recs) for recs in (got, early))
    assert seen["packed"] == seen["per-record"]
    assert len(seen["packed"][0]) == 288 and len(seen["packed"][1]) > 100


@needs_zeek
def test_packed_records_survive_a_killed_bridge(native, tmp_path, sample):
    """The delivery test of test_zeek_delivery.py with the native capture's packed records:
    kept by their packed line, published again in batches to the restarted bridge, every
    one of the 288 records labelled exactly once."""
    from test_zeek_delivery import test_a_killed_bridge_loses_no_record_offline as killed

    killed(tmp_path, sample)
    assert "flow records packed" in (tmp_path / "zeek.err").read_text()


@needs_zeek
def test_packed_records_survive_a_killed_bridge_live(native, tmp_path):
    """The live delivery test of test_zeek_delivery.py (``zeek -i lo``, serve killed under
    traffic and restarted) with the native capture's packed records, kept in the plugin."""
    from test_zeek_delivery import test_a_killed_bridge_loses_no_record_live as killed

    killed(tmp_path)
    assert "flow records packed" in (tmp_path / "zeek" / "zeek.err").read_text()


@needs_zeek
def test_packed_records_wait_for_a_bridge_at_trace_end(native, tmp_path, sample):
    """test_zeek_delivery.py's bridge-gone-at-trace-end test with the plugin's packed
    records: kept in C++, published again to the bridge that comes back."""
    from test_zeek_delivery import test_a_bridge_gone_at_trace_end_is_waited_for as gone

    gone(tmp_path, sample)
    assert "flow records packed" in (tmp_path / "zeek.err").read_text()


@needs_zeek
def test_packed_records_are_spooled_at_stop(native, tmp_path):
    """The stop test of test_zeek_delivery.py (live, SIGTERM with every window open) with
    the native capture: the packed records flushed in zeek_done go to the spool file as
    their lines, the next Zeek reads them back (keys from their fields) and publishes them
    again; every record is labelled once."""
    from test_zeek_delivery import test_zeek_stopped_with_open_windows_loses_nothing as stopped

    stopped(tmp_path)
    first = (tmp_path / "first" / "zeek.err").read_text()
    assert "flow records packed" in first and "written to" in first, first[-2000:]


@needs_zeek
@pytest.mark.parametrize("capture", ["native", "script"])
def test_records_past_unacked_max_are_dropped_and_counted(capture, plugin_dir, tmp_path, sample):
    """No bridge ever comes: Zeek keeps at most IoTClass::unacked_max final records (here 10)
    and drops the oldest past it, counted, warning at the 1st, 10th and 100th dropped; the
    plugin keeps its packed records in C++ as the script capture keeps FlowRecords."""
    from iotcls.testing.live import counts, delivery_line
    from test_zeek_scripts import _macs_arg

    if capture == "script" and _plugin_installed():
        pytest.skip("the plugin is installed in this Zeek's plugin dir: no script capture")
    r = subprocess.run(
        [ZEEK, "-C", "-r", str(sample.pcap), str(PKG), *NO_BRIDGE, _macs_arg(sample.macs)]
        + ["IoTClass::unacked_max=10"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(plugin_dir if capture == "native" else None),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert ("flow records packed" in r.stderr) == (capture == "native"), r.stderr[-2000:]
    c = counts(delivery_line(r.stderr))
    assert c["kept"] == 288 and c["dropped"] == 278 and c["acked"] == 0, c
    for n in (1, 10, 100):
        warning = f"iotcls: {n} flow records unacknowledged by the bridge were dropped "
        assert warning + "(IoTClass::unacked_max=10 kept)" in r.stderr, n


@needs_zeek
def test_native_early_records_are_the_schemas(native, tmp_path, sample):
    """IoTClass::early_flow from the plugin: one per window that has one, each the schema's
    early record of the pcap sensor's final record, as the script capture's are (the
    script capture's test, run with the plugin)."""
    from test_zeek_scripts import check_early_records

    assert "flow records packed" in check_early_records(tmp_path, sample)


@needs_zeek
def test_native_records_by_device_networks(native, tmp_path, sample):
    """Devices by network (and the mirrored records of device-to-device connections)."""
    from test_zeek_scripts import _zeek_with_bridge

    nets = ["10.0.0.0/8", "192.168.0.0/16"]
    arg = "IoTClass::device_nets={" + ",".join(nets) + "}"
    (tmp_path / "bridge").mkdir()
    r, got, _, _ = _zeek_with_bridge(sample.pcap, tmp_path / "bridge", arg)
    assert r.returncode == 0, r.stderr
    _same_as_sensor(got, sample.pcap, DeviceSelector.from_lists(nets=nets))
    recs = _same_as_script(sample.pcap, tmp_path, native, arg)
    sides = {
        (x["device_ip"], x["device_port"], x["remote_ip"], x["remote_port"], x["start"])
        for x in recs
    }
    mirrored = [k for k in sides if (k[2], k[3], k[0], k[1], k[4]) in sides]
    assert mirrored  # device-to-device connections give a record per side
    assert any(x["device_is_orig"] for x in recs) and not all(x["device_is_orig"] for x in recs)


@needs_zeek
def test_native_options_follow_the_script_options(native, tmp_path, sample):
    """Window length, packets and payload bytes come from the script options."""
    from test_zeek_scripts import _macs_arg

    recs = _same_as_script(
        sample.pcap,
        tmp_path,
        native,
        _macs_arg(sample.macs),
        "IoTClass::window_length=10sec",
        "IoTClass::packets=3",
        "IoTClass::payload_bytes=8",
        "IoTClass::dhcp_payload_bytes=16",
    )
    assert len(recs) > 288
    assert max(len(r["sizes"]) for r in recs) == 3
    assert max(len(p) for r in recs for p in r["payloads"]) == 32  # DHCP: 16 bytes, in hex
    assert all(r["last"] - r["start"] < 10 for r in recs)


@needs_zeek
def test_nothing_without_device_endpoints(native, tmp_path, sample):
    """Device networks that match nothing: no records, no capture state."""
    r, recs = _printed_records(
        sample.pcap, tmp_path, native, "IoTClass::device_nets={192.0.2.0/24}"
    )
    assert r.returncode == 0, r.stderr
    assert recs == []


@needs_zeek
def test_device_selection_follows_option_changes(native, tmp_path, sample):
    """Option::set on the options IoTClass::is_device_endpoint reads, while Zeek runs: the
    plugin asks again (it remembers answers only while those options keep their values),
    so both captures select the same connections throughout."""
    from test_zeek_scripts import _macs_arg

    two = ",".join(f'"{m}"' for m in sample.macs[:2])
    change = tmp_path / "change.zeek"
    change.write_text(f"""
global n = 0;
event new_connection(c: connection) &priority=-10
	{{
	++n;
	if ( n == 150 )
		Option::set("IoTClass::device_macs", set({two}));
	if ( n == 400 )
		Option::set("IoTClass::device_nets", set(10.0.0.0/8));
	if ( n == 700 )
		Option::set("Site::local_nets", set(192.168.0.0/16));
	if ( n == 800 )
		Option::set("IoTClass::device_macs", set());
	}}
""")
    recs = _same_as_script(sample.pcap, tmp_path, native, _macs_arg(sample.macs), str(change))
    assert 0 < sum(not x["early"] for x in recs) != 288


@needs_zeek
def test_capture_can_be_switched_off(native, tmp_path, sample):
    """Analyzer::disable_analyzer(Analyzer::ANALYZER_IOTCLASS_CAPTURE): no new capture."""
    from test_zeek_scripts import _macs_arg

    off = "event zeek_init() { Analyzer::disable_analyzer(Analyzer::ANALYZER_IOTCLASS_CAPTURE); }"
    r, recs = _printed_records(sample.pcap, tmp_path, native, _macs_arg(sample.macs), "-e", off)
    assert r.returncode == 0, r.stderr
    assert recs == []


# -- bad input -----------------------------------------------------------------------------
@needs_zeek
def test_a_truncated_pcap_ends_as_zeek_does(native, tmp_path, sample):
    """A capture cut in the middle of a packet: Zeek stops at the cut with a fatal error
    ("truncated dump file") and exits 1 with or without iotcls, running neither
    Pcap::file_done nor zeek_done, so windows open at the cut are never published, by either
    capture. Up to then the plugin publishes the script capture's records, each one as the
    whole capture has it."""
    from test_zeek_scripts import _macs_arg

    data = sample.pcap.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[: len(data) // 2 + 7])
    plain = subprocess.run(
        [ZEEK, "-C", "-r", str(cut)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(None),
        timeout=300,
    )
    assert plain.returncode > 0 and "truncated dump file" in plain.stderr
    recs = _same_as_script(
        cut, tmp_path, native, _macs_arg(sample.macs), returncode=plain.returncode
    )
    (tmp_path / "whole").mkdir()
    _, whole = _printed_records(sample.pcap, tmp_path / "whole", native, _macs_arg(sample.macs))

    def strip(rec):
        return json.dumps({k: v for k, v in rec.items() if k != "uid"}, sort_keys=True)

    assert 100 < len(recs) < len(whole)
    assert {strip(x) for x in recs} <= {strip(x) for _, x in whole}


DEV_MAC = bytes.fromhex("02aa00000001")
DEV2_MAC = bytes.fromhex("02aa00000002")
GW_MAC = bytes.fromhex("020000000001")
T0 = 1_700_000_000


def _csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ip4(
    src: str,
    dst: str,
    proto: int,
    payload: bytes,
    *,
    ident: int = 1,
    frag: int = 0,
    options: bytes = b"",
    total: int | None = None,
) -> bytes:
    ihl = (20 + len(options)) // 4
    h = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        total or 4 * ihl + len(payload),
        ident,
        frag,
        64,
        proto,
        0,
        bytes(map(int, src.split("."))),
        bytes(map(int, dst.split("."))),
    )
    h += options
    h = h[:10] + struct.pack("!H", _csum(h)) + h[12:]
    return h + payload


def _ip6(src: str, dst: str, nh: int, payload: bytes) -> bytes:
    import ipaddress

    return (
        struct.pack(
            "!IHBB16s16s",
            6 << 28,
            len(payload),
            nh,
            64,
            ipaddress.IPv6Address(src).packed,
            ipaddress.IPv6Address(dst).packed,
        )
        + payload
    )


def _udp(sp: int, dp: int, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("!HHHH", sp, dp, length or 8 + len(data), 0) + data


def _tcp(
    sp: int, dp: int, flags: int, data: bytes = b"", seq: int = 1000, ack: int = 0, off: int = 5
) -> bytes:
    return struct.pack("!HHIIBBHHH", sp, dp, seq, ack, off << 4, flags, 65535, 0, 0) + data


def _eth(src: bytes, dst: bytes, l3: bytes, v6: bool = False) -> bytes:
    return dst + src + (b"\x86\xdd" if v6 else b"\x08\x00") + l3


def _write_pcap(path: Path, frames: list[tuple[float, bytes, int | None]]) -> None:
    """Frames: (time, bytes, captured length or None for all)."""
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for t, frame, cap in frames:
            keep = frame[: cap if cap is not None else len(frame)]
            f.write(struct.pack("<IIII", int(t), round((t - int(t)) * 1e6), len(keep), len(frame)))
            f.write(keep)


def _malformed_pcap(path: Path, skipped: bool = False) -> None:
    """A device (10.0.0.5, 02:aa:00:00:00:01) whose traffic has what real links have.
    *skipped*: also packets Zeek's transport analyzers skip (a bad TCP data offset, ICMP cut
    by the snap length) though new_packet reports them."""
    dev, gw, rem = "10.0.0.5", "10.0.0.1", "93.184.216.34"

    def e(ip: bytes, up: bool = True) -> bytes:
        return _eth(DEV_MAC, GW_MAC, ip) if up else _eth(GW_MAC, DEV_MAC, ip)

    def icmp(ty: int, data: bytes) -> bytes:
        return bytes([ty, 0]) + struct.pack("!H", 0) + b"\0\x01\0\x01" + data

    t = T0 + 0.5
    frames = [
        # a UDP datagram whose length field disagrees with the IP length, both ways
        (t, e(_ip4(dev, rem, 17, _udp(40000, 9999, b"x" * 30, length=100))), None),
        (t + 0.1, e(_ip4(rem, dev, 17, _udp(9999, 40000, b"y" * 30, length=12)), False), None),
        # TCP: a handshake, data cut by the snap length, more data
        (t + 1, e(_tcp_ip(dev, rem, 40001, 80, 0x02)), None),
        (t + 1.1, e(_tcp_ip(rem, dev, 80, 40001, 0x12, seq=5000, ack=1001), False), None),
        (
            t + 1.2,
            e(_tcp_ip(dev, rem, 40001, 80, 0x18, b"GET / HTTP/1.1\r\n" * 10, seq=1001, ack=5001)),
            90,
        ),
        (
            t + 1.4,
            e(
                _tcp_ip(rem, dev, 80, 40001, 0x18, b"HTTP/1.1 200 OK\r\n", seq=5001, ack=1161),
                False,
            ),
            None,
        ),
        # a whole ICMP echo and its reply
        (t + 2.1, e(_ip4(dev, rem, 1, icmp(8, b"p" * 100))), None),
        (t + 2.2, e(_ip4(rem, dev, 1, icmp(0, b"p" * 100)), False), None),
        # IPv4 options; a fragmented UDP datagram
        (t + 3, e(_ip4(dev, rem, 17, _udp(40002, 7777, b"opt"), options=b"\x94\x04\0\0")), None),
        (t + 3.1, e(_ip4(dev, rem, 17, _BIG[:1480], ident=77, frag=0x2000)), None),
        (t + 3.2, e(_ip4(dev, rem, 17, _BIG[1480:], ident=77, frag=1480 // 8)), None),
        # IGMP, and IGMP cut by the snap length
        (t + 4, e(_ip4(dev, "224.0.0.22", 2, b"\x22\0\xf9\x01" + b"\0" * 12)), None),
        (t + 4.1, e(_ip4(dev, "224.0.0.22", 2, b"\x22\0\xf9\x01" + b"\x07" * 40)), 50),
        # IPv6: UDP after a hop-by-hop header; an unknown protocol after one
        (
            t + 5,
            _eth(
                DEV_MAC, GW_MAC, _ip6(_DEV6, _REM6, 0, _hbh(17) + _udp(40004, 5000, b"six")), True
            ),
            None,
        ),
        (
            t + 5.1,
            _eth(DEV_MAC, GW_MAC, _ip6(_DEV6, _REM6, 0, _hbh(253) + b"experimental"), True),
            None,
        ),
        # a packet stamped earlier than the one before it
        (t + 5.05, e(_ip4(dev, rem, 17, _udp(40000, 9999, b"late"))), None),
        # a connection that starts with the responder's SYN-ACK, then the originator's ACK
        (t + 6, e(_tcp_ip(rem, dev, 443, 40005, 0x12, seq=1, ack=1), False), None),
        (t + 6.1, e(_tcp_ip(dev, rem, 40005, 443, 0x10, seq=1, ack=2)), None),
        (t + 6.2, e(_tcp_ip(dev, rem, 40005, 443, 0x18, b"hello", seq=1, ack=2)), None),
        # mDNS-port DNS whose first message is a response: Zeek flips the connection
        (t + 7, e(_ip4(gw, dev, 17, _udp(5353, 5353, _DNS_RESPONSE)), False), None),
        (t + 7.1, e(_ip4(dev, gw, 17, _udp(5353, 5353, _DNS_RESPONSE))), None),
        # another device after the first one's windows ended, then the first one again
        (t + 70, _eth(DEV2_MAC, GW_MAC, _ip4("10.0.0.6", rem, 17, _udp(50000, 53, b"q"))), None),
        (t + 71, e(_ip4(dev, rem, 17, _udp(40000, 9999, b"after"))), None),
    ]
    if skipped:
        frames += [
            (
                t + 72,
                e(_tcp_ip(dev, rem, 40001, 80, 0x18, b"abc", seq=1161, ack=5001, off=15)),
                None,
            ),
            (t + 73, e(_ip4(dev, rem, 1, icmp(8, b"q" * 100))), 60),
        ]
    _write_pcap(path, frames)


_BIG = _udp(40003, 7778, bytes(range(256)) * 8)
_DEV6, _REM6 = "fe80::aa:1", "2001:db8::1"
_DNS_RESPONSE = (
    struct.pack("!HHHHHH", 0, 0x8400, 0, 1, 0, 0)
    + b"\x04host\x05local\0\0\x01\x80\x01"
    + struct.pack("!IH", 120, 4)
    + bytes([10, 0, 0, 7])
)


def _hbh(nh: int) -> bytes:
    """An IPv6 hop-by-hop options header (router alert, padding) before protocol *nh*."""
    return bytes([nh, 0]) + b"\x05\x02\0\0\x01\0"


def _tcp_ip(src, dst, sp, dp, flags, data=b"", seq=1000, ack=0, off=5):
    return _ip4(src, dst, 6, _tcp(sp, dp, flags, data, seq, ack, off))


@needs_zeek
def test_malformed_packets(native, tmp_path):
    """Length fields that disagree, snap-length cuts, IPv4 options, fragments, IGMP, IPv6
    extension headers, time going back, connections Zeek flips: the plugin publishes the
    script capture's records."""
    pcap = tmp_path / "malformed.pcap"
    _malformed_pcap(pcap)
    macs = 'IoTClass::device_macs={"02:aa:00:00:00:01","02:aa:00:00:00:02"}'
    recs = _same_as_script(pcap, tmp_path, native, macs)
    assert {r["proto"] for r in recs} == {1, 2, 6, 17, 253}


@needs_zeek
@pytest.mark.xfail(
    ZEEK is not None and zeek_testing.version(ZEEK) < (8, 1, 0),
    strict=True,
    reason="Zeek 8.0 has no tap analyzers: packets its transport analyzers skip are not counted",
)
@pytest.mark.parametrize("checksums", [False, True], ids=["-C", "checksums"])
def test_packets_the_transport_analyzers_skip(native, tmp_path, checksums):
    """Packets that raise new_packet but that Zeek's transport analyzers skip: a bad TCP
    data offset, ICMP cut by the snap length, and without -C every packet with a bad
    checksum (these carry none). The script capture counts them, with no payload; so does
    the plugin on Zeek 8.1+, whose tap analyzers see them. On 8.0 only child analyzers
    exist, which never see them (zeek-plugin/README.md)."""
    pcap = tmp_path / "skipped.pcap"
    _malformed_pcap(pcap, skipped=True)
    macs = 'IoTClass::device_macs={"02:aa:00:00:00:01","02:aa:00:00:00:02"}'
    _same_as_script(pcap, tmp_path, native, macs, checksums=checksums)


# -- iotcls zeek-install builds and installs it --------------------------------------------
def _bin_with(tmp_path: Path, *names: str) -> Path:
    """A PATH directory holding links to these programs only (what the build may find)."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name in names:
        found = shutil.which(name)
        if found:
            (d / name).symlink_to(found)
    return d


def test_zeek_install_without_zeek_config_says_so(tmp_path, capsys, monkeypatch):
    """No Zeek development files at all: one line naming zeek-config and the way out, and
    nothing installed."""
    from iotcls import cli

    monkeypatch.setenv("PATH", str(_bin_with(tmp_path)))
    site = tmp_path / "site"
    site.mkdir()
    assert cli.main(["zeek-install", "--zeek-site", str(site)]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err == (
        "iotcls zeek-install: error: cannot build the native capture plugin: no "
        "zeek-config on PATH (Zeek's bin directory, or --zeek-config PATH); or pass "
        "--no-plugin to keep the script capture (per-packet script events: slower)"
    )
    assert list(site.iterdir()) == []


@needs_zeek
@pytest.mark.parametrize("missing", ["cmake", "compiler", "headers"])
def test_zeek_install_names_what_the_build_lacks(missing, tmp_path, capsys, monkeypatch):
    """A real zeek-config with one prerequisite taken away: the error names it, before
    anything is built or installed."""
    from iotcls import cli

    zeek_config = _zeek_config()
    assert zeek_config, "a zeek without zeek-config"
    tools = {
        "cmake": ["make", "c++", "sh", "sed", "cat"],
        "compiler": ["cmake", "make", "sh", "sed", "cat"],
        "headers": ["cmake", "make", "c++", "sh", "sed", "cat"],
    }[missing]
    monkeypatch.setenv("PATH", str(_bin_with(tmp_path, *tools)))
    monkeypatch.delenv("CXX", raising=False)
    if missing == "headers":  # the same zeek-config, pointing at an include dir without Zeek's
        (tmp_path / "include").mkdir()
        lines = Path(zeek_config).read_text().splitlines(keepends=True)
        fake = tmp_path / "zeek-config"
        fake.write_text(
            "".join(
                f'include_dir="{tmp_path / "include"}"\n' if ln.startswith("include_dir=") else ln
                for ln in lines
            )
        )
        fake.chmod(0o755)
        zeek_config = str(fake)
    site = tmp_path / "site"
    site.mkdir()
    args = [
        "zeek-install",
        "--zeek-site",
        str(site),
        "--zeek-config",
        zeek_config,
        "--plugin-dir",
        str(tmp_path / "plugins"),
    ]
    assert cli.main(args) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("iotcls zeek-install: error: cannot build the native capture plugin: ")
    assert err.endswith(
        "or pass --no-plugin to keep the script capture (per-packet script events: slower)"
    )
    expect = {
        "cmake": "no cmake on PATH",
        "compiler": "no C++ compiler",
        "headers": "headers are missing (no zeek/zeek-config.h",
    }[missing]
    assert expect in err
    assert list(site.iterdir()) == [] and not (tmp_path / "plugins").exists()


@needs_zeek
def test_zeek_install_builds_and_installs_the_plugin(tmp_path, capsys, sample):
    """The whole install for a real Zeek: scripts in the site dir, the plugin built with its
    zeek-config and unpacked in the plugin dir; that Zeek then lists it, runs the package with
    the native capture and says so once; a second install replaces its own plugin."""
    from iotcls import cli

    site, plugins = tmp_path / "site", tmp_path / "plugins"
    site.mkdir()
    args = [
        "zeek-install",
        "--zeek-site",
        str(site),
        "--zeek-config",
        _zeek_config(),
        "--plugin-dir",
        str(plugins),
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert (
        f"installed the native capture plugin IoTClass::Capture in {plugins / 'IoTClass_Capture'}\n"
        in out
    )
    assert (
        plugins / "IoTClass_Capture" / "__zeek_plugin__"
    ).read_text().strip() == "IoTClass::Capture"
    assert (site / "iotcls" / "capture-native.zeek").is_file()

    zeekpath = os.environ.get("ZEEKPATH") or zeek_testing.search_path(ZEEK)
    env = {**_env(plugins), "ZEEKPATH": f"{site}:{zeekpath}"}
    from test_zeek_scripts import _macs_arg

    r = subprocess.run(
        [ZEEK, "-C", "-r", str(sample.pcap), "iotcls", *NO_BRIDGE, _macs_arg(sample.macs)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    reporter = (tmp_path / "reporter.log").read_text()
    assert reporter.count("iotcls: capture in the native plugin (IoTClass::Capture)") == 1
    assert "capture in script land" not in reporter

    assert cli.main(args) == 0  # again: its own plugin is replaced
    assert "installed the native capture plugin" in capsys.readouterr().out


@needs_zeek
@pytest.mark.parametrize("publish", [False, True], ids=["default", "publish_without_bridge"])
@pytest.mark.parametrize("capture", ["native", "script"])
def test_nothing_is_published_until_a_bridge_says_hello(
    capture, publish, plugin_dir, tmp_path, sample
):
    """A WebSocket client subscribed to the records topic that never says hello: a standalone
    Zeek keeps the records for a bridge and turns none of them into a Broker message (the
    biggest part of what capture costs it; the plugin does not even pack early records, which
    are kept nowhere), unless IoTClass::publish_without_bridge asks it to: then the client
    gets the final records, packed or not, and the early ones."""
    from conftest import free_port
    from iotcls.bridge import records as rc
    from test_zeek_scripts import _macs_arg

    if capture == "script" and _plugin_installed():
        pytest.skip("the plugin is installed in this Zeek's plugin dir: no script capture")
    port = free_port()
    finals: list[FlowRecord] = []
    earlies: list[FlowRecord] = []
    events: list[str] = []
    subscribed = threading.Event()

    def listener():
        ws, _ = zeek_testing.websocket_subscriber(port, ["zeek/iotcls/flows"])
        with ws:
            subscribed.set()
            try:
                for frame in ws:
                    obj = json.loads(frame)
                    events.append(rc.event_name(obj) or "")
                    if events[-1] == rc.FLOW_EVENT:
                        finals.append(rc.flow_record(obj))
                    if events[-1] == rc.EARLY_FLOW_EVENT:
                        earlies.append(rc.early_flow_record(obj))
                    for line in rc.packed_records(obj) if events[-1] == rc.FLOWS_EVENT else []:
                        rec, early = rc.packed_flow_record(line)
                        (earlies if early else finals).append(rec)
            except Exception:  # Zeek closes the connection when it terminates
                pass

    t = threading.Thread(target=listener, daemon=True)
    t.start()
    r = subprocess.run(
        [ZEEK, "-C", "-r", str(sample.pcap), str(PKG), _macs_arg(sample.macs)]
        + [f"IoTClass::websocket_port={port}/tcp", "IoTClass::hold_timeout=5sec"]
        + [f"IoTClass::publish_without_bridge={'T' if publish else 'F'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(plugin_dir if capture == "native" else None),
        timeout=120,
    )
    t.join(10)
    assert r.returncode == 0, r.stderr
    assert subscribed.is_set(), "the client never subscribed"
    assert ("flow records packed" in r.stderr) == (capture == "native"), r.stderr[-2000:]
    assert "iotcls: no bridge connected, 288 flow records of" in r.stderr
    if publish:
        # Zeek terminates at the trace's end without waiting for a subscriber that is no
        # bridge: what the flush at the end publishes may not reach it
        assert len({(f.uid, f.start, f.device_is_orig) for f in finals}) == len(finals) >= 100
        assert earlies, "no early record was published"
    else:
        assert finals == earlies == [], events
