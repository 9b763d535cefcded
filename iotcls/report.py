"""The device inventory as one self-contained HTML page (``iotcls report``).

For operators without a SIEM: the page carries its pictures as PNG data URIs and its style
inline, so it can be mailed or opened from a USB stick with no network and no scripts.
Pictures are drawn with matplotlib's object API (no pyplot state), so a report can be built
inside any process.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import Counter
from datetime import datetime, timezone

from .inventory import Device

MAX_TIMELINE_DEVICES = 60  # beyond this the timeline shows the devices seen last
MAX_HISTOGRAM_LABELS = 12


def _plain(text: str) -> str:
    """``text`` for a matplotlib label, shown as written: labels and device keys come from a
    log, and a ``$`` pair would make matplotlib parse them as mathtext (and raise on bad
    TeX). An escaped ``\\$`` is never math and is drawn as ``$``."""
    return text.replace("$", r"\$")


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _label_colors(labels: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return {lab: cmap(i % 20) for i, lab in enumerate(sorted(labels))}


def timeline_png(devices: list[Device]) -> str:
    """Each device a row; each entry a mark coloured by its label, hollow when untrusted.

    Drawn as one LineCollection and one scatter: a day of a busy sensor's log is hundreds of
    thousands of entries, too many for one artist each.
    """
    import numpy as np
    from matplotlib.collections import LineCollection
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    shown = sorted(devices, key=lambda d: d.last_seen)[-MAX_TIMELINE_DEVICES:]
    shown.sort(key=lambda d: (d.label, d.key), reverse=True)
    labels = sorted({h[1] for d in shown for h in d.history})
    colors = _label_colors(labels)
    epoch = date2num(datetime(1970, 1, 1, tzinfo=timezone.utc))
    # the log's times lie in 1970..9999 (iotcls.logread); the padding must not leave
    # what matplotlib can draw a date for
    first_day = date2num(datetime(1, 1, 2, tzinfo=timezone.utc))
    last_day = date2num(datetime(9999, 12, 31, tzinfo=timezone.utc))
    segs, seg_colors, xs, ys, face, edge = [], [], [], [], [], []
    for y, d in enumerate(shown):
        t = epoch + np.array([h[0] for h in d.history]) / 86400.0
        ends = np.append(t[1:], t[-1])
        c = [colors[h[1]] for h in d.history]
        segs += [((a, y), (b, y)) for a, b in zip(t, ends)]
        seg_colors += c
        xs.append(t)
        ys.append(np.full(len(t), y))
        edge += c
        face += [col if h[3] else (1, 1, 1, 1) for col, h in zip(c, d.history)]
    fig = Figure(figsize=(11, 1.2 + 0.32 * len(shown)), layout="constrained")
    ax = fig.add_subplot()
    ax.add_collection(LineCollection(segs, colors=seg_colors, linewidths=4, capstyle="butt"))
    ax.scatter(np.concatenate(xs), np.concatenate(ys), s=25, c=face, edgecolors=edge, zorder=3)
    ax.set_yticks(range(len(shown)), [_plain(f"{d.key} ({d.label})") for d in shown], fontsize=8)
    ax.set_ylim(-0.7, len(shown) - 0.3)
    ax.xaxis_date(tz=timezone.utc)
    locator = AutoDateLocator(tz=timezone.utc)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator, tz=timezone.utc))
    lo, hi = float(min(x.min() for x in xs)), float(max(x.max() for x in xs))
    pad = max((hi - lo) * 0.02, 1 / 86400)
    ax.set_xlim(max(lo - pad, first_day), min(hi + pad, last_day))
    ax.set_xlabel("time (UTC)")
    ax.grid(axis="x", alpha=0.3)
    handles = [Line2D([], [], color=colors[lab], linewidth=4, label=_plain(lab)) for lab in labels]
    handles.append(
        Line2D(
            [],
            [],
            color="grey",
            marker="o",
            markerfacecolor="white",
            linestyle="",
            label="untrusted entry",
        )
    )
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    return _png(fig)


def histograms_png(devices: list[Device]) -> str:
    """Confidence of all entries (trusted and untrusted), then per label (most entries first)."""
    from matplotlib.figure import Figure

    entries = [(h[1], h[2], h[3]) for d in devices for h in d.history if not math.isnan(h[2])]
    per_label = Counter(lab for lab, _, _ in entries)
    top = [lab for lab, _ in per_label.most_common(MAX_HISTOGRAM_LABELS)]
    panels = 1 + len(top)
    cols = 4
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(11, 2.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    bins = [i / 20 for i in range(21)]

    def draw(ax, title: str, sel: list[tuple[str, float, bool]]) -> None:
        ok = [c for _, c, t in sel if t]
        bad = [c for _, c, t in sel if not t]
        ax.hist(
            [ok, bad],
            bins=bins,
            stacked=True,
            color=["#2b8a3e", "#e8590c"],
            label=["trusted", "untrusted"],
        )
        ax.set_title(title, fontsize=9)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=7)

    draw(axes[0], f"all entries ({len(entries)})", entries)
    axes[0].legend(fontsize=7)
    for ax, lab in zip(axes[1:], top):
        draw(ax, _plain(f"{lab} ({per_label[lab]})"), [e for e in entries if e[0] == lab])
    for ax in axes[panels:]:
        ax.set_axis_off()
    fig.supxlabel("confidence", fontsize=9)
    return _png(fig)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}
th{background:#f1f3f5}
tr.untrusted td.trusted{color:#c92a2a;font-weight:bold}
td.num{text-align:right;font-variant-numeric:tabular-nums}

img{max-width:100%;display:block;margin:1em 0}
.summary td{border:none;padding:1px 10px 1px 0}
"""


