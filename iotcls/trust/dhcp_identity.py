"""Trust rule 6: a label must fit what the device says it is in DHCP.

A DHCP client repeats its identity in every message: host name, vendor class and parameter
request list (:func:`iotcls.dhcp.identity_of`; ``host=HS110(EU) vendor=udhcp 0.9.9-pre
params=0103060c0f1c``). The model sees it only in the few matrices whose rows hold the DHCP
flow; the rule remembers it for the device. A label is ``dhcp_identity_mismatch`` when the
device's latest DHCP identity was never seen with the label's class in the training data
(training and validation captures). That catches two things the explanations cannot:

* a sibling taken for another (an ``HS100(EU)`` plug labelled HS110, the D-Link sensors);
* a device type the model never learnt: its identity was seen with no class at all.

Devices whose identity is shared by several classes (same firmware, MAC-derived host names
that the view blanks) pass for any of them, and a device not seen in DHCP yet is not
checked. The map of identities to classes travels in the trust state.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .decision import DHCP_MISMATCH

__all__ = ["DHCP_MISMATCH", "DhcpIdentity", "DhcpIdentityTracker", "fit_identities"]


def fit_identities(identities: np.ndarray, labels: Sequence[str]) -> dict[str, list[str]]:
    """Identity -> the classes whose flows showed it (rows without an identity are skipped)."""
    seen: dict[str, set[str]] = {}
    for ident, label in zip(identities, labels):
        if ident is not None and label:
            seen.setdefault(str(ident), set()).add(str(label))
    return {k: sorted(v) for k, v in sorted(seen.items())}


@dataclass(frozen=True)
class DhcpIdentity:
    """Rule 6 over labels whose device history is known (classify, evaluate, explain); the
    bridge runs its live twin, :class:`DhcpIdentityTracker`. No map (a model trained before
    the rule existed): every label passes."""

    seen: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, state) -> "DhcpIdentity":
        ids = getattr(state, "dhcp_identities", None) or {}
        return cls({k: frozenset(v) for k, v in ids.items()})

    def accepts(self, identity: str | None, label: str) -> bool:
        return identity is None or not self.seen or label in self.seen.get(identity, ())

    def agrees(self, labels: Sequence[str], identities: np.ndarray, groups: np.ndarray,
               times: np.ndarray) -> np.ndarray:  # fmt: skip
        """Per label, whether it passes: the identity of the device's latest DHCP flow up to
        and including this label's (by ``times``, ties in input order) against its class."""
        n = len(labels)
        out = np.ones(n, bool)
        if n == 0 or not self.seen:
            return out
        order = np.lexsort((np.arange(n), np.asarray(times), np.asarray(groups)))
        g = np.asarray(groups)[order]
        has = np.array([x is not None for x in np.asarray(identities, object)[order]])
        at = np.maximum.accumulate(np.where(has, np.arange(n), -1))  # latest identity so far
        first = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
        start = np.repeat(first, np.diff(np.r_[first, n]))
        for k in np.flatnonzero(at >= start).tolist():  # labels whose device has one
            out[order[k]] = self.accepts(identities[order[at[k]]], labels[order[k]])
        return out

    def online(self, max_devices: int = 100_000) -> "DhcpIdentityTracker":
        return DhcpIdentityTracker(self, max_devices)


class DhcpIdentityTracker:
    """The live twin of :meth:`DhcpIdentity.agrees`: the bridge notes each device's DHCP
    identity as its records arrive and checks each label against the latest one; least
    recently seen devices are forgotten beyond ``max_devices``."""

    def __init__(self, rule: DhcpIdentity, max_devices: int = 100_000):
        self.rule, self.max_devices = rule, max_devices
        self._latest: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._latest)

    def note(self, device: str, identity: str | None) -> None:
        if identity is None or not self.rule.seen:
            return
        self._latest[device] = identity
        self._latest.move_to_end(device)
        if len(self._latest) > self.max_devices:
            self._latest.popitem(last=False)

    def agrees(self, device: str, label: str) -> bool:
        return self.rule.accepts(self._latest.get(device), label)
