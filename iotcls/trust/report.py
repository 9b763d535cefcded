"""Figures of the refinement: what trust buys, measured before and after.

Per-label figures (one label per sequence, the paper's strategy) for three rows:

* ``raw``: every label as the model gives it (all count as trusted);
* ``confidence``: trusted when the calibrated confidence reaches the state's threshold
  (the confidence criterion alone, to show what the explanation adds);
* ``explanation`` (when known): the decision from the label alone (rules 1-4 of
  :mod:`.decision`: confidence and explanation);
* ``trust``: the full decision, with rule 5 (consistency with the device's earlier labels)
  where the device is known.

For each: ``macro_f1_all`` (over all labels: the same for every row), ``macro_f1_trusted``
(over the trusted labels, on the classes present among them), ``coverage`` (share trusted),
``high_conf_errors`` (count of trusted labels with confidence >= 0.9 that are wrong) and its
``rate`` (over all labels, so rates of the rows compare directly), and
``macro_f1_refined`` (all labels, untrusted ones counted as the extra prediction
``unknown``, which is never right for a known device).

Device figures: per (capture, device) session, the label after its last sequence with the
windowed vote (:func:`iotcls.trust.decision.windowed_trusted_vote`), before (every label
votes) and after (trusted labels only; ``unknown`` if too few are trusted).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .calibration import reliability_bins

HIGH_CONFIDENCE = 0.9


def macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Macro-F1 over classes present in ``y`` or ``pred``; ``pred`` may hold -1 (unknown),
    which is a wrong prediction counted in no class's precision."""
    y, pred = np.asarray(y), np.asarray(pred)
    if len(y) == 0:
        return float("nan")
    known = pred >= 0
    tp = np.bincount(y[known & (y == pred)], minlength=n_classes).astype(float)
    support = np.bincount(y, minlength=n_classes).astype(float)
    predicted = np.bincount(pred[known], minlength=n_classes).astype(float)
    present = (support + predicted) > 0
    f1 = 2 * tp / np.maximum(support + predicted, 1)
    return float(f1[present].mean())


def row_figures(y, pred, conf, trusted, n_classes: int) -> dict:
    y, pred, conf, tr = (np.asarray(a) for a in (y, pred, conf, trusted))
    tr = tr.astype(bool)
    n = len(y)
    wrong_hc = (conf >= HIGH_CONFIDENCE) & (pred != y)
    hc = int((wrong_hc & tr).sum())
    refined = np.where(tr, pred, -1)
    return {
        "labels": int(n),
        "coverage": round(float(tr.mean()) if n else 0.0, 4),
        "accuracy_trusted": round(float((pred[tr] == y[tr]).mean()) if tr.any() else 0.0, 4),
        "macro_f1_all": round(macro_f1(y, pred, n_classes), 4),
        "macro_f1_trusted": round(macro_f1(y[tr], pred[tr], n_classes), 4) if tr.any() else 0.0,
        "macro_f1_refined": round(macro_f1(y, refined, n_classes), 4),
        "high_conf_errors": {
            "count": hc,
            "rate": round(hc / max(n, 1), 5),
            "rate_among_trusted": round(hc / max(int(tr.sum()), 1), 5),
        },
    }


