"""Early records of a whole table, and what they give: labels seconds after a device's first
packet instead of at its first window's end.

:func:`iotcls.schema.early_record` defines the early record of one window; :func:`early_table`
is its vectorised twin for a :class:`~iotcls.flowtable.FlowTable` (a test keeps the two equal).
:func:`early_matrices` builds what a live bridge would score for each early record: its own
row, and as history the device's final records already published by then (a final record is
published when its window ends, ``start + window_s``), the latest first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .flowtable import FlowTable
from .layout import MatrixLayout, rel_time
from .schema import DEFAULT_PACKETS, DEFAULT_WINDOW_S, EARLY_IDLE_S, PROTO_TCP, PROTO_UDP


@dataclass
class EarlyTable:
    table: FlowTable  # the early records
    source: np.ndarray  # (m,) row of the final table each one is the early record of
    at: np.ndarray  # (m,) when it is published (epoch seconds)


def early_table(
    t: FlowTable,
    packets: int = DEFAULT_PACKETS,
    idle_s: float = EARLY_IDLE_S,
    window_s: float = DEFAULT_WINDOW_S,
) -> EarlyTable:
    """The early record of every window of ``t`` that has one (schema.early_cut's rule)."""
    n = np.minimum(t.n_pkts.astype(np.int64), packets)
    p = t.offsets.shape[1]
    cols = np.arange(p - 1)
    gaps = np.diff(t.offsets, axis=1) >= idle_s
    gaps &= cols[None, :] < (n - 1)[:, None]  # between recorded packets only
    has_gap = gaps.any(axis=1)
    first_gap = np.argmax(gaps, axis=1)
    rows = np.arange(len(t))
    k = np.where(has_gap, first_gap + 1, n)
    last_off = t.offsets[rows, np.clip(k - 1, 0, p - 1)]
    at = np.where(has_gap, last_off + idle_s, np.where(n == packets, last_off, last_off + idle_s))
    ok = (n > 0) & (has_gap | (n == packets) | (t.total_packets == n)) & (at < window_s)
    src = np.flatnonzero(ok)
    e = t.take(src)
    k = k[src]
    keep = np.arange(p)[None, :] < k[:, None]
    e.n_pkts = k.astype(e.n_pkts.dtype)
    e.offsets = np.where(keep, e.offsets, 0.0)
    e.sizes = np.where(keep, e.sizes, 0).astype(e.sizes.dtype)
    e.directions = np.where(keep, e.directions, 0).astype(e.directions.dtype)
    e.payload_len = np.where(keep, e.payload_len, 0).astype(e.payload_len.dtype)
    e.payload = e.payload * keep[:, :, None].astype(e.payload.dtype)
    e.total_packets = k.astype(e.total_packets.dtype)
    e.total_bytes = e.sizes.astype(np.int64).sum(axis=1)
    e.last = e.start + e.offsets[np.arange(len(src)), k - 1]
    return EarlyTable(e, src, t.start[src] + at[src])


def early_matrices(layout: MatrixLayout, final: FlowTable, early: EarlyTable) -> np.ndarray:
    """One matrix per early record: its row, then the device's final records published
    before it (window ended: ``start + window_s <= at``), latest start first."""
    k, m = layout.history, len(early.source)
    mats = np.zeros((m, k + 1, layout.width), np.float32)
    if m == 0:
        return mats
    mats[:, 0] = layout.encode_rows(early.table)
    rows = layout.encode_rows(final)
    devices = final.device_keys()
    published = final.start + layout.window_s
    by_device: dict[str, np.ndarray] = {}
    for d in np.unique(devices):
        idx = np.flatnonzero(devices == d)
        by_device[d] = idx[np.argsort(final.start[idx], kind="stable")]
    for j, (src, at) in enumerate(zip(early.source.tolist(), early.at.tolist())):
        idx = by_device[devices[src]]
        done = idx[published[idx] <= at]
        hist = done[::-1][:k]
        mats[j, 1 : 1 + len(hist)] = rows[hist]
        mats[j, 1 : 1 + len(hist), 0] = rel_time(final.start[src] - final.start[hist])
    return mats


TIMES_S = (1, 2, 5, 10, 30, 60)


@dataclass
class DeviceLabels:
    """One device session's labels in the order a live bridge would give them."""

    truth: str
    first_seen: float  # the device's first packet
    at: np.ndarray  # when each label is known
    label: np.ndarray  # object
    trusted: np.ndarray  # bool
    confidence: np.ndarray
    first_port_flow: float = float("inf")  # start of the device's first TCP or UDP flow


def _labels(
    predictor,
    layout: MatrixLayout,
    t: FlowTable,
    mats: np.ndarray,
    rows: np.ndarray,
    at: np.ndarray,
):
    devices = t.device_keys()[rows]
    groups = np.unique(devices, return_inverse=True)[1] if len(rows) else np.zeros(0, int)
    return predictor.label(mats, groups, at)


def capture_device_labels(predictor, cm, early: bool = True) -> list[DeviceLabels]:
    """The labels of one capture's devices (``cm``: :class:`iotcls.dataset.CaptureMatrices`),
    final ones (known at their window's end) and, with ``early``, early ones too."""
    layout, t = predictor.layout, cm.table
    final_at = t.start[cm.order] + layout.window_s
    fp = _labels(predictor, layout, t, cm.matrices, cm.order, final_at)
    parts = [(cm.order, final_at, fp)]
    if early:
        et = early_table(t, layout.packets, EARLY_IDLE_S, layout.window_s)
        if len(et.source):
            em = early_matrices(layout, t, et)
            parts.append((et.source, et.at, _labels(predictor, layout, t, em, et.source, et.at)))
    rows = np.concatenate([p[0] for p in parts])
    at = np.concatenate([p[1] for p in parts])
    label = np.concatenate([p[2].label for p in parts])
    trusted = np.concatenate([p[2].trusted for p in parts])
    conf = np.concatenate([p[2].confidence for p in parts])
    devices = t.device_keys()[rows]
    truth = cm.labels[rows]
    out = []
    for d in np.unique(devices):
        sel = np.flatnonzero(devices == d)
        sel = sel[np.argsort(at[sel], kind="stable")]
        mine = t.device_keys() == d
        first = float(t.start[mine].min())
        ported = mine & ((t.proto == PROTO_TCP) | (t.proto == PROTO_UDP))
        first_port = float(t.start[ported].min()) if ported.any() else float("inf")
        out.append(
            DeviceLabels(
                str(truth[sel[0]]), first, at[sel], label[sel], trusted[sel], conf[sel], first_port
            )
        )
    return out


def _macro_f1(truth: list[str], pred: list[str]) -> float:
    classes = sorted(set(truth))
    f1 = []
    for c in classes:
        tp = sum(t == c and p == c for t, p in zip(truth, pred))
        fp = sum(t != c and p == c for t, p in zip(truth, pred))
        fn = sum(t == c and p != c for t, p in zip(truth, pred))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(f1)) if f1 else 0.0


