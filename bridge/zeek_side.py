"""The serve process's link to Zeek: flow events in, label events out, the offline drain.

Built on :class:`~iotcls.bridge.zeek_ws.ZeekClient` (connection, handshake, reconnects,
lenient frame reading) and :mod:`iotcls.bridge.records` (the IoTClass event formats). What is
added here is what ``serve`` needs around them:

* flow events are decoded as they arrive and handed on in batches, one batch per turn of
  the event loop, so that matrix assembly and dispatch run vectorised;
* after each handshake the bridge says ``IoTClass::hello``; Zeek answers ``welcome`` with its
  capture settings, which are checked against the model's layout (a Zeek that records fewer
  packets or payload bytes than the model reads is reported once, loudly);
* labels go out through one sender task in order; its queue is bounded
  (``max_label_queue``), and a label dropped there is counted, never silent;
* offline, Zeek's ``IoTClass::drain(n)`` is answered with ``drained(records, labels)`` once
  every record received so far has its outcome and its label event has been sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Callable

from iotcls.config import ZeekConfig
from iotcls.layout import MatrixLayout
from iotcls.schema import FlowRecord

from . import records as rec
from .dispatch import Outcome
from .metrics import ServeMetrics
from .zeek_ws import ZeekClient

log = logging.getLogger("iotcls.bridge.zeek")

STRATEGY = "sequence"


class ZeekSide:
    def __init__(
        self,
        cfg: ZeekConfig,
        on_records: Callable[[list[FlowRecord]], None],
        metrics: ServeMetrics,
        layout: MatrixLayout | None = None,
        is_idle: Callable[[], bool] = lambda: True,
        max_label_queue: int = 200_000,
    ):
        self.cfg = cfg
        self.on_records = on_records
        self.metrics = metrics
        self.layout = layout
        self.is_idle = is_idle
        self.max_label_queue = max_label_queue
        self.client = ZeekClient(
            cfg.url, cfg.topics, on_message=self._on_message, on_connect=self._on_connect,
            reconnect_max_s=cfg.reconnect_max_s,
        )  # fmt: skip
        self.flow_events = 0  # IoTClass::flow events received (decodable or not)
        self.welcome: rec.Welcome | None = None
        self._batch: list[FlowRecord] = []
        self._flush_scheduled = False
        self._paused = False
        self._out: deque[bytes] = deque()
        self._out_ready = asyncio.Event()
        self._sending = False
        self._sender: asyncio.Task | None = None
        self._drains: list[asyncio.Task] = []
        self._last_warn: dict[str, float] = {}

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self) -> None:
        self._sender = asyncio.create_task(self._send_loop(), name="zeek-labels")
        await self.client.run()

    def pause(self) -> None:
        """Stop taking flow records (shutdown); what arrives later is counted as shed."""
        self._paused = True

    async def flush(self, timeout: float = 10.0) -> None:
        """Waits until every queued label event has been handed to the connection."""
        deadline = time.monotonic() + timeout
        while (self._out or self._sending) and time.monotonic() < deadline:
            if not self.client.connected.is_set():
                break  # ZeekClient buffers what we hand it while disconnected
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        for t in self._drains:
            t.cancel()
        self.client.stop()
        if self._sender:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)

    # -- in -------------------------------------------------------------------------------
    def _warn(self, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_warn.get(kind, -1e9) >= 10.0:
            self._last_warn[kind] = now
            log.warning(msg, *args)

    def _on_message(self, obj: Any) -> None:
        name = rec.event_name(obj)
        if name == rec.FLOW_EVENT:
            self.flow_events += 1
            try:
                r = rec.flow_record(obj)
            except rec.RecordError as e:
                n = self.metrics.add_rejected("websocket", "bad_flow_record")
                self._warn("bad", "rejected a flow event from Zeek (%d so far): %s", n, e)
                return
            if self._paused:
                self.metrics.records_in += 1
                self.metrics.add_shed("shutdown")
                return
            self._batch.append(r)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_records)
            return
        if name in (rec.WELCOME_EVENT, rec.DRAIN_EVENT):
            self._on_control(obj)
            return
        n = self.metrics.add_rejected("websocket", "unexpected_event")
        self._warn("unexpected", "ignored a message from Zeek that is not an iotcls event "
                   "(%d so far): %s", n, name or "not an event")  # fmt: skip

    def _flush_records(self) -> None:
        self._flush_scheduled = False
        batch, self._batch = self._batch, []
        if batch:
            self.on_records(batch)

    def _on_control(self, obj: Any) -> None:
        ev = rec.control_event(obj)
        try:
            if ev is None:
                raise rec.RecordError("undecodable control event")
            if ev.name == rec.WELCOME_EVENT:
                self.welcome = rec.welcome_from(ev)
                self._check_welcome(self.welcome)
            else:
                n = rec.drain_from(ev)
                log.info("Zeek says its trace ended after %d flow records; draining", n)
                self._drains.append(asyncio.create_task(self._answer_drain()))
        except rec.RecordError as e:
            n = self.metrics.add_rejected("websocket", "bad_control_event")
            self._warn("badctl", "rejected a control event from Zeek (%d so far): %s", n, e)

    def _check_welcome(self, w: rec.Welcome) -> None:
        log.info("Zeek node %s: schema %d, %g s windows, %d packets, %d payload bytes%s",
                 w.node, w.schema_version, w.window_s, w.packets, w.payload_bytes,
                 ", reading a trace" if w.offline else "")  # fmt: skip
        lay = self.layout
        if lay is None:
            return
        problems = []
        if w.packets < lay.packets:
            problems.append(f"Zeek records {w.packets} packets per flow, the model reads {lay.packets}")
        if w.payload_bytes < lay.required_payload_bytes():
            problems.append(f"Zeek keeps {w.payload_bytes} payload bytes per packet, the model "
                            f"reads {lay.required_payload_bytes()}")  # fmt: skip
        if abs(w.window_s - lay.window_s) > 1e-9:
            problems.append(f"Zeek's windows are {w.window_s:g} s, the model's {lay.window_s:g} s")
        for p in problems:
            log.error("Zeek's capture settings do not fit the model: %s; labels will be poor "
                      "(set IoTClass options to match the model)", p)  # fmt: skip

    async def _on_connect(self, ack: Any) -> None:
        await self.client.send(rec.hello_message(self.cfg.label_topic, "iotcls-serve", ack.endpoint))

    async def _answer_drain(self) -> None:
        while not (self.is_idle() and not self._batch and not self._out and not self._sending):
            await asyncio.sleep(0.01)
        m = self.metrics
        await self.client.send(rec.drained_message(self.cfg.label_topic, self.flow_events, m.labels_sent))
        log.info("told Zeek: %d flow records received, %d labels sent", self.flow_events, m.labels_sent)

    # -- out ------------------------------------------------------------------------------
    def send_labels(self, outcomes: list[Outcome]) -> None:
        """Queues the label events of labelled outcomes that the log policy lets through."""
        topic = self.cfg.label_topic
        for o in outcomes:
            record, n_flows = o.ctx
            verdict = rec.Verdict(
                label=o.label, confidence=o.confidence, strategy=STRATEGY, n_flows=n_flows,
                trusted=o.trusted, reason=o.reason, top_groups=o.top_groups, model=o.model,
            )  # fmt: skip
            try:
                frame = rec.label_message(topic, rec.log_entry(record, verdict))
            except rec.RecordError as e:
                self.metrics.add_rejected("websocket", "unencodable_label")
                self._warn("enc", "could not encode a label: %s", e)
                continue
            if len(self._out) >= self.max_label_queue:
                self._out.popleft()
                self.metrics.labels_dropped += 1
                self._warn("outq", "label queue to Zeek full (%d): dropped the oldest label",
                           self.max_label_queue)  # fmt: skip
            self._out.append(frame)
        if self._out:
            self._out_ready.set()

    async def _send_loop(self) -> None:
        while True:
            await self._out_ready.wait()
            self._out_ready.clear()
            while self._out:
                self._sending = True
                frame = self._out.popleft()
                try:
                    await self.client.send(frame)
                finally:
                    self._sending = False
