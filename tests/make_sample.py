"""Write the bundled sample capture, iotcls/data/sample.pcap, and its device list.

One setup capture of each of a few IoT Sentinel devices, each shifted in time to start a few
seconds after the previous one, merged by time into one classic pcap: a small stand-in for a
home network where several devices are set up at once. Deterministic; rerun to regenerate:

    python tests/make_sample.py [--data ../shared/data/iot-sentinel] [--out iotcls/data]
"""

from __future__ import annotations

import argparse
import csv
import heapq
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "iot-sentinel"
# (directory, capture): the first setup capture of each device
CAPTURES = (
    ("Aria", "Setup-A-1-STA"),
    ("D-LinkCam", "Setup-B-1-STA"),
    ("EdimaxPlug1101W", "Setup-A-1-STA"),
    ("HueBridge", "Setup-A-1-STA"),
    ("Lightify", "Setup-C-1-STA"),
    ("TP-LinkPlugHS110", "Setup-A-1-STA"),
    ("WeMoSwitch", "Setup-A-1-STA"),
    ("Withings", "Setup-A-1-STA"),
)
BASE_US = 1_700_000_000 * 1_000_000  # 2023-11-14 22:13:20 UTC
GAP_US = 5_000_000  # each capture starts 5 s after the previous one


def records(path: Path) -> list[tuple[int, bytes]]:
    """(timestamp in us, record header + data) of a little-endian usec Ethernet pcap."""
    b = path.read_bytes()
    magic, _, _, _, _, _, linktype = struct.unpack_from("<IHHiIII", b, 0)
    if magic != 0xA1B2C3D4 or linktype != 1:
        raise SystemExit(f"{path}: expected a little-endian usec Ethernet pcap")
    out, off = [], 24
    while off + 16 <= len(b):
        sec, usec, incl, _ = struct.unpack_from("<IIII", b, off)
        out.append((sec * 1_000_000 + usec, b[off + 8 : off + 16 + incl]))
        off += 16 + incl
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=ROOT / "iotcls" / "data")
    args = ap.parse_args(argv)
    types = {row["device"]: row["type"] for row in
             csv.DictReader((args.data / "devices.csv").open())}  # fmt: skip
    streams, devices = [], []
    for i, (device, capture) in enumerate(CAPTURES):
        recs = records(args.data / device / f"{capture}.pcap")
        shift = BASE_US + i * GAP_US - recs[0][0]
        streams.append([(t + shift, i, j, rest) for j, (t, rest) in enumerate(recs)])
        mac = (args.data / device / "_iotdevice-mac.txt").read_text().strip().lower()
        devices.append((mac, types[device]))
    args.out.mkdir(parents=True, exist_ok=True)
    pcap = args.out / "sample.pcap"
    with pcap.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for t, _, _, rest in heapq.merge(*streams):
            f.write(struct.pack("<II", t // 1_000_000, t % 1_000_000) + rest)
    with (args.out / "sample-devices.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["mac", "label"])
        w.writerows(devices)
    print(f"{pcap}: {pcap.stat().st_size:,} bytes, {len(devices)} devices")
    return 0


if __name__ == "__main__":
    sys.exit(main())
