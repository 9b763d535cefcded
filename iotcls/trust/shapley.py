"""Exact Shapley values over a handful of feature groups of the flow-sequence matrix.

Players are groups of matrix cells (:func:`feature_groups`): by default the five column
groups of the *current* flow (row 0: meta, timing, sizes, directions, payload) and one
player for the whole history (rows 1..H). A coalition keeps its players' cells and sets
every other cell to the **baseline, zero**: zero is what the layout itself writes for "no
flow", "no packet", "no payload byte" and "private remote", so a masked input is always one
the model has seen the like of (a device's first flow has all-zero history rows). With G
players there are 2^G coalitions; the empty one (the all-zero matrix) is the same for every
input and is evaluated once, the other 2^G - 1 in one batched forward pass (chunked).

When the model reads each row on its own before combining rows (the project's CNN: a
``flow`` row encoder, then ``sequence_head``) and every player is either a set of columns
of row 0 or a set of whole history rows, the pass is *structured*: each of the 2^P masked
variants of row 0 and each history row is encoded once, and only the cheap inter-flow
stage runs per coalition. Same values (a test checks it), about a sixth of the work.

The game's value is the predicted class's calibrated log-probability,
``log_softmax(logits / T)[c]``, so values are additive in evidence and
``sum(phi) == log p_c(x) - log p_c(0)`` (efficiency), exactly up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..layout import GROUPS, MatrixLayout

HISTORY_MODES = ("one", "rows", "none")
MAX_PLAYERS = 12  # 4096 coalitions: beyond this exact Shapley is not "one batched pass"


def feature_groups(layout: MatrixLayout, history: str = "one") -> tuple[list[str], np.ndarray]:
    """Player names and their cell masks, shape ``(G, rows, width)`` bool.

    ``history``: ``"one"`` (default) makes rows 1..H a single player ``history``;
    ``"rows"`` makes each row ``j`` a player ``h{j}``; ``"none"`` leaves history out of the
    game (its cells always keep their values). Empty groups (no payload in a
    ``payload_mode="none"`` layout, no history when ``history=0``) are not players.
    """
    if history not in HISTORY_MODES:
        raise ValueError(f"shapley: history must be one of {HISTORY_MODES}, not {history!r}")
    rows, width = layout.shape
    names: list[str] = []
    masks: list[np.ndarray] = []
    for name, sl in layout.group_slices().items():
        m = np.zeros((rows, width), bool)
        m[0, sl] = True
        if m.any():
            names.append(name)
            masks.append(m)
    if layout.history and history == "one":
        m = np.zeros((rows, width), bool)
        m[1:] = True
        names.append("history")
        masks.append(m)
    elif layout.history and history == "rows":
        for j in range(1, rows):
            m = np.zeros((rows, width), bool)
            m[j] = True
            names.append(f"h{j}")
            masks.append(m)
    return names, np.stack(masks) if masks else np.zeros((0, rows, width), bool)


def coalitions(g: int) -> np.ndarray:
    """All ``2**g`` coalitions as a ``(2**g, g)`` bool array; row ``k`` has player ``i`` iff
    bit ``i`` of ``k`` is set (row 0 empty, last row full)."""
    k = np.arange(2**g)[:, None]
    return ((k >> np.arange(g)[None, :]) & 1).astype(bool)


def shapley_matrix(g: int) -> np.ndarray:
    """``(2**g, g)`` weights ``A`` with ``phi = v @ A`` for coalition values ``v``.

    phi_i = sum over S not containing i of |S|!(g-|S|-1)!/g! (v(S + i) - v(S)); each
    coalition T therefore enters player i's value with +w(|T|-1) if i is in T, and with
    -w(|T|) if not.
    """
    c = coalitions(g)
    size = c.sum(1)
    w = np.array(
        [math.factorial(s) * math.factorial(g - s - 1) / math.factorial(g) for s in range(g)]
        + [0.0]
    )
    plus = w[np.maximum(size - 1, 0)][:, None]
    minus = w[size][:, None]
    return np.where(c, plus, -minus)


@dataclass
class RowPlan:
    """How players map onto rows, for the structured pass (see the module docstring)."""

    variant_cols: np.ndarray  # (2^P0, width) float32: kept columns of row 0 per variant
    variant_of: np.ndarray  # (2^G,) int64: coalition -> its row-0 variant
    rows_on: np.ndarray  # (2^G, rows - 1) bool: coalition -> which history rows it keeps


def row_plan(masks: np.ndarray) -> RowPlan | None:
    """The structured plan for these players, or None when some player mixes rows."""
    g, rows, width = masks.shape
    row0 = [i for i in range(g) if not masks[i, 1:].any()]
    hist = [i for i in range(g) if i not in row0]
    for i in hist:
        full = masks[i].all(1)
        if masks[i, 0].any() or not np.array_equal(full, masks[i].any(1)):
            return None
    c = coalitions(g)
    sub = coalitions(len(row0))  # variants of row 0
    variant_cols = (sub[:, :, None] & masks[row0][None, :, 0, :]).any(1).astype(np.float32)
    variant_of = (c[:, row0] * (1 << np.arange(len(row0)))[None, :]).sum(1)
    rows_on = np.zeros((2**g, rows - 1), bool)
    for i in hist:
        rows_on |= c[:, i : i + 1] & masks[i, 1:].any(1)[None, :]
    return RowPlan(variant_cols, variant_of.astype(np.int64), rows_on)


LOG_ZERO = -1.0e4  # log-probability of a class a refinement ruled out (exp: 0)


@dataclass
class Explanation:
    """Shapley values of a batch; ``values[n, g]`` for the explained class ``target[n]``."""

    names: list[str]
    values: np.ndarray  # (n, G) float64
    target: np.ndarray  # (n,) int: the explained class (the prediction by default)
    log_probs: np.ndarray  # (n, C) calibrated log-probabilities of the full input
    base: np.ndarray  # (C,) calibrated log-probabilities of the all-zero (empty) input
    coalition_values: np.ndarray | None = None  # (n, 2^G) of the target, when asked for
    all_values: np.ndarray | None = None  # (n, G, C): every class's values, when asked for

    def restricted(self, allowed: np.ndarray) -> Explanation:
        """The explanation with each label's classes limited to ``allowed`` (n, C): the
        calibrated log-probabilities renormalised over them (the others ~ -inf), the target
        the most probable of them, its values those of that class (computed for all classes:
        ``all_values`` must be present)."""
        allowed = np.asarray(allowed, bool)
        lp = np.where(allowed, self.log_probs, -np.inf)
        top = lp.max(axis=1, keepdims=True)
        lp = lp - (top + np.log(np.exp(lp - top).sum(axis=1, keepdims=True)))
        lp = np.where(allowed, lp, LOG_ZERO)
        target = lp.argmax(axis=1)
        values = self.all_values[np.arange(len(target)), :, target]
        return replace(self, log_probs=lp, target=target, values=values, coalition_values=None)

    def top_groups(self, k: int = 3, digits: int = 2) -> list[list[str]]:
        """Per label, the ``k`` groups of largest |value|, as ``"name=value"`` strings."""
        order = np.argsort(-np.abs(self.values), axis=1, kind="stable")[:, :k]
        return [
            [f"{self.names[j]}={self.values[i, j]:.{digits}f}" for j in row]
            for i, row in enumerate(order)
        ]


class GroupShapley:
    """Exact group Shapley values of a classifier's calibrated log-probability.

    ``forward`` maps a float32 batch ``(n, rows, width)`` to logits ``(n, C)``; it is called
    under ``torch.inference_mode`` on chunks of at most ``chunk`` matrices.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        names: list[str],
        masks: np.ndarray,
        temperature: float = 1.0,
        chunk: int = 4096,
        value: str = "log_prob",
        structured: bool | None = None,
    ):
        g = len(names)
        if value not in ("log_prob", "logit"):
            raise ValueError(f"shapley: value must be log_prob or logit, not {value!r}")
        self.value = value
        if masks.shape[0] != g:
            raise ValueError(f"shapley: {g} names but {masks.shape[0]} masks")
        if g > MAX_PLAYERS:
            raise ValueError(
                f"shapley: {g} players is too many for exact values (max {MAX_PLAYERS})"
            )
        if not temperature > 0:
            raise ValueError(f"shapley: temperature must be positive, not {temperature!r}")
        self.forward, self.names, self.temperature, self.chunk = forward, names, temperature, chunk
        c = coalitions(g)
        # cell mask of every non-empty coalition: (2^G - 1, rows, width)
        cm = (c[1:, :, None, None] & masks[None]).any(1)
        self._cmask = torch.from_numpy(cm.astype(np.float32))
        self._A = torch.from_numpy(shapley_matrix(g))  # float64
        self._base: torch.Tensor | None = None
        can = hasattr(forward, "flow") and hasattr(forward, "sequence_head")
        plan = row_plan(masks) if can and structured is not False else None
        if structured and plan is None:
            raise ValueError(
                "shapley: the structured pass needs a model with flow and "
                "sequence_head, and players that are row-0 columns or whole rows"
            )
        self._plan = plan
        if plan is not None:
            self._vcols = torch.from_numpy(plan.variant_cols)
            self._vof = torch.from_numpy(plan.variant_of[1:])
            self._rows_on = torch.from_numpy(plan.rows_on[1:])
        params = getattr(forward, "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        self.device = first.device if first is not None else torch.device("cpu")
        if self.device.type != "cpu":
            for name in ("_cmask", "_vcols", "_vof", "_rows_on"):
                if hasattr(self, name):
                    setattr(self, name, getattr(self, name).to(self.device))

    @property
    def structured(self) -> bool:
        return self._plan is not None

    @classmethod
    def for_layout(
        cls,
        forward: Callable[[torch.Tensor], torch.Tensor],
        layout: MatrixLayout,
        history: str = "one",
        temperature: float = 1.0,
        chunk: int = 4096,
        structured: bool | None = None,
    ) -> GroupShapley:
        names, masks = feature_groups(layout, history)
        return cls(forward, names, masks, temperature, chunk, structured=structured)

    @property
    def n_players(self) -> int:
        return len(self.names)

    @property
    def n_coalitions(self) -> int:
        return 2 ** len(self.names)

    def _value(self, logits: torch.Tensor) -> torch.Tensor:
        z = logits.float() / self.temperature
        return z if self.value == "logit" else torch.log_softmax(z, dim=-1)

    def _logp(self, x: torch.Tensor) -> torch.Tensor:
        """The game's value for every class: calibrated log-probabilities (or logits)."""
        out = [
            self._value(self.forward(x[i : i + self.chunk])) for i in range(0, len(x), self.chunk)
        ]
        return torch.cat(out) if out else torch.zeros(0)

    def _coalition_values(self, xb: torch.Tensor) -> torch.Tensor:
        """Values of the non-empty coalitions: ``(len(xb), 2^G - 1, C)``."""
        b, rows, width = xb.shape
        k = self._cmask.shape[0]
        if self._plan is None:
            masked = (xb[:, None] * self._cmask[None]).reshape(-1, rows, width)
            return self._logp(masked).reshape(b, k, -1)
        model = self.forward
        v0 = xb[:, 0, None, :] * self._vcols[None]  # (b, V0, W): row-0 variants
        enc0 = model.flow(v0.reshape(-1, width)).view(b, v0.shape[1], -1)
        d = enc0.shape[-1]
        h = torch.empty((b, k, rows, d), device=xb.device)
        mask = torch.empty((b, k, rows), device=xb.device)
        h[:, :, 0] = enc0[:, self._vof]
        mask[:, :, 0] = (v0 != 0).any(-1).to(mask.dtype)[:, self._vof]
        if rows > 1:
            hist = xb[:, 1:]
            h[:, :, 1:] = model.flow(hist.reshape(-1, width)).view(b, 1, rows - 1, d)
            mask[:, :, 1:] = ((hist != 0).any(-1)[:, None, :] & self._rows_on[None]).to(mask.dtype)
        logits = model.sequence_head(h.view(b * k, rows, d), mask.view(b * k, 1, rows))
        return self._value(logits).reshape(b, k, -1)

    def base(self, shape: tuple[int, int]) -> torch.Tensor:
        """Log-probabilities of the empty coalition (the all-zero matrix); cached."""
        if self._base is None:
            with torch.inference_mode():
                self._base = self._logp(torch.zeros((1, *shape), device=self.device))[0].cpu()
        return self._base

    def explain(
        self,
        x: np.ndarray | torch.Tensor,
        target: np.ndarray | None = None,
        keep_coalitions: bool = False,
        all_classes: bool = False,
    ) -> Explanation:
        """Shapley values for every matrix of ``x`` (n, rows, width).

        ``target`` picks the explained class per matrix; by default the prediction. The full
        input's log-probabilities come with the result, so the caller needs no separate
        forward pass for the label itself. ``all_classes`` also returns every class's
        values (``Explanation.all_values``, (n, G, C)): the same coalitions, no extra pass.
        """
        x = torch.as_tensor(x, dtype=torch.float32)
        if x.ndim != 3 or tuple(x.shape[1:]) != tuple(self._cmask.shape[1:]):
            raise ValueError(
                f"shapley: expected matrices of shape (n, "
                f"{tuple(self._cmask.shape[1:])}), got {tuple(x.shape)}"
            )
        n, k = len(x), self._cmask.shape[0]
        base = self.base(tuple(x.shape[1:]))
        c_dim = base.shape[0]
        vals = torch.empty((n, k + 1), dtype=torch.float64)
        full = torch.empty((n, c_dim))
        given = target is not None
        tgt = (
            torch.as_tensor(np.asarray(target), dtype=torch.long)
            if given
            else torch.empty(n, dtype=torch.long)
        )
        per = max(1, self.chunk // k)  # matrices per forward chunk
        every = torch.empty((n, len(self.names), c_dim)) if all_classes else None
        a32 = self._A.float()
        with torch.inference_mode():
            for i in range(0, n, per):
                xb = x[i : i + per].to(self.device)
                sl = slice(i, i + len(xb))
                lp = self._coalition_values(xb).cpu()
                full[sl] = lp[:, -1]
                if not given:
                    tgt[sl] = lp[:, -1].argmax(-1)
                t = tgt[sl]
                vals[sl, 1:] = lp.gather(2, t[:, None, None].expand(-1, k, 1))[..., 0].double()
                vals[sl, 0] = base[t].double()
                if every is not None:
                    every[sl] = (
                        torch.einsum("nkc,kg->ngc", lp, a32[1:]) + torch.outer(a32[0], base)[None]
                    )
        phi = (vals @ self._A).numpy()
        return Explanation(
            names=list(self.names),
            values=phi,
            target=tgt.numpy(),
            log_probs=full.numpy(),
            base=base.numpy(),
            coalition_values=vals.numpy() if keep_coalitions else None,
            all_values=every.numpy() if every is not None else None,
        )


def group_names(layout: MatrixLayout, history: str = "one") -> list[str]:
    return feature_groups(layout, history)[0]


__all__ = [
    "GROUPS",
    "HISTORY_MODES",
    "Explanation",
    "GroupShapley",
    "coalitions",
    "feature_groups",
    "group_names",
    "shapley_matrix",
]
