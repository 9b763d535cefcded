"""Data for the model commands: a capture set read by the sensor, or a dataset file."""

from __future__ import annotations

import argparse
import sys

from ..cli import CliError
from ..dataset import CaptureMatrices, Dataset, DatasetError, build_dataset
from ..layout import LayoutError, MatrixLayout


def is_dataset_file(args: argparse.Namespace) -> bool:
    items = args.captures if isinstance(args.captures, list) else [args.captures]
    return len(items) == 1 and items[0].endswith(".npz")


def report_capture(cm: CaptureMatrices) -> None:
    """One line per unreadable file, and the reader's warnings, on stderr."""
    if cm.flows.error:
        print(f"iotcls: warning: {cm.flows.error}", file=sys.stderr)
    for w in cm.flows.stats.summary_warnings():
        print(f"iotcls: warning: {w}", file=sys.stderr)


def load_data(
    args: argparse.Namespace, layout: MatrixLayout, exact_layout: bool, progress: bool
) -> Dataset:
    """The dataset named by ``args.captures``: a ``.npz`` from ``iotcls extract`` or captures.

    ``exact_layout``: the data must have ``layout`` (a model's); otherwise a dataset file
    brings its own layout.
    """
    from ..capture import specs_from_args

    if is_dataset_file(args):
        path = args.captures[0] if isinstance(args.captures, list) else args.captures
        try:
            ds = Dataset.load(path)
        except DatasetError as e:
            raise CliError(str(e)) from None
        if exact_layout:
            try:
                layout.check_compatible(ds.layout, f"dataset {path}")
            except LayoutError as e:
                raise CliError(str(e)) from None
        return ds
    specs = specs_from_args(args)
    try:
        ds = build_dataset(specs, layout, args.window, args.packets, args.payload_bytes,
                           progress=progress, on_capture=report_capture)  # fmt: skip
    except LayoutError as e:
        raise CliError(str(e)) from None
    if exact_layout and ds.layout != layout:
        raise CliError(f"--window/--packets change the model's layout: "
                       f"{ds.layout.to_dict()} is not {layout.to_dict()}")  # fmt: skip
    unreadable = int((ds.captures_table.errors != "").sum())
    if unreadable == len(specs):
        raise CliError("no capture could be read")
    return ds


def layout_from_arg(value: str | None) -> MatrixLayout:
    """``--layout``: a preset name (default, paper, no-payload) or a YAML file."""
    from .extract import load_layout

    return load_layout(value) if value else MatrixLayout()
