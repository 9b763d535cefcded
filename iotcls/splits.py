"""How captures are split for training and evaluation, and the figures both need.

A leaf module: training (:mod:`iotcls.train`), evaluation (:mod:`iotcls.evaluate`) and the
trust evaluation (:mod:`iotcls.trust.evaluation`) all read these, and none of them has to
import another to get them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """Capture ids of each part; a capture belongs to exactly one part."""

    train: list[str]
    val: list[str]
    test: list[str]

    def part_of(self, captures: np.ndarray) -> np.ndarray:
        """Per entry: 0 train, 1 val, 2 test, -1 none."""
        out = np.full(len(captures), -1, np.int8)
        for i, ids in enumerate((self.train, self.val, self.test)):
            out[np.isin(captures, np.array(ids, dtype=object))] = i
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def split_captures(
    captures: np.ndarray, labels: np.ndarray, seed: int, val: float, test: float
) -> Split:
    """Per label, shuffle its capture files (seeded) and deal them into train/val/test.

    A label with at least three files gets at least one validation and one test file; with
    two, one train and one test file; with one, a train file only. A capture's label is that
    of its labelled flows (the label of the capture's device).
    """
    pairs = sorted({(str(c), str(lab)) for c, lab in zip(captures, labels)})
    by_label: dict[str, list[str]] = {}
    for c, lab in pairs:
        by_label.setdefault(lab, []).append(c)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for label in sorted(by_label):
        files = list(by_label[label])
        rng.shuffle(files)
        n = len(files)
        n_test = max(1, round(test * n)) if n >= 2 else 0
        n_val = max(1, round(val * n)) if n >= 3 else 0
        parts["test"] += files[:n_test]
        parts["val"] += files[n_test : n_test + n_val]
        parts["train"] += files[n_test + n_val :]
    return Split(**{k: sorted(v) for k, v in parts.items()})


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Macro-F1 over the classes present in ``y_true`` or ``y_pred``."""
    cm = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    cm = cm.reshape(n_classes, n_classes).astype(np.float64)
    tp = np.diag(cm)
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    f1 = np.where(support + predicted > 0, 2 * tp / np.maximum(support + predicted, 1), 0.0)
    return float(f1[present].mean()) if present.any() else 0.0


def device_sessions(captures: np.ndarray, devices: np.ndarray) -> np.ndarray:
    """One id per (capture, device): a device in another capture is another session."""
    keys = np.array([f"{c}\x00{d}" for c, d in zip(captures, devices)], object)
    return np.unique(keys, return_inverse=True)[1]
