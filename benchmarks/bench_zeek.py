"""What iotcls costs a Zeek: CPU time of ``zeek -C -r X`` alone, with the iotcls package and
the native capture plugin (zeek-plugin/), and with the package's script capture.

Three inputs:

  (a) a synthetic busy link (bench_sensor.py's generator: 200 devices, 20,000 flows),
      every device inside IoTClass::device_nets;
  (b) the same with IoTClass::device_nets matching nothing (the cost of looking);
  (c) the IoT Sentinel captures, one after the other in one pcap (each shifted to start
      10 minutes after the previous one ended), devices by MAC;
  (m) memory: --conns TCP connections that never end (a SYN each, never answered or
      closed), all within 200 s, once with every device endpoint in IoTClass::device_nets
      and once with none: peak RSS of plain Zeek, the plugin and the script capture. Zeek
      itself drops such a connection after a few seconds; its window lives on (parked)
      until start + window_length, so the capture holds at most a window length's worth
      of device connections (here 60 of 200 s: some 300,000), and nothing for the others.

With ``--instructions``, each configuration runs once more under valgrind's callgrind and
the figure is the instructions executed (Ir), exact and unaffected by what else the machine
runs; the synthetic link is then --instr-packets long (callgrind runs some 50x slower), and
Zeek's start-up (loading scripts, the same whatever the traffic) is reported apart: a run on
the first 10 packets of the same input is subtracted, so the ratio is that of the traffic's
cost.

Runs are paired: each round runs plain Zeek, the plugin and the script capture on the same
input, one after the other; CPU time is user + system of the Zeek process (os.wait4), the
figure a shared machine disturbs least. Prints medians over the rounds and their ratios to
plain Zeek (targets: (a) <= 1.15, (b) <= 1.03, (c) <= 1.10). The package runs without a
bridge (no WebSocket server, no offline hold): what a Zeek spends, not what waiting costs.
Without a bridge, a standalone Zeek keeps the records for one and does not publish them; a
fourth run per round publishes them anyway (IoTClass::publish_without_bridge=T): what a
connected bridge adds, turning each batch into a Broker message. A fifth also sets
IoTClass::native_batch=0: the plugin raising and publishing one IoTClass::FlowRecord event
per record (as it does when an IoTClass::flow_policy handler needs each record), against
the default, packed records published in batches.

    python benchmarks/bench_zeek.py [--packets 1000000] [--rounds 3] [--cases a,b,c]
                                    [--plugin DIR] [--zeek PATH] [--data DIR] [--conns N]
                                    [--instructions [--instr-packets 100000]]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_sensor import synthetic_pcap  # noqa: E402

from iotcls.testing.zeek import find_zeek, igmp_shim_needed, shim_igmp  # noqa: E402

PKG = ROOT / "zeek-scripts" / "iotcls"
TARGETS = {"a": 1.15, "b": 1.03, "c": 1.10}
NO_BRIDGE = ["IoTClass::hold_offline=F", "IoTClass::websocket_listen=F"]
SENT = re.compile(r"no bridge connected, (\d+) flow records")


def build_plugin(zeek: str, out: Path) -> Path:
    """Builds zeek-plugin/ against *zeek*'s zeek-config into *out*; returns the plugin dir."""
    zc = Path(zeek).parent / "zeek-config"
    zeek_config = str(zc) if zc.exists() else shutil.which("zeek-config")
    if not zeek_config:
        sys.exit(f"no zeek-config beside {zeek} or on PATH: pass --plugin DIR")
    t = time.perf_counter()
    for cmd in (
        [
            str(ROOT / "zeek-plugin" / "configure"),
            f"--zeek-config={zeek_config}",
            f"--builddir={out}",
        ],
        ["make", "-C", str(out), "-j2"],
    ):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    print(f"plugin built in {out} ({time.perf_counter() - t:.0f} s)")
    return out


