"""The long fuzz run of the capture readers: at least 100,000 mutated inputs per decoder.

Same engine as the CI suite (``tests/test_fuzz_captures.py``, :mod:`iotcls.testing.capture_fuzz`),
longer: each input goes through the reader, the flow builder and the matrices; every 100th
input also joins a group of four through the many-small-captures path (1 GiB read chunk, one
builder pass). Counted per decoder:

* crashes: any exception but PcapError, or a batch that breaks an invariant, or a capture
  that the many-captures path had to report as "cannot read" (its safety net caught
  something); one reproducer per crash kind is written to ``--out``;
* hangs: an input still running after ``--hang-s`` seconds (SIGALRM);
* memory: peak RSS of the process, and the resident size sampled along the run (it must not
  grow with the number of inputs).

    python benchmarks/fuzz_captures.py [--inputs 100000] [--seed 1] [--out DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from iotcls.flows import DeviceSelector, capture_flows_many  # noqa: E402
from iotcls.testing.capture_fuzz import FORMATS, crash_kind, inputs, run_one, seeds  # noqa: E402
from iotcls.testing.shared import missing, sentinel_dir  # noqa: E402

_SEL = DeviceSelector.from_lists([], ["0.0.0.0/0", "::/0"])


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def rss_kib() -> int:
    """The resident size now (not the peak), from /proc."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return 0


def real_captures(n: int) -> list[Path]:
    """The first capture of each of the first ``n`` IoT Sentinel devices (none if absent)."""
    root = sentinel_dir()
    if missing(root):
        print(f"note: {missing(root)}; synthetic seeds only", file=sys.stderr)
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        pcaps = sorted(d.glob("*.pcap"))
        if pcaps:
            out.append(pcaps[0])
        if len(out) >= n:
            break
    return out


def fuzz_format(
    fmt: str, pool: list[bytes], n: int, seed: int, hang_s: float, work: Path, out: Path
) -> dict:
    path = work / f"input.{fmt}"
    crashes: Counter = Counter()
    examples: dict[str, str] = {}
    hangs, slowest, group = 0, 0.0, []
    rss_samples = []
    t0 = time.perf_counter()

    def record(kind: str, i: int, data: bytes, msg: str) -> None:
        crashes[kind] += 1
        if kind not in examples:
            keep = out / f"{fmt}-crash-{len(examples)}.{fmt}"
            keep.write_bytes(data)
            examples[kind] = f"input {i}, kept as {keep}: {msg[:200]}"

    for i, data, chunk in inputs(fmt, pool, n, seed):
        path.write_bytes(data)
        t = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, hang_s)
        try:
            run_one(path, chunk)
        except Hang:
            hangs += 1
            (out / f"{fmt}-hang-{hangs}.{fmt}").write_bytes(data)
        except Exception as e:  # noqa: BLE001 - counted, not raised
            record(crash_kind(e), i, data, str(e))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        slowest = max(slowest, time.perf_counter() - t)
        if i % 100 < 4:  # every 100th input, a group of four through the many-files path
            gp = work / f"group{len(group)}.{fmt}"
            gp.write_bytes(data)
            group.append((gp, data))
            if len(group) == 4:
                for (_p, d), cf in zip(
                    group, capture_flows_many([p for p, _ in group], [_SEL] * 4)
                ):
                    if "cannot read this capture" in cf.error:
                        record(
                            "many-captures path: " + cf.error.split("(")[-1][:60], i, d, cf.error
                        )
                group = []
        if i % 10_000 == 0:
            rss_samples.append(rss_kib())
            print(
                f"  {fmt}: {i:,} inputs, {sum(crashes.values())} crashes, {hangs} hangs, "
                f"RSS {rss_samples[-1] / 1024:.0f} MiB, {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    return {
        "format": fmt,
        "inputs": n,
        "seeds": len(pool),
        "crashes": sum(crashes.values()),
        "crash_kinds": dict(crashes),
        "examples": examples,
        "hangs": hangs,
        "slowest_input_s": round(slowest, 3),
        "wall_s": round(time.perf_counter() - t0, 1),
        "rss_mib_samples": [round(x / 1024) for x in rss_samples],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=100_000, help="per decoder (default 100,000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--real", type=int, default=12, help="real captures used as seeds")
    ap.add_argument("--hang-s", type=float, default=10.0, help="an input slower than this hangs")
    ap.add_argument("--out", default="", help="directory for reproducers (default: a temp dir)")
    ap.add_argument("--json", default="", help="also write the totals here")
    args = ap.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    out = Path(args.out or tempfile.mkdtemp(prefix="fuzz-captures-"))
    out.mkdir(parents=True, exist_ok=True)
    real = real_captures(args.real)
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as w:
        for fmt in args.formats.split(","):
            pool = seeds(fmt, real)
            print(
                f"{fmt}: {len(pool)} seeds ({len(real)} real), {args.inputs:,} inputs",
                file=sys.stderr,
            )
            results.append(
                fuzz_format(fmt, pool, args.inputs, args.seed, args.hang_s, Path(w), out)
            )
    total = {
        "decoders": results,
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "reproducers": str(out),
    }
    print(
        f"\n{'decoder':<8}{'inputs':>10}{'crashes':>9}{'hangs':>7}{'slowest s':>11}"
        f"{'wall s':>9}  RSS MiB along the run"
    )
    for r in results:
        print(
            f"{r['format']:<8}{r['inputs']:>10,}{r['crashes']:>9}{r['hangs']:>7}"
            f"{r['slowest_input_s']:>11.3f}{r['wall_s']:>9.0f}  {r['rss_mib_samples']}"
        )
        for kind, ex in r["examples"].items():
            print(f"  {kind}: {ex}")
    print(f"peak RSS {total['peak_rss_mib']} MiB, wall {total['wall_s']:.0f} s, {total['machine']}")
    if args.json:
        Path(args.json).write_text(json.dumps(total, indent=1) + "\n")
    return 1 if any(r["crashes"] or r["hangs"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
