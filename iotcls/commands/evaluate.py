"""``iotcls evaluate CAPTURES --model MODEL``: figures of a model on a labelled capture set.

When CAPTURES holds any capture the model was trained or validated on (the usual case:
the training set itself), only the model's held-out test captures are scored; ``--all``
scores everything given. See docs/strategies.md for the strategies and metrics.
``--folds K`` cross-validates instead (:mod:`iotcls.crossval`), ``--leave-out TYPE`` tests a
type the model never saw (:mod:`iotcls.trust.evaluation`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..cli import CliError
from ._data import is_dataset_file, load_data, store_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..capture import add_capture_arguments
    from ..strategies import VoteConfig

    add_capture_arguments(p)
    v = VoteConfig()
    p.add_argument("--model", metavar="MODEL", help="model bundle (default: the shipped model)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also train and score a random forest on flow statistics (same split)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default="out/evaluate",
        help="where the confusion-matrix PNG and report.json go (default %(default)s)",
    )
    p.add_argument(
        "--all",
        action="store_true",
        dest="use_all",
        help="score every capture given, even those the model was trained on",
    )
    p.add_argument(
        "--vote-window",
        type=int,
        default=v.window,
        help="device strategy: sequences that vote (default %(default)s)",
    )
    p.add_argument(
        "--min-votes",
        type=int,
        default=v.min_votes,
        help="device strategy: sequences before a first label (default %(default)s)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--no-time-to-label",
        dest="time_to_label",
        action="store_false",
        help="skip the table of labels by time since each device's first packet "
        "(early and final records; read from the captures again)",
    )
    # trust (docs/trust.md): the unseen-device test
    p.add_argument(
        "--leave-out",
        action="append",
        metavar="TYPE",
        default=[],
        help="train without TYPE (repeatable; quick training, the same code path "
        "as iotcls train) and report the share of TYPE's labels that come out "
        "untrusted/unknown; --model is not used",
    )
    p.add_argument(
        "--folds",
        type=int,
        metavar="K",
        help="cross-validate instead: train K models, each without one K-th of "
        "every label's capture files, and report the labels each gives the "
        "files it did not see (every capture held out once); --model is not "
        "used",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="--leave-out, --folds: training epochs (default 15 for --leave-out, "
        "as iotcls train for --folds)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="--leave-out, --folds: split and training seed"
    )


def run(args: argparse.Namespace) -> int:
    from ..bundle import BundleError, ModelBundle
    from ..evaluate import evaluate_report, format_report
    from ..train import Split

    if args.leave_out and args.folds is not None:
        raise CliError("--leave-out and --folds are two different runs: give one")
    if args.leave_out:  # the unseen-device test (docs/trust.md)
        return _run_leave_out(args)
    if args.folds is not None:
        return _run_folds(args)
    try:
        bundle = ModelBundle.load(args.model)
    except BundleError as e:
        raise CliError(str(e)) from None
    vote = _vote(args)
    progress = not args.quiet and sys.stderr.isatty()
    ds = load_data(args, bundle.layout, exact_layout=True, progress=progress)
    split = bundle.metadata.get("split")
    split = Split(**split) if split else None
    try:
        report = evaluate_report(
            bundle,
            ds,
            split,
            use_all=args.use_all,
            baseline=args.baseline,
            vote=vote,
            out_dir=Path(args.out),
        )
    except ValueError as e:
        raise CliError(str(e)) from None
    out = Path(args.out)
    if args.time_to_label and not is_dataset_file(args) and not store_args(args):  # needs pcaps
        report["time_to_label"] = _time_to_label(args, bundle, ds, split, out)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
        if "time_to_label" in report:
            from ..early import format_time_to_label

            t = report["time_to_label"]
            print(format_time_to_label(t["early"], "with early records"))
            print(format_time_to_label(t["final_only"], "final records only"))
    return 0


def _time_to_label(args: argparse.Namespace, bundle, ds, split, out: Path) -> dict:
    """Labels by time since each device's first packet, on the captures evaluate scored."""
    from ..capture import specs_from_args
    from ..dataset import capture_matrices
    from ..early import capture_device_labels, time_to_label, time_to_label_png
    from ..evaluate import select_for_evaluation
    from ..predict import Predictor

    chosen, _ = select_for_evaluation(ds.captures.astype(object), split, args.use_all)
    ids = set(ds.captures[chosen].tolist())
    predictor = Predictor(bundle)
    with_early, final_only = [], []
    for spec in specs_from_args(args):
        if spec.capture_id not in ids:
            continue
        cm = capture_matrices(spec, bundle.layout)
        if cm.flows.error or not len(cm.order):
            continue
        known = np.isin(cm.labels[cm.order], np.array(bundle.classes, object))
        if not known.all():
            continue
        with_early += capture_device_labels(predictor, cm, early=True)
        final_only += capture_device_labels(predictor, cm, early=False)
    r = {"early": time_to_label(with_early), "final_only": time_to_label(final_only)}
    r["png"] = str(time_to_label_png(r["early"], r["final_only"], out / "time-to-label.png"))
    return r


def _vote(args: argparse.Namespace):
    from ..strategies import VoteConfig

    if args.vote_window < 1 or args.min_votes < 1 or args.min_votes > args.vote_window:
        raise CliError("--vote-window and --min-votes must be >= 1, min-votes <= vote-window")
    return VoteConfig(args.vote_window, args.min_votes)


def _run_folds(args: argparse.Namespace) -> int:
    """``--folds K``: see iotcls.crossval."""
    from ..crossval import cross_validate, format_cross_validation
    from ..train import TrainConfig

    vote = _vote(args)
    if args.folds < 2:  # before reading the captures
        raise CliError(f"--folds must be at least 2, got {args.folds}")
    return _train_and_report(
        args,
        TrainConfig().epochs,
        "cross-validation.json",
        format_cross_validation,
        lambda ds, cfg, progress, log: cross_validate(ds, args.folds, cfg, vote, progress, log),
    )


def _run_leave_out(args: argparse.Namespace) -> int:
    """``--leave-out TYPE`` (docs/trust.md): see iotcls.trust.evaluation.leave_out."""
    from ..trust.evaluation import DEFAULT_LEAVE_OUT_EPOCHS, format_leave_out, leave_out

    types = list(dict.fromkeys(args.leave_out))
    return _train_and_report(
        args,
        DEFAULT_LEAVE_OUT_EPOCHS,
        "leave-out.json",
        format_leave_out,
        lambda ds, cfg, progress, log: leave_out(ds, types, cfg, progress, log),
    )


def _train_and_report(
    args: argparse.Namespace, default_epochs: int, name: str, fmt, evaluate
) -> int:
    """The runs that train their own models (``--folds``, ``--leave-out``): the captures in
    the default layout, training as ``iotcls train`` with ``--seed`` and ``--epochs``, the
    report printed and written to ``--out``/``name``."""
    from ..layout import MatrixLayout
    from ..train import TrainConfig

    epochs = default_epochs if args.epochs is None else args.epochs
    if epochs < 1:
        raise CliError("--epochs must be at least 1")
    progress = not args.quiet and sys.stderr.isatty()
    ds = load_data(args, MatrixLayout(), exact_layout=False, progress=progress)
    cfg = TrainConfig(seed=args.seed, epochs=epochs)
    try:
        rep = evaluate(ds, cfg, progress, lambda m: print(m, file=sys.stderr))
    except ValueError as e:
        raise CliError(str(e)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(rep, indent=1) + "\n")
    print(json.dumps(rep) if args.json else fmt(rep))
    return 0
