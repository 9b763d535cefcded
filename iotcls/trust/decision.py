"""The trust decision: is a label backed by the kind of evidence its class is known for?

Each label comes with its *explanation profile*: the group Shapley values of every class's
calibrated log-probability (:mod:`.shapley`; G groups x C classes, from the same coalitions
as the label's own explanation), each divided by its spread over the references. All
classes, not only the predicted one: a flow of an unseen device may push the predicted
class up as strongly as that class's own flows do, yet push the *other* classes in its own
way. The references are the labels of the fitting split (the validation split
during ``iotcls train``: data the model did not learn from), each with its profile, its
predicted class and whether it was right. A label is **trusted** when all of these hold;
the first that fails is its ``reason``:

1. ``low_confidence``: its calibrated confidence is below ``conf_threshold``.
2. ``unverified_class``: its class has fewer than ``min_refs`` correct references, so there
   is nothing to compare its explanation with.
3. ``atypical_explanation``: its profile is far from every profile of a *correct* reference
   of the same class: the distance to the ``k``-th nearest one exceeds the ``quantile`` of
   the same (leave-one-out) distance among those references. This catches traffic the model
   has no precedent for, such as a device type it never saw.
4. ``error_like_explanation``: among the ``precision_k`` references of the same predicted
   class whose profiles are nearest, too few were right: the share, shrunk towards the
   share ``p0`` of right references overall, ``(right + m p0) / (n + m)`` with
   ``m = prior_strength``, is below ``min_precision``. This catches confident labels
   explained the way the model's mistakes were explained (on classes it confuses); the
   shrinkage keeps a class with a handful of references (one bad validation capture) from
   being condemned on that alone.

Nearest neighbours rather than a mean and covariance: a device's flows fall in several
distinct kinds (DNS, NTP, its cloud session, ...), each with its own explanation, so a
class's profiles form clusters that one Gaussian would blur.

5. ``inconsistent_with_device`` (:class:`DeviceConsistency`, where the device's earlier
   labels are known): a class other than this label's dominates the device's previous
   labels. Explanations cannot tell sibling models apart (their correct and wrong labels are
   explained alike), but a device that was called X twenty times is not suddenly Y.

6. ``dhcp_identity_mismatch`` (:mod:`.dhcp_identity`, where the device's DHCP messages were
   seen): the device's DHCP identity (host name, vendor class, parameter list) was never
   seen with this label's class in training; ``dhcp_identity_ambiguous``: the identity is
   shared by classes that the model, on validation, did not tell apart.

7. ``dhcp_identity_needed`` (:mod:`.dhcp_identity`): the device's identity is not known
   yet and the label's class is one whose labels need it.

8. ``atypical_features`` (:mod:`.features`, while the device's identity is not known yet):
   the label's features, the model's last hidden layer, are farther from its class's mean
   than its class's correct validation labels go. Rules 3-4 compare *explanations*, which
   an unseen type close to a known one can share; the features say "none of these".

9. ``dns_names_mismatch`` (:mod:`.dns_names`, once the device has used a name in DNS or
   mDNS): of a kind of name the device used (DNS registered domains, mDNS names), none was
   ever used by a device of the label's class in training. Unlike DHCP, a device repeats
   its queries and announcements for as long as it runs, so this speaks for devices that
   joined before the sensor started.

**Refinement**: an untrusted label is reported as ``unknown`` (:data:`UNKNOWN`).
**Device vote** (:func:`device_vote`): among one device's labels, if fewer than
``min_trusted_share`` of them (or none) are trusted the device is ``unknown``; otherwise
its label is the class with the largest sum of calibrated confidence over trusted labels.

The fitted state (:meth:`TrustState.to_dict`) holds only tensors, numbers, strings and lists
of them, so it travels in a model bundle that ``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .dhcp_identity import DHCP_AMBIGUOUS, DHCP_MISMATCH, DHCP_NEEDED, DhcpIdentity  # 6, 7
from .dns_names import DNS_MISMATCH, DnsNames  # rule 9
from .features import ATYPICAL_FEATURES, FeatureDistance  # rule 8, the open-set signal

UNKNOWN = "unknown"
TRUST_VERSION = 1
INCONSISTENT = "inconsistent_with_device"  # rule 5's reason
REASONS = (
    "-",
    "low_confidence",
    "unverified_class",
    "atypical_explanation",
    "error_like_explanation",
    INCONSISTENT,
    DHCP_MISMATCH,
    DHCP_AMBIGUOUS,
    DHCP_NEEDED,
    ATYPICAL_FEATURES,
    DNS_MISMATCH,
)


class TrustError(ValueError):
    pass


@dataclass
class TrustConfig:
    """Knobs of the fit; they are stored in the :class:`TrustState` with what was fitted."""

    conf_threshold: float = 0.5
    quantile: float = 0.99  # of correct references' k-NN distance: "atypical" beyond it
    k: int = 5
    precision_k: int = 50  # neighbours for the explanation-conditioned precision
    min_precision: float = 0.5
    prior_strength: float = 3.0  # pseudo-references at the overall precision
    max_refs: int = 500  # per predicted class, a seeded random subset of the labels
    min_refs: int = 6
    seed: int = 0
    device_window: int = 20  # the device's previous labels the consistency rule looks at
    device_share: float = 0.5  # a previous class this dominant makes a different label suspect
    device_min_prior: int = 2  # fewer previous labels: no consistency check
    dhcp_min_accuracy: float = 0.9  # a shared DHCP identity below this on validation: ambiguous
    dhcp_needed_max_error: float = 0.05  # rule 7: trusted-error share without DHCP, per class
    feature_quantile: float = 0.999  # rule 8 (trust.features): the threshold's quantile; 0 off


_FLOATS = ("conf_threshold", "quantile", "min_precision", "prior_strength", "prior_precision")
_INTS = ("k", "precision_k", "n_fit")
# Knobs added after the first bundles shipped: absent from an older state means the default.
_DEVICE_KNOBS = {"device_window": int, "device_share": float, "device_min_prior": int}


@dataclass
class TrustState:
    groups: list[str]
    history: str  # how history rows form players, see shapley.feature_groups
    classes: list[str]
    conf_threshold: float
    quantile: float
    min_precision: float
    prior_strength: float
    prior_precision: float  # p0: share of right predictions among the references
    k: int
    precision_k: int
    scale: torch.Tensor  # (G*C,) spread of each value over the correct references
    refs: torch.Tensor  # (N, G*C): scaled profiles of the references (float16 precision)
    ref_pred: torch.Tensor  # (N,) int64: their predicted class
    ref_correct: torch.Tensor  # (N,) bool: whether that prediction was right
    dist_threshold: torch.Tensor  # (C,) float32; NaN: the class has no profile
    fitted_on: str = ""
    n_fit: int = 0
    version: int = TRUST_VERSION
    device_window: int = TrustConfig.device_window
    device_share: float = TrustConfig.device_share
    device_min_prior: int = TrustConfig.device_min_prior
    # rule 6 (trust.dhcp_identity): DHCP identity -> classes seen with it; empty: rule off
    dhcp_identities: dict[str, list[str]] = field(default_factory=dict)
    dhcp_ambiguous: list[str] = field(default_factory=list)  # identities rule 6 refuses
    dhcp_needed: list[str] = field(default_factory=list)  # classes rule 7 holds back
    # rule 9 (trust.dns_names): class -> names its devices used in (m)DNS; empty: off
    dns_names: dict[str, list[str]] = field(default_factory=dict)
    # the open-set signal (trust.features): None where the state predates it
    features: FeatureDistance | None = None

    def to_dict(self) -> dict:
        d = {
            "version": self.version,
            "groups": list(self.groups),
            "history": self.history,
            "classes": list(self.classes),
            "fitted_on": self.fitted_on,
        }
        d.update({k: float(getattr(self, k)) for k in _FLOATS})
        d.update({k: int(getattr(self, k)) for k in _INTS})
        d.update({k: kind(getattr(self, k)) for k, kind in _DEVICE_KNOBS.items()})
        d.update(
            {
                "scale": self.scale.float().contiguous(),
                "refs": self.refs.half().contiguous(),
                "ref_pred": self.ref_pred.long().contiguous(),
                "ref_correct": self.ref_correct.bool().contiguous(),
                "dist_threshold": self.dist_threshold.float().contiguous(),
            }
        )
        d["dhcp_identities"] = {
            str(k): [str(c) for c in v] for k, v in self.dhcp_identities.items()
        }
        d["dhcp_ambiguous"] = [str(k) for k in self.dhcp_ambiguous]
        d["dhcp_needed"] = [str(k) for k in self.dhcp_needed]
        d["dns_names"] = {str(k): [str(x) for x in v] for k, v in self.dns_names.items()}
        if self.features is not None:
            d.update(self.features.to_dict())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrustState:
        if not isinstance(d, dict):
            raise TrustError(f"trust state: expected a mapping, got {type(d).__name__}")
        if d.get("version") != TRUST_VERSION:
            raise TrustError(
                f"trust state: version {d.get('version')!r} is not supported "
                f"(this is {TRUST_VERSION})"
            )
        try:
            s = cls(
                groups=[str(g) for g in d["groups"]],
                history=str(d["history"]),
                classes=[str(c) for c in d["classes"]],
                **{k: float(d[k]) for k in _FLOATS},
                **{k: int(d[k]) for k in _INTS},
                scale=torch.as_tensor(d["scale"]).float(),
                refs=torch.as_tensor(d["refs"]).float(),
                ref_pred=torch.as_tensor(d["ref_pred"]).long(),
                ref_correct=torch.as_tensor(d["ref_correct"]).bool(),
                dist_threshold=torch.as_tensor(d["dist_threshold"]).float(),
                fitted_on=str(d.get("fitted_on", "")),
                **{k: kind(d.get(k, getattr(TrustConfig, k))) for k, kind in _DEVICE_KNOBS.items()},
                dhcp_identities={
                    str(k): [str(c) for c in v]
                    for k, v in dict(d.get("dhcp_identities", {})).items()
                },
                dhcp_ambiguous=[str(k) for k in d.get("dhcp_ambiguous", [])],
                dhcp_needed=[str(k) for k in d.get("dhcp_needed", [])],
                dns_names={
                    str(k): [str(x) for x in v] for k, v in dict(d.get("dns_names", {})).items()
                },
                features=FeatureDistance.from_dict(d),
            )
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise TrustError(f"trust state: malformed ({type(e).__name__}: {e})") from None
        g, c, n = len(s.groups), len(s.classes), len(s.refs)
        if s.scale.shape != (g * c,) or s.refs.ndim != 2 or s.refs.shape[1] != g * c:
            raise TrustError(f"trust state: profiles do not match its {g} groups x {c} classes")
        if s.ref_pred.shape != (n,) or s.ref_correct.shape != (n,):
            raise TrustError("trust state: references and their classes differ in length")
        if s.dist_threshold.shape != (c,):
            raise TrustError("trust state: thresholds do not match its classes")
        if n and (s.ref_pred.min() < 0 or s.ref_pred.max() >= c):
            raise TrustError("trust state: a reference names a class outside the model's")
        _check_knobs(s)
        return s

    def check_for(self, classes: list[str], groups: list[str]) -> None:
        """TrustError unless this state was fitted for a model with these ``classes`` and a
        layout whose Shapley players are ``groups``: checked once when a bundle is loaded, so
        that no caller (classify, a scorer) finds out later, one batch at a time."""
        if list(self.classes) != list(classes):
            raise TrustError(
                f"trust state: fitted for the classes {_short(self.classes)}, "
                f"the model has {_short(classes)}"
            )
        if list(self.groups) != list(groups):
            raise TrustError(
                f"trust state: groups {self.groups} do not match the layout's {groups}"
            )

    def refs_per_class(self) -> np.ndarray:
        """Correct references per class."""
        ok = self.ref_correct.numpy()
        return np.bincount(self.ref_pred.numpy()[ok], minlength=len(self.classes))


_KNOB_RANGES = {  # name: (lowest, highest) a fitted state can hold
    "conf_threshold": (0.0, 1.0),
    "quantile": (1e-12, 1.0),
    "min_precision": (0.0, 1.0),
    "prior_strength": (0.0, 1e9),
    "prior_precision": (0.0, 1.0),
    "device_share": (0.0, 1.0),
    "k": (1, 1_000_000),
    "precision_k": (1, 1_000_000),
    "n_fit": (0, 1 << 62),
    "device_window": (0, 1_000_000),
    "device_min_prior": (0, 1_000_000),
}


def _check_knobs(s: TrustState) -> None:
    """The state's numbers in the ranges the decision can use: a NaN threshold or a window
    of 10**30 labels would fail (or mislead) at the first batch, not at load."""
    from .shapley import HISTORY_MODES

    for name, (lo, hi) in _KNOB_RANGES.items():
        v = getattr(s, name)
        if not lo <= v <= hi:  # NaN included
            raise TrustError(f"trust state: {name} {v!r} is outside [{lo}, {hi}]")
    if s.history not in HISTORY_MODES:
        raise TrustError(f"trust state: history {s.history!r} is not one of {HISTORY_MODES}")
    if len(set(s.classes)) != len(s.classes):
        raise TrustError("trust state: a class is named twice")
    if not (torch.isfinite(s.scale).all() and (s.scale > 0).all()):
        raise TrustError("trust state: scales must be positive numbers")
    thr = s.dist_threshold
    if not (torch.isnan(thr) | (torch.isfinite(thr) & (thr > 0))).all():
        raise TrustError("trust state: distance thresholds must be positive numbers or NaN")
    if torch.isnan(s.refs).any():
        raise TrustError("trust state: reference profiles hold NaN")


def _short(names: list[str], n: int = 4) -> str:
    more = f", ... ({len(names)})" if len(names) > n else ""
    return "[" + ", ".join(names[:n]) + more + "]"


@dataclass
class TrustDecision:
    """Per label: the decision and what it rests on."""

    pred: np.ndarray  # (n,) int
    confidence: np.ndarray  # (n,) calibrated
    trusted: np.ndarray  # (n,) bool
    reason: list[str]
    distance: np.ndarray  # (n,) k-NN distance / class threshold (<= 1: typical); NaN: none
    precision: np.ndarray  # (n,) explanation-conditioned precision estimate
    top_groups: list[list[str]] = field(default_factory=list)

    def refined(self, classes: list[str]) -> list[str]:
        """Labels after refinement: the class name when trusted, :data:`UNKNOWN` if not."""
        return [classes[p] if t else UNKNOWN for p, t in zip(self.pred, self.trusted)]


def _kth_distance(q: torch.Tensor, refs: torch.Tensor, k: int, exclude_self: bool) -> torch.Tensor:
    """Distance from each row of ``q`` to its k-th nearest row of ``refs`` (1-based k)."""
    kk = min(k, refs.shape[0] - (1 if exclude_self else 0))
    if kk < 1 or len(q) == 0:
        return torch.full((len(q),), float("nan"))
    d = torch.cdist(q.double(), refs.double())
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.topk(kk, dim=1, largest=False).values[:, -1].float()


def _near_precision(
    q: torch.Tensor, refs: torch.Tensor, correct: torch.Tensor, k: int, p0: float, m: float
) -> np.ndarray:
    """Share of right predictions among the ``k`` nearest references, shrunk towards p0."""
    if len(refs) == 0:
        return np.full(len(q), p0)
    kk = min(k, len(refs))
    nn = torch.cdist(q.double(), refs.double()).topk(kk, dim=1, largest=False).indices
    right = correct[nn].sum(1).double()
    return ((right + m * p0) / (kk + m)).numpy()


def fit_trust(
    values: np.ndarray,
    pred: np.ndarray,
    labels: np.ndarray,
    groups: list[str],
    classes: list[str],
    history: str = "one",
    config: TrustConfig | None = None,
    fitted_on: str = "",
) -> TrustState:
    """The trust state from labelled predictions of data the model did not train on.

    ``values`` (n, G, C) are the group Shapley values of every class for each prediction
    ``pred``; ``labels`` the true classes.
    """
    cfg = config or TrustConfig()
    values = np.asarray(values, dtype=np.float64)
    pred, labels = np.asarray(pred, np.int64), np.asarray(labels, np.int64)
    shape = (len(groups), len(classes))
    if values.ndim != 3 or values.shape[1:] != shape:
        raise TrustError(
            f"trust fit: values must be (n, {shape[0]}, {shape[1]}), got {values.shape}"
        )
    values = values.reshape(len(values), -1)
    if not (len(values) == len(pred) == len(labels)):
        raise TrustError("trust fit: values, predictions and labels differ in length")
    if not 0 < cfg.quantile <= 1:
        raise TrustError(f"trust fit: quantile must lie in (0, 1], not {cfg.quantile}")
    rng = np.random.default_rng(cfg.seed)
    keep: list[np.ndarray] = []
    for c in range(len(classes)):
        idx = np.flatnonzero(pred == c)
        if len(idx) > cfg.max_refs:
            idx = np.sort(rng.choice(idx, cfg.max_refs, replace=False))
        keep.append(idx)
    idx = np.concatenate(keep) if keep else np.zeros(0, np.int64)
    raw, ok = values[idx], pred[idx] == labels[idx]
    scale = raw[ok].std(0) if ok.sum() > 1 else np.ones(values.shape[1])
    scale = np.where(scale > 1e-6, scale, 1.0)
    refs = torch.from_numpy(raw / scale).half().float()  # stored as float16
    ref_pred = torch.from_numpy(pred[idx])
    ref_correct = torch.from_numpy(ok)
    thr = torch.full((len(classes),), float("nan"))
    for c in range(len(classes)):
        r = refs[(ref_pred == c) & ref_correct]
        if len(r) >= max(cfg.min_refs, cfg.k + 1):
            d = _kth_distance(r, r, cfg.k, exclude_self=True)
            thr[c] = max(float(torch.quantile(d.double(), cfg.quantile)), 1e-6)
    return TrustState(
        groups=list(groups),
        history=history,
        classes=list(classes),
        conf_threshold=float(cfg.conf_threshold),
        quantile=float(cfg.quantile),
        min_precision=float(cfg.min_precision),
        prior_strength=float(cfg.prior_strength),
        prior_precision=float(ok.mean()) if len(ok) else 0.5,
        k=int(cfg.k),
        precision_k=int(cfg.precision_k),
        scale=torch.from_numpy(scale).float(),
        refs=refs,
        ref_pred=ref_pred,
        ref_correct=ref_correct,
        dist_threshold=thr,
        fitted_on=fitted_on,
        n_fit=int(len(values)),
        device_window=int(cfg.device_window),
        device_share=float(cfg.device_share),
        device_min_prior=int(cfg.device_min_prior),
    )


def decide(
    state: TrustState,
    log_probs: np.ndarray,
    values: np.ndarray,
    pred: np.ndarray | None = None,
    top_groups: list[list[str]] | None = None,
) -> TrustDecision:
    """The trust decision for a batch: calibrated log-probabilities (n, C) and the Shapley
    values (n, G, C) of every class."""
    log_probs = np.asarray(log_probs)
    values = np.asarray(values, dtype=np.float64)
    n = len(log_probs)
    if log_probs.ndim != 2 or log_probs.shape[1] != len(state.classes):
        raise TrustError(
            f"trust: model gives {log_probs.shape[-1]} classes, the trust state "
            f"was fitted for {len(state.classes)}"
        )
    shape = (n, len(state.groups), len(state.classes))
    if values.shape != shape:
        raise TrustError(f"trust: values must be {shape}, got {values.shape}")
    values = values.reshape(n, shape[1] * shape[2])  # n may be 0: an empty batch
    pred = log_probs.argmax(1) if pred is None else np.asarray(pred)
    conf = np.exp(log_probs[np.arange(n), pred])
    prof = torch.from_numpy(values / state.scale.double().numpy()).float()
    ratio = np.full(n, np.nan)
    precision = np.full(n, state.prior_precision)
    for c in np.unique(pred):
        rows = np.flatnonzero(pred == c)
        of_c = state.ref_pred == int(c)
        precision[rows] = _near_precision(
            prof[rows],
            state.refs[of_c],
            state.ref_correct[of_c],
            state.precision_k,
            state.prior_precision,
            state.prior_strength,
        )
        thr = float(state.dist_threshold[c])
        if not np.isnan(thr):
            d = _kth_distance(prof[rows], state.refs[of_c & state.ref_correct], state.k, False)
            ratio[rows] = d.numpy() / thr
    reason = np.full(n, "-", dtype=object)
    for mask, why in reversed(
        [
            (conf < state.conf_threshold, "low_confidence"),
            (np.isnan(ratio), "unverified_class"),
            (ratio > 1.0, "atypical_explanation"),
            (precision < state.min_precision, "error_like_explanation"),
        ]
    ):
        reason[mask] = why  # the first failing criterion, in this order, is the reason
    trusted = reason == "-"
    return TrustDecision(
        pred=pred,
        confidence=conf,
        trusted=trusted,
        reason=reason.tolist(),
        distance=ratio,
        precision=precision,
        top_groups=top_groups or [],
    )


@dataclass(frozen=True)
class DeviceConsistency:
    """Rule 5, which needs the device's earlier labels, so it runs where they are known
    (classify, evaluate, explain over a capture; the bridge's dispatcher live).

    A label is ``inconsistent_with_device`` when, among the device's previous ``window``
    labels (at least ``min_prior`` of them, trusted or not), a class other than this label's
    holds at least ``share`` of their calibrated confidence. A device does
    not change type: a confident label that contradicts what the device has mostly been
    called is the typical high-confidence mistake between sibling models (the D-Link
    sensor family, TP-Link HS100/HS110), whose explanations look like correct ones. A device
    that really changes (an address reused) is relabelled once the window has turned over.
    """

    window: int = TrustConfig.device_window
    share: float = TrustConfig.device_share
    min_prior: int = TrustConfig.device_min_prior

    @classmethod
    def of(cls, state: TrustState | None) -> DeviceConsistency:
        """The state's knobs; the defaults for a model without a trust state."""
        if state is None:
            return cls()
        return cls(state.device_window, state.device_share, state.device_min_prior)

    def agrees(
        self,
        pred: np.ndarray,
        confidence: np.ndarray,
        groups: np.ndarray,
        times: np.ndarray,
        n_classes: int,
    ) -> np.ndarray:
        """Per label, whether it passes the rule; ``groups`` names each label's device and
        ``times`` orders a device's labels (ties: input order)."""
        pred = np.asarray(pred, np.int64)
        n = len(pred)
        if n == 0 or self.window < 1:
            return np.ones(n, bool)
        order = np.lexsort((np.arange(n), np.asarray(times), np.asarray(groups)))
        p, g = pred[order], np.asarray(groups)[order]
        ballots = np.zeros((n + 1, n_classes), np.int64)
        ballots[np.arange(n) + 1, p] = _units(np.asarray(confidence, np.float64)[order])
        cs = np.cumsum(ballots, axis=0)  # cs[i]: ballots of sorted labels before i
        first = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
        start = np.repeat(first, np.diff(np.r_[first, n]))
        lo = np.maximum(start, np.arange(n) - self.window)
        prior = cs[np.arange(n)] - cs[lo]  # the previous `window` labels of the same device
        total = prior.sum(axis=1)
        prior[np.arange(n), p] = 0  # what the other classes hold
        dominant = prior.max(axis=1) >= self.share * total
        odd = (np.arange(n) - lo >= self.min_prior) & (total > 0) & dominant
        out = np.ones(n, bool)
        out[order] = ~odd
        return out

    def online(self, max_devices: int = 100_000) -> DeviceConsistencyTracker:
        return DeviceConsistencyTracker(self, max_devices)


def _units(confidence):
    """Confidence in integer millionths: the batch rule and its live twin sum the same
    integers exactly, so they agree even on ties."""
    return np.rint(np.asarray(confidence, np.float64) * 1e6).astype(np.int64)


class _Window:
    """One device's last labels and their running weight per class."""

    __slots__ = ("labels", "weight", "total")

    def __init__(self) -> None:
        from collections import deque

        self.labels: deque = deque()
        self.weight: dict[str, int] = {}
        self.total = 0


class DeviceConsistencyTracker:
    """The live twin of :meth:`DeviceConsistency.agrees`: labels arrive one at a time, each
    device keeps its last ``window`` (class, confidence) with running sums per class (the
    bridge runs this for every label); least recently seen devices are forgotten beyond
    ``max_devices``."""

    def __init__(self, rule: DeviceConsistency, max_devices: int = 100_000):
        from collections import OrderedDict

        self.rule, self.max_devices = rule, max_devices
        self._recent: OrderedDict[str, _Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._recent)

    def check(self, device: str, label: str) -> bool:
        """Whether this label would pass the rule, leaving the device's window as it is (an
        early record's label: its final record's label will join the window)."""
        r, w = self.rule, self._recent.get(device)
        if r.window < 1 or w is None or len(w.labels) < r.min_prior or w.total <= 0:
            return True
        other = max((v for lab, v in w.weight.items() if lab != label), default=0)
        return not other >= r.share * w.total

    def observe(self, device: str, label: str, confidence: float) -> bool:
        """Whether this label passes the rule; then it joins the device's window."""
        r = self.rule
        if r.window < 1:
            return True
        w = self._recent.get(device)
        if w is None:
            w = self._recent[device] = _Window()
            if len(self._recent) > self.max_devices:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(device)
        ok = True
        if len(w.labels) >= r.min_prior and w.total > 0:
            other = max((v for lab, v in w.weight.items() if lab != label), default=0)
            ok = not other >= r.share * w.total
        units = round(float(confidence) * 1e6)  # as _units: half to even
        w.labels.append((label, units))
        w.weight[label] = w.weight.get(label, 0) + units
        w.total += units
        if len(w.labels) > r.window:
            old, u = w.labels.popleft()
            w.weight[old] -= u
            w.total -= u
            if not w.weight[old]:
                del w.weight[old]
        return ok


def apply_device_rule(
    trusted: np.ndarray,
    reason: np.ndarray,
    agrees: np.ndarray,
    why: str | np.ndarray = INCONSISTENT,
) -> None:
    """A device rule (5, 6 or 9) on top of the earlier ones, in place: a label trusted so far
    that fails it becomes untrusted with reason ``why`` (one, or one per label)."""
    hit = np.asarray(trusted, bool) & ~np.asarray(agrees, bool)
    trusted[hit] = False
    reason[hit] = why[hit] if isinstance(why, np.ndarray) else why


def apply_device_rules(
    state: TrustState | None,
    classes: Sequence[str],
    pred: np.ndarray,
    confidence: np.ndarray,
    groups: np.ndarray,
    times: np.ndarray,
    identities: Sequence[str | None] | None,
    trusted: np.ndarray,
    reason: np.ndarray,
    names: Sequence[frozenset[str]] | None = None,
) -> None:
    """Rules 5, 6 and 9, in place, on labels whose device history is known together (one
    capture, a whole evaluation); ``identities``: each label's device's latest DHCP identity
    (:func:`.dhcp_identity.latest`), for rule 6; ``names``: the names its
    device used in DNS and mDNS so far (:func:`.dns_names.so_far`), for rule 9."""
    agrees = DeviceConsistency.of(state).agrees(pred, confidence, groups, times, len(classes))
    apply_device_rule(trusted, reason, agrees)
    if not len(pred):
        return
    labels = np.asarray(classes, object)[np.asarray(pred, np.int64)]
    rule6 = DhcpIdentity.of(state)
    if rule6.seen and identities is not None:
        why = rule6.reasons(labels, identities)
        apply_device_rule(trusted, reason, why == "-", why)
    rule9 = DnsNames.of(state)
    if rule9.seen and names is not None:
        why = rule9.reasons(labels, names)
        apply_device_rule(trusted, reason, why == "-", why)


def device_vote(
    pred: np.ndarray,
    confidence: np.ndarray,
    trusted: np.ndarray,
    n_classes: int,
    min_trusted_share: float = 0.5,
) -> int:
    """One device's label from its labels: a class index, or -1 for :data:`UNKNOWN`.

    Unknown when no label, or fewer than ``min_trusted_share`` of them, is trusted; else
    the class with the largest sum of calibrated confidence over trusted labels (ties: the
    lower class index).
    """
    pred, conf, tr = np.asarray(pred), np.asarray(confidence, float), np.asarray(trusted, bool)
    if len(pred) == 0 or not tr.any() or tr.mean() < min_trusted_share:
        return -1
    score = np.bincount(pred[tr], weights=conf[tr], minlength=n_classes)
    return int(score.argmax())


def windowed_trusted_vote(
    pred: np.ndarray,
    confidence: np.ndarray,
    trusted: np.ndarray,
    groups: np.ndarray,
    times: np.ndarray,
    n_classes: int,
    window: int = 10,
    min_votes: int = 3,
    min_trusted_share: float = 0.5,
    with_confidence: bool = False,
):
    """The refined device label after each sequence: :func:`device_vote` over the window of
    the device's last ``window`` sequences (by time, the current one included; ``groups``
    names the device session). Returns ``(index, emitted)``: no label before ``min_votes``
    sequences (``emitted`` False); index -1 with ``emitted`` True is :data:`UNKNOWN`.
    ``with_confidence`` adds a third array: the mean calibrated confidence of the window's
    trusted labels of the voted class (0 when unknown)."""
    pred = np.asarray(pred, np.int64)
    n = len(pred)
    if n == 0:
        empty = (np.zeros(0, np.int64), np.zeros(0, bool))
        return (*empty, np.zeros(0)) if with_confidence else empty
    order = np.lexsort((np.arange(n), np.asarray(times), np.asarray(groups)))
    p, c = pred[order], np.asarray(confidence, np.float64)[order]
    t, g = np.asarray(trusted, bool)[order], np.asarray(groups)[order]
    ballots = np.zeros((n, n_classes))
    ballots[np.arange(n), p] = np.where(t, c, 0.0)
    first = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    start = np.repeat(first, np.diff(np.r_[first, n]))
    lo = np.maximum(start, np.arange(n) - window + 1)
    cs = np.vstack([np.zeros((1, n_classes)), np.cumsum(ballots, axis=0)])
    votes = cs[np.arange(n) + 1] - cs[lo]
    ct = np.r_[0, np.cumsum(t)]
    n_trusted = ct[np.arange(n) + 1] - ct[lo]
    n_votes = np.arange(n) - lo + 1
    winner = votes.argmax(axis=1)
    unknown = (n_trusted == 0) | (n_trusted < min_trusted_share * n_votes)
    winner = np.where(unknown, -1, winner)
    emitted = n_votes >= min_votes
    index, out_emitted = np.empty(n, np.int64), np.empty(n, bool)
    index[order], out_emitted[order] = np.where(emitted, winner, -1), emitted
    if not with_confidence:
        return index, out_emitted
    counts = np.zeros((n, n_classes))
    counts[np.arange(n), p] = t
    cc = np.vstack([np.zeros((1, n_classes)), np.cumsum(counts, axis=0)])
    k = np.maximum(winner, 0)
    n_win = (cc[np.arange(n) + 1] - cc[lo])[np.arange(n), k]
    mean = np.where(winner >= 0, votes[np.arange(n), k] / np.maximum(n_win, 1), 0.0)
    conf = np.empty(n)
    conf[order] = mean
    return index, out_emitted, conf
