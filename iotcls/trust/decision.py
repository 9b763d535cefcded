"""The trust decision: is a label backed by the kind of evidence its class is known for?

A label is **trusted** when both hold:

1. its calibrated confidence is at least ``conf_threshold`` (else reason ``low_confidence``);
2. its *explanation profile* lies near those of correct predictions of the same class, seen
   at fitting time (else reason ``atypical_explanation``). The profile is the vector of
   group Shapley values of the predicted class's log-probability, each group divided by
   its spread over all references; "near" is the distance to the ``k``-th nearest
   reference profile of the predicted class, compared with the ``quantile`` of the same
   leave-one-out distance among that class's references. A class with fewer than
   ``min_refs`` references has no profile to compare with: its labels are untrusted with
   reason ``unverified_class``.

Nearest neighbours rather than a mean and covariance: a device's flows fall in several
distinct kinds (DNS, NTP, its cloud session, ...), each with its own explanation, so a
class's profiles form clusters that one Gaussian would blur.

**Refinement**: an untrusted label is reported as ``unknown`` (:data:`UNKNOWN`).
**Device vote** (:func:`device_vote`): among one device's labels, if fewer than
``min_trusted_share`` of them (or none) are trusted the device is ``unknown``; otherwise
its label is the class with the largest sum of calibrated confidence over trusted labels.

The fitted state (:meth:`TrustState.to_dict`) holds only tensors, numbers, strings and lists
of them, so it travels in a model bundle that ``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

UNKNOWN = "unknown"
TRUST_VERSION = 1
REASONS = ("-", "low_confidence", "atypical_explanation", "unverified_class")


class TrustError(ValueError):
    pass


@dataclass
class TrustConfig:
    """Knobs of the fit; the fitted values land in :class:`TrustState`."""

    conf_threshold: float = 0.5
    quantile: float = 0.95
    k: int = 5
    max_refs: int = 400  # per class, a seeded random subset of the correct predictions
    min_refs: int = 6
    seed: int = 0


@dataclass
class TrustState:
    groups: list[str]
    history: str  # how history rows form players, see shapley.feature_groups
    classes: list[str]
    conf_threshold: float
    k: int
    quantile: float
    scale: torch.Tensor  # (G,) spread of each group's value over the references
    refs: torch.Tensor  # (N, G) float32, scaled profiles of correct predictions
    ref_class: torch.Tensor  # (N,) int64
    dist_threshold: torch.Tensor  # (C,) float32; +inf never happens, NaN = no profile
    fitted_on: str = ""
    n_fit: int = 0
    version: int = TRUST_VERSION

    def to_dict(self) -> dict:
        return {
            "version": self.version, "groups": list(self.groups), "history": self.history,
            "classes": list(self.classes), "conf_threshold": float(self.conf_threshold),
            "k": int(self.k), "quantile": float(self.quantile),
            "scale": self.scale.float().contiguous(), "refs": self.refs.float().contiguous(),
            "ref_class": self.ref_class.long().contiguous(),
            "dist_threshold": self.dist_threshold.float().contiguous(),
            "fitted_on": self.fitted_on, "n_fit": int(self.n_fit),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> "TrustState":
        if not isinstance(d, dict):
            raise TrustError(f"trust state: expected a mapping, got {type(d).__name__}")
        if d.get("version") != TRUST_VERSION:
            raise TrustError(f"trust state: version {d.get('version')!r} is not supported "
                             f"(this is {TRUST_VERSION})")  # fmt: skip
        try:
            s = cls(
                groups=[str(g) for g in d["groups"]], history=str(d["history"]),
                classes=[str(c) for c in d["classes"]],
                conf_threshold=float(d["conf_threshold"]), k=int(d["k"]),
                quantile=float(d["quantile"]), scale=torch.as_tensor(d["scale"]).float(),
                refs=torch.as_tensor(d["refs"]).float(),
                ref_class=torch.as_tensor(d["ref_class"]).long(),
                dist_threshold=torch.as_tensor(d["dist_threshold"]).float(),
                fitted_on=str(d.get("fitted_on", "")), n_fit=int(d.get("n_fit", 0)),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise TrustError(f"trust state: malformed ({type(e).__name__}: {e})") from None
        g, c = len(s.groups), len(s.classes)
        if s.scale.shape != (g,) or s.refs.ndim != 2 or s.refs.shape[1] != g:
            raise TrustError(f"trust state: profiles do not match its {g} groups")
        if s.ref_class.shape != (len(s.refs),) or s.dist_threshold.shape != (c,):
            raise TrustError("trust state: reference classes or thresholds have the wrong shape")
        if len(s.ref_class) and (s.ref_class.min() < 0 or s.ref_class.max() >= c):
            raise TrustError("trust state: a reference names a class outside the model's")
        return s

    def refs_per_class(self) -> np.ndarray:
        return np.bincount(self.ref_class.numpy(), minlength=len(self.classes))


@dataclass
class TrustDecision:
    """Per label: the decision and what it rests on."""

    pred: np.ndarray  # (n,) int
    confidence: np.ndarray  # (n,) calibrated
    trusted: np.ndarray  # (n,) bool
    reason: list[str]
    distance: np.ndarray  # (n,) k-NN distance of the profile / class threshold (<=1: typical)
    top_groups: list[list[str]] = field(default_factory=list)

    def refined(self, classes: list[str]) -> list[str]:
        """Labels after refinement: the class name when trusted, :data:`UNKNOWN` if not."""
        return [classes[p] if t else UNKNOWN for p, t in zip(self.pred, self.trusted)]


def _kth_distance(q: torch.Tensor, refs: torch.Tensor, k: int, exclude_self: bool) -> torch.Tensor:
    """Distance from each row of ``q`` to its k-th nearest row of ``refs`` (1-based k)."""
    if len(refs) == 0 or len(q) == 0:
        return torch.full((len(q),), float("nan"))
    d = torch.cdist(q.double(), refs.double())
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    kk = min(k, refs.shape[0] - (1 if exclude_self else 0))
    if kk < 1:
        return torch.full((len(q),), float("nan"))
    return d.topk(kk, dim=1, largest=False).values[:, -1].float()


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
    """Fit per-class reference profiles from the Shapley values of labelled predictions.

    ``values`` (n, G) are the group Shapley values of each prediction ``pred``; ``labels``
    the true classes. Only correct predictions become references.
    """
    cfg = config or TrustConfig()
    values = np.asarray(values, dtype=np.float64)
    pred, labels = np.asarray(pred), np.asarray(labels)
    if values.ndim != 2 or values.shape[1] != len(groups):
        raise TrustError(f"trust fit: values must be (n, {len(groups)}), got {values.shape}")
    if not (len(values) == len(pred) == len(labels)):
        raise TrustError("trust fit: values, predictions and labels differ in length")
    if not 0 < cfg.quantile <= 1:
        raise TrustError(f"trust fit: quantile must lie in (0, 1], not {cfg.quantile}")
    rng = np.random.default_rng(cfg.seed)
    ok = pred == labels
    idx_all: list[np.ndarray] = []
    for c in range(len(classes)):
        idx = np.flatnonzero(ok & (labels == c))
        if len(idx) > cfg.max_refs:
            idx = np.sort(rng.choice(idx, cfg.max_refs, replace=False))
        idx_all.append(idx)
    idx = np.concatenate(idx_all) if idx_all else np.zeros(0, int)
    raw = values[idx]
    scale = raw.std(0) if len(raw) > 1 else np.ones(len(groups))
    scale = np.where(scale > 1e-6, scale, 1.0)
    refs = torch.from_numpy(raw / scale).float()
    ref_class = torch.from_numpy(labels[idx].astype(np.int64))
    thr = torch.full((len(classes),), float("nan"))
    for c in range(len(classes)):
        r = refs[ref_class == c]
        if len(r) >= max(cfg.min_refs, cfg.k + 1):
            d = _kth_distance(r, r, cfg.k, exclude_self=True)
            thr[c] = max(float(torch.quantile(d.double(), cfg.quantile)), 1e-6)
    return TrustState(
        groups=list(groups), history=history, classes=list(classes),
        conf_threshold=float(cfg.conf_threshold), k=int(cfg.k), quantile=float(cfg.quantile),
        scale=torch.from_numpy(scale).float(), refs=refs, ref_class=ref_class,
        dist_threshold=thr, fitted_on=fitted_on, n_fit=int(len(values)),
    )  # fmt: skip


def decide(
    state: TrustState,
    log_probs: np.ndarray,
    values: np.ndarray,
    pred: np.ndarray | None = None,
    top_groups: list[list[str]] | None = None,
) -> TrustDecision:
    """The trust decision for a batch: calibrated log-probabilities (n, C) and the Shapley
    values (n, G) of the predicted class."""
    log_probs = np.asarray(log_probs)
    values = np.asarray(values, dtype=np.float64)
    n = len(log_probs)
    if log_probs.ndim != 2 or log_probs.shape[1] != len(state.classes):
        raise TrustError(f"trust: model gives {log_probs.shape[-1]} classes, the trust state "
                         f"was fitted for {len(state.classes)}")  # fmt: skip
    if values.shape != (n, len(state.groups)):
        raise TrustError(f"trust: values must be ({n}, {len(state.groups)}), got {values.shape}")
    pred = log_probs.argmax(1) if pred is None else np.asarray(pred)
    conf = np.exp(log_probs[np.arange(n), pred])
    prof = torch.from_numpy(values / state.scale.double().numpy()).float()
    ratio = np.full(n, np.nan)
    for c in np.unique(pred):
        rows = np.flatnonzero(pred == c)
        thr = float(state.dist_threshold[c])
        if np.isnan(thr):
            continue
        d = _kth_distance(prof[rows], state.refs[state.ref_class == int(c)], state.k, False)
        ratio[rows] = d.numpy() / thr
    low = conf < state.conf_threshold
    no_ref = np.isnan(ratio)
    atyp = ~no_ref & (ratio > 1.0)
    reason = np.where(low, "low_confidence",
                      np.where(no_ref, "unverified_class",
                               np.where(atyp, "atypical_explanation", "-")))  # fmt: skip
    trusted = reason == "-"
    return TrustDecision(pred=pred, confidence=conf, trusted=trusted, reason=reason.tolist(),
                         distance=ratio, top_groups=top_groups or [])  # fmt: skip


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
