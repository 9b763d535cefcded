"""``iotcls demo``: the README's first command. It writes a synthetic home network itself,
classifies it through the same pipeline as ``classify``, and writes the log and the report.
Also: nothing third-party is tracked in the repository."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from iotcls.demo import PROFILES, write_demo_pcap
from iotcls.flows import DeviceSelector, capture_flows
from iotcls.logread import read_logs
from iotcls.logschema import FIELD_NAMES

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = subprocess.run(
        [sys.executable, "-m", "iotcls", "demo", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out, r


@pytest.mark.e2e
def test_demo_writes_its_capture_log_and_report(demo_run):
    out, r = demo_run
    assert r.returncode == 0, r.stderr
    assert "SYNTHETIC capture" in r.stderr.splitlines()[0]
    rows = read_logs([out / "iot_class.log"])
    macs = {row["device_mac"] for row in rows}
    assert len(macs) == len(PROFILES)
    # every device's first label is reported as it comes out, with its trust decision
    stream = [ln for ln in r.stderr.splitlines() if ln.startswith("  +")]
    assert {re.search(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", ln).group(0) for ln in stream} == macs
    assert all(("untrusted (" in ln) != ln.rstrip().endswith(" trusted") for ln in stream)
    head = (out / "iot_class.log").read_text().splitlines()
    assert head[6] == "#fields\t" + "\t".join(FIELD_NAMES)
    html = (out / "report.html").read_text()
    assert all(m in html for m in macs)
    summary = r.stdout.splitlines()
    assert summary[0].split()[:3] == ["device", "ip", "label"] and len(summary) == 1 + len(macs)


def test_demo_capture_is_what_its_profiles_say(tmp_path):
    """Each device joins with DHCP (naming itself), resolves names, keeps its sessions; the
    same seed writes the same bytes."""
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    net = write_demo_pcap(a)
    write_demo_pcap(b)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    t = capture_flows(a, DeviceSelector.from_lists([d.mac for d in net.devices])).table
    for d in net.devices:
        mine = t.take(t.device_mac.astype(str) == d.mac)
        ports = set(mine.remote_port.tolist())
        assert 67 in ports and 53 in ports, d.profile.kind
        assert {s.port for s in d.profile.sessions} <= ports, d.profile.kind
        assert float(mine.start.min()) == pytest.approx(d.joins_at, abs=1e-3)


@pytest.mark.e2e
def test_demo_refuses_a_bad_duration(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "iotcls", "demo", "-o", str(tmp_path), "--duration", "-5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "iotcls demo: error: --duration must be a positive number of seconds, not -5.0"
    ]


def test_no_capture_or_vendored_schema_is_tracked():
    """Tests write the captures they need at run time; third-party data stays in ../shared."""
    r = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"not a git checkout: {ROOT}")
    files = r.stdout.splitlines()
    assert files, "git ls-files listed nothing"
    bad = [
        f
        for f in files
        if f.lower().endswith((".pcap", ".pcapng", ".cap", ".dmp"))
        or "compose-spec" in f
        or f.startswith("tests/fixtures/")
    ]
    assert not bad, f"third-party files tracked: {bad}"
