"""A device inventory from ``iot_class.log`` entries: one row per device, newest label first.

A device is keyed as the bridge's log policy keys it (docs/serve.md): by MAC, else by IP, so
the inventory has the rows an operator expects from the log. The "current" label is the
newest entry's, because the log policy writes an entry whenever a label or trust changes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .logread import LogRow

# A device asking DHCP for an address sends from these; they say nothing about where it is.
UNSPECIFIED = frozenset({"0.0.0.0", "::"})


@dataclass
class Device:
    key: str
    mac: str
    ips: list[str] = field(default_factory=list)
    label: str = ""
    confidence: float = float("nan")
    trusted: bool = False
    reason: str = ""
    first_seen: float = 0.0
    last_seen: float = 0.0
    entries: int = 0
    label_changes: int = 0
    labels: Counter = field(default_factory=Counter)
    # (ts, label, confidence, trusted) per entry, in time order: the report's timeline.
    history: list[tuple[float, str, float, bool]] = field(default_factory=list)


def device_key(row: LogRow) -> str:
    return row["device_mac"] or row["device_ip"]


def build_inventory(rows: list[LogRow]) -> list[Device]:
    """Devices from entries in time order; sorted by label, then key."""
    devices: dict[str, Device] = {}
    for r in rows:
        key = device_key(r)
        d = devices.get(key)
        if d is None:
            d = devices[key] = Device(key=key, mac=r["device_mac"] or "", first_seen=r["ts"])
        ip = r["device_ip"]
        if ip not in d.ips and (ip not in UNSPECIFIED or not d.ips):
            d.ips.append(ip)
        if len(d.ips) > 1 and d.ips[0] in UNSPECIFIED:
            del d.ips[0]
        if d.entries and r["label"] != d.label:
            d.label_changes += 1
        d.label, d.confidence, d.trusted = r["label"], r["confidence"], r["trusted"]
        d.reason = "" if r["trusted"] else (r["reason"] or "")
        d.first_seen = min(d.first_seen, r["ts"])
        d.last_seen = max(d.last_seen, r["ts"])
        d.entries += 1
        d.labels[r["label"]] += 1
        d.history.append((r["ts"], r["label"], r["confidence"], r["trusted"]))
    return sorted(devices.values(), key=lambda d: (d.label, d.key))
