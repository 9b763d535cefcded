"""Trust under shift (docs/model-card.md, "Robust without DHCP"): the default model (or
``--model``) on its held-out captures with and without their DHCP records, and
leave-one-type-out over every type.

    python benchmarks/bench_shift.py ../shared/data/iot-sentinel            # held-out figures
    python benchmarks/bench_shift.py ../shared/data/iot-sentinel --leave-out-all --epochs 8

CAPTURES: the training set (IoT Sentinel layout) or a dataset file from ``iotcls extract``.
"DHCP removed" drops every DHCP record and rebuilds the other records' histories
(:func:`iotcls.trust.shift.without_dhcp`): a device that joined before the sensor started.
"remotes moved" gives each matrix's public remote addresses new ones (servers elsewhere, as
on another network or years later); "timing x4" makes every gap between a flow's packets four
times as long (servers farther away, a slower network: harsher than a longer round trip,
which stretches only the gaps that wait for an answer).
Figures are those of ``iotcls evaluate``: per-sequence and per-device macro-F1 of the labels
``classify`` writes (DHCP identity refinement where there is one), and the trust gate's
coverage and high-confidence (>= 0.9) errors among trusted labels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iotcls.bundle import ModelBundle  # noqa: E402
from iotcls.dataset import Dataset  # noqa: E402
from iotcls.evaluate import evaluate_report  # noqa: E402
from iotcls.splits import Split  # noqa: E402
from iotcls.trust.shift import stretched_timing, without_dhcp  # noqa: E402


def load(path: str) -> Dataset:
    if path.endswith(".npz"):
        return Dataset.load(path)
    from iotcls.capture import specs_from_args
    from iotcls.commands.train import add_arguments
    from iotcls.dataset import build_dataset
    from iotcls.layout import MatrixLayout

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([path, "-o", "unused"])
    return build_dataset(specs_from_args(args), MatrixLayout(), progress=False)


def remotes_moved(ds: Dataset, seed: int = 0) -> Dataset:
    """``ds`` as another network would show it: each matrix's public remote addresses moved
    elsewhere (:func:`iotcls.train.move_remotes`, as training moves half of them)."""
    import torch

    from iotcls.train import move_remotes

    gen = torch.Generator().manual_seed(seed)
    return replace(ds, matrices=move_remotes(torch.from_numpy(ds.matrices), 1.0, gen).numpy())


def held_out(bundle: ModelBundle, ds: Dataset) -> dict:
    """Figures with DHCP, with DHCP removed, with the remote addresses moved and with the
    timing stretched, on the bundle's held-out captures."""
    split = Split(**bundle.metadata["split"])
    test = np.flatnonzero(split.part_of(ds.captures.astype(object)) == 2)
    base = ds.take(test)
    out = {}
    for name, d in (
        ("with_dhcp", base),
        ("dhcp_removed", without_dhcp(base)),
        ("remotes_moved", remotes_moved(base)),
        ("timing_x4", replace(base, matrices=stretched_timing(base.matrices, base.layout, 4))),
    ):
        r = evaluate_report(bundle, d, None, use_all=True)
        ident = r.get("dhcp_identity") or {
            "sequence": r["strategies"]["sequence"],
            "device": r["strategies"]["device"],
        }
        tr = r["trust"]["rows"]["trust"]
        out[name] = {
            "labels": r["data"]["flows"],
            "sequence_macro_f1": ident["sequence"]["macro_f1"],
            "device_macro_f1": ident["device"]["macro_f1"],
            "cnn_sequence_macro_f1": r["strategies"]["sequence"]["macro_f1"],
            "coverage": tr["coverage"],
            "macro_f1_trusted": tr["macro_f1_trusted"],
            "high_conf_trusted_errors": tr["high_conf_errors"]["count"],
            "high_conf_errors_untrusted_model": r["trust"]["rows"]["raw"]["high_conf_errors"][
                "count"
            ],
        }
    return out


def label_type(bundle: ModelBundle, d: Dataset) -> dict:
    """What ``bundle`` says about the flows of ``d`` (a type it never saw): the share of
    labels trusted (each one wrong), and as what."""
    from iotcls.predict import Predictor
    from iotcls.splits import device_sessions

    p = Predictor(bundle)
    groups = device_sessions(d.captures.astype(object), d.devices.astype(object))
    pr = p.label(d.matrices, groups, d.timestamps)
    tr = pr.trusted
    names = np.array(bundle.classes, object)[pr.index[tr]]
    as_what, counts = np.unique(names, return_counts=True) if tr.any() else ([], [])
    top = sorted(zip(counts.tolist(), as_what.tolist()), reverse=True)[:4] if tr.any() else []
    return {
        "labels": int(len(d)),
        "trusted_share": round(float(tr.mean()), 4),
        "high_confidence_trusted": int((tr & (pr.confidence >= 0.9)).sum()),
        "trusted_as": {k: c for c, k in top},
    }


