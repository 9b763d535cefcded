"""Evaluation: the three strategies, each on accuracy, coverage, cost and selectivity.

Definitions are in docs/strategies.md. Everything here is computed on the labelled flows of
the evaluated captures (flows of a listed device); unlabelled traffic (phones, gateways) only
counts towards what the sensor inspects. Figures of one strategy:

* ``accuracy``, ``macro_f1``: over the labels the strategy emits;
* ``coverage``: share of devices (one per device and capture) with at least one label, share
  of flows labelled, and the time from a device's first packet to its first label;
* ``cost``: CPU time per label (measured, both threads counted) and model FLOPs per label;
* ``selectivity``: share of the devices' packets and bytes the sensor must inspect.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .model import count_flops
from .predict import Predictions, Predictor
from .strategies import STRATEGIES, VoteConfig, device_vote, strategy_input
from .train import Split, macro_f1


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

    def take(self, idx: np.ndarray) -> "EvalData":
        return EvalData(**{k: v[idx] for k, v in self.__dict__.items()})

    def device_groups(self) -> np.ndarray:
        """One id per (capture, device): a device in another capture is another session."""
        keys = np.array([f"{c}\x00{d}" for c, d in zip(self.captures, self.devices)], object)
        return np.unique(keys, return_inverse=True)[1]


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
        per_class[c] = {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4),
                        "support": int(support[i])}  # fmt: skip
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
                pairs.append({"pair": [classes[a], classes[b]], "errors": errors,
                              "a_as_b": int(cm[a, b]), "b_as_a": int(cm[b, a]),
                              "rate": round(rate, 4)})  # fmt: skip
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
    starts = np.r_[0, np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1] if n else np.zeros(0, int)
    return starts, np.r_[starts[1:], n].astype(int)


def timed_predict(predictor: Predictor, matrices: np.ndarray) -> tuple[Predictions, float, float]:
    """Predictions and the CPU and wall seconds they took."""
    predictor.predict(matrices[:8])  # warm-up: first-call allocations are not per-label cost
    c0, w0 = time.process_time(), time.perf_counter()
    pred = predictor.predict(matrices)
    return pred, time.process_time() - c0, time.perf_counter() - w0


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
    seq = None
    for name in STRATEGIES:
        if name == "device":
            groups = d.device_groups()
            v = device_vote(seq.probs, groups, d.start, vote)
            t = running_max_by_group(d.last, groups, d.start)
            c0 = time.process_time()
            device_vote(seq.probs, groups, d.start, vote)  # the vote's own cost
            vote_cpu = time.process_time() - c0
            fig, rep = strategy_figures(
                name, d, y, v.index, v.emitted, t, seq_cpu + vote_cpu, seq_wall + vote_cpu,
                flops["sequence"] * len(d), seq.confidence >= predictor.threshold, classes,
            )  # fmt: skip
            fig["vote"] = {"window": vote.window, "min_votes": vote.min_votes}
        else:
            pred, cpu, wall = timed_predict(predictor, strategy_input(d.matrices, name))
            emitted = np.ones(len(d), bool)
            fig, rep = strategy_figures(name, d, y, pred.index, emitted, d.last, cpu, wall,
                                        flops[name] * len(d), pred.trusted, classes)  # fmt: skip
            if name == "sequence":
                seq, seq_cpu, seq_wall = pred, cpu, wall
        figs[name], reps[name] = fig, rep
    return figs, reps


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
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=5,
                        color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
