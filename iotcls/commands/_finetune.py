"""``iotcls train DATA --from MODEL -o OUT``: fine-tune a bundle (see :mod:`iotcls.finetune`)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from ..cli import CliError
from ._data import data_sources, load_learning_data

if TYPE_CHECKING:
    from ..bundle import ModelBundle

DEFAULT_MODEL = "default-model"  # --from, --refit-trust: the bundle shipped with iotcls


def load_named_model(name: str) -> ModelBundle:
    """The bundle ``name`` names (:data:`DEFAULT_MODEL`: the shipped one), or CliError."""
    from ..bundle import BundleError, ModelBundle

    try:
        return ModelBundle.load(None if name == DEFAULT_MODEL else name)
    except BundleError as e:
        raise CliError(str(e)) from None


def run_finetune(args: argparse.Namespace) -> int:
    from ..bundle import BundleError
    from ..finetune import FinetuneConfig, finetune

    t0 = time.time()
    progress = not args.quiet and sys.stderr.isatty()
    if args.layout:
        raise CliError("--layout does not go with --from: the bundle's layout is used")
    base = load_named_model(args.from_model)
    ds, served = load_learning_data(args, base.layout, exact_layout=True, progress=progress)
    labelled = ds.labels != ""
    if not labelled.any():
        raise CliError(
            "no labelled records: fill in the label column of the device list "
            "(iotcls inventory) and give it with --labels devices.csv"
        )
    cfg = FinetuneConfig(
        seed=args.seed,
        batch_size=args.batch_size,
        threads=args.threads,
        **({"epochs": args.epochs} if args.epochs is not None else {}),
    )
    meta = {
        "data": {
            "captures": [str(c) for c in args.captures],
            "records": int(len(ds)),
            "labelled_records": int(labelled.sum()),
            "class_counts": {k: v for k, v in ds.label_counts().items() if k},
            **data_sources(args),
        }
    }
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    try:
        bundle = finetune(base, ds, served, cfg, meta, log)
        path = bundle.save(args.output)
    except (OSError, BundleError, ValueError) as e:
        raise CliError(f"{args.output}: {e}") from None
    added = bundle.metadata["classes_added"]
    print(
        f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB): {len(bundle.classes)} classes "
        f"({len(added)} new: {', '.join(added) or 'none'}), fine-tuned from {base.name}; "
        f"{time.time() - t0:.0f}s in all. Serve it: copy it over scorers.model, then "
        "iotcls reload"
    )
    return 0
