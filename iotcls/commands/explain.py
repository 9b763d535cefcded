"""``iotcls explain PCAP --device MAC``: why each of a device's labels came out as it did.

For every flow of the device (one label per flow, the per-sequence strategy) it prints the
label, its calibrated confidence, the trust decision and the exact Shapley values of the
feature groups (meta, timing, sizes, directions, payload of the current flow, and the
device's history) for the predicted class's log-probability; ``-o PNG`` draws them as
stacked bars over time with the confidence on top. See docs/trust.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pcap", metavar="PCAP", help="a pcap/pcapng capture")
    from ..cli import add_renamed

    add_renamed(
        p,
        "--device",
        "--devices",
        dest="mac",
        metavar="MAC",
        help="the device's MAC address (required)",
    )
    p.add_argument("--model", metavar="MODEL", help="model bundle (default: the shipped model)")
    p.add_argument("-o", "--output", metavar="PNG", help="also plot the explanations to PNG")
    p.add_argument("--top", type=int, default=3, help="groups named per label (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON object per label on stdout")


def explain_device(bundle, cm, top: int = 3) -> dict:
    """Labels, confidences, trust and Shapley values of every matrix of ``cm``."""
    from ..flowtable import bytes_to_ip
    from ..predict import Predictor
    from ..schema import proto_name
    from ..trust.decision import apply_device_rules, decide
    from ..trust.layer import TrustLayer

    layer = TrustLayer.from_bundle(bundle)
    t = cm.table
    rows = cm.order
    n = len(cm.matrices)
    groups = t.device_keys()[rows] if n else np.zeros(0, object)
    groups = np.unique(groups, return_inverse=True)[1] if n else np.zeros(0, int)
    predictor = Predictor(bundle, explain=False)
    ids = predictor.device_identities(cm.matrices, groups, t.start[rows])
    allowed = predictor.allowed(ids)  # the DHCP identity refinement, as in classify
    e = layer.explain(cm.matrices)
    if allowed is not None:
        e = e.restricted(allowed)
    conf = np.exp(e.log_probs[np.arange(n), e.target])
    if layer.state is not None:
        d = decide(layer.state, e.log_probs, e.all_values, e.target)
        trusted, reason = d.trusted, d.reason
        decided_by = "trust state (confidence + explanation + device rules" + (
            ", DHCP identity refinement)" if ids is not None else ")"
        )
    else:
        from ..predict import DEFAULT_THRESHOLD

        thr = float(bundle.metadata.get("confidence_threshold", DEFAULT_THRESHOLD))
        trusted = conf >= thr
        reason = ["-" if t else "low_confidence" for t in trusted]
        decided_by = f"no trust state in the model: confidence >= {thr:g} only"
    trusted, reason = np.array(trusted, bool), np.array(reason, object)
    names = predictor.device_names(cm.matrices, groups, t.start[rows])
    apply_device_rules(
        layer.state,
        bundle.classes,
        e.target,
        conf,
        groups,
        t.start[rows],
        ids,
        trusted,
        reason,
        names,
    )
    labels = []
    for i in range(n):
        r = rows[i]
        labels.append(
            {
                "ts": float(t.start[r]),
                "uid": str(t.uid[r]),
                "remote": f"{bytes_to_ip(t.remote_ip[r].tobytes())}:{int(t.remote_port[r])}",
                "proto": proto_name(int(t.proto[r])),
                "label": bundle.classes[int(e.target[i])],
                "confidence": round(float(conf[i]), 4),
                "trusted": bool(trusted[i]),
                "reason": str(reason[i]),
                "shapley": {g: round(float(v), 4) for g, v in zip(e.names, e.values[i])},
                "base": round(float(e.base[e.target[i]]), 4),
            }
        )
    order = sorted(range(n), key=lambda i: (labels[i]["ts"], i))
    return {
        "groups": list(e.names),
        "labels": [labels[i] for i in order],
        "decided_by": decided_by,
        "top": top,
    }


def format_explanations(res: dict, device: str, model: str) -> str:
    groups, labs = res["groups"], res["labels"]
    t0 = labs[0]["ts"] if labs else 0.0
    head = (
        f"{'t+s':>7} {'remote':<22} {'proto':<5} {'label':<20} {'conf':>6} {'trust':<5} "
        + " ".join(f"{g[:9]:>9}" for g in groups)
        + "  reason"
    )
    lines = [
        f"device {device}: {len(labs)} labels by {model} ({res['decided_by']}); Shapley "
        "values of log p(label) per feature group, baseline = all-zero matrix",
        head,
    ]
    for lab in labs:
        vals = " ".join(f"{lab['shapley'][g]:>9.3f}" for g in groups)
        lines.append(
            f"{lab['ts'] - t0:>7.1f} {lab['remote'][:22]:<22} {lab['proto']:<5} "
            f"{lab['label'][:20]:<20} {lab['confidence']:>6.3f} "
            f"{'yes' if lab['trusted'] else 'no':<5} {vals}  {lab['reason']}"
        )
    if labs:
        v = np.array([[lab["shapley"][g] for g in groups] for lab in labs])
        mean_abs = np.abs(v).mean(0)
        counts: dict[str, int] = {}
        for lab in labs:
            if lab["trusted"]:
                counts[lab["label"]] = counts.get(lab["label"], 0) + 1
        share = sum(counts.values()) / len(labs)
        lines.append(
            "mean |value|: "
            + ", ".join(
                f"{g} {m:.3f}" for g, m in sorted(zip(groups, mean_abs), key=lambda x: -x[1])
            )
        )
        top = ", ".join(f"{k} {c}" for k, c in sorted(counts.items(), key=lambda x: -x[1])[:3])
        lines.append(f"trusted: {share:.1%} of labels" + (f" ({top})" if top else ""))
    return "\n".join(lines)


def plot_explanations(res: dict, path: Path, title: str) -> Path:
    """Stacked bars of the group values per label (time order) and the confidence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, labs = res["groups"], res["labels"]
    n = len(labs)
    v = np.array([[lab["shapley"][g] for g in groups] for lab in labs]).reshape(n, len(groups))
    x = np.arange(n)
    fig, (ax, axc) = plt.subplots(
        2,
        1,
        figsize=(max(7.0, min(0.12 * n + 4, 30)), 6.5),
        sharex=True,
        gridspec_kw={"height_ratios": [3, 1]},
    )
    colors = plt.get_cmap("tab10").colors
    pos, neg = np.zeros(n), np.zeros(n)
    for j, g in enumerate(groups):
        col = v[:, j]
        up, down = np.maximum(col, 0), np.minimum(col, 0)
        ax.bar(x, up, bottom=pos, width=0.85, color=colors[j % 10], label=g)
        ax.bar(x, down, bottom=neg, width=0.85, color=colors[j % 10])
        pos, neg = pos + up, neg + down
    ax.axhline(0, color="black", lw=0.6)
    ax.plot(x, v.sum(1), "k.", ms=3, label="sum = log p - log p(empty)")
    ax.set_ylabel("Shapley value (log-prob)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    conf = np.array([lab["confidence"] for lab in labs])
    trusted = np.array([lab["trusted"] for lab in labs], bool)
    axc.plot(x, conf, "-", color="grey", lw=0.8)
    axc.scatter(x[trusted], conf[trusted], s=10, color="tab:green", label="trusted", zorder=3)
    axc.scatter(
        x[~trusted], conf[~trusted], s=14, marker="x", color="tab:red", label="untrusted", zorder=3
    )
    axc.set_ylim(0, 1.05)
    axc.set_ylabel("confidence")
    axc.set_xlabel("label (time order)")
    axc.legend(fontsize=7, loc="lower right")
    names = [lab["label"] for lab in labs]
    changes = [0] + [i for i in range(1, n) if names[i] != names[i - 1]]
    for i in changes[:40]:  # name the label where it changes
        axc.annotate(names[i], (i, 0.02), fontsize=6, rotation=90, va="bottom")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    from ..bundle import BundleError, ModelBundle
    from ..capture import CaptureSpec, _norm_mac
    from ..cli import CliError
    from ..dataset import capture_matrices
    from ..trust.decision import TrustError

    if not args.mac:
        raise CliError("--devices MAC is required: the device to explain")
    mac = _norm_mac(args.mac, "--devices")
    pcap = Path(args.pcap)
    if not pcap.is_file():
        raise CliError(f"{pcap}: no such capture file")
    if args.top < 1:
        raise CliError("--top must be at least 1")
    try:
        bundle = ModelBundle.load(args.model)
    except BundleError as e:
        raise CliError(str(e)) from None
    cm = capture_matrices(CaptureSpec(pcap, pcap.name, {mac: ""}), bundle.layout)
    if cm.flows.error:
        raise CliError(cm.flows.error)
    if len(cm.matrices) == 0:
        raise CliError(f"{pcap}: no flows of device {mac}")
    try:
        res = explain_device(bundle, cm, args.top)
    except TrustError as e:
        raise CliError(f"{bundle.source}: {e}") from None
    if args.json:
        for lab in res["labels"]:
            print(json.dumps(lab))
    else:
        print(format_explanations(res, mac, bundle.name))
    if args.output:
        try:
            png = plot_explanations(res, Path(args.output), f"{mac} in {pcap.name}: {bundle.name}")
        except OSError as e:
            raise CliError(f"{args.output}: cannot write: {e.strerror or e}") from None
        print(f"plot: {png}", file=sys.stderr)
    return 0
