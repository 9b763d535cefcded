"""Labels for matrices: the one place where a model's output becomes a label.

A device history whose devices and times are known together (a capture, a dataset split)
goes through :meth:`Predictor.label` once, its stages in order: each matrix's device's DHCP
identity -> the model's calibrated scores -> refined by the identity -> trusted (rules 1-4
per label, then 5 and 6 over the device history; docs/trust.md). A stream of single
matrices (the scorer beside Zeek) calls :meth:`Predictor.predict`, and the bridge applies
rules 5 and 6 as labels arrive. The CNN runs in batches under :func:`torch.inference_mode`.
A bundle without a trust state trusts a label when its calibrated confidence reaches
``threshold`` (:meth:`Predictor.assess`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields

import numpy as np
import torch

from .bundle import ModelBundle
from .rowcache import RowCache
from .trust.decision import apply_device_rules
from .trust.dhcp_identity import DhcpIdentity, latest, unidentified
from .trust.dns_names import DnsNames, so_far
from .trust.layer import TrustLayer

DEFAULT_THRESHOLD = 0.5
# Below this many matrices the CPU runs on one thread: intra-op parallelism gains nothing on
# so little work, and when another process holds a core (Zeek beside us) its barriers turn a
# 0.5 ms forward pass into tens of milliseconds.
SMALL_BATCH = 64
REASON_OK = "-"
REASON_LOW_CONFIDENCE = "low_confidence"


@contextmanager
def _few_threads(active: bool):
    if not active:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Predictions:
    """One entry per input matrix."""

    index: np.ndarray  # (n,) int64: class index
    label: np.ndarray  # (n,) object: class name
    probs: np.ndarray  # (n, C) float32: calibrated probabilities
    confidence: np.ndarray  # (n,) float32: probability of the chosen class
    trusted: np.ndarray  # (n,) bool
    reason: np.ndarray  # (n,) object: why not trusted, "-" when trusted
    top_groups: list[list[str]]  # per entry, the feature groups that drove the label

    def __len__(self) -> int:
        return len(self.index)

    def take(self, idx: np.ndarray) -> Predictions:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = [v[i] for i in np.asarray(idx)] if isinstance(v, list) else v[idx]
        return Predictions(**out)


@dataclass
class Assessment:
    trusted: np.ndarray
    reason: np.ndarray
    top_groups: list[list[str]]


class Predictor:
    def __init__(
        self,
        bundle: ModelBundle,
        device: str = "cpu",
        batch_size: int | None = None,
        threshold: float | None = None,
        explain: bool = True,
        row_cache: int = 0,
    ):
        """``row_cache``: for a stream of a device's successive matrices (the scorer), cache
        that many rows' packet features (:mod:`iotcls.rowcache`; CPU only, 0 = off)."""
        self.bundle = bundle
        self.device = torch.device(device)
        self.model = bundle.model.to(self.device).eval()
        self.row_cache = None
        if row_cache > 0 and self.device.type == "cpu":
            self.row_cache = RowCache(self.model, row_cache)
        # Chunks of 256 matrices on a CPU: their intermediates stay in cache (measured on the
        # 2-core VM: 6,800 matrices/s in chunks of 256, 4,300 in chunks of 4,096).
        self.batch_size = batch_size or (256 if self.device.type == "cpu" else 4096)
        self.threshold = (
            float(bundle.metadata.get("confidence_threshold", DEFAULT_THRESHOLD))
            if threshold is None
            else threshold
        )
        self.classes = np.array(bundle.classes, dtype=object)
        # trust (docs/trust.md): with a trust state in the bundle, every label's trusted/reason/
        # top_groups come from iotcls.trust (Shapley values + the fitted decision); the
        # confidence criterion uses the state's threshold. explain=False keeps labels cheap
        # (confidence threshold only); assess_subset() then explains the labels to be logged.
        self.trust = TrustLayer.from_bundle(bundle, require_state=True)
        self.explain = explain and self.trust is not None
        if self.trust is not None and threshold is None:
            self.threshold = self.trust.state.conf_threshold
        self.identity_map = DhcpIdentity.of(self._state)  # the DHCP identity refinement
        self.dns_map = DnsNames.of(self._state)  # rule 9

    @property
    def layout(self):
        return self.bundle.layout

    def _checked(self, matrices: np.ndarray) -> np.ndarray:
        """float32 matrices of the model's width with at most its rows, else ValueError."""
        x = np.asarray(matrices, dtype=np.float32)
        if x.ndim != 3 or x.shape[2] != self.layout.width or x.shape[1] > self.layout.rows:
            raise ValueError(
                f"matrices of shape {x.shape} do not fit the model's layout "
                f"(n, <= {self.layout.rows}, {self.layout.width})"
            )
        return x

    def _few(self, n: int) -> bool:
        return n < SMALL_BATCH and self.device.type == "cpu"

    def _predictions(
        self, probs: np.ndarray, index: np.ndarray, trusted, reason, top_groups: list[list[str]]
    ) -> Predictions:
        index = np.asarray(index, np.int64)
        return Predictions(
            index=index,
            label=self.classes[index] if len(index) else np.zeros(0, object),
            probs=probs,
            confidence=probs[np.arange(len(index)), index].astype(np.float32),
            trusted=np.asarray(trusted, bool),
            reason=np.asarray(reason, object),
            top_groups=top_groups,
        )

    def logits(self, matrices: np.ndarray) -> np.ndarray:
        """Raw (uncalibrated) logits; ``matrices`` may hold fewer rows than the layout's."""
        x = self._checked(matrices)
        out = np.empty((len(x), len(self.classes)), np.float32)
        with torch.inference_mode(), _few_threads(self._few(len(x))):
            for s in range(0, len(x), self.batch_size):
                if self.row_cache is not None:
                    xc = x[s : s + self.batch_size]
                    out[s : s + len(xc)] = self.row_cache.logits(xc).numpy()
                    continue
                xb = torch.from_numpy(x[s : s + self.batch_size]).to(self.device)
                out[s : s + len(xb)] = self.model(xb).float().cpu().numpy()
        return out

    def probabilities(self, matrices: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
        """Calibrated class probabilities, renormalised over each row's ``allowed`` classes."""
        probs = self.calibrate(self.logits(matrices))
        if allowed is not None:
            probs = probs * allowed
            probs /= probs.sum(axis=1, keepdims=True)
        return probs

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        z = logits / self.bundle.temperature
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def assess(self, matrices: np.ndarray, probs: np.ndarray, index: np.ndarray) -> Assessment:
        """The trust decision of a bundle without a trust state: the confidence threshold."""
        conf = probs[np.arange(len(index)), index]
        trusted = conf >= self.threshold
        reason = np.where(trusted, REASON_OK, REASON_LOW_CONFIDENCE).astype(object)
        return Assessment(trusted, reason, [[] for _ in range(len(index))])

    def label(self, matrices: np.ndarray, groups: np.ndarray, times: np.ndarray) -> Predictions:
        """The labels of a device history known together (a capture, a dataset split): each
        stage once, in order. ``groups`` names each matrix's device and ``times`` orders a
        device's matrices (the flow's window start).

        1. identities: each matrix's device's latest DHCP identity (:meth:`device_identities`);
        2. scores, refined and trusted by rules 1-4 (:meth:`predict`): the calibrated class
           probabilities, restricted to the classes the identity was seen with, the label
           and its trust decision;
        3. rules 5, 6 and 9 over the device history (:meth:`check_devices`)."""
        identities = self.device_identities(matrices, groups, times)
        pred = self.predict(matrices, identities)
        names = self.device_names(matrices, groups, times)
        return self.check_devices(pred, groups, times, identities, names)

    def predict(
        self, matrices: np.ndarray, identities: Sequence[str | None] | None = None
    ) -> Predictions:
        """Labels of ``matrices``; ``identities`` (per matrix, its device's latest DHCP
        identity, see :meth:`device_identities`) refine them (:mod:`.trust.dhcp_identity`)."""
        allowed = self.allowed(identities)
        if self.explain:  # trust (docs/trust.md): one batched pass gives the label and its trust
            return self._predict_explained(matrices, allowed, unidentified(identities))
        probs = self.probabilities(matrices, allowed)
        index = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
        a = self.assess(matrices, probs, index)
        return self._predictions(probs, index, a.trusted, a.reason, a.top_groups)

    def check_devices(
        self,
        pred: Predictions,
        groups: np.ndarray,
        times: np.ndarray,
        identities: Sequence[str | None] | None = None,
        names: Sequence[frozenset[str]] | None = None,
    ) -> Predictions:
        """Apply trust rules 5 (``inconsistent_with_device``) and, given the devices'
        ``identities`` (:meth:`device_identities`), 6 (``dhcp_identity_mismatch``) and given
        their ``names`` (:meth:`device_names`), 9 (``dns_names_mismatch``) in place,
        given each label's device (``groups``) and time; for labels whose device history is
        known."""
        apply_device_rules(
            self._state,
            self.classes,
            pred.index,
            pred.confidence,
            groups,
            times,
            identities,
            pred.trusted,
            pred.reason,
            names,
        )
        return pred

    @property
    def _state(self):
        return self.trust.state if self.trust is not None else None

    def device_identities(
        self, matrices: np.ndarray, groups: np.ndarray, times: np.ndarray
    ) -> np.ndarray | None:
        """Per matrix, its device's latest DHCP identity up to it (None: none yet), read from
        the matrices' own DHCP flows (row 0: the labelled flow); None when the model has no
        identity map."""
        if not self.identity_map.seen:
            return None
        return latest(self.layout.dhcp_identities(np.asarray(matrices)[:, 0]), groups, times)

    def device_names(
        self, matrices: np.ndarray, groups: np.ndarray, times: np.ndarray
    ) -> np.ndarray | None:
        """Per matrix, the names its device used in DNS and mDNS up to it, read from the
        matrices' own flows (row 0); None when the model has no name map (rule 9)."""
        if not self.dns_map.seen:
            return None
        return so_far(self.layout.dns_names(np.asarray(matrices)[:, 0]), groups, times)

    def allowed(self, identities: Sequence[str | None] | None) -> np.ndarray | None:
        """(n, C) the classes each label may take given its device's identity, or None."""
        if identities is None:
            return None
        return self.identity_map.allowed(identities, list(self.classes))

    # -- trust (docs/trust.md) ----------------------------------------------------------------
    def _predict_explained(
        self, matrices: np.ndarray, allowed: np.ndarray | None, unknown: np.ndarray | None
    ) -> Predictions:
        x = self._checked(matrices)
        with _few_threads(self._few(len(x))):
            a = self.trust.assess(x, allowed, unknown)
        lp = a.log_probs.astype(np.float64)
        probs = np.exp(lp - lp.max(axis=1, keepdims=True))
        probs = (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)
        d = a.decision
        return self._predictions(probs, d.pred, d.trusted, d.reason, d.top_groups)

    def assess_subset(
        self,
        matrices: np.ndarray,
        pred: Predictions,
        idx: np.ndarray,
        identities: Sequence[str | None] | None = None,
    ) -> None:
        """Explain and decide the trust of the labels ``idx`` only (those to be logged), in
        place; labels from ``predict`` with ``explain=False`` keep the confidence criterion.
        ``identities``: as given to ``predict``."""
        idx = np.asarray(idx, np.int64)
        if self.trust is None or len(idx) == 0:
            return
        allowed = self.allowed(identities)
        unknown = unidentified(identities)
        a = self.trust.assess(
            np.asarray(matrices, np.float32)[idx],
            None if allowed is None else allowed[idx],
            None if unknown is None else unknown[idx],
        )
        d = a.decision
        pred.trusted[idx] = d.trusted
        pred.reason[idx] = np.asarray(d.reason, object)
        for j, i in enumerate(idx):
            pred.top_groups[i] = d.top_groups[j]
