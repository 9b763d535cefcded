"""The :class:`~iotcls.bridge.core.Bridge` that ``iotcls serve`` runs, for Zeek's records and
(as :class:`~iotcls.bridge.suricata.SuricataBridge`) for Suricata's: both modules import it
from here, and neither imports the other's module for it."""

from __future__ import annotations

from typing import Any

from .core import SHED_PAUSED, Bridge
from .dispatch import SHED_LABEL_BACKLOG, SHED_SHUTDOWN
from .metrics import ServeMetrics


class ServeBridge(Bridge):
    """The :class:`Bridge` of ``iotcls serve``: batches are scored concurrently (the base
    class's ``max_inflight``, so every scorer is kept busy) and the intake is bounded
    (``max_live_records``); records refused at the door are counted in the serve metrics
    as shed, ``label_backlog`` (labels are made faster than Zeek takes them: the
    dispatcher's queue bounds the rest) or ``shutdown`` (after :meth:`pause`)."""

    def __init__(self, *args: Any, metrics: ServeMetrics, max_live_records: int, **kw: Any):
        # batches hold at least one record each, so the intake bound bounds them too: a batch
        # never waits for a slot, it reaches the dispatcher (and its metrics) at once
        kw.setdefault("max_inflight", max_live_records + 1)
        super().__init__(*args, max_live_records=max_live_records, on_shed=self._count_shed, **kw)
        self.metrics = metrics

    def _count_shed(self, reason: str) -> None:
        self.metrics.records_in += 1
        self.metrics.add_shed(SHED_SHUTDOWN if reason == SHED_PAUSED else SHED_LABEL_BACKLOG)

    async def hand_over(self, timeout: float) -> None:
        """Shutdown: moves every record the Bridge still holds on to the dispatcher."""
        await self.flush(timeout)
