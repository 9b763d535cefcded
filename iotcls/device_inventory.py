"""The device list an operator edits: ``iotcls inventory STORE -o devices.csv``.

One row per device in a flow store (:mod:`iotcls.store`): what the sensor saw of it (its
MAC and addresses, first and last seen, how many records), what the model said (its latest
label, whether that was trusted, the share of its labels that were, the model's name), what
the device says about itself (its DHCP host name, vendor class and identity, the names it
looks up in DNS, its MAC's vendor from the IEEE OUI list that ``netaddr`` ships), an empty
``label`` column for the operator, and a ``suggested`` label where the device's own DHCP
identity names one class of the model (:mod:`iotcls.trust.dhcp_identity`).

``iotcls train STORE --labels devices.csv`` trains on the rows whose ``label`` is filled in.
Running the inventory again updates what was observed and keeps what the operator wrote: the
``label`` column, any column it added, and the rows of devices no longer in the store.

(:mod:`iotcls.inventory` is another inventory: the HTML report's, from ``iot_class.log``.)
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .dhcp import client_options, identity_of, is_dhcp
from .dns import DNS_PORT, MDNS_PORT, first_name, query_name
from .flowtable import FlowTable, bytes_to_ip
from .schema import DIR_TO_REMOTE, PROTO_UDP
from .store import Labels

KEY = "device"
OPERATOR = ("label",)  # written by the operator, never by iotcls
COLUMNS = (
    KEY,
    "label",
    "suggested",
    "suggested_by",
    "current_label",
    "trusted",
    "trusted_share",
    "confidence",
    "model",
    "mac",
    "mac_vendor",
    "addresses",
    "first_seen",
    "last_seen",
    "records",
    "dhcp_host",
    "dhcp_vendor",
    "dhcp_identity",
    "dns_names",
    "mdns_names",
)
MAX_NAMES = 8  # DNS and mDNS names listed per device, the most frequent first


class InventoryError(ValueError):
    """A devices.csv that cannot be read or merged: one line naming the file."""


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def mac_vendor(mac: str) -> str:
    """The organisation the IEEE registered the MAC's OUI to (netaddr's copy of the list);
    "" when unknown or the MAC is locally administered (randomised)."""
    if not mac:
        return ""
    try:
        if int(mac.split(":")[0], 16) & 0x02:
            return "(locally administered)"
        import netaddr

        return str(netaddr.EUI(mac).oui.registration().org)
    except Exception:  # not registered, not a MAC, netaddr absent: no vendor
        return ""


@dataclass
class _Seen:
    """What the records read so far say of one device (segments are read one at a time)."""

    mac: str = ""
    addresses: set = field(default_factory=set)
    first: float = math.inf
    last: float = -math.inf
    records: int = 0
    labels: int = 0
    trusted: int = 0
    latest: tuple = (-math.inf,)  # (start, label, trusted, confidence, model) of the last label
    dhcp: tuple = (-math.inf, {})  # (start, columns) of the last DHCP client message
    names: Counter = field(default_factory=Counter)
    announced: Counter = field(default_factory=Counter)  # mDNS names, as the device sent them

    def add(self, t: FlowTable, lab: Labels, r: np.ndarray) -> None:
        """Records *r* (by start) of this device, from one segment."""
        self.mac = self.mac or str(t.device_mac[r[0]])
        self.addresses |= {bytes_to_ip(b) for b in {x.tobytes() for x in t.device_ip[r]}}
        self.first = min(self.first, float(t.start[r].min()))
        self.last = max(self.last, float(t.last[r].max()))
        self.records += len(r)
        given = r[lab.label[r] != ""]
        self.labels += len(given)
        self.trusted += int(lab.trusted[given].sum())
        if len(given) and float(t.start[given[-1]]) >= self.latest[0]:
            i = given[-1]
            self.latest = (
                float(t.start[i]),
                str(lab.label[i]),
                bool(lab.trusted[i]),
                float(lab.confidence[i]),
                str(lab.model[i]),
            )
        self._dhcp(t, r)
        dns = r[(t.proto[r] == PROTO_UDP) & (t.remote_port[r] == DNS_PORT)]
        self.names.update(n for n in map(query_name, _sent(t, dns)) if n)
        mdns = r[(t.proto[r] == PROTO_UDP) & (t.remote_port[r] == MDNS_PORT)]
        self.announced.update(n for n in map(first_name, _sent(t, mdns)) if n)

    def _dhcp(self, t: FlowTable, r: np.ndarray) -> None:
        """The device's latest DHCP client message: host name, vendor class, identity."""
        for i in r[is_dhcp(t.proto[r], t.device_port[r], t.remote_port[r])].tolist():
            for view in _sent(t, np.array([i])):
                opts = client_options(view)
                if opts and float(t.start[i]) >= self.dhcp[0]:
                    self.dhcp = (
                        float(t.start[i]),
                        {
                            "dhcp_identity": identity_of(view) or "",
                            "dhcp_host": opts.get(12, b"").decode("ascii", "backslashreplace"),
                            "dhcp_vendor": opts.get(60, b"").decode("ascii", "backslashreplace"),
                        },
                    )

    def columns(self) -> dict[str, str]:
        out = {
            "mac": self.mac,
            "mac_vendor": mac_vendor(self.mac),
            "addresses": " ".join(sorted(self.addresses)),
            "first_seen": _when(self.first),
            "last_seen": _when(self.last),
            "records": str(self.records),
            "dns_names": " ".join(n for n, _ in self.names.most_common(MAX_NAMES)),
            "mdns_names": "; ".join(n for n, _ in self.announced.most_common(MAX_NAMES)),
            **self.dhcp[1],
        }
        if self.labels:
            _, label, trusted, conf, model = self.latest
            out.update(
                current_label=label,
                trusted="T" if trusted else "F",
                trusted_share=f"{self.trusted / self.labels:.2f}",
                confidence=f"{conf:.3f}",
                model=model,
            )
        return out