def sentinel_concat(data: Path, out: Path) -> tuple[int, list[str]]:
    """Every IoT Sentinel capture, one after the other, into *out*; (packets, device MACs)."""
    pcaps = sorted(data.glob("*/*.pcap"))
    mac_files = [d / "_iotdevice-mac.txt" for d in {p.parent for p in pcaps}]
    macs = sorted(
        {
            m.lower()
            for f in mac_files
            if f.exists()
            for m in f.read_text().replace(",", " ").split()
        }
    )
    n, next_start = 0, 1_500_000_000 * 1_000_000
    with out.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        for p in pcaps:
            b = p.read_bytes()
            magic, *_, linktype = struct.unpack_from("<IHHiIII", b, 0)
            if magic != 0xA1B2C3D4 or linktype != 1:
                print(f"  skipped {p} (not a little-endian usec Ethernet pcap)")
                continue
            off, shift, last = 24, None, next_start
            while off + 16 <= len(b):
                sec, usec, incl, orig = struct.unpack_from("<IIII", b, off)
                t = sec * 1_000_000 + usec
                if shift is None:
                    shift = next_start - t
                t += shift
                last = max(last, t)
                f.write(struct.pack("<IIII", t // 1_000_000, t % 1_000_000, incl, orig))
                f.write(b[off + 16 : off + 16 + incl])
                off += 16 + incl
                n += 1
            next_start = last + 600 * 1_000_000  # past every inactivity timeout
    return n, macs


def churn_pcap(path: Path, conns: int, seconds: float = 200.0) -> None:
    """*conns* TCP SYNs, each opening its own connection (device 10.0.x.y to 198.18.x.y:443),
    evenly over *seconds*, none answered or closed."""
    ip_hdr = struct.Struct("!BBHHHBBH4s4s")
    frames = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    eth = bytes.fromhex("0200000000020200000000010800")
    t0 = 1_600_000_000 * 1_000_000
    for i in range(conns):
        src = bytes((10, 0, (i >> 8) & 0xFF, i & 0xFF))
        dst = bytes((198, 18, (i >> 16) & 0xFF, (i >> 8) & 0xFF))
        tcp = struct.pack("!HHIIBBHHH", 1024 + (i % 60000), 443, i, 0, 5 << 4, 0x02, 65535, 0, 0)
        ip = ip_hdr.pack(0x45, 0, 20 + len(tcp), i & 0xFFFF, 0, 64, 6, 0, src, dst) + tcp
        t = t0 + int(i * seconds * 1_000_000 / conns)
        frames += struct.pack("<IIII", t // 1_000_000, t % 1_000_000, 14 + len(ip), 14 + len(ip))
        frames += eth + ip
    path.write_bytes(frames)


def run(
    zeek: str, pcap: Path, args: list[str], plugin: Path | None, cwd: Path, rss: list | None = None
) -> tuple[float, int | None]:
    """CPU seconds (user + sys) of one Zeek run, and the records it published (None: no
    package); its peak RSS (bytes) is appended to *rss* when given."""
    env = {k: v for k, v in os.environ.items() if k != "ZEEK_PLUGIN_PATH"}
    if plugin:
        env["ZEEK_PLUGIN_PATH"] = str(plugin)
    shutil.rmtree(cwd, ignore_errors=True)
    cwd.mkdir(parents=True)
    err = cwd / "stderr"
    with err.open("w") as e:
        p = subprocess.Popen(
            [zeek, "-C", "-r", str(pcap), *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=e,
        )
        _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    text = err.read_text()
    if p.returncode != 0:
        sys.exit(f"zeek failed ({p.returncode}): {text[-2000:]}")
    if rss is not None:
        rss.append(ru.ru_maxrss * 1024)
    m = SENT.search(text)
    return ru.ru_utime + ru.ru_stime, int(m.group(1)) if m else None


# The plugin publishing one FlowRecord event per record instead of packed batches.
PER_RECORD = "IoTClass::native_batch=0"
PER_RECORD_NAME = "plugin, event per record"
# The plugin publishing its batches although no bridge listens: what a connected bridge
# costs the Zeek (turning each batch into a Broker message), without waiting for one.
PUBLISHING = "IoTClass::publish_without_bridge=T"
PUBLISHING_NAME = "plugin, publishing"


def configurations(select: list[str], plugin: Path) -> dict[str, tuple[list[str], Path | None]]:
    """Each configuration's Zeek arguments and plugin directory, plain Zeek first."""
    pkg = [str(PKG), *NO_BRIDGE, *select]
    return {
        "plain": ([], None),
        "plugin": (pkg, plugin),
        "script": (pkg, None),
        PUBLISHING_NAME: ([*pkg, PUBLISHING], plugin),
        PER_RECORD_NAME: ([*pkg, PER_RECORD, PUBLISHING], plugin),
    }


def instructions(zeek: str, pcap: Path, args: list[str], plugin: Path | None, cwd: Path) -> int:
    """Instructions (callgrind's Ir) of one ``zeek -C -r pcap`` run."""
    env = {k: v for k, v in os.environ.items() if k != "ZEEK_PLUGIN_PATH"}
    if plugin:
        env["ZEEK_PLUGIN_PATH"] = str(plugin)
    shutil.rmtree(cwd, ignore_errors=True)
    cwd.mkdir(parents=True)
    r = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            zeek,
            "-C",
            "-r",
            str(pcap),
            *args,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    m = re.search(r"Collected : (\d+)", r.stderr)
    if r.returncode != 0 or not m:
        sys.exit(f"zeek under callgrind failed ({r.returncode}): {r.stderr[-2000:]}")
    return int(m.group(1))


def head_pcap(pcap: Path, out: Path, n: int = 10) -> Path:
    """The first *n* frames of a little-endian pcap."""
    b = pcap.read_bytes()
    off = 24
    for _ in range(n):
        off += 16 + struct.unpack_from("<I", b, off + 8)[0]
    out.write_bytes(b[:off])
    return out


def bench_instructions(
    name: str, zeek: str, pcap: Path, select: list[str], plugin: Path, work: Path
) -> None:
    """Callgrind's instruction counts of each configuration, start-up subtracted."""
    work.mkdir(parents=True, exist_ok=True)
    head = head_pcap(pcap, work / f"head-{pcap.name}")
    configs = configurations(select, plugin)
    traffic = {}
    print(f"  {'':27}{'instructions':>15}{'start-up':>15}{'traffic':>15}{'vs plain':>10}")
    for k, (args, plug) in configs.items():
        total = instructions(zeek, pcap, args, plug, work / k)
        start = instructions(zeek, head, args, plug, work / k)
        traffic[k] = total - start
        print(
            f"  {k:27}{total:>15,}{start:>15,}{traffic[k]:>15,}{traffic[k] / traffic['plain']:>9.3f}x"
        )
    ratio = traffic["plugin"] / traffic["plain"]
    print(
        f"  plugin/plain, instructions for the traffic: {ratio:.3f}x (target <= {TARGETS[name]:.2f}x: "
        f"{'met' if ratio <= TARGETS[name] else 'NOT met'})"
    )


def bench(
    name: str, zeek: str, pcap: Path, select: list[str], plugin: Path, rounds: int, work: Path
) -> None:
    configs = configurations(select, plugin)
    cpu: dict[str, list[float]] = {k: [] for k in configs}
    recs: dict[str, set] = {k: set() for k in configs}
    pcap.read_bytes()  # page cache
    for i in range(rounds):
        order = list(configs)[i % len(configs) :] + list(configs)[: i % len(configs)]  # rotate
        for k in order:
            args, plug = configs[k]
            s, n = run(zeek, pcap, args, plug, work / k)
            cpu[k].append(s)
            recs[k].add(n)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"  {'':27}{'median CPU s':>13}{'vs plain':>10}{'records':>9}   runs (CPU s)")
    for k in configs:
        runs = " ".join(f"{x:.2f}" for x in cpu[k])
        ratio = med[k] / med["plain"]
        n = ",".join(str(x) for x in sorted(recs[k], key=str)) if k != "plain" else "-"
        print(f"  {k:27}{med[k]:>13.2f}{ratio:>9.3f}x{n:>9}   {runs}")
    keep = PER_RECORD_NAME
    paired = statistics.median(p / q for p, q in zip(cpu["plugin"], cpu["plain"]))
    target = TARGETS[name]
    script = statistics.median(p / q for p, q in zip(cpu["script"], cpu["plain"]))
    print(
        f"  plugin/plain, median of paired ratios: {paired:.3f}x (target <= {target:.2f}x: "
        f"{'met' if paired <= target else 'NOT met'}); script/plain {script:.3f}x"
    )
    for k, what in (
        (PUBLISHING_NAME, "publishing as to a connected bridge (publish_without_bridge=T)"),
        (keep, "and one FlowRecord event per record (native_batch=0)"),
    ):
        print(
            f"  {what}: plugin/plain "
            f"{statistics.median(p / q for p, q in zip(cpu[k], cpu['plain'])):.3f}x"
        )
    if recs["plugin"] != recs["script"]:
        print(f"  !! record counts differ: plugin {recs['plugin']}, script {recs['script']}")


def bench_memory(zeek: str, pcap: Path, conns: int, plugin: Path, work: Path) -> None:
    """Peak RSS with many open connections, device ones and others."""
    print(f"  {'':38}{'peak RSS MiB':>13}{'vs plain':>10}{'per conn':>10}")
    for label, select in (
        ("every endpoint a device", "IoTClass::device_nets={10.0.0.0/8}"),
        ("no device endpoint", "IoTClass::device_nets={192.0.2.0/24}"),
    ):
        peak: dict[str, int] = {}
        for k, args, plug in (
            ("plain", [], None),
            ("plugin", [str(PKG), *NO_BRIDGE, select], plugin),
            ("script", [str(PKG), *NO_BRIDGE, select], None),
        ):
            got: list[int] = []
            run(zeek, pcap, args, plug, work / k, got)
            peak[k] = got[0]
            more = peak[k] - peak["plain"]
            print(
                f"  {label + ', ' + k:38}{peak[k] / 2**20:>13,.0f}{more / 2**20:>+9,.0f}M"
                f"{more / conns:>9,.0f}B"
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=1_000_000, help="synthetic packets (a, b)")
    ap.add_argument("--flows", type=int, default=20_000)
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, help="paired rounds per input")
    ap.add_argument("--cases", default="a,b,c")
    ap.add_argument("--zeek", default=find_zeek(), help="default: $ZEEK_HOME/bin/zeek, else PATH")
    ap.add_argument("--plugin", help="a built plugin directory (default: build one)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "iot-sentinel"))
    ap.add_argument("--conns", type=int, default=1_000_000, help="open connections (m)")
    ap.add_argument(
        "--instructions",
        action="store_true",
        help="also count instructions under callgrind (exact; slow)",
    )
    ap.add_argument(
        "--instr-packets",
        type=int,
        default=100_000,
        help="synthetic packets for --instructions (a, b)",
    )
    args = ap.parse_args()
    if not args.zeek:
        sys.exit("no zeek: set ZEEK_HOME or PATH, or pass --zeek")
    cases = set(args.cases.split(","))
    version = subprocess.run(
        [args.zeek, "--version"], capture_output=True, text=True
    ).stdout.strip()
    print(
        f"{version}; {platform.node()}: {os.cpu_count()} cores visible, "
        f"load average {os.getloadavg()[0]:.1f} at start; {args.rounds} paired rounds"
    )

    with tempfile.TemporaryDirectory(prefix="bench-zeek-") as tmp:
        work = Path(tmp)
        if igmp_shim_needed(args.zeek) and "ZEEKPATH" not in os.environ:
            # a Zeek 8.2 built without Spicy cannot load its IGMP analyzer (as in the tests)
            os.environ["ZEEKPATH"] = shim_igmp(args.zeek, work / "shim")
            print("this Zeek has no Spicy: its IGMP analyzer is stubbed out (ZEEKPATH)")
        plugin = Path(args.plugin) if args.plugin else build_plugin(args.zeek, work / "plugin")
        if cases & {"a", "b"}:
            syn = work / "synthetic.pcap"
            n = synthetic_pcap(syn, args.packets, devices=args.devices, keys=args.flows)
            print(
                f"synthetic: {n:,} packets, {syn.stat().st_size / 2**20:,.0f} MiB, "
                f"{args.devices} devices (10.0.0.0/16), {args.flows:,} flows"
            )
            small = work / "synthetic-small.pcap"
            if args.instructions:
                synthetic_pcap(
                    small,
                    args.instr_packets,
                    devices=args.devices,
                    keys=max(1, args.flows * args.instr_packets // args.packets),
                )
            for case, nets, title in (
                ("a", "10.0.0.0/16", "every device in IoTClass::device_nets"),
                ("b", "192.0.2.0/24", "IoTClass::device_nets matching nothing"),
            ):
                if case not in cases:
                    continue
                select = [f"IoTClass::device_nets={{{nets}}}"]
                print(f"({case}) {title}")
                bench(case, args.zeek, syn, select, plugin, args.rounds, work / "runs")
                if args.instructions:
                    print(f"  callgrind, {args.instr_packets:,} packets of the same link:")
                    bench_instructions(case, args.zeek, small, select, plugin, work / "instr")
        if "c" in cases:
            data = Path(args.data)
            if not data.is_dir():
                print(f"(c) skipped: {data} not found")
            else:
                cat = work / "sentinel.pcap"
                n, macs = sentinel_concat(data, cat)
                print(
                    f"(c) IoT Sentinel: {len(list(data.glob('*/*.pcap')))} captures one after "
                    f"the other, {n:,} frames, {len(macs)} device MACs"
                )
                sel = "IoTClass::device_macs={" + ",".join(f'"{m}"' for m in macs) + "}"
                bench("c", args.zeek, cat, [sel], plugin, args.rounds, work / "runs")
                if args.instructions:
                    print("  callgrind, the same capture:")
                    bench_instructions("c", args.zeek, cat, [sel], plugin, work / "instr")
        if "m" in cases:
            churn = work / "open-connections.pcap"
            churn_pcap(churn, args.conns)
            print(f"(m) {args.conns:,} TCP connections in 200 s (a SYN each, never answered)")
            bench_memory(args.zeek, churn, args.conns, plugin, work / "runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
