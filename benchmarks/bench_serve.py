"""End-to-end benchmark of ``iotcls serve``: a fake Zeek (real WebSocket, Zeek's frames) in,
labels back, with the real bridge and scorer processes in between.

Phases (each starts a fresh ``iotcls serve``):

1. capacity with 1 scorer, then with 2: closed loop (``--window`` records outstanding), the
   highest sustained label rate; their ratio is the scaling figure;
2. sustained load: open loop at ``--rate`` records/s for ``--duration`` seconds with
   ``--scorers`` scorers: labels/s, latency percentiles (record sent -> label read back), and
   RSS of the bridge and of the scorers sampled every second (start, end, trend).

Targets (issue 6): >= 5,000 records/s sustained with p99 <= 50 ms; RSS flat over a
10-minute run (``--duration 600``); the 2-vs-1 scorer ratio is reported as measured.
The load generator runs in this process, on the same machine: its CPU is part of the bill.

    python benchmarks/bench_serve.py                   # short run (about a minute)
    python benchmarks/bench_serve.py --duration 600    # the 10-minute memory run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from iotcls.testing.fake_zeek import FakeZeek
from iotcls.testing.loadgen import LoadGen, RssSampler, tree_cpu_s
from iotcls.testing.synth import synthetic_records


def model_path(arg: str | None, tmp: Path) -> tuple[str, str]:
    """The model to serve: --model, else the bundled default, else a random-weight bundle of
    the default layout and size (same cost per matrix as the trained one)."""
    if arg:
        return arg, arg
    from iotcls.bundle import ModelBundle, default_model_path

    p = default_model_path()
    if p.is_file():
        return str(p), f"bundled default model ({p.name})"
    import torch

    from iotcls.layout import MatrixLayout
    from iotcls.model import IoTCNN, ModelConfig

    torch.manual_seed(0)
    lay = MatrixLayout()
    b = ModelBundle(IoTCNN(ModelConfig.from_layout(lay, 27)).eval(), lay, [f"class{i}" for i in range(27)])
    out = b.save(tmp / "bench-model.pt")
    return str(out), "random-weight model of the default layout and size (no bundled model yet)"


def write_config(path: Path, url: str, model: str, scorers: int, args) -> None:
    path.write_text(
        f"zeek: {{url: '{url}', reconnect_max_s: 0.5}}\n"
        f"bridge: {{bind: ['tcp://127.0.0.1:*'], queue_records: {args.queue}}}\n"
        f"scorers: {{count: {scorers}, model: '{model}', device: cpu, threads: 1,"
        f" batch_size: {args.batch_size}, max_wait_ms: {args.max_wait_ms}}}\n"
        f"log: {{policy: all}}\n"
    )


class Serve:
    """One ``iotcls serve`` subprocess against the fake Zeek."""

    def __init__(self, zeek: FakeZeek, cfg: Path, scorers: int):
        self.zeek, self.cfg, self.scorers = zeek, cfg, scorers
        self.proc: asyncio.subprocess.Process | None = None
        self.summary = ""

    async def __aenter__(self) -> "Serve":
        self.zeek.bridge_connected.clear()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "iotcls", "serve", "--config", str(self.cfg),
            "--log-level", "warning", stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.wait_for(self.zeek.bridge_connected.wait(), 60)
        await asyncio.sleep(4.0)  # scorers: python + torch start, model load
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(self.proc.communicate(), 60)
        lines = [ln for ln in out.decode().splitlines() if "stopped in" in ln]
        self.summary = lines[-1] if lines else "(no summary)"


class CpuMeter:
    """CPU seconds of this process (the load generator), the bridge and its scorers."""

    def __init__(self, pid: int):
        self.pid = pid
        self.start = self._now()

    def _now(self) -> tuple[float, float, float]:
        t = os.times()
        bridge, scorers = tree_cpu_s(self.pid)
        return t.user + t.system, bridge, scorers

    def per_record_us(self, n: int) -> str:
        end = self._now()
        d = [(e - s) / max(n, 1) * 1e6 for s, e in zip(self.start, end)]
        return (f"CPU per record: load generator {d[0]:.0f} us, bridge {d[1]:.0f} us, "
                f"scorers {d[2]:.0f} us, total {sum(d):.0f} us")


async def capacity(zeek, gen, cfg, model, n, args) -> float:
    write_config(cfg, zeek.url, model, n, args)
    async with Serve(zeek, cfg, n) as serve:
        await gen.closed_loop(args.window, 2.0, settle_s=5.0)  # warm up
        cpu = CpuMeter(serve.proc.pid)
        r = await gen.closed_loop(args.window, args.capacity_s, settle_s=10.0)
        print(f"    {cpu.per_record_us(r.labelled)}", flush=True)
    print(f"  {n} scorer(s): {r.labels_per_s:8.0f} labels/s over {r.seconds:.1f} s "
          f"({r.labelled} of {r.sent} labelled; p50 {r.pct_ms(50):.1f} ms, "
          f"p99 {r.pct_ms(99):.1f} ms with {args.window} outstanding)", flush=True)  # fmt: skip
    return r.labels_per_s


async def main(args) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model, what = model_path(args.model, tmp)
    print(f"bench_serve: model: {what}; {os.cpu_count()} CPUs; load generator in this process")
    zeek = await FakeZeek(strict=False, payload_bytes=64).start()
    gen = LoadGen(zeek, synthetic_records(args.templates, devices=args.devices, seed=1))
    cfg = tmp / "serve.yaml"
    rates = {}
    if not args.skip_capacity:
        print("capacity (closed loop):")
        for n in (1, 2):
            rates[n] = await capacity(zeek, gen, cfg, model, n, args)
        print(f"  ratio 2 scorers / 1 scorer: {rates[2] / rates[1]:.2f}")
    print(f"sustained: {args.rate:.0f} records/s for {args.duration:.0f} s, {args.scorers} scorer(s):")
    write_config(cfg, zeek.url, model, args.scorers, args)
    async with Serve(zeek, cfg, args.scorers) as serve:
        sampler = RssSampler(serve.proc.pid, 1.0)
        st = asyncio.create_task(sampler.run())
        cpu = CpuMeter(serve.proc.pid)
        r = await gen.open_loop(args.rate, args.duration, settle_s=10.0)
        cpu_line = cpu.per_record_us(r.labelled)
        st.cancel()
    lat = r.latencies_s
    print(f"  sent {r.sent} ({r.sent_per_s:.0f}/s), labelled {r.labelled} "
          f"({r.labelled / max(args.duration, 1e-9):.0f}/s over the send period), "
          f"outstanding after 10 s: {r.outstanding}")  # fmt: skip
    print(f"  latency record -> label: p50 {r.pct_ms(50):.1f} ms, p90 {r.pct_ms(90):.1f} ms, "
          f"p99 {r.pct_ms(99):.1f} ms, p99.9 {r.pct_ms(99.9):.1f} ms, max "
          f"{(lat.max() * 1000 if len(lat) else float('nan')):.1f} ms")  # fmt: skip
    s = sampler.samples
    if s:
        skip = min(10.0, args.duration / 4)
        late = [x for x in s if x[0] >= skip] or s
        print(f"  RSS bridge: {late[0][1]:.0f} MiB at {late[0][0]:.0f} s -> {s[-1][1]:.0f} MiB at "
              f"{s[-1][0]:.0f} s (max {max(x[1] for x in s):.0f}), trend "
              f"{sampler.slope_mib_per_min(1, skip):+.2f} MiB/min")  # fmt: skip
        print(f"  RSS scorers: {late[0][2]:.0f} MiB -> {s[-1][2]:.0f} MiB (max "
              f"{max(x[2] for x in s):.0f}), trend {sampler.slope_mib_per_min(2, skip):+.2f} MiB/min")  # fmt: skip
        if args.rss_log:
            Path(args.rss_log).write_text("t_s,bridge_mib,scorers_mib\n" + "".join(
                f"{t:.1f},{b:.1f},{k:.1f}\n" for t, b, k in s))  # fmt: skip
    print(f"  {cpu_line}")
    print(f"  serve: {serve.summary}")
    ok_rate = r.labelled >= 0.99 * r.sent and r.sent_per_s >= 0.98 * args.rate
    print(f"targets: {args.rate:.0f}/s sustained: {'met' if ok_rate else 'NOT met'}; p99 <= 50 ms: "
          f"{'met' if r.pct_ms(99) <= 50 else 'NOT met'}")  # fmt: skip
    await zeek.close()
    return 0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=20.0, help="sustained phase, seconds")
    p.add_argument("--rate", type=float, default=5000.0, help="sustained phase, records/s")
    p.add_argument("--scorers", type=int, default=1, help="sustained phase scorers")
    p.add_argument("--capacity-s", type=float, default=8.0, help="each capacity phase, seconds")
    p.add_argument("--skip-capacity", action="store_true")
    p.add_argument("--window", type=int, default=2000, help="capacity: records outstanding")
    p.add_argument("--devices", type=int, default=500)
    p.add_argument("--templates", type=int, default=2000, help="distinct records rendered")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--queue", type=int, default=20000)
    p.add_argument("--model", help="model bundle (default: the bundled model)")
    p.add_argument("--rss-log", help="write the RSS samples to this CSV")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
