"""Trust figures inside ``iotcls evaluate``, and the leave-one-type-out test.

:func:`trust_section` adds to the evaluation report the refinement figures of
:mod:`.report` (before and after), the calibration (ECE with and without the temperature)
and a reliability diagram PNG, and the device figures before and after the trusted vote.

:func:`leave_out` answers "what happens with a device the model has never seen": for each
type X, train a model without X through the same code path as ``iotcls train`` (trust state
included), label every flow of X's captures, and count how many labels come out untrusted
(``unknown`` after refinement). Every trusted label of X is wrong by construction.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .calibration import reliability_diagram
from .decision import windowed_trusted_vote
from .report import format_refinement, leave_out_figures, refinement_report


def _softmax_conf(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).max(axis=1)


def device_figures(y, pred, conf, trusted, groups, times, n_classes, window=10, min_votes=3):
    """Per device session, its label after its last sequence: before (every label votes)
    and after refinement (trusted labels only; ``unknown`` if too few are trusted)."""
    everyone = np.ones(len(pred), bool)
    before, em_b = windowed_trusted_vote(
        pred, conf, everyone, groups, times, n_classes, window, min_votes, min_trusted_share=0.0
    )
    after, em_a = windowed_trusted_vote(
        pred, conf, trusted, groups, times, n_classes, window, min_votes
    )
    order = np.lexsort((np.arange(len(times)), times, groups))
    last = np.zeros(0, np.int64)
    if len(order):
        g = groups[order]
        last = order[np.r_[np.flatnonzero(g[1:] != g[:-1]), len(g) - 1]]
    last = last[em_b[last]]  # sessions with a device label at all
    yb, b, a = y[last], before[last], after[last]
    known = a >= 0
    return {
        "sessions": int(len(last)),
        "before": {"accuracy": round(float((b == yb).mean()) if len(last) else 0.0, 4)},
        "after": {
            "unknown_share": round(float((~known).mean()) if len(last) else 0.0, 4),
            "accuracy_labelled": round(
                float((a[known] == yb[known]).mean()) if known.any() else 0.0, 4
            ),
            "wrong": int((known & (a != yb)).sum()),
        },
        "wrong_before": int((b != yb).sum()),
        "vote": {"window": window, "min_votes": min_votes, "min_trusted_share": 0.5},
    }


def trust_section(predictor, d, out_dir: Path | None = None, name: str = "model") -> dict:
    """Refinement, calibration and device figures for the sequence labels of ``d``."""
    classes = list(predictor.bundle.classes)
    y = np.searchsorted(np.array(classes, object), d.labels)
    t0 = time.process_time()
    groups = d.device_groups()
    ids = predictor.device_identities(d.matrices, groups, d.start)  # the DHCP refinement
    pred = predictor.predict(d.matrices, ids)
    cpu = time.process_time() - t0
    label_alone = pred.trusted.copy()  # rules 1-4: what the label and its explanation say
    names = predictor.device_names(d.matrices, groups, d.start)
    predictor.check_devices(pred, groups, d.start, ids, names)  # rules 5, 6, 9
    logits = predictor.logits(d.matrices)
    raw_conf = _softmax_conf(logits)  # the model alone, T = 1
    probs = predictor.calibrate(logits)  # the model alone, before the DHCP refinement
    alone = (probs.argmax(axis=1), probs.max(axis=1)) if ids is not None else None
    if predictor.trust is None:
        threshold = predictor.threshold
        note = "no trust state in this model: the confidence threshold alone decides"
    else:
        threshold = predictor.trust.state.conf_threshold
        note = (
            "trust layer: confidence + explanation + device consistency + DHCP identity "
            "(docs/trust.md)"
        )
    rep = refinement_report(
        y,
        pred.index,
        pred.confidence,
        pred.trusted,
        pred.reason,
        threshold,
        len(classes),
        raw_confidence=raw_conf,
        label_alone=label_alone,
        model_alone=alone,
    )
    rep["decided_by"] = note
    rep["cpu_ms_per_label"] = round(1000 * cpu / max(len(y), 1), 4)
    rep["device"] = device_figures(
        y, pred.index, pred.confidence, pred.trusted, d.device_groups(), d.start, len(classes)
    )
    if out_dir is not None:
        own, conf = alone if alone is not None else (pred.index, pred.confidence)
        correct = own == y
        png = reliability_diagram(
            out_dir / "reliability.png",
            {
                "uncalibrated (T=1)": (raw_conf, correct),
                f"calibrated (T={predictor.bundle.temperature:.2f})": (conf, correct),
            },
            title=f"{name}: per-sequence labels",
        )
        rep["reliability_png"] = str(png)
    return rep


def format_trust(rep: dict) -> str:
    out = format_refinement(rep)
    if "reliability_png" in rep:
        out += f"\n  reliability diagram: {rep['reliability_png']}"
    return out


# -- leave one type out ----------------------------------------------------------------------
DEFAULT_LEAVE_OUT_EPOCHS = 15


def leave_out(ds, types: list[str], cfg, progress: bool = False, log=print) -> dict:
    """Train without each type in ``types`` and label that type's flows."""
    from ..predict import Predictor
    from ..splits import Split, device_sessions
    from ..train import train

    labelled = ds.labels != ""
    known = sorted(set(ds.labels[labelled].tolist()))
    missing = [t for t in types if t not in known]
    if missing:
        raise ValueError(f"--leave-out: no flows labelled {missing} (labels: {', '.join(known)})")
    results = {}
    for x in types:
        t0 = time.time()
        keep = np.flatnonzero(labelled & (ds.labels != x))
        log(f"leave-out {x}: training on {len(keep)} flows of {len(known) - 1} other types")
        bundle = train(
            ds.matrices[keep],
            ds.labels[keep],
            ds.captures[keep],
            ds.layout,
            replace(cfg),
            progress=progress,
            log=lambda m: None,
            devices=ds.devices[keep],
            times=ds.timestamps[keep],
        )
        p = Predictor(bundle)
        xi = np.flatnonzero(labelled & (ds.labels == x))
        groups = device_sessions(ds.captures[xi], ds.devices[xi])
        pr = p.label(ds.matrices[xi], groups, ds.timestamps[xi])
        dev, emitted = windowed_trusted_vote(
            pr.index, pr.confidence, pr.trusted, groups, ds.timestamps[xi], len(bundle.classes)
        )
        fig = leave_out_figures(pr.index, pr.trusted, pr.reason, list(bundle.classes), dev[emitted])
        fig["confidence_only_untrusted_share"] = round(
            float((pr.confidence < p.threshold).mean()) if len(xi) else 0.0, 4
        )
        fig["high_confidence_share"] = round(float((pr.confidence >= 0.9).mean()), 4)
        # the same model on held-out captures of the types it knows
        part = Split(**bundle.metadata["split"]).part_of(ds.captures[keep])
        te = keep[part == 2]
        gt = device_sessions(ds.captures[te], ds.devices[te])
        pt = p.label(ds.matrices[te], gt, ds.timestamps[te])
        yt = np.searchsorted(np.array(bundle.classes, object), ds.labels[te])
        rep = refinement_report(
            yt, pt.index, pt.confidence, pt.trusted, pt.reason, p.threshold, len(bundle.classes)
        )
        fig["known_types_test"] = {k: rep["rows"][k] for k in ("raw", "trust")}
        fig["seconds"] = round(time.time() - t0, 1)
        results[x] = fig
        log(
            f"leave-out {x}: {fig['untrusted_share']:.1%} of {fig['labels']} labels untrusted "
            f"(confidence alone {fig['confidence_only_untrusted_share']:.1%}); device label "
            f"unknown {fig.get('device_unknown_share', 0):.1%}; {fig['seconds']:.0f}s"
        )
    shares = [r["untrusted_share"] for r in results.values()]
    return {
        "types": results,
        "epochs": cfg.epochs,
        "mean_untrusted_share": round(float(np.mean(shares)), 4) if shares else None,
        "target": 0.9,
    }


def format_leave_out(r: dict) -> str:
    lines = [
        f"leave one type out (train without X, epochs {r['epochs']}; share of X's labels "
        f"untrusted -> unknown; target >= {r['target']:.0%})",
        f"  {'type X':<22}{'labels':>7}{'untrusted':>10}{'conf only':>10}"
        f"{'hi-conf':>8}{'dev unknown':>12}{'known cov':>10}  trusted as",
    ]
    for x, f in r["types"].items():
        kt = f["known_types_test"]["trust"]
        lines.append(
            f"  {x:<22}{f['labels']:>7}{f['untrusted_share']:>10.3f}"
            f"{f['confidence_only_untrusted_share']:>10.3f}"
            f"{f['high_confidence_share']:>8.3f}"
            f"{f.get('device_unknown_share', 0):>12.3f}{kt['coverage']:>10.3f}  "
            + ", ".join(f"{k} {v}" for k, v in f["trusted_as"].items())
        )
    if r["mean_untrusted_share"] is not None:
        lines.append(f"  mean untrusted share: {r['mean_untrusted_share']:.3f}")
    return "\n".join(lines)
