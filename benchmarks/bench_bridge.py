"""Bridge speed: flow records from Zeek's WebSocket frames to matrices, on one core.

The frames are ``IoTClass::flow`` events byte for byte as Zeek 8.2 renders them
(:func:`iotcls.bridge.records.flow_frame`), made from the flow records the pcap sensor reads
from real IoT Sentinel captures; the records are repeated with shifted times and addresses
until there are ``--records`` of them over ``--devices`` devices. Measured, in one process on
one core, best of ``--repeat``:

* decode: bytes -> FlowRecord on the fast path (what the bridge does per frame), and through
  the JSON parser and the generic codec for comparison;
* decode + assemble: what the bridge does, in batches of ``--batch``: a regex match per
  frame as it arrives, then per batch the decode straight into a FlowTable
  (bridge/flowbatch.py), MatrixLayout.encode_rows and SequenceAssembler; and for comparison
  the earlier intake, a FlowRecord per frame, then FlowTable.from_records;
* the way back: ``IoTClass::label`` frames encoded from log entries.

Rates are given per CPU second of this process (``time.process_time``) and per wall second;
on a shared machine the CPU figure is the one that says what one core does. Target: 50,000
records/s decoded and assembled.

    python benchmarks/bench_bridge.py [--records 100000] [--devices 500] [--batch 256]
                                      [--payload-bytes N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from iotcls.bridge import broker_json as bj  # noqa: E402
from iotcls.bridge import flowbatch as fb  # noqa: E402
from iotcls.bridge import records as rc  # noqa: E402
from iotcls.bridge.core import FlowAssembler  # noqa: E402
from iotcls.flows import DeviceSelector, capture_flows  # noqa: E402
from iotcls.layout import MatrixLayout  # noqa: E402
from iotcls.schema import FlowRecord  # noqa: E402

TOPIC = "zeek/iotcls/flows"
TARGET = 50_000


def base_records(data: Path, files: int) -> list[FlowRecord]:
    sel = DeviceSelector.from_lists(nets=["10.0.0.0/8", "192.168.0.0/16"])
    pcaps = sorted(data.glob("*/*.pcap"))[:files] if data.is_dir() else []
    recs = []
    for p in pcaps:
        recs += capture_flows(p, sel).table.records()
    if not pcaps:  # no IoT Sentinel data here: the synthetic demo network
        import tempfile

        from iotcls.demo import write_demo_pcap

        with tempfile.TemporaryDirectory() as tmp:
            write_demo_pcap(Path(tmp) / "demo.pcap")
            recs = capture_flows(Path(tmp) / "demo.pcap", sel).table.records()
    return recs


def make_records(base: list[FlowRecord], n: int, devices: int) -> list[FlowRecord]:
    out = []
    for i in range(n):
        r = base[i % len(base)]
        d = i % devices
        v4 = "." in r.device_ip  # devices keep their address; times move on
        out.append(
            replace(
                r,
                device_ip=f"10.{(d >> 8) & 255}.{d & 255}.2" if v4 else r.device_ip,
                device_mac=f"02:00:00:00:{(d >> 8) & 255:02x}:{d & 255:02x}",
                start=r.start + 3600.0 * (i // len(base)) + 1e-3 * (i % 997),
                last=r.last + 3600.0 * (i // len(base)) + 1e-3 * (i % 997),
                uid=f"C{i:017d}",
            )
        )
    return [rc.flow_record_raw(rc.flow_frame(TOPIC, r)) for r in out]  # as Zeek's times


def best(fn, repeat: int) -> tuple[float, float]:
    """Fastest (cpu seconds, wall seconds) of *repeat* runs."""
    cpu, wall = [], []
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return min(cpu), min(wall)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--files", type=int, default=60, help="captures to take records from")
    ap.add_argument(
        "--payload-bytes",
        type=int,
        default=None,
        help="payload bytes per packet in the layout (default: the layout's)",
    )
    ap.add_argument(
        "--data",
        type=Path,
        default=Path(
            os.environ.get("IOTCLS_DATA", ROOT.parent / "shared" / "data" / "iot-sentinel")
        ),
    )
    a = ap.parse_args()

    base = base_records(a.data, a.files)
    recs = make_records(base, a.records, a.devices)
    frames = [rc.flow_frame(TOPIC, r) for r in recs]
    n = len(frames)
    size = sum(map(len, frames)) / n
    assert all(rc.flow_record_raw(f) == r for f, r in zip(frames[:2000], recs[:2000]))
    layout = MatrixLayout(**({} if a.payload_bytes is None else {"payload_bytes": a.payload_bytes}))
    print(
        f"bridge benchmark: {n} IoTClass::flow frames ({size:.0f} bytes each on average) from "
        f"{len(base)} records of real captures, {a.devices} devices, batches of {a.batch}, "
        f"layout {layout.shape}; load average {os.getloadavg()[0]:.2f} on "
        f"{os.cpu_count()} CPUs"
    )

    def fast():
        for f in frames:
            rc.flow_record_raw(f)

    sample = frames[: max(1, n // 10)]

    def generic():
        for f in sample:
            rc.flow_record_generic(bj.parse_frame(f)[0])

    def intake():  # what the bridge does: match each frame as it comes, decode per batch
        asm = FlowAssembler(layout, max_devices=100_000)
        for i in range(0, n, a.batch):
            items = [fb.match_flow(f) for f in frames[i : i + a.batch]]
            asm.assemble_table(asm.decode(items).table)

    def intake_per_record():  # before: a FlowRecord per frame, then FlowTable.from_records
        asm = FlowAssembler(layout, max_devices=100_000)
        for i in range(0, n, a.batch):
            asm.assemble([rc.flow_record_raw(f) for f in frames[i : i + a.batch]])

    def assemble_only():
        asm = FlowAssembler(layout, max_devices=100_000)
        for i in range(0, n, a.batch):
            asm.assemble(recs[i : i + a.batch])

    verdict = rc.Verdict("D-LinkCam", 0.8765, "flow", 3, True, "-", ["payload", "sizes"], "m")
    entries = [rc.log_entry(r, verdict) for r in recs]

    def labels():
        for e in entries:
            rc.label_message("zeek/iotcls/labels", e)

    rows = [
        ("decode, fast path", fast, n),
        ("decode, JSON + generic codec", generic, len(sample)),
        ("assemble only (from_records, encode_rows, SequenceAssembler)", assemble_only, n),
        ("decode + assemble, per-record decode (before)", intake_per_record, n),
        ("decode + assemble (the bridge's intake)", intake, n),
        ("label events encoded (IoTClass::label frames)", labels, n),
    ]
    results = {}
    for name, fn, count in rows:
        cpu, wall = best(fn, a.repeat)
        results[name] = count / cpu
        print(
            f"  {name:62s} {count / cpu:>10,.0f} records/s per CPU second "
            f"({count / wall:,.0f}/s wall, {cpu / count * 1e6:.1f} us each)"
        )
    got = results["decode + assemble (the bridge's intake)"]
    print(
        f"target >= {TARGET:,} records/s decoded and assembled on one core: "
        f"{'met' if got >= TARGET else 'NOT met'} ({got:,.0f}/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
