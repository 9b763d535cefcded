"""Cross-validation by capture file: every capture is held out once.

One held-out split of a small capture set gives a noisy figure. On IoT Sentinel a split keeps
two captures of most types for the test, so one unlucky capture moves macro-F1 by points, and
the spread between split seeds was larger than most changes worth measuring
(docs/model-card.md). Here each label's capture files are dealt into ``k`` folds. For each
fold, a model is trained on the others, with a validation share of them for early stopping,
calibration and the trust state, as ``iotcls train`` does. It then labels the fold. The
pooled out-of-fold labels give one figure over every capture, and the per-fold figures give
its spread.

Flows of one capture never straddle a train/test boundary (they are strongly correlated),
and the folds are stratified by label, as :func:`iotcls.train.split_captures` is.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace

import numpy as np

from .evaluate import class_report, hardest_pairs
from .splits import device_sessions
from .strategies import VoteConfig, device_vote
from .train import Split, TrainConfig

# the CNN alone per flow / sequence / device vote, with the DHCP identity refinement, and the
# random-forest baseline of ``evaluate --baseline`` (iotcls.baseline) trained on the same files
VARIANTS = (
    "flow",
    "sequence",
    "device",
    "sequence + DHCP identity",
    "device + DHCP identity",
    "random forest, flow",
    "random forest, device",
)


def fold_splits(
    captures: np.ndarray, labels: np.ndarray, k: int, seed: int, val: float
) -> list[Split]:
    """Per label, shuffle its capture files (seeded) and deal them into ``k`` test folds; per
    fold, a ``val`` share of each label's other files (at least one where it has three or
    more) validates and the rest train. Every label needs at least ``k`` files."""
    pairs = sorted({(str(c), str(lab)) for c, lab in zip(captures, labels)})
    by_label: dict[str, list[str]] = {}
    for c, lab in pairs:
        by_label.setdefault(lab, []).append(c)
    few = {lab: len(f) for lab, f in by_label.items() if len(f) < k}
    if few:
        raise ValueError(
            f"--folds {k}: every label needs at least {k} capture files; too few: {few}"
        )
    rng = np.random.default_rng(seed)
    parts = [{"train": [], "val": [], "test": []} for _ in range(k)]
    for label in sorted(by_label):
        files = list(by_label[label])
        rng.shuffle(files)
        for f in range(k):
            test = files[f::k]
            rest = [c for c in files if c not in test]
            n_val = max(1, round(val * len(files))) if len(rest) >= 2 else 0
            parts[f]["test"] += test
            parts[f]["val"] += rest[:n_val]
            parts[f]["train"] += rest[n_val:]
    return [Split(**{n: sorted(v) for n, v in p.items()}) for p in parts]


def fold_labels(
    bundle, matrices: np.ndarray, groups: np.ndarray, times: np.ndarray, vote: VoteConfig
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per variant, ``(entries, labels)``: the class index each held-out matrix gets (the
    device vote: only where it emits one); ``groups``: each matrix's device session."""
    from .predict import Predictor

    p = Predictor(bundle, explain=False)
    allowed = p.allowed(p.device_identities(matrices, groups, times))
    every = np.arange(len(matrices))
    out = {"flow": (every, p.probabilities(matrices[:, :1]).argmax(axis=1))}
    for name, probs in (
        ("", p.probabilities(matrices)),
        (" + DHCP identity", p.probabilities(matrices, allowed)),
    ):
        out["sequence" + name] = (every, probs.argmax(axis=1))
        v = device_vote(probs, groups, times, vote)
        out["device" + name] = (np.flatnonzero(v.emitted), v.index[v.emitted])
    return out


