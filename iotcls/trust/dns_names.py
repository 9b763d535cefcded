"""Trust rule 9: the names a device uses in DNS and mDNS against those its label's class used.

A device asks DNS for its vendor's servers at boot and whenever a cached answer expires, and
announces its host name and services in multicast DNS again and again (:mod:`iotcls.dns`),
so a sensor that missed the device's DHCP exchange still hears, within minutes, whose cloud
it belongs to and what it calls itself. Training says which names each class's devices used
(training and validation captures; the map travels in the trust state). Then, for every
label:

* ``dns_names_mismatch``: the device has used names of a kind (DNS registered domains, or
  mDNS names) by now, and none of them was ever used by a device of the label's class. A door
  opener that resolves its maker's cloud is not a Lightify gateway however alike their
  packets look; a camera announcing ``localcam.local`` is not a D-Link camera.

One shared name of the kind is enough to pass (``ntp.org``, ``google.com``, the cloud
providers and ``_services._dns-sd._udp.local`` are used by many types, and a known type on
another network may use a few names its lab captures did not): the rule refuses only a
device whose every name of a kind is foreign to the class. A class whose devices used no
name of a kind in training refuses every device that uses one. A device that has used
none yet is not judged by this rule.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..dns import is_mdns_name
from ..layout import NO_NAMES

DNS_MISMATCH = "dns_names_mismatch"  # rule 9: no domain of the device's was seen with the class
MAX_NAMES = 64  # per device: one resolving random names cannot grow the state further

__all__ = ["DNS_MISMATCH", "DnsNames", "DnsNamesTracker", "fit_names", "so_far"]


def fit_names(names: Iterable[frozenset[str]], labels: Sequence[str]) -> dict[str, list[str]]:
    """Class -> the names its flows used (flows without a label skipped)."""
    seen: dict[str, set[str]] = {}
    for used, label in zip(names, labels):
        if used and label:
            seen.setdefault(str(label), set()).update(used)
    return {k: sorted(v) for k, v in sorted(seen.items())}


@dataclass(frozen=True)
class DnsNames:
    """The name map of a model. Labels come with their device's names so far
    (:func:`so_far` offline, :class:`DnsNamesTracker` in the bridge). No map (a model fitted
    before rule 9, or trained on data without DNS): every label passes."""

    seen: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, state) -> DnsNames:
        m = getattr(state, "dns_names", None) or {}
        return cls({k: frozenset(v) for k, v in m.items()})

    def reason(self, names: frozenset[str] | None, label: str) -> str:
        """``"-"`` when the label passes rule 9, else :data:`DNS_MISMATCH`: each kind of
        name the device used (DNS domains, mDNS names) must share one with the class."""
        if not self.seen or not names:
            return "-"
        known = self.seen.get(label, NO_NAMES)
        mdns = frozenset(filter(is_mdns_name, names))
        for kind in (names - mdns, mdns):
            if kind and not kind & known:
                return DNS_MISMATCH
        return "-"

    def reasons(self, labels: Sequence[str], names: Sequence[frozenset[str] | None]) -> np.ndarray:
        return np.array([self.reason(d, lab) for d, lab in zip(names, labels)], object)

    def online(self, max_devices: int = 100_000) -> DnsNamesTracker:
        return DnsNamesTracker(self, max_devices)


def _grow(have: frozenset[str], new: frozenset[str]) -> frozenset[str]:
    """``have`` with ``new`` added, up to :data:`MAX_NAMES` (the first ones kept, by
    arrival, then sorted name: offline and live keep the same ones)."""
    if not new or new <= have:
        return have
    room = MAX_NAMES - len(have)
    if room <= 0:
        return have
    return have | frozenset(sorted(new - have)[:room])


def so_far(names: Sequence[frozenset[str]], groups: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Per label, the names its device used up to and including its own flow (by
    ``times``, ties in input order); ``names`` are the labels' own flows'
    (:meth:`iotcls.layout.MatrixLayout.dns_names`)."""
    n = len(names)
    out = np.full(n, NO_NAMES, object)
    order = np.lexsort((np.arange(n), np.asarray(times), np.asarray(groups)))
    g = np.asarray(groups)[order]
    have, prev = NO_NAMES, None
    for k, i in enumerate(order.tolist()):
        if k == 0 or g[k] != prev:
            have, prev = NO_NAMES, g[k]
        have = _grow(have, names[i])
        out[i] = have
    return out


class DnsNamesTracker:
    """The live twin of :func:`so_far`: the bridge notes each device's names as its
    records arrive and judges each label with those noted by then; least recently seen
    devices are forgotten beyond ``max_devices``."""

    def __init__(self, rule: DnsNames, max_devices: int = 100_000):
        self.rule, self.max_devices = rule, max_devices
        self._seen: OrderedDict[str, frozenset[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def note(self, device: str, names: frozenset[str]) -> None:
        if not names or not self.rule.seen:
            return
        self._seen[device] = _grow(self._seen.get(device, NO_NAMES), names)
        self._seen.move_to_end(device)
        if len(self._seen) > self.max_devices:
            self._seen.popitem(last=False)

    def so_far(self, device: str) -> frozenset[str]:
        return self._seen.get(device, NO_NAMES)
