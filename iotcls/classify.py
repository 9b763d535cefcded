"""Classify the devices in captures: per-flow labels for ``iot_class.log`` and a summary.

The pcap twin of what the scorer does beside Zeek. One capture goes through each stage once,
top to bottom (:func:`classify_capture`):

    read -> records -> matrices     iotcls.dataset.capture_matrices (iotcls.pcap, .flows, .layout)
    -> scores -> refined -> trusted Predictor.label (iotcls.predict, iotcls.trust)
    -> the strategy's labels        iotcls.strategies (docs/strategies.md)
    -> log entries                  Classified.entries (iotcls.logschema)

An entry's ``ts`` is the start of its labelled window, as under Zeek (like ``conn.log``'s
``ts``: when the activity began). A device's history restarts with every capture, as a
sensor's would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .dataset import CaptureMatrices
from .flowtable import bytes_to_ip
from .logschema import LogEntry
from .predict import Predictions, Predictor
from .schema import proto_name
from .strategies import STRATEGIES, VoteConfig, device_labels, strategy_input


@dataclass
class DeviceSummary:
    device: str  # MAC, else IP
    ip: str
    label: str
    confidence: float
    trusted: bool
    trusted_share: float  # share of the device's labels that are trusted
    n_labels: int
    captures: list[str] = field(default_factory=list)


@dataclass
class Classified:
    """One capture's labels: ``rows`` index the capture's flow table, one per label."""

    capture: CaptureMatrices
    rows: np.ndarray  # table row of each label
    pred: Predictions  # per label
    n_flows: np.ndarray  # flows the label rests on
    strategy: str
    sequences: Predictions  # every flow's sequence label (the summary votes over them)

    def entries(self, model: str) -> list[LogEntry]:
        t = self.capture.table
        out = []
        for k, i in enumerate(self.rows.tolist()):
            orig_h, orig_p, resp_h, resp_p = _conn_id(t, i)
            out.append(
                LogEntry(
                    ts=float(t.start[i]),
                    uid=str(t.uid[i]),
                    orig_h=orig_h,
                    orig_p=orig_p,
                    resp_h=resp_h,
                    resp_p=resp_p,
                    proto=proto_name(int(t.proto[i])),
                    device_mac=str(t.device_mac[i]),
                    device_ip=bytes_to_ip(t.device_ip[i].tobytes()),
                    label=str(self.pred.label[k]),
                    confidence=float(self.pred.confidence[k]),
                    strategy=self.strategy,
                    n_flows=int(self.n_flows[k]),
                    trusted=bool(self.pred.trusted[k]),
                    reason=str(self.pred.reason[k]),
                    top_groups=list(self.pred.top_groups[k]),
                    model=model,
                )
            )
        return out


def _conn_id(t, i: int) -> tuple[str, int, str, int]:
    dev = (bytes_to_ip(t.device_ip[i].tobytes()), int(t.device_port[i]))
    rem = (bytes_to_ip(t.remote_ip[i].tobytes()), int(t.remote_port[i]))
    (oh, op), (rh, rp) = (dev, rem) if t.device_is_orig[i] else (rem, dev)
    return oh, op, rh, rp


def classify_capture(
    predictor: Predictor, cm: CaptureMatrices, strategy: str, vote: VoteConfig = VoteConfig()
) -> Classified:
    """One capture's labels under ``strategy`` (its matrices already read: ``cm``), and
    every flow's sequence label for the summary (:func:`summarize`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
    order = cm.order
    groups, times = _histories(cm)
    pred = predictor.label(strategy_input(cm.matrices, strategy), groups, times)
    if strategy == "flow":
        # the summary votes over sequence labels as the sequence strategy gives them (DHCP
        # refinement and trust rules included), whatever strategy writes the log
        seq = predictor.label(cm.matrices, groups, times)
        return Classified(cm, order, pred, np.ones(len(order), np.int64), strategy, seq)
    if strategy == "sequence":
        rows_present = (cm.matrices != 0).any(axis=2).sum(axis=1)
        return Classified(cm, order, pred, rows_present, strategy, pred)
    d = device_labels(pred.probs, pred.index, pred.confidence, pred.trusted, groups, times, vote)
    keep = np.flatnonzero(d.emitted)
    voted = pred.take(keep)
    voted.index = d.index[keep]
    voted.label = predictor.classes[voted.index]
    voted.confidence = d.confidence[keep].astype(np.float32)
    voted.trusted = d.trusted[keep]
    voted.reason = np.where(voted.trusted, "-", "few_trusted_labels").astype(object)
    return Classified(cm, order[keep], voted, d.n_votes[keep], strategy, pred)


def _histories(cm: CaptureMatrices) -> tuple[np.ndarray, np.ndarray]:
    """Per matrix, its device (a group number) and its flow's window start."""
    t, order = cm.table, cm.order
    if not len(order):
        return np.zeros(0, int), t.start[order]
    devices = t.device_keys()[order]
    return np.unique(devices, return_inverse=True)[1], t.start[order]


def summarize(
    predictor: Predictor, results: list[tuple[CaptureMatrices, Predictions]]
) -> list[DeviceSummary]:
    """Per device (across captures), the confidence-weighted vote over all its sequence labels."""
    per_dev: dict[str, list] = {}
    for cm, pred in results:
        t, order = cm.table, cm.order
        keys = t.device_keys()[order]
        for k, i in enumerate(order.tolist()):
            per_dev.setdefault(str(keys[k]), []).append((cm, i, k, pred))
    out = []
    for dev, items in per_dev.items():
        trusted = np.array([p.trusted[k] for _, _, k, p in items])
        starts = np.array([cm.table.start[i] for cm, i, _, _ in items])
        # the vote of all its sequences (min_votes 1), of the trusted ones where enough are
        d = device_labels(
            np.stack([p.probs[k] for _, _, k, p in items]),
            np.array([p.index[k] for _, _, k, p in items]),
            np.array([p.confidence[k] for _, _, k, p in items]),
            trusted,
            np.zeros(len(items), np.int64),
            starts,
            VoteConfig(window=len(items), min_votes=1),
        )
        last = int(np.argmax(starts))
        cls, conf = int(d.index[last]), float(d.confidence[last])
        cm0, i0 = items[last][0], items[last][1]  # the device's address as last seen
        share = float(trusted.mean())
        out.append(
            DeviceSummary(
                device=dev,
                ip=bytes_to_ip(cm0.table.device_ip[i0].tobytes()),
                label=str(predictor.classes[cls]),
                confidence=conf,
                trusted=conf >= predictor.threshold and share >= 0.5,
                trusted_share=share,
                n_labels=len(items),
                captures=sorted({cm.spec.capture_id for cm, _, _, _ in items}),
            )
        )
    out.sort(key=lambda s: s.device)
    return out


def format_summary(rows: list[DeviceSummary]) -> str:
    head = f"{'device':<19}{'ip':<17}{'label':<22}{'confidence':>11}{'trusted':>9}{'labels':>8}"
    lines = [head]
    for r in rows:
        trusted = f"{'yes' if r.trusted else 'no'}"
        lines.append(
            f"{r.device:<19}{r.ip:<17}{r.label:<22}{r.confidence:>11.3f}{trusted:>9}{r.n_labels:>8}"
        )
    return "\n".join(lines)
