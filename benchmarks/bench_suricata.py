"""Suricata's packets/s with and without the iotcls Lua output script, on the same captures.

Runs ``suricata -r DIR --runmode single -k none`` (no rules, no other outputs) over a
directory of IoT Sentinel captures three ways: without the script, with it and a reader on
the socket (what ``iotcls serve`` does), and with it and no reader (records dropped). Each
is run ``--repeat`` times; the best run counts (the machine is shared). Packets/s is the
packet count Suricata reports over the processing time it reports ("time elapsed").

    python benchmarks/bench_suricata.py [--captures N] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data/iot-sentinel")


def run(tmp: Path, pcaps: Path, lua: bool, sock: Path | None) -> tuple[int, float, str]:
    outputs = ""
    if lua:
        conf = tmp / "iotcls-suricata.conf"
        conf.write_text(f"socket = {sock}\nlocal_nets = 10.0.0.0/8,192.168.0.0/16\n")
        outputs = (
            f"outputs:\n  - lua:\n      enabled: yes\n      scripts-dir: {ROOT / 'suricata'}\n"
            "      scripts:\n        - iotcls.lua\n"
        )
    yaml = tmp / "suricata.yaml"
    yaml.write_text("%YAML 1.1\n---\n" + outputs)
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "IOTCLS_CONFIG": str(tmp / "iotcls-suricata.conf")}
    r = subprocess.run(
        [
            "suricata",
            "-c",
            str(yaml),
            "-r",
            str(pcaps),
            "-l",
            str(logs),
            "-k",
            "none",
            "--runmode",
            "single",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    out = r.stdout + r.stderr
    pk = re.search(r"read \d+ files?, (\d+) packets", out)
    el = re.search(r"time elapsed ([\d.]+)s", out)
    if r.returncode != 0 or not pk or not el:
        sys.exit(f"suricata failed:\n{out}")
    info = re.search(r"iotcls: (\d+) packets, (\d+) records sent, (\d+) dropped", out)
    return int(pk.group(1)), float(el.group(1)), info.group(0) if info else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captures", type=int, default=120, help="captures to read (largest first)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not shutil.which("suricata"):
        sys.exit("suricata is not installed")
    pcaps = sorted(DATA.glob("*/*.pcap"), key=lambda p: -p.stat().st_size)[: args.captures]
    ver = subprocess.run(["suricata", "-V"], capture_output=True, text=True).stdout.strip()
    print(
        f"{ver}; {platform.machine()}, {os.cpu_count()} CPUs ({platform.node()}); "
        f"{len(pcaps)} IoT Sentinel captures, {sum(p.stat().st_size for p in pcaps) / 1e6:.1f} MB"
    )
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        d = tmp / "pcaps"
        d.mkdir()
        for i, p in enumerate(pcaps):
            shutil.copyfile(p, d / f"{i:04d}.pcap")  # pcap-file mode skips symlinks
        sock = tmp / "bridge.sock"
        rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        rx.bind(str(sock))
        rx.settimeout(0.1)
        stop = threading.Event()
        got = [0, 0]

        def reader() -> None:
            while not stop.is_set():
                try:
                    got[0] += rx.recv(65536).count(b"\n") + 1
                except TimeoutError:
                    pass

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        cases = [
            ("no script", False, None),
            ("script, bridge reading", True, sock),
            ("script, no bridge", True, tmp / "absent.sock"),
        ]
        best = {}
        for _ in range(args.repeat):
            for name, lua, s in cases:
                n, el, info = run(tmp, d, lua, s)
                if name not in best or el < best[name][1]:
                    best[name] = (n, el, info)
        stop.set()
        th.join()
    base = best["no script"][0] / best["no script"][1]
    for name, (n, el, info) in best.items():
        pps = n / el
        print(
            f"{name:24s} {n:8d} packets in {el:6.3f} s: {pps:10,.0f} packets/s "
            f"({pps / base:5.2f}x)  {info}"
        )


if __name__ == "__main__":
    main()
