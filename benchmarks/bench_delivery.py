"""Records lost when the bridge is killed under load: a live ``zeek -i lo`` beside ``iotcls
serve``, UDP "devices" on the loopback interface (127.0.0.2) making flow records at a steady
rate (one record per flow per window), the service killed with ``kill -9`` (its scorers with
it) mid-stream and restarted; then the traffic ends, the flows end, and Zeek is stopped with
SIGTERM. Counted: records Zeek published (its flow_policy hook writes each), labels in
iot_class.log (``log.policy: all``), records published again, duplicates, and what Zeek says
it did with them (its delivery line).

    sudo python benchmarks/bench_delivery.py [--flows 200] [--window 1] [--seconds 30]
        [--kill-at 10] [--zeek ZEEK]

Records per second are about flows / window. Needs root (capture on ``lo``) and a zeek
(``$ZEEK_HOME/bin``, else ``PATH``). Target (issue "Hardening"): 0 records lost, 0 labelled
twice.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from iotcls.testing import live  # noqa: E402
from iotcls.testing import zeek as zk  # noqa: E402


def run(
    work: Path, zeek: str, flows: int, window: float, seconds: float, kill_at: float, explain: str
) -> dict:
    port, ws = live.free_port(), live.free_port()
    serve = live.Serve(
        work,
        f"ws://127.0.0.1:{ws}/v1/messages/json",
        scorers={"batch_size": 256, "explain": explain},
    ).start()
    zdir, pub = work / "zeek", work / "published.txt"
    z = live.live_zeek(
        zeek,
        zdir,
        port,
        ws,
        pub,
        f"IoTClass::window_length={window}sec",
        f"udp_inactivity_timeout={max(2.0, window + 1):.1f}sec",
    )
    zerr = zdir / "zeek.err"
    traffic = live.Traffic(port, flows, window / 5)
    down_s = 0.0
    try:
        live.wait_for(
            lambda: live.connects(zerr) >= 1 and "listening on lo" in zerr.read_text(),
            180,
            "Zeek and the bridge",
            [z],
        )
        serve.ready(180)
        traffic.ticking(True)
        killed = []

        def kill_and_restart():
            killed.append(time.monotonic())
            serve.kill()
            serve.start()

        t0 = time.monotonic()
        traffic.send_for(seconds, during=(kill_at, kill_and_restart))
        live.wait_for(lambda: live.connects(zerr) >= 2, 180, "the restarted bridge", [z])
        down_s = time.monotonic() - killed[0] if killed else 0.0
        down_s = min(down_s, time.monotonic() - t0)
        time.sleep(2 * window + 3)  # the flows end, their last windows end
        n = len(live.published_keys(pub))
        live.wait_for(
            lambda: len(live.log_rows(zdir / "iot_class.log")) >= n, 300, "the labels", [z]
        )
    finally:
        traffic.close()
        if z.poll() is None:
            z.send_signal(signal.SIGTERM)
        z.wait(120)
        serve.stop()
    published = live.published_keys(pub)
    keys = live.label_keys(live.log_rows(zdir / "iot_class.log"))
    c = live.counts(live.delivery_line(zerr.read_text()))
    return {
        "zeek": ".".join(map(str, zk.version(zeek))),
        "flows": flows,
        "window_s": window,
        "seconds": seconds,
        "packets_sent": traffic.sent,
        "packets_in_records": sum(published.values()),
        "records_published": len(published),
        "labels": len(keys),
        "labelled_twice": len(keys) - len(set(keys)),
        "lost": len(set(published) - set(keys)),
        "published_again": c["again"],
        "acknowledged": c["acked"],
        "shed": c["shed"],
        "dropped_past_cap": c["dropped"],
        "spooled_at_stop": c["spooled"],
        "bridge_restart_s": round(serve_restart_s(serve), 1),
    }


def serve_restart_s(serve: live.Serve) -> float:
    """Seconds from the second run's start to its connection to Zeek (serve's log times)."""
    text = serve.text().split("==== run 2")[-1]
    stamps = [
        time.mktime(time.strptime(ln[:19], "%Y-%m-%d %H:%M:%S"))
        for ln in text.splitlines()
        if ln[:4].isdigit()
    ]
    conn = [ln for ln in text.splitlines() if "connected to Zeek" in ln]
    if not stamps or not conn:
        return float("nan")
    return time.mktime(time.strptime(conn[0][:19], "%Y-%m-%d %H:%M:%S")) - stamps[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=200, help="device flows (UDP sockets)")
    ap.add_argument("--window", type=float, default=1.0, help="IoTClass::window_length, s")
    ap.add_argument("--seconds", type=float, default=30.0, help="seconds of traffic")
    ap.add_argument("--kill-at", type=float, default=10.0, help="kill -9 the bridge after this")
    ap.add_argument("--explain", default="none", help="scorers.explain (none: cheapest)")
    ap.add_argument("--zeek", default=zk.find_zeek(), help="zeek binary")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    a = ap.parse_args()
    if os.geteuid() != 0 or not a.zeek:
        print("needs root (capture on lo) and a zeek: not run")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        res = run(Path(tmp), a.zeek, a.flows, a.window, a.seconds, a.kill_at, a.explain)
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>20}: {v}")
    return 0 if res["lost"] == res["labelled_twice"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
