"""The trust layer of one model bundle: explain a batch, decide trust, fit the state.

This is what :class:`iotcls.predict.Predictor` calls when the bundle carries a trust state,
and what training calls to fit one. One batched pass gives, per matrix, the calibrated
log-probabilities of the full input (so the label itself costs nothing extra), the group
Shapley values of the predicted class, and the trust decision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..layout import MatrixLayout
from .decision import TrustConfig, TrustDecision, TrustError, TrustState, decide, fit_trust
from .features import ATYPICAL_FEATURES, fit_features, penultimate
from .shapley import Explanation, GroupShapley


@dataclass
class Assessed:
    """A batch through the trust layer: the explanation and the decision."""

    explanation: Explanation
    decision: TrustDecision

    @property
    def log_probs(self) -> np.ndarray:
        return self.explanation.log_probs


class TrustLayer:
    def __init__(
        self,
        model: torch.nn.Module,
        layout: MatrixLayout,
        temperature: float,
        classes: list[str],
        state: TrustState | None = None,
        history: str = "one",
        top_k: int = 3,
        chunk: int = 4096,
    ):
        if state is not None:
            history = state.history
            if list(state.classes) != list(classes):
                raise TrustError("trust state: fitted for other classes than the model's")
        self.layout, self.classes, self.state, self.top_k = layout, list(classes), state, top_k
        self.model = model
        self.explainer = GroupShapley.for_layout(
            model, layout, history=history, temperature=temperature, chunk=chunk
        )
        if state is not None and state.groups != self.explainer.names:
            raise TrustError(
                f"trust state: groups {state.groups} do not match the layout's "
                f"{self.explainer.names}"
            )

    @classmethod
    def from_bundle(cls, bundle, require_state: bool = False) -> TrustLayer | None:
        """The bundle's trust layer; None when it has no trust state (unless required)."""
        state = TrustState.from_dict(bundle.trust) if bundle.trust else None
        if state is None and require_state:
            return None
        return cls(bundle.model, bundle.layout, bundle.temperature, bundle.classes, state)

    @property
    def groups(self) -> list[str]:
        return self.explainer.names

    def full_rows(self, matrices: np.ndarray) -> np.ndarray:
        """Matrices with fewer rows than the layout's (the per-flow strategy) padded with
        zero rows: the CNN gives the same output, and the history player gets value 0."""
        x = np.asarray(matrices, dtype=np.float32)
        if x.ndim == 3 and x.shape[1] < self.layout.rows:
            pad = np.zeros((len(x), self.layout.rows - x.shape[1], x.shape[2]), np.float32)
            x = np.concatenate([x, pad], axis=1)
        return x

    def explain(self, matrices: np.ndarray) -> Explanation:
        return self.explainer.explain(self.full_rows(matrices), all_classes=True)

    def assess(
        self,
        matrices: np.ndarray,
        allowed: np.ndarray | None = None,
        unidentified: np.ndarray | None = None,
    ) -> Assessed:
        """The explanation and trust decision; ``allowed`` (n, C) limits each label's classes
        (the DHCP identity refinement, :mod:`.dhcp_identity`). The open-set signal
        (:mod:`.features`) judges only the labels of devices whose DHCP identity is not known
        (``unidentified``, (n,) bool; None: all): a known identity already vouches for the
        classes it allows (rule 6), and refuses the rest."""
        if self.state is None:
            raise ValueError("trust layer: no fitted trust state")
        e = self.explain(matrices)
        if allowed is not None:
            e = e.restricted(allowed)
        d = decide(self.state, e.log_probs, e.all_values, e.target, e.top_groups(self.top_k))
        fd = self.state.features
        judged = d.trusted if unidentified is None else d.trusted & np.asarray(unidentified, bool)
        if fd is not None and judged.any():  # the open-set signal, on trusted labels only
            idx = np.flatnonzero(judged)
            x = self.full_rows(np.asarray(matrices)[idx])
            far = idx[fd.atypical(penultimate(self.model, x), d.pred[idx])]
            d.trusted[far] = False
            for i in far.tolist():
                d.reason[i] = ATYPICAL_FEATURES
        return Assessed(e, d)


def fit_state(
    model: torch.nn.Module,
    layout: MatrixLayout,
    temperature: float,
    classes: list[str],
    matrices: np.ndarray,
    labels: np.ndarray,
    config: TrustConfig | None = None,
    fitted_on: str = "validation split",
    history: str = "one",
    fallback: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[TrustState, dict]:
    """Fit a trust state on labelled matrices (class indices); returns it and fit facts.

    ``fallback`` (training matrices and labels): for a class with too few correct
    references in ``matrices`` (a small class may have a single validation capture, all
    wrong), its training flows become references too, so its labels are judged against
    something rather than all refused as ``unverified_class``; they also give the open-set
    signal its class means (:func:`.features.fit_features`).
    """
    t0 = time.time()
    cfg = config or TrustConfig()
    layer = TrustLayer(model, layout, temperature, classes, None, history=history)
    e = layer.explain(matrices)
    values, pred, y = e.all_values, e.target, np.asarray(labels, np.int64)
    lacking: list[int] = []
    if fallback is not None:
        ok = np.bincount(y[pred == y], minlength=len(classes))
        lacking = [c for c in range(len(classes)) if ok[c] < max(cfg.min_refs, cfg.k + 1)]
        fy = np.asarray(fallback[1], np.int64)
        rng = np.random.default_rng(cfg.seed)
        pick = []
        for c in lacking:
            idx = np.flatnonzero(fy == c)
            if len(idx) > cfg.max_refs:
                idx = np.sort(rng.choice(idx, cfg.max_refs, replace=False))
            pick.append(idx)
        pick = np.concatenate(pick) if pick else np.zeros(0, np.int64)
        if len(pick):
            ef = layer.explain(np.asarray(fallback[0])[pick])
            values = np.concatenate([values, ef.all_values])
            pred = np.concatenate([pred, ef.target])
            y = np.concatenate([y, fy[pick]])
    state = fit_trust(
        values, pred, y, layer.groups, classes, history=history, config=cfg, fitted_on=fitted_on
    )
    if cfg.feature_quantile > 0 and fallback is not None and len(fallback[0]):
        state.features = fit_features(
            model,
            np.asarray(fallback[0]),
            fallback[1],
            matrices,
            labels,
            len(classes),
            cfg.feature_quantile,
        )
    per = state.refs_per_class()
    facts = {
        "fitted_on": fitted_on,
        "labels": int(len(matrices)),
        "references": int(len(state.refs)),
        "training_references_for": [classes[c] for c in lacking],
        "classes_without_profile": [
            c for c, t in zip(classes, state.dist_threshold.tolist()) if t != t
        ],  # NaN
        "min_references": int(per.min()) if len(per) else 0,
        "seconds": round(time.time() - t0, 2),
    }
    return state, facts
