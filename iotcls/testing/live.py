"""Real Zeek, real ``iotcls serve``, real traffic: the pieces of the delivery tests
(tests/test_zeek_delivery.py) and of benchmarks/bench_delivery.py. ``iotcls serve`` in its
own process group, restartable and killable; UDP "devices" on the loopback interface for a
live ``zeek -i lo``; Zeek's logs and its delivery summary line, read back."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "zeek-scripts" / "iotcls"

# Loaded beside iotcls: every final record Zeek makes, one line each (uid, device, start,
# packets), some more than once: the native capture's packed records as they leave, and, as a
# bridge says hello, those it kept while none listened (a flow_policy handler would make it
# raise FlowRecords one by one instead), else through the package's flow_policy hook.
PUBLISHED = """
global iotcls_published = open(getenv("IOTCLS_PUBLISHED"));
@ifdef ( IoTClass::native_flows )
function iotcls_print(line: string)
    {
    local f = split_string(line, /\t/);
    print iotcls_published, fmt("%s %s %s %s %s", f[15], f[1], f[2], f[7], f[10]);
    }
event IoTClass::native_flows(recs: vector of string, keys: vector of string, finals: count)
    &priority=-100
    {
    for ( i in recs )
        {
        if ( keys[i] != "" )
            iotcls_print(recs[i]);
        }
    }
event IoTClass::hello(bridge: string, endpoint: string) &priority=100
    {
    local kept = IoTClass::__native_unacked();
    for ( i in kept )
        iotcls_print(kept[i]);
    }
@else
hook IoTClass::flow_policy(rec: IoTClass::FlowRecord, early: bool) &priority=-100
    {
    if ( ! early )
        print iotcls_published, fmt("%s %s %s %.6f %d", rec$uid, rec$device_mac, rec$device_ip,
            rec$start, rec$total_packets);
    }
