"""What the device says it is in DHCP: a refinement of the label and trust rule 6.

A DHCP client repeats its identity in every message: host name, vendor class and parameter
request list (:func:`iotcls.dhcp.identity_of`; ``host=HS110(EU) vendor=udhcp 0.9.9-pre
params=0103060c0f1c``). The model sees it only in the few matrices whose rows hold the DHCP
flow; here it is remembered for the device (:func:`latest`, and the bridge's
:class:`DhcpIdentityTracker`), and the training data says which classes showed it (training
and validation captures; the map travels in the trust state). Then, for every later label
of the device:

* **refinement**: where the identity was seen, the label is the model's most probable class
  among those it was seen with (:meth:`DhcpIdentity.allowed`; the calibrated probabilities
  renormalised over them). Same-vendor siblings whose traffic is alike but whose DHCP host
  names differ (TP-Link ``HS100(EU)`` / ``HS110(EU)``, the D-Link sensors) are then told
  apart in every sequence, not only in those whose rows hold the DHCP flow;
* **rule 6**, ``dhcp_identity_mismatch``: a label whose class was never seen with the
  identity is untrusted. After the refinement that means an identity seen with no class at
  all: a device type (or a firmware, or a renamed device) the model never learnt;
  ``dhcp_identity_ambiguous``: the identity is shared by classes that the refined model did
  not tell apart on validation (:func:`fit_ambiguous`), so its devices' labels are guesses
  between siblings.

Identities shared by several classes (same firmware, MAC-derived host names that the view
blanks) allow any of them. A device not seen in DHCP yet (it joined before the sensor
started, or has not renewed its lease since) is not refined, and:

* **rule 7**, ``dhcp_identity_needed``: its labels of a class that needs the identity are
  untrusted until the identity is known (:func:`fit_needed`): classes of an ambiguous
  identity (whatever the device turns out to be, such a label would be refused or narrowed
  down to the siblings), and classes whose labels, on the validation captures with their
  DHCP records removed, the gate trusted wrongly at high confidence more than once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

DHCP_MISMATCH = "dhcp_identity_mismatch"  # rule 6: the identity was never seen with the class
DHCP_AMBIGUOUS = "dhcp_identity_ambiguous"  # rule 6: an identity its classes are mixed up under
DHCP_NEEDED = "dhcp_identity_needed"  # rule 7: a class trusted only once the identity is known

__all__ = [
    "DHCP_AMBIGUOUS",
    "DHCP_MISMATCH",
    "DHCP_NEEDED",
    "fit_needed",
    "DhcpIdentity",
    "DhcpIdentityTracker",
    "fit_ambiguous",
    "fit_identities",
    "latest",
    "unidentified",
]


def fit_identities(identities: np.ndarray, labels: Sequence[str]) -> dict[str, list[str]]:
    """Identity -> the classes whose flows showed it (rows without an identity are skipped)."""
    seen: dict[str, set[str]] = {}
    for ident, label in zip(identities, labels):
        if ident is not None and label:
            seen.setdefault(str(ident), set()).add(str(label))
    return {k: sorted(v) for k, v in sorted(seen.items())}


def fit_ambiguous(
    seen: dict[str, list[str]],
    identities: Sequence[str | None],
    pred: Sequence[str],
    truth: Sequence[str],
    min_accuracy: float,
) -> list[str]:
    """The identities shared by several classes that the model, refined, did not tell apart
    on held-out labels (``identities``: each label's device's latest, :func:`latest`): right
    less than ``min_accuracy`` of the time, or never seen there. Their devices' labels are
    untrusted (``dhcp_identity_ambiguous``): the identity narrows the label down to
    siblings, and the traffic does not pick among them reliably."""
    ids = np.asarray(identities, object)
    right = np.asarray(pred, object) == np.asarray(truth, object)
    out = []
    for ident, classes in seen.items():
        if len(classes) < 2:
            continue
        m = ids == ident
        if not m.any() or right[m].mean() < min_accuracy:
            out.append(ident)
    return sorted(out)


def fit_needed(
    seen: dict[str, list[str]],
    ambiguous: Sequence[str],
    pred: Sequence[str],
    truth: Sequence[str],
    trusted: np.ndarray,
    confidence: np.ndarray,
    max_error: float,
    high: float = 0.9,
    min_errors: int = 2,
) -> list[str]:
    """Rule 7's classes: those of an ambiguous identity, and those whose trusted labels on
    held-out captures without DHCP (``pred``, ``truth``, ``trusted``, ``confidence``: the
    gate's decisions there, rules 1-5) were wrong at confidence >= ``high`` more than
    ``max_error`` of the time (and at least ``min_errors`` times)."""
    out = {c for ident in ambiguous for c in seen.get(ident, ())}
    pred, truth = np.asarray(pred, object), np.asarray(truth, object)
    tr = np.asarray(trusted, bool)
    sure = np.asarray(confidence, float) >= high
    for c in sorted(set(pred[tr].tolist())):
        mine = tr & (pred == c)
        wrong = int((mine & sure & (truth != c)).sum())
        if wrong >= min_errors and wrong > max_error * int(mine.sum()):
            out.add(str(c))
    return sorted(out)


@dataclass(frozen=True)
class DhcpIdentity:
    """The identity map of a model: which labels an identity allows (the refinement) and
    accepts (rule 6). Labels come with their device's latest identity (:func:`latest`
    offline, :class:`DhcpIdentityTracker` in the bridge). No map (a model trained before
    it existed): nothing is refined and every label passes."""

    seen: dict[str, frozenset[str]] = field(default_factory=dict)
    ambiguous: frozenset[str] = frozenset()  # shared identities the model mixes up
    needed: frozenset[str] = frozenset()  # classes trusted only once the identity is known

    @classmethod
    def of(cls, state) -> DhcpIdentity:
        ids = getattr(state, "dhcp_identities", None) or {}
        return cls(
            {k: frozenset(v) for k, v in ids.items()},
            frozenset(getattr(state, "dhcp_ambiguous", None) or ()),
            frozenset(getattr(state, "dhcp_needed", None) or ()),
        )

    def accepts(self, identity: str | None, label: str) -> bool:
        """Rule 6: the label's class was seen with the identity (or there is none)."""
        return identity is None or not self.seen or label in self.seen.get(identity, ())

    def reason(self, identity: str | None, label: str) -> str:
        """Rule 6 for one label: ``"-"`` when it passes, else why not (the class was never
        seen with the identity; or the identity is one the model mixes its classes up on)."""
        if not self.accepts(identity, label):
            return DHCP_MISMATCH
        if identity is None:
            return DHCP_NEEDED if label in self.needed else "-"
        return DHCP_AMBIGUOUS if identity in self.ambiguous else "-"

    def allowed(
        self, identities: Sequence[str | None], classes: Sequence[str]
    ) -> np.ndarray | None:
        """Per label, the classes its device's identity was seen with (all where the identity
        is unknown or was never seen): the refinement keeps the model's most probable class
        among them. None when no label is restricted."""
        if not self.seen:
            return None
        names = np.asarray(classes, object)
        mask = np.ones((len(identities), len(names)), bool)
        rows: dict[str, np.ndarray] = {}  # per identity, once per call (the scorer's hot path)
        for i, ident in enumerate(identities):
            if ident is None or ident not in self.seen:
                continue
            row = rows.get(ident)
            if row is None:
                row = rows[ident] = np.isin(names, list(self.seen[ident]))
            if row.any():  # (a map naming none of the model's classes restricts nothing)
                mask[i] = row
        return mask if not mask.all() else None

    def reasons(self, labels: Sequence[str], identities: Sequence[str | None]) -> np.ndarray:
        """:meth:`reason` per label, given its device's latest identity (:func:`latest`)."""
        return np.array([self.reason(i, lab) for i, lab in zip(identities, labels)], object)

    def online(self, max_devices: int = 100_000) -> DhcpIdentityTracker:
        return DhcpIdentityTracker(self, max_devices)