def leave_out_all(
    ds: Dataset, types: list[str], cfg, cache: Path | None, refit: bool = False
) -> dict:
    """Train without each type (``cfg``; bundles kept in ``cache`` and reused; ``refit``:
    a reused bundle gets its trust state fitted anew, as ``train --refit-trust`` does, for
    rules added since it was trained), then label all of that type's flows, with their
    DHCP records and without."""
    from iotcls.train import refit_trust, train

    out = {}
    for x in types:
        t0 = time.time()
        path = cache / f"without-{x}.pt" if cache else None
        keep = np.flatnonzero(ds.labels != x)
        if path is not None and path.exists():
            bundle = ModelBundle.load(path)
            if refit:
                rest = ds.take(keep)
                args = (rest.matrices, rest.labels, rest.captures, rest.devices, rest.timestamps)
                bundle = refit_trust(bundle, *args, log=lambda m: None)
        else:
            bundle = train(
                ds.matrices[keep],
                ds.labels[keep],
                ds.captures[keep],
                ds.layout,
                replace(cfg),
                progress=False,
                log=lambda m: None,
                devices=ds.devices[keep],
                times=ds.timestamps[keep],
            )
            if path is not None:
                bundle.save(path)
        d = ds.take(np.flatnonzero(ds.labels == x))
        out[x] = {
            "with_dhcp": label_type(bundle, d),
            "dhcp_removed": label_type(bundle, without_dhcp(d)),
            "seconds": round(time.time() - t0, 1),
        }
        print(
            f"leave-out {x}: trusted {out[x]['with_dhcp']['trusted_share']:.3f} with DHCP, "
            f"{out[x]['dhcp_removed']['trusted_share']:.3f} without "
            f"({out[x]['seconds']:.0f}s)",
            file=sys.stderr,
        )
    return {
        "types": out,
        "train_config": {"epochs": cfg.epochs, "max_per_capture": cfg.max_per_capture},
    }


def format_held_out(r: dict) -> str:
    lines = [
        f"{'':<14}{'labels':>7}{'seq F1':>8}{'dev F1':>8}{'CNN seq':>8}{'coverage':>9}"
        f"{'F1 trusted':>11}{'hi-conf trusted errors':>24}"
    ]
    for k, v in r.items():
        lines.append(
            f"{k:<14}{v['labels']:>7}{v['sequence_macro_f1']:>8.3f}"
            f"{v['device_macro_f1']:>8.3f}{v['cnn_sequence_macro_f1']:>8.3f}"
            f"{v['coverage']:>9.3f}{v['macro_f1_trusted']:>11.4f}"
            f"{v['high_conf_trusted_errors']:>12} (of {v['high_conf_errors_untrusted_model']})"
        )
    return "\n".join(lines)


def format_leave_out(r: dict) -> str:
    c = r["train_config"]
    lines = [
        f"leave one type out (epochs {c['epochs']}, max {c['max_per_capture'] or 'all'} "
        f"matrices per capture): share of the type's labels trusted (target <= 2%)",
        f"  {'type':<20}{'labels':>7}{'with DHCP':>10}{'no DHCP':>9}  trusted as (no DHCP)",
    ]
    over = []
    for x, f in r["types"].items():
        a, b = f["with_dhcp"], f["dhcp_removed"]
        if max(a["trusted_share"], b["trusted_share"]) > 0.02:
            over.append(x)
        lines.append(
            f"  {x:<20}{a['labels']:>7}{a['trusted_share']:>10.3f}"
            f"{b['trusted_share']:>9.3f}  "
            + ", ".join(f"{k} {v}" for k, v in b["trusted_as"].items())
        )
    lines.append(f"  types over 2%: {', '.join(over) if over else 'none'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("captures")
    p.add_argument("--model", help="model bundle (default: the shipped model)")
    p.add_argument("--no-held-out", dest="held_out", action="store_false")
    p.add_argument(
        "--leave-out-all",
        action="store_true",
        help="train without each type in turn (27 trainings)",
    )
    p.add_argument("--types", nargs="*", help="--leave-out-all: only these types")
    p.add_argument("--epochs", type=int, default=8, help="leave-out trainings (default 8)")
    p.add_argument(
        "--max-per-capture",
        type=int,
        default=0,
        help="leave-out trainings: matrices per capture file (0: all)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dhcp-dropout",
        type=float,
        default=None,
        help="leave-out trainings: TrainConfig.dhcp_dropout (default: its default)",
    )
    p.add_argument("--cache", metavar="DIR", help="leave-out bundles: kept here, reused")
    p.add_argument(
        "--refit-trust",
        action="store_true",
        help="--cache: fit the reused bundles' trust states anew (rules added since)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = p.parse_args(argv)
    t0 = time.time()
    ds = load(args.captures)
    ds = ds.take(np.flatnonzero(ds.labels != ""))
    rep: dict = {}
    if args.held_out:
        bundle = ModelBundle.load(args.model)
        rep["model"] = bundle.name
        rep["held_out"] = held_out(bundle, ds)
        print(f"{bundle.name}: held-out captures of its split")
        print(format_held_out(rep["held_out"]))
    if args.leave_out_all:
        types = args.types or ds.classes
        from iotcls.train import TrainConfig

        cfg = TrainConfig(seed=args.seed, epochs=args.epochs, max_per_capture=args.max_per_capture)
        if args.dhcp_dropout is not None:
            cfg = replace(cfg, dhcp_dropout=args.dhcp_dropout)
        cache = Path(args.cache) if args.cache else None
        if cache:
            cache.mkdir(parents=True, exist_ok=True)
        rep["leave_out"] = leave_out_all(ds, types, cfg, cache, args.refit_trust)
        print(format_leave_out(rep["leave_out"]))
    rep["seconds"] = round(time.time() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
