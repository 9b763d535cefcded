"""``iotcls demo``: write a synthetic home network's capture, classify it, write the log and
the HTML inventory. The main job end to end with no input from the user (and no third-party
capture shipped: :mod:`iotcls.demo` writes the packets from behaviour profiles)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        default="out",
        help="directory for demo.pcap, iot_class.log and report.html (default: %(default)s)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=180.0,
        metavar="SECONDS",
        help="length of the synthetic capture (default: %(default)g)",
    )
    p.add_argument("--model", metavar="MODEL", help="model bundle (default: the shipped model)")


def run(args: argparse.Namespace) -> int:
    from ..bundle import BundleError, ModelBundle
    from ..capture import CaptureSpec
    from ..classify import classify_capture, format_summary, summarize
    from ..cli import CliError
    from ..dataset import capture_matrices
    from ..demo import write_demo_pcap
    from ..inventory import build_inventory
    from ..logread import read_logs
    from ..logschema import open_log
    from ..predict import Predictor
    from ..report import render_html

    if not args.duration > 0:
        raise CliError(f"--duration must be a positive number of seconds, not {args.duration}")
    out = Path(args.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        pcap = out / "demo.pcap"
        net = write_demo_pcap(pcap, args.duration)
    except OSError as e:
        raise CliError(f"{out}: cannot write the demo capture: {e.strerror or e}") from None
    try:
        bundle = ModelBundle.load(args.model)
    except BundleError as e:
        raise CliError(str(e)) from None
    print(
        f"iotcls demo: {pcap} is a SYNTHETIC capture ({args.duration:g} s, "
        f"{len(net.devices)} made-up devices written from behaviour profiles, not real "
        f"traffic); classifying it with {bundle.name}",
        file=sys.stderr,
    )
    for d in net.devices:
        print(
            f"  {d.mac}  {d.ip:<15} a {d.profile.kind} ({d.profile.hostname}), joins at "
            f"+{d.joins_at - net.devices[0].joins_at + 2:.0f} s",
            file=sys.stderr,
        )
    spec = CaptureSpec(pcap, "demo", {d.mac: "" for d in net.devices})
    predictor = Predictor(bundle)
    cm = capture_matrices(spec, bundle.layout)
    if cm.flows.error:
        raise CliError(cm.flows.error)
    c = classify_capture(predictor, cm, "sequence")
    entries = sorted(c.entries(bundle.name), key=lambda e: e.ts)
    print(
        "labels as they come out (each device's first label and every change of label or trust):",
        file=sys.stderr,
    )
    t0, last = net.devices[0].joins_at - 2, {}
    for e in entries:
        now = (e.label, e.trusted)
        if last.get(e.device_mac) != now:
            last[e.device_mac] = now
            verdict = "trusted" if e.trusted else f"untrusted ({e.reason})"
            print(
                f"  +{e.ts - t0:6.1f} s  {e.device_mac}  {e.label:<22} {e.confidence:.3f}  "
                f"{verdict}",
                file=sys.stderr,
            )
    writer, f = open_log(out, "zeek")
    try:
        for e in entries:
            writer.write(e)
    finally:
        writer.close()
        f.close()
    log = out / "iot_class.log"
    rows = read_logs([log])
    devices = build_inventory(rows)
    report = out / "report.html"
    report.write_text(render_html(devices, [str(log)], len(rows)), encoding="utf-8")
    print(format_summary(summarize(predictor, [(cm, c.sequences)])))
    print(
        f"iotcls demo: {len(entries)} labels -> {log}; {len(devices)} devices -> {report}",
        file=sys.stderr,
    )
    return 0