def _sent(t: FlowTable, rows: np.ndarray):
    """The payloads of the packets the device sent, in records *rows*."""
    for i in rows.tolist():
        for j in range(int(t.n_pkts[i])):
            if t.directions[i, j] == DIR_TO_REMOTE:
                yield t.payload[i, j, : t.payload_len[i, j]].tobytes()


def observe(segments: Iterable[tuple[Any, FlowTable, Labels, float]]) -> dict[str, dict[str, str]]:
    """Per device (its MAC, else its address), the observed columns; *segments* as
    :func:`iotcls.store.iter_segments` gives them, read one at a time."""
    seen: dict[str, _Seen] = {}
    for _, t, lab, _ in segments:
        if not len(t):
            continue
        keys = np.char.lower(t.device_keys().astype(str))
        order = np.lexsort((t.start, keys))
        names, first = np.unique(keys[order], return_index=True)
        bounds = [*first.tolist(), len(order)]
        for i, k in enumerate(names.tolist()):
            seen.setdefault(k, _Seen()).add(t, lab, order[bounds[i] : bounds[i + 1]])
    return {k: v.columns() for k, v in seen.items()}


def suggest(row: dict[str, str], seen: dict[str, frozenset[str]]) -> tuple[str, str]:
    """(suggested label, why) from the device's DHCP identity and the model's map of the
    identities it learnt (rule 6's): one class, or the model's current label among several."""
    classes = sorted(seen.get(row.get("dhcp_identity", ""), ()))
    if len(classes) == 1:
        return classes[0], "its DHCP identity is that type's in training"
    if classes and row.get("current_label") in classes:
        return row["current_label"], f"its DHCP identity is one of {', '.join(classes)}'s"
    if classes:
        return "", f"its DHCP identity is one of {', '.join(classes)}'s"
    return "", ""


def read_csv(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    """(columns, rows by device) of an existing devices.csv."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = [c for c in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InventoryError(f"{path}: cannot read: {e}") from None
    if KEY not in cols:
        raise InventoryError(f"{path}: no {KEY!r} column: not an iotcls device list")
    out = {}
    for i, row in enumerate(rows, start=2):
        key = (row.get(KEY) or "").strip().lower()
        if not key:
            raise InventoryError(f"{path}: line {i}: empty {KEY}")
        out[key] = {k: (v or "").strip() for k, v in row.items() if k is not None}
    return cols, out


def labels_of(path: str | Path) -> dict[str, str]:
    """device -> label, for the rows the operator labelled."""
    _, rows = read_csv(Path(path))
    return {k: r["label"] for k, r in rows.items() if r.get("label", "")}


def merge(
    observed: dict[str, dict[str, str]],
    old_cols: list[str],
    old: dict[str, dict[str, str]],
    seen: dict[str, frozenset[str]],
) -> tuple[list[str], list[dict[str, str]]]:
    """The new file's columns and rows: observed columns renewed, the operator's kept."""
    extra = [c for c in old_cols if c not in COLUMNS]
    rows = []
    for key in sorted(set(observed) | set(old)):
        row = {c: "" for c in (*COLUMNS, *extra)}
        prev = old.get(key)
        if key in observed:
            row.update(observed[key])
            row["suggested"], row["suggested_by"] = suggest(row, seen)
        elif prev is not None:  # no longer in the store: the row stays as it was
            row.update(prev)
        if prev is not None:
            for c in (*OPERATOR, *extra):
                row[c] = prev.get(c, "")
        row[KEY] = key
        rows.append(row)
    return [*COLUMNS, *extra], rows


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """Written whole: a temporary file renamed over *path*."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def inventory(
    segments: Iterable[tuple[Any, FlowTable, Labels, float]],
    out: Path,
    seen: dict[str, frozenset[str]],
) -> dict[str, int]:
    """Writes (or updates) *out* from a store's segments; returns counts for the summary."""
    old_cols, old = read_csv(out) if out.exists() else ([], {})
    observed = observe(segments)
    cols, rows = merge(observed, old_cols, old, seen)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out, cols, rows)
    return {
        "devices": len(rows),
        "new": len(set(observed) - set(old)),
        "labelled": sum(1 for r in rows if r["label"]),
        "suggested": sum(1 for r in rows if r["suggested"]),
    }
