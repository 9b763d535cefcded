"""Evaluation: the three strategies, each on accuracy, coverage, cost and selectivity.

Definitions are in docs/strategies.md. Everything here is computed on the labelled flows of
the evaluated captures (flows of a listed device); unlabelled traffic (phones, gateways) only
counts towards what the sensor inspects. Figures of one strategy:

* ``accuracy``, ``macro_f1``: over the labels the strategy emits;
* ``coverage``: share of devices (one per device and capture) with at least one label, share
  of flows labelled, and the time from a device's first packet to its first label;
* ``cost``: CPU time per label (measured, both threads counted) and model FLOPs per label,
  for the plain label; ``explained_cpu_ms_per_label`` adds the trust layer's explanation;
* ``selectivity``: share of the devices' packets and bytes the sensor must inspect.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import ModelBundle
from .dataset import Dataset
from .model import count_flops, count_parameters
from .predict import Predictions, Predictor
from .splits import Split, device_sessions, macro_f1  # noqa: F401  (device_sessions: re-exported)
from .strategies import STRATEGIES, VoteConfig, device_vote, strategy_input


@dataclass
class EvalData:
    """The arrays evaluation reads, one entry per labelled matrix (see :mod:`iotcls.dataset`)."""

    matrices: np.ndarray  # (n, K+1, W) float32
    labels: np.ndarray  # (n,) object: true label
    devices: np.ndarray  # (n,) object: device id (MAC or IP)
    captures: np.ndarray  # (n,) object: capture id
    start: np.ndarray  # (n,) window start
    last: np.ndarray  # (n,) last packet of the window: when the record is complete
    device_first_seen: np.ndarray  # (n,) the device's first packet in the capture
    total_packets: np.ndarray
    total_bytes: np.ndarray
    inspected_packets: np.ndarray
    inspected_bytes: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_dataset(cls, ds: Dataset, idx: np.ndarray) -> EvalData:
        return cls(
            matrices=ds.matrices[idx],
            labels=ds.labels[idx].astype(object),
            devices=ds.devices[idx].astype(object),
            captures=ds.captures[idx].astype(object),
            start=ds.timestamps[idx],
            last=ds.last[idx],
            device_first_seen=ds.device_first_seen[idx],
            total_packets=ds.total_packets[idx],
            total_bytes=ds.total_bytes[idx],
            inspected_packets=ds.inspected_packets[idx],
            inspected_bytes=ds.inspected_bytes[idx],
        )

    def device_groups(self) -> np.ndarray:
        return device_sessions(self.captures, self.devices)


def class_report(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict:
    n = len(classes)
    cm = np.bincount(y * n + pred, minlength=n * n).reshape(n, n)
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(1), cm.sum(0)
    per_class = {}
    for i, c in enumerate(classes):
        if support[i] == 0 and predicted[i] == 0:
            continue
        p = tp[i] / predicted[i] if predicted[i] else 0.0
        r = tp[i] / support[i] if support[i] else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        per_class[c] = {
            "precision": round(float(p), 4),
            "recall": round(float(r), 4),
            "f1": round(float(f), 4),
            "support": int(support[i]),
        }
    return {
        "accuracy": round(float(tp.sum() / max(len(y), 1)), 4),
        "macro_f1": round(macro_f1(y, pred, n), 4),
        "per_class": per_class,
        "confusion": cm,
    }


def hardest_pairs(cm: np.ndarray, classes: list[str], top: int = 5) -> list[dict]:
    """Class pairs most confused with each other, by errors in both directions over support."""
    support = cm.sum(1)
    pairs = []
    for a in range(len(classes)):
        for b in range(a + 1, len(classes)):
            errors = int(cm[a, b] + cm[b, a])
            if errors:
                rate = errors / max(int(support[a] + support[b]), 1)
                pairs.append(
                    {
                        "pair": [classes[a], classes[b]],
                        "errors": errors,
                        "a_as_b": int(cm[a, b]),
                        "b_as_a": int(cm[b, a]),
                        "rate": round(rate, 4),
                    }
                )
    pairs.sort(key=lambda p: (-p["rate"], -p["errors"]))
    return pairs[:top]


def coverage(d: EvalData, emitted: np.ndarray, label_time: np.ndarray) -> dict:
    groups = d.device_groups()
    n_dev = int(groups.max()) + 1 if len(groups) else 0
    first = np.full(n_dev, np.inf)
    np.minimum.at(first, groups[emitted], label_time[emitted])
    seen = np.full(n_dev, np.inf)
    np.minimum.at(seen, groups, d.device_first_seen)
    labelled = np.isfinite(first)
    delay = (first - seen)[labelled]
    return {
        "devices": round(float(labelled.mean()) if n_dev else 0.0, 4),
        "flows": round(float(emitted.mean()) if len(emitted) else 0.0, 4),
        "first_label_s_median": round(float(np.median(delay)), 2) if len(delay) else None,
        "first_label_s_mean": round(float(delay.mean()), 2) if len(delay) else None,
    }


def selectivity(d: EvalData) -> dict:
    return {
        "packets": round(float(d.inspected_packets.sum() / max(d.total_packets.sum(), 1)), 4),
        "bytes": round(float(d.inspected_bytes.sum() / max(d.total_bytes.sum(), 1)), 4),
    }


def running_max_by_group(values: np.ndarray, groups: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Per entry, the largest value among its group's entries up to it in time."""
    order = np.lexsort((np.arange(len(times)), times, groups))
    v, g = values[order], groups[order]
    out = np.empty_like(v)
    for lo, hi in zip(*_runs(g)):
        out[lo:hi] = np.maximum.accumulate(v[lo:hi])
    res = np.empty_like(values)
    res[order] = out
    return res