def device_label(d: DeviceLabels, known: np.ndarray) -> tuple[str, bool, float]:
    """The device's label from its labels ``known`` so far, as an analyst would read them:
    the trusted label with the largest sum of calibrated confidence (ties: the latest), else
    the same over all labels; with its trust and the mean confidence of the labels that
    named it. Summing confidence rather than counting labels lets one confident label
    outweigh two that were near guesses (a device's first flows, before its type shows)."""
    pool = known[d.trusted[known]]
    is_trusted = len(pool) > 0
    pool = pool if is_trusted else known
    names = d.label[pool]
    weight = {str(n): float(d.confidence[pool][names == n].sum()) for n in set(names.tolist())}
    top = max(weight.values())
    best = {n for n, w in weight.items() if w >= top - 1e-9}
    latest = next(j for j in pool[::-1] if d.label[j] in best)
    label = str(d.label[latest])
    conf = float(d.confidence[pool][names == label].mean())
    return label, is_trusted, conf


def time_to_label(
    devices: list[DeviceLabels], times: tuple[float, ...] = TIMES_S, high: float = 0.9
) -> dict:
    """Per time since each device's first packet: how many devices have a label, the
    per-device accuracy and macro-F1 of their label then (:func:`device_label`; none yet
    counts as wrong),
    the share trusted, and trusted labels that are wrong at confidence >= ``high``; the share
    of devices that have begun a TCP or UDP flow by then (the others have sent only ICMP,
    such as IPv6 router solicitations, or non-IP frames: nothing that tells types apart); and the
    same for the final label (the device's last one), and the median time to a first label."""
    rows = []
    for t in (*times, float("inf")):
        truth, pred, trusted, bad = [], [], 0, 0
        ported = sum(d.first_port_flow <= d.first_seen + t for d in devices)
        for d in devices:
            known = np.flatnonzero(d.at <= d.first_seen + t)
            truth.append(d.truth)
            if not len(known):
                pred.append("")
                continue
            label, is_trusted, conf = device_label(d, known)
            pred.append(label)
            trusted += is_trusted
            bad += bool(is_trusted and label != d.truth and conf >= high)
        n = max(len(devices), 1)
        rows.append(
            {
                "seconds": "final" if t == float("inf") else t,
                "labelled": round(sum(p != "" for p in pred) / n, 4),
                "accuracy": round(sum(a == b for a, b in zip(truth, pred)) / n, 4),
                "macro_f1": round(_macro_f1(truth, pred), 4),
                "trusted": round(trusted / n, 4),
                "high_confidence_trusted_errors": bad,
                "with_port_flow": round(ported / n, 4),
            }
        )
    first = [float(d.at[0] - d.first_seen) for d in devices if len(d.at)]
    return {
        "devices": len(devices),
        "table": rows,
        "first_label_s": {
            "median": round(float(np.median(first)), 2) if first else None,
            "max": round(float(np.max(first)), 2) if first else None,
        },
    }


