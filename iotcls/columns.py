"""Dataclasses of per-row columns that narrow together: the hot paths (:mod:`iotcls.pcap`,
:mod:`iotcls.flows`) hand each phase's arrays to the next as one of these, not as a dozen
parallel arguments."""

from __future__ import annotations

from dataclasses import fields

import numpy as np


class Columns:
    """Mixin for a dataclass whose array fields hold one entry per row: :meth:`take` narrows
    every array field (and every nested :class:`Columns`) to the rows ``idx``; other fields
    (flags, counts) stay as they are."""

    def take(self, idx: np.ndarray):
        kw = {}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                v = v[idx]
            elif isinstance(v, Columns):
                v = v.take(idx)
            kw[f.name] = v
        return type(self)(**kw)