def forest_labels(
    train_x: np.ndarray,
    train_y: np.ndarray,
    matrices: np.ndarray,
    layout,
    classes: list[str],
    groups: np.ndarray,
    times: np.ndarray,
    vote: VoteConfig,
    seed: int,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """:func:`fold_labels` for the random forest on flow statistics."""
    from .baseline import ForestBaseline, flow_features

    rf = ForestBaseline(classes, seed=seed).fit(flow_features(train_x, layout), train_y)
    probs = rf.predict_proba(flow_features(matrices, layout))
    v = device_vote(probs, groups, times, vote)
    return {
        "random forest, flow": (np.arange(len(matrices)), probs.argmax(axis=1)),
        "random forest, device": (np.flatnonzero(v.emitted), v.index[v.emitted]),
    }


def cross_validate(
    ds, k: int, cfg: TrainConfig, vote: VoteConfig = VoteConfig(), progress: bool = False, log=print
) -> dict:
    """Train ``k`` models, each without one fold, and report the pooled and per-fold figures
    of the labels each gives its held-out fold (``ds``: a :class:`iotcls.dataset.Dataset`)."""
    from .train import train

    if k < 2:
        raise ValueError(f"--folds must be at least 2, got {k}")
    lab = np.flatnonzero(ds.labels != "")
    if len(lab) == 0:
        raise ValueError("--folds: no labelled flows")
    labels = ds.labels[lab].astype(object)
    captures = ds.captures[lab].astype(object)
    classes = sorted(set(labels.tolist()))
    names = np.array(classes, object)
    splits = fold_splits(captures, labels, k, cfg.seed, cfg.val_fraction)
    pooled: dict[str, tuple[list, list]] = {v: ([], []) for v in VARIANTS}
    folds = []
    for f, split in enumerate(splits):
        t0 = time.time()
        log(f"fold {f + 1}/{k}: training without {len(split.test)} capture files")
        bundle = train(
            ds.matrices[lab],
            labels,
            captures,
            ds.layout,
            replace(cfg),
            classes=classes,
            progress=progress,
            log=lambda m: None,
            devices=ds.devices[lab],
            times=ds.timestamps[lab],
            split=split,
        )
        part = split.part_of(captures)
        te, tr = lab[part == 2], lab[part == 0]
        y = np.searchsorted(names, ds.labels[te].astype(object))
        groups = device_sessions(ds.captures[te].astype(object), ds.devices[te].astype(object))
        got = fold_labels(bundle, ds.matrices[te], groups, ds.timestamps[te], vote)
        got |= forest_labels(
            ds.matrices[tr],
            np.searchsorted(names, ds.labels[tr].astype(object)),
            ds.matrices[te],
            ds.layout,
            classes,
            groups,
            ds.timestamps[te],
            vote,
            cfg.seed,
        )
        fig = {
            "capture_files": len(split.test),
            "labels": int(len(te)),
            "best_epoch": bundle.metadata["best_epoch"],
        }
        for v, (entries, pred) in got.items():
            fig[v] = class_report(y[entries], pred, classes)["macro_f1"]
            pooled[v][0].append(y[entries])
            pooled[v][1].append(pred)
        fig["seconds"] = round(time.time() - t0, 1)
        folds.append(fig)
        log(
            f"fold {f + 1}/{k}: macro-F1 per sequence {fig['sequence']:.4f}, with the DHCP "
            f"identity {fig['sequence + DHCP identity']:.4f}; {fig['seconds']:.0f}s"
        )
    report = {
        "folds": k,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "vote": asdict(vote),
        "capture_files": int(len(np.unique(captures))),
        "labels": int(len(lab)),
        "classes": len(classes),
        "pooled": {},
        "per_fold": folds,
    }
    _add_pooled(report, pooled, folds, classes)
    return report


def _add_pooled(
    report: dict, pooled: dict[str, tuple[list, list]], folds: list[dict], classes: list[str]
) -> None:
    """Figures over all folds' held-out labels together, and the spread of the per-fold ones."""
    for v, (ys, preds) in pooled.items():
        rep = class_report(np.concatenate(ys), np.concatenate(preds), classes)
        per = np.array([fold[v] for fold in folds])
        report["pooled"][v] = {
            "accuracy": rep["accuracy"],
            "macro_f1": rep["macro_f1"],
            "fold_macro_f1": {
                "mean": round(float(per.mean()), 4),
                "sd": round(float(per.std(ddof=1)), 4),
                "min": round(float(per.min()), 4),
                "max": round(float(per.max()), 4),
            },
        }
        if v == "sequence + DHCP identity":
            report["per_class"] = {c: r["f1"] for c, r in rep["per_class"].items()}
            report["hardest_pairs"] = hardest_pairs(rep["confusion"], classes)


def format_cross_validation(r: dict) -> str:
    lines = [
        f"cross-validation by capture file: {r['folds']} folds (seed {r['seed']}), "
        f"{r['capture_files']} capture files, {r['labels']} labelled flows, "
        f"{r['classes']} classes; every capture held out once",
        "",
        f"{'':<26}{'pooled':>17}   macro-F1 per fold",
        f"{'labels':<26}{'accuracy':>8}{'macro-F1':>9}   {'mean':>6}{'sd':>7}{'min':>7}{'max':>7}",
    ]
    for v, s in r["pooled"].items():
        f = s["fold_macro_f1"]
        lines.append(
            f"{v:<26}{s['accuracy']:>8.4f}{s['macro_f1']:>9.4f}   {f['mean']:>6.4f}"
            f"{f['sd']:>7.4f}{f['min']:>7.4f}{f['max']:>7.4f}"
        )
    lines += ["", "per class F1 (sequence + DHCP identity, pooled), lowest first:"]
    for c, f1 in sorted(r["per_class"].items(), key=lambda x: x[1])[:10]:
        lines.append(f"  {c:<24}{f1:.4f}")
    lines += ["", "hardest class pairs (errors both ways / their flows):"]
    for p in r["hardest_pairs"]:
        a, b = p["pair"]
        lines.append(f"  {a} <-> {b}: {p['errors']} errors, rate {p['rate']:.3f}")
    if not r["hardest_pairs"]:
        lines.append("  none: no label went to another class")
    return "\n".join(lines)
