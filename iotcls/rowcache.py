"""A scorer-side cache of each flow's packet features, so a flow is encoded once, not six times.

A device's flow enters its matrices as the current row, then moves down the history of its
next ``history`` matrices. Every time, the CNN's intra-flow stage re-reads its packets and
payload: about nine tenths of the model's work (:meth:`FlowEncoder.packet_features`), for a
row that has not changed except for ``rel_time`` (its age relative to the current flow),
which only the cheap metadata part reads. Streaming scoring therefore caches those features
by the row's content without ``rel_time``: in steady state five of a matrix's six rows are
hits and the forward pass costs about a fifth.

Keys are two independent 64-bit multiply-add hashes of the row's bytes (columns 1..W), so a
wrong hit needs a 128-bit collision. Entries live in a fixed ring of ``capacity`` slots
(first in, first out): a row is needed again within the device's next few flows, so
recency of insertion is what matters, and memory is bounded at ``capacity`` x features x 4
bytes (50,000 x 128 x 4 = 25 MB with the default model).

Results equal the plain forward pass up to float rounding (the same operations on the same
rows, in differently sized batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .model import IoTCNN


@dataclass
class CacheStats:
    rows: int = 0  # present rows looked up
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.rows if self.rows else 0.0


class RowCache:
    def __init__(self, model: IoTCNN, capacity: int = 50_000, seed: int = 0x10C15):
        if capacity < 1:
            raise ValueError(f"row cache: capacity must be at least 1, not {capacity}")
        self.model, self.capacity = model, capacity
        w = model.cfg.width
        words = (4 * (w - 1) + 7) // 8  # the row's bytes past rel_time, as uint64 words
        rng = np.random.default_rng(seed)
        self._mult = rng.integers(1, 2**63, size=(2, words), dtype=np.uint64) | np.uint64(1)
        self._pad = 8 * words - 4 * (w - 1)
        self._slot: dict[tuple[int, int], int] = {}
        self._keys: list[tuple[int, int] | None] = [None] * capacity
        self._feats: torch.Tensor | None = None  # (capacity, F), allocated on first use
        self._next = 0
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._slot)

    def clear(self) -> None:
        """Forget every row (the features' memory is kept for reuse)."""
        self._slot.clear()
        self._keys = [None] * self.capacity
        self._next = 0
        self.stats = CacheStats()

    def _hashes(self, rows: np.ndarray) -> list[tuple[int, int]]:
        body = np.ascontiguousarray(rows[:, 1:], dtype=np.float32).view(np.uint8)
        if self._pad:
            body = np.concatenate([body, np.zeros((len(body), self._pad), np.uint8)], axis=1)
        words = np.ascontiguousarray(body).view(np.uint64)
        with np.errstate(over="ignore"):
            h = words @ self._mult.T  # (n, 2), arithmetic mod 2**64
        return list(zip(h[:, 0].tolist(), h[:, 1].tolist()))

    def features(self, rows: np.ndarray) -> torch.Tensor:
        """Packet features of ``rows`` (n, W), each distinct row computed at most once while
        cached (a device's flow is often the current row and a history row in one batch)."""
        keys = self._hashes(rows)
        slot = self._slot
        src = np.empty(len(rows), np.int64)  # >= 0: cache slot; < 0: -1 - index into fresh
        fresh_keys: dict[tuple[int, int], int] = {}
        first: list[int] = []  # row index of each fresh key
        for i, k in enumerate(keys):
            s = slot.get(k)
            if s is None:
                j = fresh_keys.get(k)
                if j is None:
                    j = fresh_keys[k] = len(first)
                    first.append(i)
                s = -1 - j
            src[i] = s
        self.stats.rows += len(rows)
        self.stats.hits += len(rows) - len(first)
        fresh = None
        if first:
            fresh = self.model.flow.packet_features(torch.from_numpy(rows[first]))
            if self._feats is None:
                self._feats = torch.empty((self.capacity, fresh.shape[1]), dtype=fresh.dtype)
        assert self._feats is not None
        out = torch.empty((len(rows), self._feats.shape[1]), dtype=self._feats.dtype)
        cached = np.flatnonzero(src >= 0)
        if len(cached):
            out[cached] = self._feats[src[cached]]
        if fresh is not None:
            new = np.flatnonzero(src < 0)
            out[new] = fresh[-1 - src[new]]
            self._store(list(fresh_keys), fresh)
        return out

    def _store(self, keys: list[tuple[int, int]], feats: torch.Tensor) -> None:
        assert self._feats is not None
        skip = max(0, len(keys) - self.capacity)  # more new rows than slots: keep the last
        slots = []
        for k in keys[skip:]:
            s = self._next
            old = self._keys[s]
            if old is not None:
                del self._slot[old]
            self._keys[s], self._slot[k] = k, s
            slots.append(s)
            self._next = (s + 1) % self.capacity
        if slots:
            self._feats[slots] = feats[skip:]

    @torch.inference_mode()
    def logits(self, x: np.ndarray) -> torch.Tensor:
        """The model's logits for matrices ``x`` (B, R, W), through the cache. Absent (all-zero)
        rows are not encoded: the inter-flow stage masks them out."""
        b, r, w = x.shape
        rows = x.reshape(b * r, w)
        present = np.flatnonzero(rows.any(axis=1))
        model = self.model
        vecs = torch.zeros((b * r, model.cfg.row_dim), dtype=torch.float32)
        if len(present):
            sel = rows[present]
            vecs[present] = model.flow.combine(torch.from_numpy(sel), self.features(sel))
        mask = torch.zeros(b * r, dtype=torch.float32)
        mask[present] = 1.0
        return model.sequence_head(vecs.view(b, r, -1), mask.view(b, 1, r))
