"""The long fuzz run of what peers send ``iotcls serve``: at least 100,000 inputs per decoder.

The decoders, seeds and mutations are :mod:`iotcls.testing.fuzz`'s (the CI test runs a few
thousand of them); here each decoder reads ``--inputs`` of them, in its own process (so that
one's memory does not count against the next). A *crash* is an input that raised anything
but the decoder's own error (or broke a promise of the edge: an accepted record with a
non-finite matrix row); a *hang* an input that took more than ``--hang-s`` (an interval
timer interrupts Python code stuck longer, so a hang cannot stall the run). Reported per decoder:
inputs, read, refused, crashes, hangs, the slowest input, peak RSS (``ru_maxrss``) and RSS
after the first 10 % and at the end (bounded memory: the two stay close), wall time.

    python benchmarks/fuzz_service.py [--inputs 100000] [--seed 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import signal
import sys
import time


class Hang(Exception):
    pass


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(name: str, n: int, seed: int, hang_s: float) -> dict:
    """Fuzzes decoder *name* in this process; returns its totals."""
    from iotcls.testing import fuzz

    target = next(t for t in fuzz.targets() if t.name == name)
    read = target.read

    def on_alarm(*_):
        raise Hang()

    def guarded(data: bytes) -> str:
        signal.setitimer(signal.ITIMER_REAL, hang_s * 5)  # interrupt a true hang
        try:
            return read(data)
        except Hang:
            return "hang"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    signal.signal(signal.SIGALRM, on_alarm)
    target.read = guarded
    rss_start = _rss_mib()
    t0 = time.perf_counter()
    first = fuzz.run(target, max(1, n // 10), seed, hang_s)
    rss_tenth = _rss_mib()
    rest = fuzz.run(target, n - first.inputs, seed + 1, hang_s)
    wall = time.perf_counter() - t0
    out = {"decoder": name, "inputs": first.inputs + rest.inputs}
    for k in ("ok", "refused", "crashes", "hangs"):
        out[k] = getattr(first, k) + getattr(rest, k)
    out["slowest_ms"] = round(max(first.slowest_s, rest.slowest_s) * 1000, 1)
    out["rss_mib"] = {
        "start": round(rss_start, 1),
        "after_10pct": round(rss_tenth, 1),
        "end": round(_rss_mib(), 1),
    }
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["wall_s"] = round(wall, 1)
    out["inputs_per_s"] = round(out["inputs"] / wall)
    out["examples"] = [why for why, _ in first.examples + rest.examples][:5]
    return out


def _child(args: tuple, q) -> None:
    q.put(run_one(*args))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=100_000, help="inputs per decoder")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--hang-s", type=float, default=1.0, help="an input slower than this is a hang")
    ap.add_argument("--json", metavar="FILE", help="write the totals here too")
    args = ap.parse_args()
    from iotcls.testing import fuzz

    names = [t.name for t in fuzz.targets()]
    print(
        f"fuzz_service: {args.inputs} inputs per decoder, seed {args.seed}, hang > "
        f"{args.hang_s} s; {platform.node()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}",
        flush=True,
    )
    results = []
    ctx = mp.get_context("fork")
    t0 = time.perf_counter()
    for name in names:
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=((name, args.inputs, args.seed, args.hang_s), q))
        p.start()
        r = q.get()
        p.join()
        results.append(r)
        print(
            f"  {r['decoder']:18} {r['inputs']:>8} inputs: {r['ok']:>7} read, "
            f"{r['refused']:>7} refused, {r['crashes']} crashes, {r['hangs']} hangs; "
            f"slowest {r['slowest_ms']} ms; RSS {r['rss_mib']['after_10pct']} -> "
            f"{r['rss_mib']['end']} MiB (peak {r['peak_rss_mib']}); {r['wall_s']} s "
            f"({r['inputs_per_s']}/s)",
            flush=True,
        )
        for ex in r["examples"]:
            print(f"      {ex}")
    total = {k: sum(r[k] for r in results) for k in ("inputs", "crashes", "hangs")}
    total["wall_s"] = round(time.perf_counter() - t0, 1)
    print(
        f"fuzz_service: {total['inputs']} inputs, {total['crashes']} crashes, "
        f"{total['hangs']} hangs, {total['wall_s']} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"decoders": results, "total": total}, f, indent=2)
    sys.exit(1 if total["crashes"] or total["hangs"] else 0)


if __name__ == "__main__":
    main()
