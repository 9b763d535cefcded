"""Data for the model commands: a capture set read by the sensor, or a dataset file."""

from __future__ import annotations

import argparse
import sys

import numpy as np

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


def store_args(args: argparse.Namespace) -> list[str]:
    """The flow stores (:mod:`iotcls.store`) among ``args.captures``."""
    from ..store import is_store

    items = args.captures if isinstance(args.captures, list) else [args.captures]
    return [c for c in items if is_store(c)]


def load_data(
    args: argparse.Namespace, layout: MatrixLayout, exact_layout: bool, progress: bool
) -> Dataset:
    """The dataset named by ``args.captures``: a ``.npz`` from ``iotcls extract``, captures,
    flow stores, or captures and flow stores together.

    ``exact_layout``: the data must have ``layout`` (a model's); otherwise a dataset file
    brings its own layout.
    """
    return load_learning_data(args, layout, exact_layout, progress)[0]


def load_learning_data(
    args: argparse.Namespace, layout: MatrixLayout, exact_layout: bool, progress: bool
) -> tuple[Dataset, np.ndarray]:
    """:func:`load_data`, and per row the label the service gave it where that label was
    trusted ("" elsewhere, and for every capture row): what fine-tuning judges trust by
    (:mod:`iotcls.finetune`). Flow stores are labelled by ``--labels devices.csv``."""
    stores = store_args(args)
    if not stores:
        ds = _load_captures(args, layout, exact_layout, progress)
        return ds, np.full(len(ds), "", object)
    from ..store import read_stores, store_dataset

    labels = _store_labels(args)
    data = read_stores(stores, warn=lambda m: print(f"iotcls: warning: {m}", file=sys.stderr))
    if not len(data):
        raise CliError(f"{', '.join(stores)}: no readable records in the store")
    try:
        ds, served = store_dataset(data, layout, labels)
    except ValueError as e:
        raise CliError(f"{', '.join(stores)}: {e}") from None
    trusted = np.where(served.trusted, served.label, "").astype(object)
    rest = [
        c
        for c in (args.captures if isinstance(args.captures, list) else [args.captures])
        if c not in stores
    ]
    if rest:
        other = argparse.Namespace(**{**vars(args), "captures": rest})
        more = _load_captures(other, layout, exact_layout, progress)
        ds = Dataset.concat([ds, more], layout)
        trusted = np.concatenate([trusted, np.full(len(more), "", object)])
    return ds, trusted


def _store_labels(args: argparse.Namespace) -> dict[str, str]:
    from ..device_inventory import InventoryError, labels_of

    path = getattr(args, "labels", None)
    if not path or not str(path).lower().endswith(".csv"):
        return {}
    try:
        return labels_of(path)
    except InventoryError as e:
        raise CliError(str(e)) from None


def data_sources(args: argparse.Namespace) -> dict:
    """What a bundle records of the flow stores and device list it learnt from."""
    import hashlib
    from pathlib import Path

    from ..store import segment_paths

    out: dict = {}
    stores = store_args(args)
    if stores:
        out["stores"] = [
            {"path": str(Path(s).resolve()), "segments": [p.name for p in segment_paths(Path(s))]}
            for s in stores
        ]
    path = getattr(args, "labels", None)
    if path and str(path).lower().endswith(".csv") and Path(path).is_file():
        out["labels_file"] = {
            "path": str(Path(path).resolve()),
            "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        }
    return out


def _load_captures(
    args: argparse.Namespace, layout: MatrixLayout, exact_layout: bool, progress: bool
) -> Dataset:
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
        ds = build_dataset(
            specs,
            layout,
            args.window,
            args.packets,
            args.payload_bytes,
            progress=progress,
            on_capture=report_capture,
        )
    except LayoutError as e:
        raise CliError(str(e)) from None
    if exact_layout and ds.layout != layout:
        raise CliError(
            f"--window/--packets change the model's layout: "
            f"{ds.layout.to_dict()} is not {layout.to_dict()}"
        )
    unreadable = int((ds.captures_table.errors != "").sum())
    if unreadable == len(specs):
        raise CliError("no capture could be read")
    return ds


def layout_from_arg(value: str | None) -> MatrixLayout:
    """``--layout``: a preset name (default, paper, no-payload) or a YAML file."""
    from .extract import load_layout

    return load_layout(value) if value else MatrixLayout()
