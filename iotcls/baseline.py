"""The shallow baseline: a random forest on hand-crafted statistics of the current flow.

The kind of model the paper argues against (IoT Sentinel, IoTDevID): per-flow statistics,
no payload, no history. Its features, all computed from row 0 of the matrix so both models
see the same flows: protocol, remote and device port, total bytes and packets, and over the
first packets: count, sizes (mean, std, min, max, first three), packets and bytes each way,
time offsets (last, mean gap, max gap). No remote address: it names the vendor's servers,
which is not a flow statistic.
"""

from __future__ import annotations

import time

import numpy as np

from .layout import MatrixLayout

FEATURES = (
    "tcp",
    "udp",
    "icmp",
    "rport",
    "dport",
    "bytes",
    "pkts",
    "n",
    "size_mean",
    "size_std",
    "size_min",
    "size_max",
    "size0",
    "size1",
    "size2",
    "n_up",
    "n_down",
    "bytes_up",
    "bytes_down",
    "t_last",
    "gap_mean",
    "gap_max",
)


def flow_features(matrices: np.ndarray, layout: MatrixLayout) -> np.ndarray:
    """(n, len(FEATURES)) float32 from the current-flow row of each matrix."""
    row = matrices[:, 0]
    g = layout.group_slices()
    present = row[:, g["directions"]] != 0
    sizes = row[:, g["sizes"]] * 1500.0
    offs = layout.offset_ms(row[:, g["timing"]])
    up = row[:, g["directions"]] > 0
    n = present.sum(1)
    cnt = np.maximum(n, 1)
    mean = (sizes * present).sum(1) / cnt
    std = np.sqrt(((sizes - mean[:, None]) ** 2 * present).sum(1) / cnt)
    smallest = np.where(present, sizes, np.inf).min(1)
    gaps = np.diff(offs, axis=1) * (present[:, 1:])
    first = [sizes[:, i] if sizes.shape[1] > i else np.zeros(len(row)) for i in range(3)]
    cols = [
        row[:, 8],
        row[:, 9],
        row[:, 10],
        row[:, 6],
        row[:, 7],
        row[:, 11],
        row[:, 12],
        n,
        mean,
        std,
        np.where(np.isfinite(smallest), smallest, 0),
        (sizes * present).max(1),
        *first,
        (present & up).sum(1),
        (present & ~up).sum(1),
        (sizes * (present & up)).sum(1),
        (sizes * (present & ~up)).sum(1),
        (offs * present).max(1),
        gaps.sum(1) / np.maximum(n - 1, 1),
        gaps.max(1) if gaps.shape[1] else np.zeros(len(row)),
    ]
    return np.stack(cols, axis=1).astype(np.float32)


class ForestBaseline:
    def __init__(self, classes: list[str], seed: int = 0, trees: int = 100):
        from sklearn.ensemble import RandomForestClassifier

        self.classes = list(classes)
        self.rf = RandomForestClassifier(
            n_estimators=trees,
            class_weight="balanced",
            n_jobs=2,
            random_state=seed,
            min_samples_leaf=1,
        )
        self.train_seconds = 0.0

    def fit(self, features: np.ndarray, y: np.ndarray) -> ForestBaseline:
        t0 = time.perf_counter()
        self.rf.fit(features, y)
        self.train_seconds = time.perf_counter() - t0
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probabilities over all classes (classes absent from training get zero)."""
        out = np.zeros((len(features), len(self.classes)), np.float32)
        if len(features):
            out[:, self.rf.classes_] = self.rf.predict_proba(features)
        return out