def format_time_to_label(
    r: dict, title: str = "labels by time since a device's first packet"
) -> str:
    lines = [
        f"{title} ({r['devices']} devices; first label median "
        f"{r['first_label_s']['median']} s, max {r['first_label_s']['max']} s):",
        f"  {'after':>7} {'labelled':>9} {'accuracy':>9} {'macro-F1':>9} {'trusted':>8} "
        f"{'hc errors':>10} {'TCP/UDP seen':>13}",
    ]
    for row in r["table"]:
        s = row["seconds"]
        when = s if isinstance(s, str) else f"{s:g} s"
        lines.append(
            f"  {when:>7} {row['labelled']:>9.3f} {row['accuracy']:>9.3f} "
            f"{row['macro_f1']:>9.3f} {row['trusted']:>8.3f} "
            f"{row['high_confidence_trusted_errors']:>10} "
            f"{row.get('with_port_flow', float('nan')):>13.3f}"
        )
    return "\n".join(lines)


def time_to_label_png(early: dict, final_only: dict, path) -> Path:
    """Per-device macro-F1 and the share of devices labelled, by time since the first packet,
    with early records and without."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for r, name, style in (
        (early, "early + final records", "-o"),
        (final_only, "final records only", "--s"),
    ):
        rows = [x for x in r["table"] if x["seconds"] != "final"]
        secs = [x["seconds"] for x in rows]
        ax.plot(secs, [x["macro_f1"] for x in rows], style, label=f"macro-F1, {name}")
        ax.plot(
            secs,
            [x["labelled"] for x in rows],
            style,
            alpha=0.35,
            label=f"devices labelled, {name}",
        )
    ax.set_xscale("log")
    ax.set_xlabel("seconds since the device's first packet")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
