"""The bridge core: flow records from Zeek in, matrices to a scorer, label events back.

Matrices are assembled exactly as on the pcap path: :meth:`FlowTable.from_records`, then
:meth:`MatrixLayout.encode_rows`, then :class:`SequenceAssembler` (the online twin of
:meth:`MatrixLayout.assemble`). Live, records are assembled in arrival order (each batch sorted
by window start), so a record's history is what the bridge has seen so far. Offline (Zeek
says so in ``IoTClass::welcome``), records are held until ``IoTClass::drain`` and fed in
start order, which gives exactly the matrices ``iotcls classify`` computes from the same
capture.

Scoring is pluggable: a *scorer* is any callable ``scorer(matrices, table) -> verdicts`` with
one verdict (a :class:`~iotcls.bridge.records.Verdict` or None for "no label") per matrix,
sync (run in a worker thread, so the WebSocket keeps answering Zeek's pings) or async (awaited:
``iotcls serve`` puts its ZeroMQ scorer pool behind one).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import numpy as np

from iotcls.flowtable import FlowTable
from iotcls.layout import MatrixLayout, SequenceAssembler
from iotcls.schema import SCHEMA_VERSION, FlowRecord

from . import broker_json as bj
from . import flowbatch as fb
from . import records as rc

if TYPE_CHECKING:
    from .zeek_ws import ZeekClient

log = logging.getLogger("iotcls.bridge")

Scorer = Callable[[np.ndarray, FlowTable], "Sequence[Any] | Awaitable[Sequence[Any]]"]
Send = Callable[[bytes], Awaitable[Any]]


class FlowAssembler:
    """Records to matrices with the pcap path's code; keeps each device's history."""

    def __init__(self, layout: MatrixLayout, max_devices: int = 100_000):
        self.layout = layout
        self.payload_bytes = layout.required_payload_bytes()
        self.seq = SequenceAssembler(layout, max_devices=max_devices)

    def table(self, records: list[FlowRecord]) -> FlowTable:
        return FlowTable.from_records(records, self.layout.packets, self.payload_bytes)

    def assemble(self, records: list[FlowRecord]) -> tuple[np.ndarray, FlowTable]:
        """Matrices for *records*, in the given order (feed them in start order)."""
        return self.assemble_table(self.table(records))

    def decode(self, items: Sequence[Any]) -> fb.Decoded:
        """FlowRecords and :class:`~iotcls.bridge.flowbatch.RawFlow` frames to one table."""
        return fb.decode_batch(items, self.layout.packets, self.payload_bytes)

    def assemble_table(self, t: FlowTable) -> tuple[np.ndarray, FlowTable]:
        """Matrices for the rows of *t*, in row order."""
        rows = self.layout.encode_rows(t)
        mats = self.seq.add(rows, t.start, list(t.device_keys()))
        return mats, t


@dataclass
class BridgeStats:
    records: int = 0  # flow records decoded
    bad_records: int = 0  # IoTClass::flow events that could not be decoded
    other_events: int = 0  # events the bridge does not handle
    scored: int = 0  # records a scorer returned verdicts for
    labels: int = 0  # label events sent
    unlabelled: int = 0  # records without a label (verdict None, scorer failure)
    scorer_failures: int = 0
    label_errors: int = 0  # verdicts that could not become a label event
    drains: int = 0


class _Drain:
    __slots__ = ("records",)

    def __init__(self, records: int):
        self.records = records


class Bridge:
    """Connects a :class:`~iotcls.bridge.zeek_ws.ZeekClient` (or any transport calling
    :meth:`on_message` / :meth:`on_connect` and offering an async ``send(bytes)``) to a
    scorer. Run :meth:`run` as a task next to the client."""

    def __init__(
        self,
        layout: MatrixLayout,
        scorer: Scorer,
        send: Send | None = None,
        *,
        labels_topic: str = "zeek/iotcls/labels",
        name: str = "iotcls-bridge",
        batch_size: int = 256,
        max_delay_s: float = 0.02,
        max_devices: int = 100_000,
        offline: bool | None = None,
    ):
        self.layout, self.scorer, self.send = layout, scorer, send
        self.labels_topic, self.name = labels_topic, name
        self.batch_size, self.max_delay_s = batch_size, max_delay_s
        self.assembler = FlowAssembler(layout, max_devices)
        self.offline_forced = offline
        self.offline = bool(offline)
        self.welcome: rc.Welcome | None = None
        self.stats = BridgeStats()
        self.session_records = 0  # since the last hello: what IoTClass::drained reports
        self.session_labels = 0
        self._queue: asyncio.Queue = asyncio.Queue()
        self._held: list[FlowRecord] = []
        self._warned: set[str] = set()
        self.idle = asyncio.Event()
        self.idle.set()

    # -- transport callbacks ----------------------------------------------------------------
    async def on_connect(self, ack: bj.Ack) -> None:
        self.session_records = self.session_labels = 0
        await self._send(rc.hello_message(self.labels_topic, self.name, ack.endpoint))

    def on_raw(self, raw: bytes) -> bool:
        """The fast path: a frame in the plain ``IoTClass::flow`` shape is queued as it is
        and decoded with its batch (True: consumed); others are parsed as JSON."""
        item = fb.match_flow(raw)
        if item is None:
            return False
        self._add(item)
        return True

    def _add(self, rec: FlowRecord | fb.RawFlow) -> None:
        self.stats.records += 1
        self.session_records += 1
        self.idle.clear()
        self._queue.put_nowait(rec)

    def on_message(self, obj: Any) -> None:
        name = rc.event_name(obj)
        if name == rc.FLOW_EVENT:
            try:
                rec = rc.flow_record(obj)
            except rc.RecordError as e:
                self.stats.bad_records += 1
                self._warn_once("bad", f"skipped undecodable flow records, first: {e}")
                return
            self._add(rec)
        elif name in (rc.WELCOME_EVENT, rc.DRAIN_EVENT):
            ev = rc.control_event(obj)
            try:
                if ev is not None and name == rc.WELCOME_EVENT:
                    self._on_welcome(rc.welcome_from(ev))
                elif ev is not None:
                    self.stats.drains += 1
                    self.idle.clear()
                    self._queue.put_nowait(_Drain(rc.drain_from(ev)))
            except rc.RecordError as e:
                self.stats.other_events += 1
                log.warning("%s", e)
        else:
            self.stats.other_events += 1
            self._warn_once(f"event-{name}", f"ignoring events {name!r} on the records topic")

    def _on_welcome(self, w: rc.Welcome) -> None:
        self.welcome = w
        if self.offline_forced is None:
            self.offline = w.offline
        log.info("Zeek node %s: window %.0f s, %d packets, %d payload bytes%s", w.node,
                 w.window_s, w.packets, w.payload_bytes, ", offline" if w.offline else "")  # fmt: skip
        lay = self.layout
        if w.schema_version != SCHEMA_VERSION:
            log.error("Zeek sends flow record schema %d, this bridge reads %d: upgrade the one "
                      "that is behind", w.schema_version, SCHEMA_VERSION)  # fmt: skip
        if w.packets < lay.packets:
            log.warning("the model reads %d packets per flow, Zeek records %d: set "
                        "IoTClass::packets=%d", lay.packets, w.packets, lay.packets)  # fmt: skip
        if w.payload_bytes < lay.required_payload_bytes():
            log.warning("the model reads %d payload bytes per packet, Zeek keeps %d: set "
                        "IoTClass::payload_bytes=%d", lay.required_payload_bytes(),
                        w.payload_bytes, lay.required_payload_bytes())  # fmt: skip
        if abs(w.window_s - lay.window_s) > 1e-9:
            log.warning("the model's windows are %.0f s, Zeek's %.0f s: set "
                        "IoTClass::window_length", lay.window_s, w.window_s)  # fmt: skip

    # -- processing -----------------------------------------------------------------------
    async def run(self) -> None:
        """Consume decoded records for ever (cancel the task to stop)."""
        while True:
            item = await self._queue.get()
            if isinstance(item, _Drain):
                await self._drain(item)
            elif self.offline:
                self._held.append(item)
            else:
                batch = [item]
                await self._fill(batch)
                await self.process(batch)
            if self._queue.empty():
                self.idle.set()

    async def _fill(self, batch: list) -> None:
        """Take what else is queued, waiting up to max_delay_s for a fuller batch."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay_s
        while len(batch) < self.batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), timeout=left)
                except asyncio.TimeoutError:
                    break
            if isinstance(item, _Drain):  # keep its place: records before it first
                await self.process(batch)
                batch.clear()
                await self._drain(item)
                return
            if self.offline:
                self._held.append(item)
            else:
                batch.append(item)

    async def _drain(self, d: _Drain) -> None:
        held, self._held = self._held, []
        held.sort(key=lambda r: r.start)  # stable: arrival order breaks ties
        for i in range(0, len(held), self.batch_size):
            await self.process(held[i : i + self.batch_size])
        if d.records != self.session_records:
            log.warning("Zeek published %d flow records, the bridge received %d", d.records,
                        self.session_records)  # fmt: skip
        await self._send(rc.drained_message(self.labels_topic, self.session_records,
                                            self.session_labels))  # fmt: skip
        log.info("drained: %d records, %d labels", self.session_records, self.session_labels)

    async def process(self, batch: list[FlowRecord | fb.RawFlow]) -> int:
        """Assemble, score and send labels for *batch*; returns the labels sent."""
        if not batch:
            return 0
        dec = self.assembler.decode(batch)
        if dec.errors:
            n_bad = len(dec.errors)
            self.stats.records -= n_bad
            self.session_records -= n_bad
            self.stats.bad_records += n_bad
            self._warn_once("bad", f"skipped undecodable flow records, first: {dec.errors[0][1]}")
        table = dec.table
        if not len(table):
            return 0
        order = np.argsort(table.start, kind="stable")  # start order; arrival breaks ties
        if np.any(order != np.arange(len(order))):
            table = table.take(order)
        mats, table = self.assembler.assemble_table(table)
        n = len(table)
        try:
            verdicts = await self._score(mats, table)
            if len(verdicts) != n:
                raise ValueError(f"{len(verdicts)} verdicts for {n} records")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.stats.scorer_failures += 1
            self.stats.unlabelled += n
            log.error("scorer failed on %d records: %s: %s", n, type(e).__name__, e)
            return 0
        self.stats.scored += n
        sent = 0
        for i, v in enumerate(verdicts):
            if v is None:
                self.stats.unlabelled += 1
                continue
            try:
                rec = fb.head_record(table, i)
                frame = rc.label_message(self.labels_topic, rc.log_entry(rec, v))
            except (rc.RecordError, bj.BrokerJSONError, ValueError, TypeError,
                    AttributeError) as e:  # fmt: skip
                self.stats.label_errors += 1
                self._warn_once("label", f"cannot send a label, first: {e}")
                continue
            await self._send(frame)
            sent += 1
        self.stats.labels += sent
        self.session_labels += sent
        return sent

    async def _score(self, mats: np.ndarray, table: FlowTable) -> Sequence[Any]:
        if inspect.iscoroutinefunction(self.scorer) or inspect.iscoroutinefunction(
            getattr(self.scorer, "__call__", None)
        ):
            return await self.scorer(mats, table)
        r = await asyncio.to_thread(self.scorer, mats, table)
        if inspect.isawaitable(r):
            r = await r
        return r

    async def _send(self, frame: bytes) -> None:
        if self.send is not None:
            await self.send(frame)

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", msg)


def attach(bridge: Bridge, url: str, topics: Sequence[str] = ("zeek/iotcls/flows",),
           **client_options: Any) -> "ZeekClient":  # fmt: skip
    """A :class:`~iotcls.bridge.zeek_ws.ZeekClient` wired to *bridge* (hello on connect,
    flow records via the raw fast path, labels sent through the client)."""
    from .zeek_ws import ZeekClient

    client = ZeekClient(url, list(topics), on_raw=bridge.on_raw, on_message=bridge.on_message,
                        on_connect=bridge.on_connect, **client_options)  # fmt: skip
    bridge.send = client.send
    return client


async def run(bridge: Bridge, client: "ZeekClient") -> None:
    """Run the client and the bridge until cancelled (or the client is stopped)."""
    task = asyncio.create_task(bridge.run(), name="iotcls-bridge")
    try:
        await client.run()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
