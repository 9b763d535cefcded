"""Calibration metrics: expected calibration error and the reliability diagram.

A confidence is only useful to a user if "0.9" means right nine times in ten. These metrics
say how far the model is from that, before and after temperature scaling (which lives with
the bundle, see :mod:`iotcls.bundle`), so ``evaluate`` can report both.

Binning: ``n_bins`` equal-width bins over [0, 1]; a confidence of exactly 1.0 falls in the
last bin, a confidence ``c`` in bin ``min(floor(c * n_bins), n_bins - 1)``. ECE is the
count-weighted mean of |accuracy - mean confidence| over non-empty bins (Guo et al. 2017).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_BINS = 15


@dataclass
class ReliabilityBins:
    """Per-bin figures; empty bins have count 0 and NaN accuracy/confidence."""

    edges: np.ndarray  # (n_bins + 1,)
    count: np.ndarray  # (n_bins,) int
    accuracy: np.ndarray  # (n_bins,)
    confidence: np.ndarray  # (n_bins,)

    @property
    def ece(self) -> float:
        n = int(self.count.sum())
        if n == 0:
            return float("nan")
        ok = self.count > 0
        gap = np.abs(self.accuracy[ok] - self.confidence[ok])
        return float((gap * self.count[ok]).sum() / n)

    @property
    def mce(self) -> float:
        """Maximum calibration error over non-empty bins."""
        ok = self.count > 0
        if not ok.any():
            return float("nan")
        return float(np.abs(self.accuracy[ok] - self.confidence[ok]).max())

    def to_dict(self) -> dict:
        def clean(a: np.ndarray) -> list:
            return [None if np.isnan(v) else round(float(v), 6) for v in a]

        return {
            "edges": [round(float(e), 6) for e in self.edges],
            "count": [int(c) for c in self.count],
            "accuracy": clean(self.accuracy),
            "confidence": clean(self.confidence),
        }


def _check(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    ok = np.asarray(correct, dtype=bool).ravel()
    if conf.shape != ok.shape:
        raise ValueError(f"calibration: {conf.size} confidences but {ok.size} correctness flags")
    if conf.size and (np.isnan(conf).any() or conf.min() < 0 or conf.max() > 1):
        raise ValueError("calibration: confidences must lie in [0, 1]")
    return conf, ok


def reliability_bins(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = DEFAULT_BINS
) -> ReliabilityBins:
    conf, ok = _check(confidence, correct)
    if n_bins < 1:
        raise ValueError("calibration: n_bins must be at least 1")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=ok.astype(np.float64), minlength=n_bins) / count
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
    return ReliabilityBins(edges, count, acc, mean_conf)


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = DEFAULT_BINS
) -> float:
    return reliability_bins(confidence, correct, n_bins).ece


def reliability_diagram(
    path: str | Path,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    n_bins: int = DEFAULT_BINS,
    title: str = "Reliability diagram",
) -> Path:
    """Write a PNG: per curve, accuracy per confidence bin, with its ECE in the legend.

    ``curves`` maps a name (e.g. ``"raw"``, ``"calibrated"``) to ``(confidence, correct)``.
    A lower panel shows how many labels fall in each bin (log scale), since a bin's gap
    matters only as much as the labels in it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (ax, axn) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect")
    width = 1.0 / n_bins
    for i, (name, (conf, ok)) in enumerate(curves.items()):
        b = reliability_bins(conf, ok, n_bins)
        centers = (b.edges[:-1] + b.edges[1:]) / 2
        has = b.count > 0
        ax.plot(
            b.confidence[has],
            b.accuracy[has],
            marker="o",
            ms=4,
            label=f"{name} (ECE {b.ece:.3f}, n={int(b.count.sum())})",
        )
        off = (i - (len(curves) - 1) / 2) * width / max(len(curves), 1)
        axn.bar(
            centers + off,
            np.maximum(b.count, 0),
            width=width / max(len(curves), 1),
            label=name,
            alpha=0.8,
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    axn.set_yscale("log")
    axn.set_xlabel("confidence")
    axn.set_ylabel("labels")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
