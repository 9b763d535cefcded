"""Trust rule 9: the servers a device names in DNS against those its label's class named.

A device asks DNS for its vendor's servers at boot and whenever a cached answer expires
(:mod:`iotcls.dns`), so a sensor that missed the device's DHCP exchange still hears, within
minutes, whose cloud it belongs to. Training says which registered domains each class's
devices asked for (training and validation captures; the map travels in the trust state).
Then, for every label:

* ``dns_names_mismatch``: the device has asked for at least one registered domain by now,
  and none of them was ever asked for by a device of the label's class. A door opener that
  resolves its maker's cloud is not a Lightify gateway however alike their packets look; a
  camera resolving ``mydlink.com`` is not a Hue bridge.

One shared domain is enough to pass (``ntp.org``, ``google.com`` and the cloud providers are
shared by many types, and a known type on another network may resolve a few names its lab
captures did not): the rule refuses only a device whose every name is foreign to the class.
A class whose devices resolved nothing in training refuses every device that resolves
something. A device that has resolved nothing yet is not judged by this rule.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..layout import NO_DOMAINS

DNS_MISMATCH = "dns_names_mismatch"  # rule 9: no domain of the device's was seen with the class
MAX_DOMAINS = 256  # per device: a device resolving random names cannot grow the state further

__all__ = ["DNS_MISMATCH", "DnsNames", "DnsNamesTracker", "fit_domains", "so_far"]


def fit_domains(domains: Iterable[frozenset[str]], labels: Sequence[str]) -> dict[str, list[str]]:
    """Class -> the registered domains its flows asked for (flows without a label skipped)."""
    seen: dict[str, set[str]] = {}
    for ds, label in zip(domains, labels):
        if ds and label:
            seen.setdefault(str(label), set()).update(ds)
    return {k: sorted(v) for k, v in sorted(seen.items())}


@dataclass(frozen=True)
class DnsNames:
    """The domain map of a model. Labels come with their device's domains so far
    (:func:`so_far` offline, :class:`DnsNamesTracker` in the bridge). No map (a model fitted
    before rule 9, or trained on data without DNS): every label passes."""

    seen: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, state) -> DnsNames:
        m = getattr(state, "dns_domains", None) or {}
        return cls({k: frozenset(v) for k, v in m.items()})

    def reason(self, domains: frozenset[str] | None, label: str) -> str:
        """``"-"`` when the label passes rule 9, else :data:`DNS_MISMATCH`."""
        if not self.seen or not domains or domains & self.seen.get(label, NO_DOMAINS):
            return "-"
        return DNS_MISMATCH

    def reasons(
        self, labels: Sequence[str], domains: Sequence[frozenset[str] | None]
    ) -> np.ndarray:
        return np.array([self.reason(d, lab) for d, lab in zip(domains, labels)], object)

    def online(self, max_devices: int = 100_000) -> DnsNamesTracker:
        return DnsNamesTracker(self, max_devices)


def _grow(have: frozenset[str], new: frozenset[str]) -> frozenset[str]:
    """``have`` with ``new`` added, up to :data:`MAX_DOMAINS` (the first ones kept, by
    arrival, then sorted name: offline and live keep the same ones)."""
    if not new or new <= have:
        return have
    room = MAX_DOMAINS - len(have)
    if room <= 0:
        return have
    return have | frozenset(sorted(new - have)[:room])


def so_far(domains: Sequence[frozenset[str]], groups: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Per label, the domains its device asked for up to and including its own flow (by
    ``times``, ties in input order); ``domains`` are the labels' own flows'
    (:meth:`iotcls.layout.MatrixLayout.dns_domains`)."""
    n = len(domains)
    out = np.full(n, NO_DOMAINS, object)
    order = np.lexsort((np.arange(n), np.asarray(times), np.asarray(groups)))
    g = np.asarray(groups)[order]
    have, prev = NO_DOMAINS, None
    for k, i in enumerate(order.tolist()):
        if k == 0 or g[k] != prev:
            have, prev = NO_DOMAINS, g[k]
        have = _grow(have, domains[i])
        out[i] = have
    return out


class DnsNamesTracker:
    """The live twin of :func:`so_far`: the bridge notes each device's domains as its
    records arrive and judges each label with those noted by then; least recently seen
    devices are forgotten beyond ``max_devices``."""

    def __init__(self, rule: DnsNames, max_devices: int = 100_000):
        self.rule, self.max_devices = rule, max_devices
        self._seen: OrderedDict[str, frozenset[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def note(self, device: str, domains: frozenset[str]) -> None:
        if not domains or not self.rule.seen:
            return
        self._seen[device] = _grow(self._seen.get(device, NO_DOMAINS), domains)
        self._seen.move_to_end(device)
        if len(self._seen) > self.max_devices:
            self._seen.popitem(last=False)

    def so_far(self, device: str) -> frozenset[str]:
        return self._seen.get(device, NO_DOMAINS)
