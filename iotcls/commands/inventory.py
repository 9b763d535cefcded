"""``iotcls inventory STORE -o devices.csv``: the devices of a flow store, for the operator to
label (see :mod:`iotcls.device_inventory` and docs/learn.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import CliError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "stores",
        nargs="+",
        metavar="STORE",
        help="flow store directories (record.directory of iotcls serve)",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="CSV",
        help="the device list to write; an existing one is updated, keeping what you wrote in it",
    )
    p.add_argument(
        "--model",
        metavar="MODEL",
        help="whose DHCP identities suggest labels (default: the shipped model)",
    )


def run(args: argparse.Namespace) -> int:
    from ..bundle import BundleError, ModelBundle
    from ..device_inventory import InventoryError, inventory
    from ..store import is_store, iter_segments
    from ..trust.decision import TrustState
    from ..trust.dhcp_identity import DhcpIdentity

    for s in args.stores:
        if not is_store(s):
            raise CliError(f"{s}: not a flow store (no seg-*.npz segments in it)")
    try:
        bundle = ModelBundle.load(args.model)
    except BundleError as e:
        raise CliError(str(e)) from None
    seen = DhcpIdentity.of(TrustState.from_dict(bundle.trust) if bundle.trust else None).seen
    skipped: list[str] = []
    read = {"records": 0, "segments": 0}

    def segments():  # one at a time: a store may not fit in memory whole
        warn = lambda m: print(f"iotcls: warning: {m}", file=sys.stderr)  # noqa: E731
        for seg in iter_segments(args.stores, warn, skipped):
            read["records"] += len(seg[1])
            read["segments"] += 1
            yield seg

    try:
        n = inventory(segments(), Path(args.output), seen)
    except InventoryError as e:
        raise CliError(str(e)) from None
    print(
        f"{args.output}: {n['devices']} devices ({n['new']} new), {n['labelled']} labelled by "
        f"you, {n['suggested']} with a suggested label; from {read['records']} records in "
        f"{read['segments']} segments" + (f", {len(skipped)} skipped" if skipped else "")
    )
    return 0
