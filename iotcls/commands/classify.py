"""``iotcls classify PCAP...``: label the devices in captures, write ``DIR/iot_class.log``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..capture import add_capture_arguments
    from ..strategies import STRATEGIES

    add_capture_arguments(p)
    p.add_argument("--model", metavar="MODEL", help="model bundle (default: the shipped model)")
    p.add_argument(
        "--format",
        choices=("zeek", "json"),
        default="zeek",
        help="iot_class.log as Zeek ASCII (default) or JSON lines",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        default=".",
        help="directory for iot_class.log (default: the current one)",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="sequence",
        help="which labels the log carries (docs/strategies.md; default %(default)s)",
    )
    from ..cli import add_renamed

    add_renamed(
        p,
        "--device",
        "--torch-device",
        dest="compute",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where the model runs",
    )


def run(args: argparse.Namespace) -> int:
    from ..bundle import BundleError, ModelBundle
    from ..capture import specs_from_args
    from ..classify import classify_capture, format_summary, summarize
    from ..cli import CliError
    from ..dataset import capture_matrices
    from ..layout import LayoutError
    from ..logschema import open_log
    from ..predict import Predictor
    from ._data import report_capture

    try:
        bundle = ModelBundle.load(args.model)
    except BundleError as e:
        raise CliError(str(e)) from None
    specs = specs_from_args(args)
    predictor = Predictor(bundle, device=args.compute)
    try:
        writer, f = open_log(Path(args.output), args.format)
    except OSError as e:
        raise CliError(f"{args.output}: cannot write iot_class.log: {e.strerror or e}") from None
    failed, results, entries = 0, [], []
    try:
        for spec in specs:
            try:
                cm = capture_matrices(
                    spec, bundle.layout, args.window, args.packets, args.payload_bytes
                )
            except LayoutError as e:
                raise CliError(str(e)) from None
            report_capture(cm)
            if cm.flows.error:
                failed += 1
                continue
            if cm.matrices.shape[1:] != bundle.layout.shape:
                raise CliError(
                    f"--window/--packets do not match the model's layout {bundle.layout.to_dict()}"
                )
            if not len(cm.matrices):
                continue  # read, but no flow of the selected devices: nothing to label
            c = classify_capture(predictor, cm, args.strategy)
            entries += c.entries(bundle.name)
            results.append((cm, c.sequences))
        entries.sort(key=lambda e: e.ts)
        for e in entries:
            writer.write(e)
    finally:
        writer.close()
        f.close()
    rows = summarize(predictor, results)
    log = Path(args.output) / "iot_class.log"
    print(
        f"{len(entries)} labels ({args.strategy} strategy) from {len(specs) - failed} of "
        f"{len(specs)} captures by {bundle.name} -> {log}",
        file=sys.stderr,
    )
    if rows:
        print(format_summary(rows))
    else:
        print("no flows of the selected devices", file=sys.stderr)
    return 1 if failed else 0
