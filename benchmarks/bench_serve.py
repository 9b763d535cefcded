"""End-to-end benchmark of ``iotcls serve``: a fake Zeek (real WebSocket, Zeek's frames) in,
labels back, with the real bridge and scorer processes in between.

Phases (each starts a fresh ``iotcls serve``):

0. the scorer tier alone: the dispatcher and 1, then 2, scorer processes, fed matrices
   directly (no WebSocket, no decoding), to show how scorers scale;
1. capacity with 1 scorer, then with 2: closed loop (``--window`` records outstanding), the
   highest sustained label rate; their ratio is the scaling figure;
2. sustained load: open loop at ``--rate`` records/s for ``--duration`` seconds with
   ``--scorers`` scorers: labels/s, latency percentiles (record sent -> label read back), RSS
   of the bridge and of the scorers every second (start, end, trend), CPU time per record;
3. the default deployment (``--skip-default`` to leave it out): ``log.policy: changes`` and
   ``scorers.explain: logged`` with a model that has a trust state, devices whose traffic
   repeats; records/s taken in and labelled, label events sent, records explained.

Phases 1 and 2 run ``log.policy: all`` (every record's label comes back, so every latency
is measured) with ``scorers.explain: none`` (the confidence criterion): the full trust
decision for every label costs about 14x the label (docs/serve.md) and is what phase 3
avoids. Targets (docs/serve.md): >= 5,000 records/s sustained with p99 <= 50 ms; RSS flat over a
10-minute run (``--duration 600``); the 2-vs-1 scorer ratio is reported as measured. The load
generator runs in this process, on the same machine: its CPU is part of the bill.

    python benchmarks/bench_serve.py                   # short run (about two minutes)
    python benchmarks/bench_serve.py --duration 600    # the 10-minute memory run
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from iotcls.testing.fake_zeek import FakeZeek
from iotcls.testing.loadgen import LoadGen, RssSampler, tree_cpu_s
from iotcls.testing.synth import synthetic_records

WARM_UP_S = 5.0  # latencies of records sent before this are reported apart as well


def model_path(arg: str | None, tmp: Path) -> tuple[str, str]:
    """The model to serve: --model, else the bundled default, else a random-weight bundle of
    the default layout and size (same cost per matrix as a trained one) with a trust state
    fitted on synthetic records (same cost per explanation)."""
    if arg:
        return arg, arg
    from iotcls.bundle import ModelBundle, default_model_path

    p = default_model_path()
    if p.is_file():
        return str(p), f"bundled default model ({p.name})"
    import torch

    from iotcls.flowtable import FlowTable
    from iotcls.layout import MatrixLayout
    from iotcls.model import IoTCNN, ModelConfig
    from iotcls.predict import Predictor
    from iotcls.trust.layer import fit_state

    torch.manual_seed(0)
    lay = MatrixLayout()
    classes = [f"class{i}" for i in range(27)]
    b = ModelBundle(IoTCNN(ModelConfig.from_layout(lay, 27)).eval(), lay, classes)
    recs = synthetic_records(3000, devices=300, seed=7)
    x, _ = lay.matrices(FlowTable.from_records(recs, lay.packets, lay.required_payload_bytes()))
    y = Predictor(b).predict(x).index
    state, _ = fit_state(b.model, lay, 1.0, classes, x, y)
    b.trust = state.to_dict()
    out = b.save(tmp / "bench-model.pt")
    return str(out), (
        "random-weight model of the default layout and size, trust state fitted "
        "on synthetic records (no bundled model yet)"
    )


def write_config(
    path: Path, url: str, model: str, scorers: int, args, policy: str = "all", explain: str = "none"
) -> None:
    path.write_text(
        f"zeek: {{url: '{url}', reconnect_max_s: 0.5}}\n"
        f"bridge: {{bind: ['tcp://127.0.0.1:*'], queue_records: {args.queue}}}\n"
        f"scorers: {{count: {scorers}, model: '{model}', device: cpu, threads: 1,"
        f" batch_size: {args.batch_size}, max_wait_ms: {args.max_wait_ms}, explain: {explain}}}\n"
        f"log: {{policy: {policy}}}\n"
    )


class Serve:
    """One ``iotcls serve`` subprocess against the fake Zeek."""

    def __init__(self, zeek: FakeZeek, cfg: Path, scorers: int):
        self.zeek, self.cfg, self.scorers = zeek, cfg, scorers
        self.proc: asyncio.subprocess.Process | None = None
        self.summary = ""

    async def __aenter__(self) -> Serve:
        self.zeek.bridge_connected.clear()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "iotcls",
            "serve",
            "--config",
            str(self.cfg),
            "--log-level",
            "warning",
            stdout=asyncio.subprocess.PIPE,
        )
        await asyncio.wait_for(self.zeek.bridge_connected.wait(), 60)
        await asyncio.sleep(4.0)  # scorers: python + torch start, model load
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(self.proc.communicate(), 60)
        lines = [ln for ln in out.decode().splitlines() if "stopped in" in ln]
        self.summary = lines[-1] if lines else "(no summary)"

    def counts(self) -> dict[str, str]:
        return dict(re.findall(r"(\w+)=(\S+)", self.summary))


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
        return (
            f"CPU per record: load generator {d[0]:.0f} us, bridge {d[1]:.0f} us, "
            f"scorers {d[2]:.0f} us, total {sum(d):.0f} us"
        )


async def capacity(zeek, gen, cfg, model, n, args) -> float:
    write_config(cfg, zeek.url, model, n, args)
    async with Serve(zeek, cfg, n) as serve:
        await gen.closed_loop(args.window, 2.0, settle_s=5.0)  # warm up
        cpu = CpuMeter(serve.proc.pid)
        r = await gen.closed_loop(args.window, args.capacity_s, settle_s=10.0)
        cpu_line = cpu.per_record_us(r.labelled)
    print(
        f"  {n} scorer(s): {r.labels_per_s:8.0f} labels/s over {r.seconds:.1f} s "
        f"({r.labelled} of {r.sent} labelled; p50 {r.pct_ms(50):.1f} ms, "
        f"p99 {r.pct_ms(99):.1f} ms with {args.window} outstanding)",
        flush=True,
    )
    print(f"    {cpu_line}", flush=True)
    return r.labels_per_s


async def sustained(zeek, gen, cfg, model, args) -> None:
    print(
        f"sustained: {args.rate:.0f} records/s for {args.duration:.0f} s, {args.scorers} "
        f"scorer(s), log.policy all, explain none:",
        flush=True,
    )
    write_config(cfg, zeek.url, model, args.scorers, args)
    async with Serve(zeek, cfg, args.scorers) as serve:
        # ready = labels come back (the scorers may still be loading the model after the
        # bridge connected); a second of light traffic, not measured
        await gen.closed_loop(20, 1.0, settle_s=30.0)
        sampler = RssSampler(serve.proc.pid, 1.0)
        st = asyncio.create_task(sampler.run())
        cpu = CpuMeter(serve.proc.pid)
        r = await gen.open_loop(args.rate, args.duration, settle_s=10.0)
        cpu_line = cpu.per_record_us(r.labelled)
        st.cancel()
    lat = r.latencies_s
    print(
        f"  sent {r.sent} ({r.sent_per_s:.0f}/s), labelled {r.labelled} "
        f"({r.labelled / max(args.duration, 1e-9):.0f}/s over the send period), "
        f"outstanding after 10 s: {r.outstanding}"
    )
    print(
        f"  latency record -> label: p50 {r.pct_ms(50):.1f} ms, p90 {r.pct_ms(90):.1f} ms, "
        f"p99 {r.pct_ms(99):.1f} ms, p99.9 {r.pct_ms(99.9):.1f} ms, max "
        f"{(lat.max() * 1000 if len(lat) else float('nan')):.1f} ms"
    )
    warm = r.after(WARM_UP_S)
    if len(warm):
        print(
            f"  after the first {WARM_UP_S:.0f} s (model, caches and allocator warm): p50 "
            f"{np.percentile(warm, 50) * 1000:.1f} ms, p99 {np.percentile(warm, 99) * 1000:.1f} "
            f"ms, max {warm.max() * 1000:.1f} ms over {len(warm)} labels"
        )
        worst = max(
            range(int(args.duration)),
            key=lambda t: (
                np.percentile(r.latencies_s[(r.sent_at_s >= t) & (r.sent_at_s < t + 1)], 99)
                if ((r.sent_at_s >= t) & (r.sent_at_s < t + 1)).any()
                else 0.0
            ),
        )
        sec = r.latencies_s[(r.sent_at_s >= worst) & (r.sent_at_s < worst + 1)]
        print(f"  worst second: {worst}-{worst + 1} s, p99 {np.percentile(sec, 99) * 1000:.1f} ms")
    s = sampler.samples
    if s:
        skip = min(60.0, args.duration / 4)
        late = [x for x in s if x[0] >= skip] or s
        print(
            f"  RSS bridge: {late[0][1]:.0f} MiB at {late[0][0]:.0f} s -> {s[-1][1]:.0f} MiB at "
            f"{s[-1][0]:.0f} s (max {max(x[1] for x in s):.0f}), trend after {skip:.0f} s "
            f"{sampler.slope_mib_per_min(1, skip):+.2f} MiB/min"
        )
        print(
            f"  RSS scorers: {late[0][2]:.0f} MiB -> {s[-1][2]:.0f} MiB (max "
            f"{max(x[2] for x in s):.0f}), trend {sampler.slope_mib_per_min(2, skip):+.2f} MiB/min"
        )
        if args.rss_log:
            Path(args.rss_log).write_text(
                "t_s,bridge_mib,scorers_mib\n"
                + "".join(f"{t:.1f},{b:.1f},{k:.1f}\n" for t, b, k in s)
            )
    print(f"  {cpu_line}")
    print(f"  serve: {serve.summary}")
    ok_rate = r.labelled >= 0.99 * r.sent and r.sent_per_s >= 0.98 * args.rate
    print(
        f"  targets: {args.rate:.0f}/s sustained: {'met' if ok_rate else 'NOT met'}; p99 <= 50 ms: "
        f"{'met' if r.pct_ms(99) <= 50 else 'NOT met'}",
        flush=True,
    )


async def default_deployment(zeek, cfg, model, args) -> None:
    """log.policy changes + explain logged; devices repeat their traffic (stable labels)."""
    print(
        f"default deployment: log.policy changes, explain logged, {args.devices} devices "
        f"repeating their flows, {args.rate:.0f} records/s for {args.default_s:.0f} s, "
        f"{args.scorers} scorer(s):",
        flush=True,
    )
    gen = LoadGen(zeek, synthetic_records(args.devices, devices=args.devices, seed=2))
    write_config(cfg, zeek.url, model, args.scorers, args, policy="changes", explain="logged")
    async with Serve(zeek, cfg, args.scorers) as serve:
        cpu = CpuMeter(serve.proc.pid)
        t0 = time.monotonic()
        r = await gen.open_loop(args.rate, args.default_s, settle_s=3.0)
        cpu_line = cpu.per_record_us(r.sent)
        secs = time.monotonic() - t0
    c = serve.counts()
    m = re.search(r"latency_p99<=(\S+)", serve.summary)
    print(
        f"  sent {r.sent} ({r.sent / args.default_s:.0f}/s); serve: labelled "
        f"{c.get('labelled')}, explained {c.get('explained')}, label events sent "
        f"{c.get('labels_sent')}, suppressed {c.get('suppressed')}, shed "
        f"{c.get('shed')}, in {secs:.0f} s; bridge-side p99 (dispatch to label) <= "
        f"{m.group(1) if m else '?'}"
    )
    print(f"  {cpu_line}")
    print(f"  serve: {serve.summary}", flush=True)


async def scorer_tier(model: str, n: int, seconds: float, tmp: Path) -> float:
    """Matrices/s through the dispatcher and ``n`` scorer processes alone (no WebSocket, no
    decoding): what the scorer tier can do, and how it scales."""
    import numpy as np

    from iotcls.bridge.dispatch import Dispatcher
    from iotcls.config import Config
    from iotcls.scorer.service import load_bundle

    lay = load_bundle(model).layout
    cfg = Config()
    cfg.bridge.bind = ["tcp://127.0.0.1:*"]
    cfg.log.policy = "all"
    done = [0]
    d = Dispatcher(cfg, lay, lambda outs: done.__setitem__(0, done[0] + len(outs)))
    (addr,) = await d.start()
    scfg = tmp / "tier.yaml"
    scfg.write_text("scorers: {explain: none, threads: 1}\n")  # as phases 1 and 2
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "iotcls",
            "serve",
            "--scorer-only",
            "--connect",
            addr,
            "--name",
            f"tier{i}",
            "--model",
            model,
            "--device",
            "cpu",
            "--log-level",
            "warning",
            "--config",
            str(scfg),
        )
        for i in range(n)
    ]
    while len(d.scorers) < n:
        await asyncio.sleep(0.05)
    m = np.random.default_rng(0).random((100, *lay.shape), dtype=np.float32)
    devs = [f"d{i}" for i in range(100)]
    sent, t0, rate = 0, time.monotonic(), 0.0
    while True:
        el = time.monotonic() - t0
        if el >= seconds:
            rate = done[0] / el
            break
        if sent - done[0] < 4000:
            d.submit(m, devs, range(100))
            sent += 100
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(0.001)
    await d.drain(30)
    await d.stop_scorers()
    for p in procs:
        await p.wait()
    await d.close()
    return rate


async def main(args) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model, what = model_path(args.model, tmp)
    print(
        f"bench_serve: model: {what}; {os.cpu_count()} CPUs; load generator in this process; "
        f"load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    zeek = await FakeZeek(strict=False, payload_bytes=64).start()
    gen = LoadGen(zeek, synthetic_records(args.templates, devices=args.devices, seed=1))
    gc.freeze()  # as iotcls serve does: full collections scan only what the run allocates
    cfg = tmp / "serve.yaml"
    if not args.skip_tier:
        tier = {n: await scorer_tier(model, n, args.capacity_s, tmp) for n in (1, 2)}
        print(
            f"scorer tier alone (dispatcher + scorer processes, no WebSocket): 1 scorer "
            f"{tier[1]:.0f} matrices/s, 2 scorers {tier[2]:.0f}: ratio {tier[2] / tier[1]:.2f} "
            f"(explain none)",
            flush=True,
        )
    if not args.skip_capacity:
        print("capacity (closed loop, log.policy all, explain none):", flush=True)
        rates = {n: await capacity(zeek, gen, cfg, model, n, args) for n in (1, 2)}
        print(f"  ratio 2 scorers / 1 scorer: {rates[2] / rates[1]:.2f}", flush=True)
    if not args.skip_sustained:
        await sustained(zeek, gen, cfg, model, args)
    if not args.skip_default:
        await default_deployment(zeek, cfg, model, args)
    print(
        f"load average at end {os.getloadavg()[0]:.1f} (other work on this machine competes "
        f"for the same cores)"
    )
    await zeek.close()
    return 0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=20.0, help="sustained phase, seconds")
    p.add_argument("--rate", type=float, default=5000.0, help="offered records/s")
    p.add_argument("--scorers", type=int, default=1, help="scorers in phases 2 and 3")
    p.add_argument("--capacity-s", type=float, default=8.0, help="each capacity phase, seconds")
    p.add_argument("--default-s", type=float, default=15.0, help="phase 3, seconds")
    p.add_argument("--skip-tier", action="store_true")
    p.add_argument("--skip-capacity", action="store_true")
    p.add_argument("--skip-sustained", action="store_true")
    p.add_argument("--skip-default", action="store_true")
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