def refinement_report(
    y: np.ndarray,
    pred: np.ndarray,
    confidence: np.ndarray,
    trusted: np.ndarray,
    reasons: list[str] | np.ndarray,
    conf_threshold: float,
    n_classes: int,
    raw_confidence: np.ndarray | None = None,
    label_alone: np.ndarray | None = None,
    model_alone: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """Before/after figures; ``confidence`` calibrated, ``raw_confidence`` with T = 1 (of the
    model's own labels); ``label_alone``: the decision before the device rules, shown as its
    own row; ``model_alone``: (labels, calibrated confidence) of the model before the DHCP
    identity refinement changed ``pred``: then they are the ``raw`` row and the calibration."""
    n = len(y)
    all_ = np.ones(n, bool)
    if model_alone is not None:
        pred0, conf0 = model_alone
        rows = {
            "raw": row_figures(y, pred0, conf0, all_, n_classes),
            "identity": row_figures(y, pred, confidence, all_, n_classes),
        }
    else:
        pred0, conf0 = pred, confidence
        rows = {"raw": row_figures(y, pred, confidence, all_, n_classes)}
    rows["confidence"] = row_figures(y, pred, confidence, confidence >= conf_threshold, n_classes)
    if label_alone is not None:
        rows["explanation"] = row_figures(y, pred, confidence, label_alone, n_classes)
    rows["trust"] = row_figures(y, pred, confidence, trusted, n_classes)
    before = rows["raw"]["high_conf_errors"]["count"]
    after = rows["trust"]["high_conf_errors"]["count"]
    correct = np.asarray(pred0) == np.asarray(y)
    cal = reliability_bins(conf0, correct)
    out = {
        "rows": rows,
        # before / after; None when none are left (JSON has no infinity): see the counts
        "high_conf_error_cut": round(before / after, 2) if after else None,
        "macro_f1_gain_points": round(
            100 * (rows["trust"]["macro_f1_trusted"] - rows["raw"]["macro_f1_all"]), 2
        ),
        "reasons": dict(Counter(str(r) for r in reasons)),
        "calibration": {"ece": round(cal.ece, 4), "mce": round(cal.mce, 4), "bins": cal.to_dict()},
        "conf_threshold": conf_threshold,
    }
    if raw_confidence is not None:
        out["calibration"]["ece_uncalibrated"] = round(
            reliability_bins(raw_confidence, correct).ece, 4
        )
    return out


def format_refinement(rep: dict, title: str = "trust refinement (per-sequence labels)") -> str:
    rows = rep["rows"]
    lines = [title]
    head = (
        f"  {'':12s} {'coverage':>9s} {'macroF1 all':>12s} {'macroF1 trusted':>16s} "
        f"{'refined':>8s} {'hi-conf errors':>15s} {'rate':>8s}"
    )
    lines.append(head)
    names = {
        "raw": "raw",
        "identity": "+DHCP ident",
        "confidence": "confidence",
        "explanation": "+explanation",
        "trust": "+device",
    }
    for key, name in names.items():
        if key not in rows:
            continue
        r = rows[key]
        hc = r["high_conf_errors"]
        lines.append(
            f"  {name:12s} {r['coverage']:9.3f} {r['macro_f1_all']:12.4f} "
            f"{r['macro_f1_trusted']:16.4f} {r['macro_f1_refined']:8.4f} "
            f"{hc['count']:15d} {hc['rate']:8.4f}"
        )
    cut = rep["high_conf_error_cut"]
    if cut is None:
        cut_s = "all removed" if rows["raw"]["high_conf_errors"]["count"] else "none before"
    else:
        cut_s = f"{cut:.2f}x"
    lines.append(
        f"  high-confidence (>= {HIGH_CONFIDENCE}) errors cut: {cut_s}; macro-F1 "
        f"trusted - all: {rep['macro_f1_gain_points']:+.2f} points"
    )
    cal = rep["calibration"]
    ece = f"ECE {cal['ece']:.4f}"
    if "ece_uncalibrated" in cal:
        ece = f"ECE {cal['ece_uncalibrated']:.4f} uncalibrated -> {cal['ece']:.4f} calibrated"
    lines.append(
        f"  {ece}; untrusted reasons: "
        + ", ".join(f"{k} {v}" for k, v in sorted(rep["reasons"].items()) if k != "-")
    )
    if "device" in rep:
        d = rep["device"]
        lines.append(
            f"  devices ({d['sessions']} sessions): vote accuracy "
            f"{d['before']['accuracy']:.4f} -> trusted vote accuracy over labelled "
            f"{d['after']['accuracy_labelled']:.4f}, unknown "
            f"{d['after']['unknown_share']:.3f}"
        )
    return "\n".join(lines)


def leave_out_figures(
    pred: np.ndarray,
    trusted: np.ndarray,
    reasons,
    classes: list[str],
    device_index: np.ndarray | None = None,
) -> dict:
    """What the model said about a type it never saw: every trusted label is wrong."""
    pred, tr = np.asarray(pred), np.asarray(trusted, bool)
    n = len(pred)
    as_what = Counter(classes[p] for p in pred[tr])
    out = {
        "labels": int(n),
        "untrusted_share": round(float((~tr).mean()) if n else 0.0, 4),
        "reasons": dict(Counter(str(r) for r in reasons)),
        "trusted_as": dict(as_what.most_common(5)),
    }
    if device_index is not None:
        di = np.asarray(device_index)
        out["device_unknown_share"] = round(float((di < 0).mean()) if len(di) else 0.0, 4)
    return out