def latest(identities: np.ndarray, groups: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Per label, the identity of its device's latest DHCP flow up to and including its own
    (by ``times``, ties in input order), or None; ``identities`` are the labels' own flows'."""
    identities = np.asarray(identities, object)
    n = len(identities)
    out = np.full(n, None, object)
    if n == 0:
        return out
    order = np.lexsort((np.arange(n), np.asarray(times), np.asarray(groups)))
    g = np.asarray(groups)[order]
    has = np.array([x is not None for x in identities[order]])
    at = np.maximum.accumulate(np.where(has, np.arange(n), -1))  # latest identity so far
    first = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    start = np.repeat(first, np.diff(np.r_[first, n]))
    ok = at >= start  # the device has shown one by then
    out[order[ok]] = identities[order[at[ok]]]
    return out


def unidentified(identities: Sequence[str | None] | None) -> np.ndarray | None:
    """(n,) bool: the labels whose device has shown no DHCP identity yet; None (no
    identities given) stands for all of them."""
    if identities is None:
        return None
    return np.fromiter((x is None for x in identities), bool, len(identities))


class DhcpIdentityTracker:
    """The live twin of :func:`latest`: the bridge notes each device's DHCP identity as its
    records arrive, and each record carries the latest one to the scorer (refinement) and
    back (rule 6); least recently seen devices are forgotten beyond ``max_devices``."""

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

    def latest(self, device: str) -> str | None:
        return self._latest.get(device)