def render_html(devices: list[Device], sources: list[str], n_entries: int) -> str:
    """The whole page; ``sources`` are the log files read, for the header."""
    e = html.escape
    first = min((d.first_seen for d in devices), default=0.0)
    last = max((d.last_seen for d in devices), default=0.0)
    untrusted = sum(not d.trusted for d in devices)
    labels = Counter(d.label for d in devices)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>iotcls device inventory</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>IoT device inventory</h1>",
        '<table class="summary">',
        f"<tr><td>log files</td><td>{e(', '.join(sources))}</td></tr>",
        f'<tr><td>devices</td><td id="n-devices">{len(devices)}</td></tr>',
        f"<tr><td>log entries</td><td>{n_entries}</td></tr>",
    ]
    if devices:
        out += [
            f"<tr><td>period (UTC)</td><td>{_utc(first)} to {_utc(last)}</td></tr>",
            f"<tr><td>untrusted now</td><td>{untrusted}</td></tr>",
            "<tr><td>device types</td><td>"
            + e(", ".join(f"{lab} ({n})" for lab, n in sorted(labels.items())))
            + "</td></tr>",
        ]
    out += [
        "</table>",
        "<h2>Devices</h2>",
        '<table id="devices"><thead><tr><th>MAC</th><th>IPs</th><th>label</th>'
        "<th>confidence</th><th>trusted</th><th>first seen (UTC)</th><th>last seen (UTC)</th>"
        "<th>entries</th><th>label changes</th><th>labels seen</th></tr></thead><tbody>",
    ]
    for d in devices:
        seen = ", ".join(f"{lab} ({n})" for lab, n in d.labels.most_common())
        trust = "yes" if d.trusted else f"no ({d.reason})" if d.reason else "no"
        conf = "" if math.isnan(d.confidence) else f"{d.confidence:.3f}"
        out.append(
            f'<tr class="device{"" if d.trusted else " untrusted"}" data-key="{e(d.key)}">'
            f'<td class="mac">{e(d.mac or "-")}</td><td class="ips">{e(", ".join(d.ips))}</td>'
            f'<td class="label">{e(d.label)}</td><td class="num">{conf}</td>'
            f'<td class="trusted">{e(trust)}</td><td class="time">{_utc(d.first_seen)}</td>'
            f'<td class="time">{_utc(d.last_seen)}</td><td class="num">{d.entries}</td>'
            f'<td class="num">{d.label_changes}</td><td>{e(seen)}</td></tr>'
        )
    out.append("</tbody></table>")
    if devices:
        out += [
            "<h2>Label timeline</h2>",
            "<p>One row per device (the last "
            f"{MAX_TIMELINE_DEVICES} seen at most); colour: label; hollow mark: untrusted.</p>",
            f'<img id="timeline" alt="label timeline" src="{timeline_png(devices)}">',
            "<h2>Confidence</h2>",
            f'<img id="histograms" alt="confidence histograms" src="{histograms_png(devices)}">',
        ]
    out.append("</body></html>\n")
    return "\n".join(out)
