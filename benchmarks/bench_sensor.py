"""Sensor speed: pcap -> flow records -> matrices, packets per second on one core.

Two inputs: every IoT Sentinel capture (many small files, so per-file cost shows), and one
large synthetic capture (a few million packets, written to a temporary file) where the
per-packet cost dominates. Prints packets/s for reading alone, for records, and for records
plus matrices, and the peak resident memory.

    python benchmarks/bench_sensor.py [--packets 3000000] [--data DIR] [--keep FILE]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from iotcls.capture import sentinel_specs  # noqa: E402
from iotcls.dataset import capture_matrices  # noqa: E402
from iotcls.flows import DeviceSelector, FlowBuilder  # noqa: E402
from iotcls.layout import MatrixLayout  # noqa: E402
from iotcls.pcap import CaptureReader  # noqa: E402


def synthetic_pcap(path: Path, n: int, devices: int = 200, keys: int = 20_000,
                   seconds: float = 600.0, seed: int = 1) -> int:  # fmt: skip
    """Write a classic pcap of ``n`` Ethernet/IPv4 TCP+UDP packets of ``keys`` flows between
    ``devices`` local devices (10.0.0.0/16) and remote hosts, written in chunks with numpy."""
    rng = np.random.default_rng(seed)
    key_dev = rng.integers(0, devices, keys)
    key_rem = rng.integers(0, 1 << 24, keys).astype(np.uint32) | np.uint32(0x5D000000)
    key_dport = rng.integers(1024, 65535, keys)
    key_rport = rng.choice(np.array([53, 80, 123, 443, 1883, 8883]), keys)
    key_udp = rng.random(keys) < 0.35
    weights = 1.0 / np.arange(1, keys + 1) ** 0.9  # a few busy flows, many quiet ones
    weights /= weights.sum()
    written = 0
    with path.open("wb") as f:
        f.write(np.array([0xA1B2C3D4], "<u4").tobytes())
        f.write(np.array([2, 4], "<u2").tobytes())
        f.write(np.array([0, 0, 65535, 1], "<u4").tobytes())
        t0 = 1_700_000_000.0
        step = 500_000
        for c0 in range(0, n, step):
            m = min(step, n - c0)
            k = rng.choice(keys, m, p=weights)
            ts = t0 + np.sort(rng.random(m)) * seconds / (n / m) + seconds * c0 / n
            up = rng.random(m) < 0.5
            udp = key_udp[k]
            pay = rng.integers(0, 200, m) * (rng.random(m) < 0.6)
            l4h = np.where(udp, 8, 20)
            iplen = 20 + l4h + pay
            flen = np.maximum(14 + iplen, 60)
            rec = 16 + flen
            offs = np.concatenate([[0], np.cumsum(rec)[:-1]])
            buf = np.zeros(int(rec.sum()), np.uint8)
            sec = ts.astype(np.int64)
            usec = ((ts - sec) * 1e6).astype(np.int64)

            def put(col, width, values, dtype):
                v = np.asarray(values).astype(dtype)
                b = v.view(np.uint8).reshape(m, width)
                idx = (offs + col)[:, None] + np.arange(width)
                buf[idx] = b

            put(0, 4, sec, "<u4")
            put(4, 4, usec, "<u4")
            put(8, 4, flen, "<u4")
            put(12, 4, flen, "<u4")
            dev_mac = (0x02AA00000000 + key_dev[k]).astype(np.uint64)
            gw_mac = np.full(m, 0x020000000001, np.uint64)
            src_mac = np.where(up, dev_mac, gw_mac)
            dst_mac = np.where(up, gw_mac, dev_mac)
            put(16, 6, (dst_mac << np.uint64(16)).astype(">u8").view(np.uint8)
                .reshape(m, 8)[:, :6].copy().view(np.uint8), np.uint8)  # fmt: skip
            put(22, 6, (src_mac << np.uint64(16)).astype(">u8").view(np.uint8)
                .reshape(m, 8)[:, :6].copy().view(np.uint8), np.uint8)  # fmt: skip
            put(28, 2, np.full(m, 0x0800), ">u2")
            ip = 30
            put(ip, 2, np.full(m, 0x4500), ">u2")
            put(ip + 2, 2, iplen, ">u2")
            put(ip + 8, 2, np.where(udp, 0x4011, 0x4006), ">u2")
            dev_ip = (0x0A000000 + key_dev[k]).astype(np.uint32)
            rem_ip = key_rem[k]
            put(ip + 12, 4, np.where(up, dev_ip, rem_ip), ">u4")
            put(ip + 16, 4, np.where(up, rem_ip, dev_ip), ">u4")
            l4 = ip + 20
            put(l4, 2, np.where(up, key_dport[k], key_rport[k]), ">u2")
            put(l4 + 2, 2, np.where(up, key_rport[k], key_dport[k]), ">u2")
            put(l4 + 4, 2, np.where(udp, 8 + pay, 0), ">u2")
            put(l4 + 12, 1, np.where(udp, 0, 0x50), np.uint8)
            f.write(buf.tobytes())
            written += m
    return written


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_file(path: Path, selector: DeviceSelector, layout: MatrixLayout) -> dict:
    out = {}
    t = time.perf_counter()
    n = 0
    for b in CaptureReader(path).batches():
        n += len(b)
    out["read"] = (n, time.perf_counter() - t)
    t = time.perf_counter()
    fb = FlowBuilder(selector, layout.window_s, layout.packets, layout.required_payload_bytes())
    recs = 0
    rows = []
    for b in CaptureReader(path).batches():
        tb = fb.add(b)
        recs += len(tb)
        rows.append(layout.encode_rows(tb))
    tb = fb.finish()
    recs += len(tb)
    out["records"] = (n, time.perf_counter() - t, recs)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=3_000_000)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "iot-sentinel"))
    ap.add_argument("--keep", help="write the synthetic capture here and keep it")
    args = ap.parse_args()
    layout = MatrixLayout()
    print(f"machine: {os.cpu_count()} cores visible; one core used; layout default "
          f"(payload {layout.required_payload_bytes()} B/packet)")  # fmt: skip

    data = Path(args.data)
    if data.is_dir():
        specs = sentinel_specs(data)
        # warm the page cache so the figure measures the sensor, not the disk
        for s in specs:
            s.pcap.read_bytes()
        t = time.perf_counter()
        pk = 0
        for s in specs:
            for b in CaptureReader(s.pcap).batches():
                pk += len(b)
        t_read = time.perf_counter() - t
        t = time.perf_counter()
        rows = 0
        for s in specs:
            cm = capture_matrices(s, layout)
            rows += len(cm.matrices)
        t_all = time.perf_counter() - t
        print(f"iot-sentinel: {len(specs)} files, {pk:,} IP packets, {rows:,} labelled records")
        print(f"  read only:                {pk / t_read:12,.0f} packets/s")
        print(f"  records + matrices:       {pk / t_all:12,.0f} packets/s  ({t_all:.2f} s)")
    else:
        print(f"iot-sentinel: {data} not found, skipped")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "synthetic.pcap"
        t = time.perf_counter()
        n = synthetic_pcap(path, args.packets)
        size = path.stat().st_size
        print(f"synthetic: {n:,} packets, {size / 2**20:,.0f} MiB "
              f"(written in {time.perf_counter() - t:.1f} s)")  # fmt: skip
        path.read_bytes() if size < 2 << 30 else None
        sel = DeviceSelector.from_lists(nets=["10.0.0.0/16"])
        r = bench_file(path, sel, layout)
        n_read, t_read = r["read"]
        n_rec, t_rec, recs = r["records"]
        print(f"  read only:                {n_read / t_read:12,.0f} packets/s")
        print(f"  records + matrix rows:    {n_rec / t_rec:12,.0f} packets/s  "
              f"({recs:,} records, {t_rec:.2f} s)")  # fmt: skip
        t = time.perf_counter()
        from iotcls.capture import CaptureSpec

        cm = capture_matrices(CaptureSpec(path, "synthetic", {}, ("10.0.0.0/16",)), layout)
        t_all = time.perf_counter() - t
        print(f"  records + full matrices:  {n_read / t_all:12,.0f} packets/s  "
              f"({len(cm.matrices):,} matrices, {t_all:.2f} s)")  # fmt: skip
    print(f"peak RSS: {peak_rss_mib():,.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
