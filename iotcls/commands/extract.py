"""``iotcls extract``: captures -> a dataset file of flow-sequence matrices with labels."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..capture import add_capture_arguments, specs_from_args
from ..cli import CliError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_capture_arguments(parser)
    parser.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="dataset file to write (.npz)"
    )
    parser.add_argument(
        "--layout",
        default="default",
        metavar="default|paper|no-payload|FILE",
        help="matrix layout: a preset or a YAML file (default: default)",
    )
    parser.add_argument("--compress", action="store_true", help="compress the dataset file")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def load_layout(spec: str):
    """A preset name or a YAML file; CliError when neither."""
    from ..layout import LayoutError, MatrixLayout

    path = Path(spec)
    try:
        if spec.endswith((".yaml", ".yml")) or path.is_file():
            try:
                text = path.read_text()
            except OSError as e:
                raise CliError(f"--layout {spec}: cannot read: {e.strerror or e}") from None
            return MatrixLayout.from_yaml(text)
        return MatrixLayout.preset(spec)
    except LayoutError as e:
        raise CliError(f"--layout {spec}: {e}") from None


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..dataset import build_dataset
    from ..layout import LayoutError

    layout = load_layout(args.layout)
    specs = specs_from_args(args)
    for name in ("window", "packets", "payload_bytes"):
        v = getattr(args, name)
        if v is not None and v <= 0 and not (name == "payload_bytes" and v == 0):
            raise CliError(f"--{name.replace('_', '-')} must be positive, not {v}")
    failed: list[str] = []
    warned = 0

    def on_capture(cm) -> None:
        nonlocal warned
        if cm.flows.error:
            failed.append(cm.flows.error)
            tqdm.write(f"iotcls extract: error: {cm.flows.error}", file=sys.stderr)
        for w in cm.flows.stats.summary_warnings():
            tqdm.write(f"iotcls extract: warning: {w}", file=sys.stderr)
        warned += cm.flows.stats.warning_count

    try:
        ds = build_dataset(
            specs,
            layout,
            args.window,
            args.packets,
            args.payload_bytes,
            progress=not args.quiet,
            on_capture=on_capture,
        )
    except LayoutError as e:
        raise CliError(str(e)) from None
    try:
        ds.save(args.output, compress=args.compress)
    except OSError as e:
        raise CliError(f"{args.output}: cannot write: {e.strerror or e}") from None
    ct = ds.captures_table
    print(f"files:    {len(specs)} ({len(failed)} unreadable)")
    print(
        f"packets:  {int(ct.packets.sum()):,} IP packets, {int(ct.bytes.sum()):,} bytes "
        f"({int(ct.frames.sum()):,} frames)"
    )
    print(f"records:  {len(ds):,} (of {int(ct.device_packets.sum()):,} device packets)")
    print(
        f"matrices: {ds.matrices.shape[0]:,} x {ds.matrices.shape[1]} x "
        f"{ds.matrices.shape[2]} float32 -> {args.output}"
    )
    counts = ds.label_counts()
    if counts:
        width = max(len(k) for k in counts)
        print(f"labels:   {len(ds.classes)} classes")
        for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {label or '(unlabelled)':<{width}}  {n:>8,}")
    print(f"warnings: {warned}")
    return 1 if failed else 0
