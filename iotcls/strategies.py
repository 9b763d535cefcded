"""The three inference strategies: which evidence a label rests on (docs/strategies.md).

* ``flow``: the current flow alone. The model sees only row 0 of the matrix (the same as the
  matrix with its history rows zeroed, at a sixth of the cost).
* ``sequence``: the paper's matrix, the current flow and up to ``history`` previous flows of
  the same device. A device's first flows have fewer history rows; they are labelled anyway.
* ``device``: a confidence-weighted (soft) vote over the device's most recent ``window``
  sequences in the same capture (or sensor session): each sequence votes for every class with
  its calibrated probability, so a sequence torn between two classes moves neither much and
  a confident one decides. A label is emitted once at least ``min_votes`` sequences voted.
  Where enough of the window's labels are trusted, the device label is their vote instead
  (:func:`device_labels`; docs/trust.md), and trusted.

Every strategy emits at most one label per flow, at the time the flow's record is complete.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STRATEGIES = ("flow", "sequence", "device")


@dataclass(frozen=True)
class VoteConfig:
    window: int = 30  # the device's most recent sequences that vote
    min_votes: int = 3  # no device label before this many sequences


def strategy_input(matrices: np.ndarray, strategy: str) -> np.ndarray:
    """The part of the matrices the model reads for ``strategy``."""
    if strategy == "flow":
        return matrices[:, :1]
    if strategy in ("sequence", "device"):
        return matrices
    raise ValueError(f"unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)})")


@dataclass
class Vote:
    index: np.ndarray  # (n,) int64 class voted after this sequence, -1 before min_votes
    confidence: np.ndarray  # (n,) mean calibrated probability of that class over the voters
    n_votes: np.ndarray  # (n,) how many sequences voted

    @property
    def emitted(self) -> np.ndarray:
        return self.index >= 0


def device_vote(
    probs: np.ndarray,
    groups: np.ndarray,
    times: np.ndarray,
    cfg: VoteConfig = VoteConfig(),
) -> Vote:
    """The device label after each sequence: the class with the largest summed calibrated
    probability over the group's last ``cfg.window`` sequences (by time, the current one
    included); its confidence is that sum over the number of voters.

    ``groups`` identifies the device (and capture); entries are in any order.
    """
    n, c = probs.shape
    if n == 0:
        return Vote(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))
    order = np.lexsort((np.arange(n), times, groups))
    p = probs[order].astype(np.float64)
    g = groups[order]
    first = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]  # first entry of each group
    start = np.repeat(first, np.diff(np.r_[first, n]))
    lo = np.maximum(start, np.arange(n) - cfg.window + 1)  # the window's first entry
    cs = np.vstack([np.zeros((1, c)), np.cumsum(p, axis=0)])
    votes = cs[np.arange(n) + 1] - cs[lo]  # summed probabilities over the window
    n_votes = np.arange(n) - lo + 1
    winner = votes.argmax(axis=1)
    conf = votes[np.arange(n), winner] / n_votes
    winner = np.where(n_votes >= cfg.min_votes, winner, -1)
    out = Vote(np.empty(n, np.int64), np.empty(n, np.float32), np.empty(n, np.int64))
    out.index[order], out.confidence[order], out.n_votes[order] = winner, conf, n_votes
    return out


@dataclass
class DeviceLabels:
    """The ``device`` strategy's label after each sequence (``emitted``: one is given)."""

    index: np.ndarray  # (n,) int64 class, -1 before min_votes
    confidence: np.ndarray  # (n,) float64
    trusted: np.ndarray  # (n,) bool: the trusted labels' vote, else the vote of all, untrusted
    n_votes: np.ndarray  # (n,) int64 sequences in the window
    emitted: np.ndarray  # (n,) bool


def device_labels(
    probs: np.ndarray,
    index: np.ndarray,
    confidence: np.ndarray,
    trusted: np.ndarray,
    groups: np.ndarray,
    times: np.ndarray,
    cfg: VoteConfig = VoteConfig(),
) -> DeviceLabels:
    """The device label after each sequence, from the sequences' labels (``index``,
    ``confidence``, ``trusted``) and calibrated ``probs``: the vote of the window's trusted
    labels (:func:`~iotcls.trust.decision.windowed_trusted_vote`, with its confidence), and
    where too few are trusted the soft vote of all of them (:func:`device_vote`), untrusted.
    ``groups`` and ``times`` as for :func:`device_vote`."""
    # here, not at the top: the command line imports STRATEGIES, and trust.decision brings torch
    from .trust.decision import windowed_trusted_vote

    v = device_vote(probs, groups, times, cfg)
    tv, _, tconf = windowed_trusted_vote(
        index,
        confidence,
        trusted,
        groups,
        times,
        probs.shape[1],
        cfg.window,
        cfg.min_votes,
        with_confidence=True,
    )
    ok = tv >= 0
    return DeviceLabels(
        np.where(ok, tv, v.index), np.where(ok, tconf, v.confidence), ok, v.n_votes, v.emitted
    )