@endif
event zeek_init() { set_buf(iotcls_published, F); }
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float, what: str, procs=()) -> None:
    """Polls *cond* until true; fails naming *what* after *timeout* s, or when one of *procs*
    has exited."""
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, f"{what}: {p.args[0]} exited with {p.returncode}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def log_rows(path: Path) -> list[dict]:
    """A Zeek ASCII log's rows as dicts (column name -> field); none when it is absent."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    names = next((ln.split("\t")[1:] for ln in lines if ln.startswith("#fields")), [])
    return [dict(zip(names, ln.split("\t"))) for ln in lines if ln and not ln.startswith("#")]


def label_keys(rows: list[dict]) -> list[tuple]:
    """How a label names its record: uid, device MAC ("" when unset), device IP, start."""
    return [
        (
            r["uid"],
            "" if r["device_mac"] == "-" else r["device_mac"],
            r["device_ip"],
            f"{float(r['ts']):.6f}",
        )
        for r in rows
    ]


class Serve:
    """``iotcls serve`` in its own process group (a kill takes its scorers too, as systemd
    kills a unit's cgroup), every label logged, restartable."""

    def __init__(self, tmp: Path, ws_url: str, scorers: dict | None = None, **zeek: str):
        self.cfg, self.err = tmp / "serve.yaml", tmp / "serve.err"
        self.cfg.write_text(
            json.dumps(
                {
                    "zeek": {"url": ws_url, "reconnect_max_s": 0.3, **zeek},
                    "bridge": {"bind": ["tcp://127.0.0.1:*"]},
                    "scorers": {"count": 1, "device": "cpu", "batch_size": 16, **(scorers or {})},
                    "log": {"policy": "all"},
                }
            )
        )
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def start(self) -> Serve:
        self.runs += 1
        with self.err.open("a") as err:
            err.write(f"==== run {self.runs}\n")
            err.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "iotcls", "serve", "--config", str(self.cfg)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        return self

    def ready(self, timeout: float = 120) -> None:
        """Waits for this run's scorer to connect."""
        wait_for(
            lambda: self.text().split("==== run")[-1].count("connected: model") >= 1,
            timeout,
            "the scorer",
            [self.proc],
        )

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # any scorer left behind
            except ProcessLookupError:
                pass

    def text(self) -> str:
        return self.err.read_text() if self.err.exists() else ""


def connects(err: Path) -> int:
    """How many times a bridge said hello to the Zeek writing *err* (its hello line names the
    endpoint; the line that ends an offline hold does not count)."""
    return (
        len(re.findall(r"iotcls: bridge \S+ connected \(", err.read_text())) if err.exists() else 0
    )


def delivery_line(err: str) -> str:
    m = re.findall(r"iotcls: delivery: .*", err)
    assert m, err[-3000:]
    return m[-1]


def counts(line: str) -> dict[str, int]:
    """The figures of Zeek's delivery summary line."""
    pat = (
        r"(\d+) flow records kept until the bridge was done with them \((\d+) published "
        r"again\), (\d+) acknowledged, (\d+) shed by the bridge, (\d+) dropped past "
        r"IoTClass::unacked_max(?:, (\d+) written to)?"
    )
    m = re.search(pat, line)
    assert m, line
    names = ("kept", "again", "acked", "shed", "dropped", "spooled")
    return {k: int(v or 0) for k, v in zip(names, m.groups())}


class Traffic:
    """UDP from *n* sockets of 127.0.0.2 (the devices) to 127.0.0.1:*port*, a packet per
    socket every *every_s*; and a tick from 127.0.0.3 (no device) that keeps Zeek's network
    time moving when the devices are silent."""

    def __init__(self, port: int, n: int, every_s: float):
        self.port, self.n, self.every_s = port, n, every_s
        self.socks = []
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.2", 0))
            self.socks.append(s)
        self.tick = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tick.bind(("127.0.0.3", 0))
        self.sent = 0
        self._stop = threading.Event()
        self._ticking = threading.Event()
        self._thread = threading.Thread(target=self._ticker, daemon=True)
        self._thread.start()

    def _ticker(self) -> None:
        while not self._stop.is_set():
            if self._ticking.is_set():
                self.tick.sendto(b"tick", ("127.0.0.1", self.port))
            time.sleep(0.1)

    def send_for(self, seconds: float, during=None) -> None:
        """Every socket sends, for *seconds*; *during* (t, fn): call fn at t seconds."""
        t0 = time.monotonic()
        done = False
        while time.monotonic() - t0 < seconds:
            for i, s in enumerate(self.socks):
                s.sendto(b"dev %d %d" % (i, self.sent), ("127.0.0.1", self.port))
                self.sent += 1
            if during and not done and time.monotonic() - t0 >= during[0]:
                during[1]()
                done = True
            time.sleep(self.every_s)

    def ticking(self, on: bool) -> None:
        (self._ticking.set if on else self._ticking.clear)()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in [*self.socks, self.tick]:
            s.close()


def live_zeek(
    zeek: str, cwd: Path, port: int, ws: int, published: Path, *args: str
) -> subprocess.Popen:
    """``zeek -i lo`` on UDP to *port* in *cwd* (stderr: ``zeek.err``), 127.0.0.2 the
    devices, early records off, every final record it publishes written to *published*."""
    cwd.mkdir(exist_ok=True)
    (cwd / "published.zeek").write_text(PUBLISHED)
    env = dict(os.environ, IOTCLS_PUBLISHED=str(published))
    return subprocess.Popen(
        [
            zeek,
            "-C",
            "-i",
            "lo",
            "-f",
            f"udp and dst port {port}",
            str(PKG),
            "published.zeek",
            f"IoTClass::websocket_port={ws}/tcp",
            "IoTClass::device_nets={127.0.0.2/32}",
            "IoTClass::early_records=F",
            *args,
        ],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(cwd / "zeek.err").open("w"),
    )


def published_keys(path: Path) -> dict[tuple, int]:
    """What the PUBLISHED script wrote: record key -> packets."""
    out = {}
    for ln in path.read_text().splitlines():
        uid, mac, ip, start, pkts = ln.split(" ")
        out[(uid, mac, ip, start)] = int(pkts)
    return out
