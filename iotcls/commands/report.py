"""``iotcls report LOG... -o report.html``: a self-contained HTML device inventory."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "logs",
        nargs="+",
        metavar="LOG",
        help="iot_class.log files: Zeek ASCII or JSON, .gz too (rotated logs)",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        default="report.html",
        help="HTML file to write (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    from ..cli import CliError
    from ..inventory import build_inventory
    from ..logread import LogReadError, read_logs
    from ..report import render_html

    try:
        rows = read_logs(args.logs)
    except LogReadError as e:
        raise CliError(str(e)) from None
    devices = build_inventory(rows)
    page = render_html(devices, [str(p) for p in args.logs], len(rows))
    out = Path(args.output)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)  # an existing report is replaced whole or not at all
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CliError(f"{out}: cannot write the report: {e.strerror or e}") from None
    print(f"{len(devices)} devices from {len(rows)} entries -> {out}", file=sys.stderr)
    return 0
