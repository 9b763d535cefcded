"""``iotcls train CAPTURES -o MODEL``: train a model bundle on a labelled capture set."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..cli import CliError
from ._data import data_sources, is_dataset_file, layout_from_arg, load_data

if TYPE_CHECKING:
    from ..bundle import ModelBundle


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..capture import add_capture_arguments
    from ..finetune import FinetuneConfig
    from ..train import TrainConfig

    add_capture_arguments(p)
    d = TrainConfig()
    p.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write")
    p.add_argument(
        "--layout",
        metavar="PRESET|FILE.yaml",
        help="matrix layout: default, paper, no-payload or a YAML file "
        "(a dataset .npz brings its own)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="split and training seed")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"default {d.epochs}; with --from, {FinetuneConfig().epochs}",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help="stop after this many epochs without a better validation macro-F1",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument(
        "--val",
        type=float,
        default=d.val_fraction,
        dest="val_fraction",
        help="share of each label's capture files for validation",
    )
    p.add_argument(
        "--test",
        type=float,
        default=d.test_fraction,
        dest="test_fraction",
        help="share of each label's capture files held out for evaluate",
    )
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--from",
        dest="from_model",
        metavar="MODEL",
        help="fine-tune this bundle (default-model: the shipped one) instead of "
        "training anew: its types stay, new labels are added (docs/learn.md)",
    )
    p.add_argument(
        "--refit-trust",
        metavar="MODEL",
        help="keep this bundle's weights (default-model: the shipped one) and fit only its "
        "trust state anew, on the data it was trained on (its own split): a trust rule "
        "added after it (docs/trust.md)",
    )


def run(args: argparse.Namespace) -> int:
    from ..train import TrainConfig, train

    if args.from_model:
        from ._finetune import run_finetune

        return run_finetune(args)
    if args.refit_trust:
        return run_refit_trust(args)
    t0 = time.time()
    progress = not args.quiet and sys.stderr.isatty()
    if is_dataset_file(args) and args.layout:
        raise CliError("--layout applies to captures; a dataset file brings its own layout")
    ds = load_data(args, layout_from_arg(args.layout), exact_layout=False, progress=progress)
    labelled = np.flatnonzero(ds.labels != "")
    if len(labelled) == 0:
        raise CliError(
            "no labelled flows: give an IoT Sentinel directory or a manifest (pcap,mac,label)"
        )
    ds = ds.take(labelled)
    classes = ds.classes
    if len(classes) < 2:
        raise CliError(f"training needs at least two labels, the data has {classes}")
    extract_s = time.time() - t0
    print(
        f"data: {len(ds)} labelled flows, {len(set(ds.captures.tolist()))} capture files, "
        f"{len(classes)} labels; layout {ds.layout.rows}x{ds.layout.width} "
        f"({ds.layout.payload_mode}, {ds.layout.payload_bytes} payload bytes/packet); "
        f"read in {extract_s:.1f}s",
        file=sys.stderr,
    )
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in known and v is not None})
    meta = {
        "data": {
            "captures": [
                str(c)
                for c in (args.captures if isinstance(args.captures, list) else [args.captures])
            ],
            "labels_mode": getattr(args, "labels", None) or "default",
            "flows": int(len(ds)),
            "capture_files": int(len(set(ds.captures.tolist()))),
            "class_counts": {k: v for k, v in ds.label_counts().items()},
        },
        "extract_seconds": round(extract_s, 1),
    }
    meta["data"].update(data_sources(args))
    bundle = train(
        ds.matrices,
        ds.labels,
        ds.captures,
        ds.layout,
        cfg,
        classes=classes,
        metadata=meta,
        progress=progress,
        log=lambda m: print(m, file=sys.stderr),
        devices=ds.devices,
        times=ds.timestamps,
    )
    path = save_model(bundle, args.output)
    m = bundle.metadata
    print(
        f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB): {len(classes)} classes, "
        f"{m['parameters']:,} parameters, {m['flops']['sequence'] / 1e6:.2f} MFLOPs/matrix, "
        f"validation macro-F1 {m['val_macro_f1']:.4f}, temperature {bundle.temperature:.3f}, "
        f"{time.time() - t0:.0f}s in all"
    )
    labels = f" --labels {args.labels}" if getattr(args, "labels", None) else ""
    print(
        f"held out for evaluation: {len(m['split']['test'])} capture files; "
        f"run: iotcls evaluate {' '.join(meta['data']['captures'])}{labels} --model {path}"
    )
    return 0


def run_refit_trust(args: argparse.Namespace) -> int:
    from ..train import refit_trust
    from ._finetune import load_named_model

    t0 = time.time()
    bundle = load_named_model(args.refit_trust)
    source = bundle.name
    ds = load_data(args, bundle.layout, exact_layout=True, progress=False)
    ds = ds.take(np.flatnonzero(ds.labels != ""))
    try:
        refit_trust(
            bundle,
            ds.matrices,
            ds.labels,
            ds.captures,
            ds.devices,
            ds.timestamps,
            log=lambda m: print(m, file=sys.stderr),
        )
    except ValueError as e:
        raise CliError(f"{args.refit_trust}: cannot refit its trust state: {e}") from None
    path = save_model(bundle, args.output)
    t = bundle.metadata["trust"]
    print(
        f"wrote {path}: {source}'s weights with a trust state refitted on "
        f"{t['labels']} validation labels; rule 7 holds back "
        f"{', '.join(t.get('dhcp_needed', [])) or 'no class'} ({time.time() - t0:.0f}s)"
    )
    return 0


def save_model(bundle: ModelBundle, output: str) -> Path:
    """Write the bundle to ``output``; its path, or CliError naming it."""
    from ..bundle import BundleError

    try:
        return bundle.save(output)
    except (OSError, BundleError) as e:
        raise CliError(f"{output}: cannot write model: {e}") from None