def _runs(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(sorted_keys)
    if n == 0:
        return np.zeros(0, int), np.zeros(0, int)
    starts = np.r_[0, np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1]
    return starts, np.r_[starts[1:], n].astype(int)


def timed_predict(predictor: Predictor, matrices: np.ndarray) -> tuple[Predictions, float, float]:
    """Predictions and the CPU and wall seconds they took."""
    predictor.predict(matrices[:8])  # warm-up: first-call allocations are not per-label cost
    c0, w0 = time.process_time(), time.perf_counter()
    pred = predictor.predict(matrices)
    return pred, time.process_time() - c0, time.perf_counter() - w0


def label_cost(predictor: Predictor, matrices: np.ndarray) -> tuple[float, float]:
    """CPU and wall seconds of the plain labels (the CNN, no explanation) of ``matrices``."""
    plain = Predictor(predictor.bundle, device=str(predictor.device), explain=False)
    return timed_predict(plain, matrices)[1:]


def strategy_figures(
    name: str,
    d: EvalData,
    y: np.ndarray,
    index: np.ndarray,
    emitted: np.ndarray,
    label_time: np.ndarray,
    cpu_s: float,
    wall_s: float,
    flops: int,
    trusted: np.ndarray,
    classes: list[str],
) -> tuple[dict, dict]:
    n_labels = int(emitted.sum())
    rep = class_report(y[emitted], index[emitted], classes)
    fig = {
        "strategy": name,
        "accuracy": rep["accuracy"],
        "macro_f1": rep["macro_f1"],
        "labels": n_labels,
        "trusted_share": round(float(trusted[emitted].mean()) if n_labels else 0.0, 4),
        "coverage": coverage(d, emitted, label_time),
        "cost": {
            "cpu_ms_per_label": round(1000 * cpu_s / max(n_labels, 1), 4),
            "wall_ms_per_label": round(1000 * wall_s / max(n_labels, 1), 4),
            "flops_per_label": int(round(flops / max(n_labels, 1))),
        },
        "selectivity": selectivity(d),
    }
    return fig, rep


def evaluate_model(
    predictor: Predictor, d: EvalData, vote: VoteConfig = VoteConfig()
) -> tuple[dict, dict[str, dict]]:
    """Figures per strategy, and each strategy's class report (with its confusion matrix)."""
    classes = list(predictor.bundle.classes)
    y = np.searchsorted(np.array(classes, object), d.labels)
    model = predictor.model
    flops = {"flow": count_flops(model, rows=1), "sequence": count_flops(model)}
    figs, reps = {}, {}
    seq, seq_cpu, seq_wall = None, 0.0, 0.0  # set by 'sequence', which comes before 'device'
    for name in STRATEGIES:
        if name == "device":
            groups = d.device_groups()
            v = device_vote(seq.probs, groups, d.start, vote)
            t = running_max_by_group(d.last, groups, d.start)
            c0 = time.process_time()
            device_vote(seq.probs, groups, d.start, vote)  # the vote's own cost
            vote_cpu = time.process_time() - c0
            fig, rep = strategy_figures(
                name,
                d,
                y,
                v.index,
                v.emitted,
                t,
                seq_cpu + vote_cpu,
                seq_wall + vote_cpu,
                flops["sequence"] * len(d),
                seq.confidence >= predictor.threshold,
                classes,
            )
            fig["vote"] = {"window": vote.window, "min_votes": vote.min_votes}
        else:
            x = strategy_input(d.matrices, name)
            pred, explained_cpu, _ = timed_predict(predictor, x)
            cpu, wall = label_cost(predictor, x)
            emitted = np.ones(len(d), bool)
            fig, rep = strategy_figures(
                name,
                d,
                y,
                pred.index,
                emitted,
                d.last,
                cpu,
                wall,
                flops[name] * len(d),
                pred.trusted,
                classes,
            )
            fig["cost"]["explained_cpu_ms_per_label"] = round(1000 * explained_cpu / len(d), 4)
            if name == "sequence":
                seq, seq_cpu, seq_wall = pred, cpu, wall
        figs[name], reps[name] = fig, rep
    return figs, reps


def identity_figures(predictor: Predictor, d: EvalData, vote: VoteConfig) -> dict | None:
    """The sequence and device strategies with the DHCP identity refinement
    (:mod:`.trust.dhcp_identity`): what ``classify`` and ``serve`` label; the strategies
    above are the CNN alone. None for a model without an identity map."""
    groups = d.device_groups()
    ids = predictor.device_identities(d.matrices, groups, d.start)
    if ids is None:
        return None
    classes = list(predictor.bundle.classes)
    y = np.searchsorted(np.array(classes, object), d.labels)
    probs = predictor.probabilities(d.matrices, predictor.allowed(ids))
    seq = class_report(y, probs.argmax(axis=1), classes)
    v = device_vote(probs, groups, d.start, vote)
    dev = class_report(y[v.emitted], v.index[v.emitted], classes)
    return {
        "labels_with_identity": round(float(np.mean([x is not None for x in ids])), 4),
        "sequence": {"accuracy": seq["accuracy"], "macro_f1": seq["macro_f1"]},
        "device": {"accuracy": dev["accuracy"], "macro_f1": dev["macro_f1"]},
        "hardest_pairs": hardest_pairs(seq["confusion"], classes),
    }


def select_for_evaluation(
    captures: np.ndarray, split: Split | None, use_all: bool
) -> tuple[np.ndarray, str]:
    """Which entries to score: the bundle's held-out test captures when the data holds any of
    its training or validation captures (scoring those would flatter the model)."""
    if use_all or split is None:
        return np.ones(len(captures), bool), "all captures given"
    part = split.part_of(captures)
    if ((part == 0) | (part == 1)).any():
        return part == 2, "held-out test captures of the model's split"
    return np.ones(len(captures), bool), "all captures given (none was used in training)"


def confusion_png(cm: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = (cm.sum(0) + cm.sum(1)) > 0
    cm = cm[present][:, present]
    names = [c for c, p in zip(classes, present) if p]
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(6.0, 0.32 * len(names) + 3)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for i in range(len(names)):
        for j in range(len(names)):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=5,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def baseline_figures(
    bundle: ModelBundle, ds: Dataset, train_idx: np.ndarray, d: EvalData, vote: VoteConfig
) -> dict:
    """The random forest on the model's training captures, scored like the CNN."""
    from .baseline import FEATURES, ForestBaseline, flow_features

    classes = list(bundle.classes)
    names = np.array(classes, object)
    rf = ForestBaseline(classes, seed=int(bundle.metadata.get("train_config", {}).get("seed", 0)))
    rf.fit(
        flow_features(ds.matrices[train_idx], ds.layout),
        np.searchsorted(names, ds.labels[train_idx].astype(object)),
    )
    y = np.searchsorted(names, d.labels)
    feats = flow_features(d.matrices, ds.layout)
    c0, w0 = time.process_time(), time.perf_counter()
    probs = rf.predict_proba(feats)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    index = probs.argmax(1)
    everything = np.ones(len(d), bool)
    out = {
        "model": "random forest, 100 trees, balanced class weights",
        "features": list(FEATURES),
        "train_flows": int(len(train_idx)),
        "train_seconds": round(rf.train_seconds, 2),
    }
    flow, _ = strategy_figures(
        "flow", d, y, index, everything, d.last, cpu, wall, 0, probs.max(1) >= 0.5, classes
    )
    groups = d.device_groups()
    v = device_vote(probs, groups, d.start, vote)
    t = running_max_by_group(d.last, groups, d.start)
    dev, _ = strategy_figures(
        "device", d, y, v.index, v.emitted, t, cpu, wall, 0, probs.max(1) >= 0.5, classes
    )
    for f in (flow, dev):
        del f["cost"]["flops_per_label"], f["trusted_share"]
    out["strategies"] = {"flow": flow, "device": dev}
    return out


def data_section(ds: Dataset, d: EvalData, unknown: dict[str, int]) -> dict:
    """What was evaluated, and how much of the captures' traffic the matrices looked at."""
    caps = np.unique(d.captures)
    ct = ds.captures_table
    in_caps = np.isin(ct.ids.astype(object), caps)
    data = {
        "capture_files": int(len(caps)),
        "flows": int(len(d)),
        "devices": int(d.device_groups().max() + 1),
        "labels": int(len(np.unique(d.labels))),
        "unknown_labels": unknown,
        "capture_packets": int(ct.packets[in_caps].sum()) if in_caps.any() else None,
        "capture_bytes": int(ct.bytes[in_caps].sum()) if in_caps.any() else None,
    }
    if in_caps.any() and ct.packets[in_caps].sum():
        data["inspected_share_of_all_packets"] = round(
            float(d.inspected_packets.sum() / ct.packets[in_caps].sum()), 4
        )
        data["inspected_share_of_all_bytes"] = round(
            float(d.inspected_bytes.sum() / max(ct.bytes[in_caps].sum(), 1)), 4
        )
    return data


def evaluate_report(
    bundle: ModelBundle,
    ds: Dataset,
    split: Split | None,
    use_all: bool = False,
    baseline: bool = False,
    vote: VoteConfig = VoteConfig(),
    out_dir: Path | None = None,
    predictor: Predictor | None = None,
) -> dict:
    """Everything ``iotcls evaluate`` reports, as one JSON-ready dict."""
    bundle.check_layout(ds.layout, "dataset")
    predictor = predictor or Predictor(bundle)
    labels = ds.labels.astype(object)
    chosen, scope = select_for_evaluation(ds.captures.astype(object), split, use_all)
    chosen &= labels != ""
    known = np.isin(labels, np.array(bundle.classes, object))
    unknown = {
        str(k): int(v) for k, v in zip(*np.unique(labels[chosen & ~known], return_counts=True))
    }
    idx = np.flatnonzero(chosen & known)
    if len(idx) == 0:
        raise ValueError(
            "nothing to evaluate: no labelled flow of the model's classes"
            + (f" (labels unknown to the model: {sorted(unknown)})" if unknown else "")
        )
    d = EvalData.from_dataset(ds, idx)
    figs, reps = evaluate_model(predictor, d, vote)
    seq = reps["sequence"]
    classes = list(bundle.classes)
    report = {
        "model": bundle.name,
        "accuracy": figs["sequence"]["accuracy"],
        "macro_f1": figs["sequence"]["macro_f1"],
        "scope": scope,
        "data": data_section(ds, d, unknown),
        "parameters": count_parameters(bundle.model),
        "flops": {"sequence": count_flops(bundle.model), "flow": count_flops(bundle.model, rows=1)},
        "strategies": figs,
        "per_class": seq["per_class"],
        "hardest_pairs": hardest_pairs(seq["confusion"], classes),
    }
    ident = identity_figures(predictor, d, vote)
    if ident is not None:
        report["dhcp_identity"] = ident
    if baseline:
        if split is None:
            raise ValueError("--baseline needs a model trained by iotcls train (with a split)")
        part = split.part_of(ds.captures.astype(object))
        train_idx = np.flatnonzero((part == 0) & (labels != "") & known)
        if len(train_idx) == 0:
            raise ValueError(
                "--baseline trains on the model's training captures: give the "
                "capture set the model was trained on"
            )
        report["baseline"] = baseline_figures(bundle, ds, train_idx, d, vote)
    if out_dir is not None:
        png = confusion_png(
            seq["confusion"],
            classes,
            out_dir / "confusion.png",
            f"{bundle.name}: per-sequence labels, {scope}",
        )
        report["confusion_png"] = str(png)
    # trust (docs/trust.md): refinement before/after, calibration (ECE, reliability PNG), devices
    from .trust.evaluation import trust_section

    report["trust"] = trust_section(predictor, d, out_dir, bundle.name)
    return report


def format_report(r: dict) -> str:
    """The report as text: strategies side by side, per class, hardest pairs, baseline."""
    lines = [
        f"model {r['model']}: {r['parameters']:,} parameters, "
        f"{r['flops']['sequence'] / 1e6:.2f} MFLOPs per matrix",
        f"data: {r['scope']}: {r['data']['capture_files']} capture files, "
        f"{r['data']['flows']} labelled flows, {r['data']['devices']} devices, "
        f"{r['data']['labels']} labels",
    ]
    if r["data"]["unknown_labels"]:
        lines.append(f"left out, labels the model does not know: {r['data']['unknown_labels']}")
    lines += [
        "",
        f"{'strategy':<22}{'accuracy':>9}{'macro-F1':>9}{'labels':>8}{'dev cov':>8}"
        f"{'flow cov':>9}{'1st label s':>12}{'CPU ms/lbl':>11}{'kFLOPs/lbl':>11}"
        f"{'pkts insp':>10}{'bytes insp':>11}",
    ]
    rows = [(f"CNN {k}", v) for k, v in r["strategies"].items()]
    if "baseline" in r:
        rows += [(f"RF baseline {k}", v) for k, v in r["baseline"]["strategies"].items()]
    for name, s in rows:
        c, cost, sel = s["coverage"], s["cost"], s["selectivity"]
        first = c["first_label_s_median"]
        kflops = cost.get("flops_per_label")
        lines.append(
            f"{name:<22}{s['accuracy']:>9.4f}{s['macro_f1']:>9.4f}{s['labels']:>8}"
            f"{c['devices']:>8.3f}{c['flows']:>9.3f}{'-' if first is None else f'{first:.1f}':>12}"
            f"{cost['cpu_ms_per_label']:>11.4f}"
            f"{'-' if kflops is None else f'{kflops / 1e3:.0f}':>11}"
            f"{sel['packets']:>10.3f}{sel['bytes']:>11.3f}"
        )
    if "dhcp_identity" in r:
        di = r["dhcp_identity"]
        lines.append(
            f"{'+ DHCP identity':<22}{di['sequence']['accuracy']:>9.4f}"
            f"{di['sequence']['macro_f1']:>9.4f}  per sequence; device vote "
            f"{di['device']['accuracy']:.4f} / {di['device']['macro_f1']:.4f} "
            f"({di['labels_with_identity']:.1%} of labels had their device's identity)"
        )
    lines += [
        "",
        "per class (sequence strategy):",
        f"  {'class':<22}{'precision':>10}{'recall':>8}{'F1':>8}{'support':>9}",
    ]
    for c, v in r["per_class"].items():
        lines.append(
            f"  {c:<22}{v['precision']:>10.4f}{v['recall']:>8.4f}{v['f1']:>8.4f}{v['support']:>9}"
        )
    lines += ["", "hardest class pairs (errors both ways / their flows):"]
    for p in r["hardest_pairs"]:
        a, b = p["pair"]
        lines.append(
            f"  {a} <-> {b}: {p['errors']} errors ({p['a_as_b']} + {p['b_as_a']}), "
            f"rate {p['rate']:.3f}"
        )
    if "confusion_png" in r:
        lines += ["", f"confusion matrix: {r['confusion_png']}"]
    if "trust" in r:  # docs/trust.md
        from .trust.evaluation import format_trust

        lines += ["", format_trust(r["trust"])]
    return "\n".join(lines)
