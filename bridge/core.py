"""The bridge core: flow records from Zeek in, matrices to a scorer, label events back.

Frames in the plain ``IoTClass::flow`` shape are queued undecoded and decoded a batch at a
time straight into a :class:`FlowTable` (:mod:`iotcls.bridge.flowbatch`, which equals the
generic codec followed by :meth:`FlowTable.from_records`). Matrices are then assembled exactly
as on the pcap path: :meth:`MatrixLayout.encode_rows`, then :class:`SequenceAssembler` (the
online twin of :meth:`MatrixLayout.assemble`). Live, records are assembled in arrival order
(each batch sorted by window start), so a record's history is what the bridge has seen so far.
Offline (Zeek says so in ``IoTClass::welcome``), records are held until ``IoTClass::drain``
and fed in start order, which gives exactly the matrices ``iotcls classify`` computes from
the same capture.

Scoring is pluggable: a *scorer* is any callable ``scorer(matrices, table) -> verdicts`` with
one verdict (a :class:`~iotcls.bridge.records.Verdict` or None for "no label") per matrix,
sync (run in a worker thread, so the WebSocket keeps answering Zeek's pings) or async (awaited:
``iotcls serve`` puts its ZeroMQ scorer pool behind one).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
SendMany = Callable[[list[bytes]], Awaitable[Any]]
Shed = Callable[[str], Any]

SHED_BACKLOG = "backlog"  # the intake bound was reached
SHED_PAUSED = "paused"  # taken after pause(): shutting down
# Outcomes whose records Zeek keeps (no ack, no shed sent): the bridge is stopping, and Zeek
# publishes them again to the next bridge that says hello (the dispatcher's "shutdown").
KEPT_BY_ZEEK = frozenset({"shutdown", SHED_PAUSED})


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
        mats, t, _ = self.assemble_finite(t)
        return mats, t

    def assemble_finite(self, t: FlowTable) -> tuple[np.ndarray, FlowTable, np.ndarray]:
        """Matrices for the rows of *t* whose encoded row is finite, the table of those rows,
        and the indices (into *t*) of the rows left out. Why: a row enters its device's
        history, so one non-finite row (a negative count, a negative offset) would make the
        next ``history`` matrices of that device non-finite too; it is refused here, before
        it joins the history, whatever the sensor's checks missed."""
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # judged below
            rows = self.layout.encode_rows(t)
        ok = np.isfinite(rows).all(axis=1)
        bad = np.flatnonzero(~ok)
        if len(bad):
            keep = np.flatnonzero(ok)
            t, rows = t.take(keep), rows[keep]
        mats = self.seq.add(rows, t.start, list(t.device_keys()))
        return mats, t, bad


@dataclass
class BridgeStats:
    records: int = 0  # flow records decoded
    bad_records: int = 0  # flow records (IoTClass::flow events, packed lines) not decodable
    other_events: int = 0  # events the bridge does not handle
    scored: int = 0  # records a scorer returned verdicts for
    labels: int = 0  # label events sent
    unlabelled: int = 0  # records without a label (verdict None, scorer failure)
    scorer_failures: int = 0
    label_errors: int = 0  # verdicts that could not become a label event
    drains: int = 0
    shed: int = 0  # records refused at the door (intake bound, paused)
    duplicates: int = 0  # records seen before (same uid, start and device): dropped
    early_records: int = 0  # early records decoded (schema.early_record; not in records)
    early_labels: int = 0  # their labels sent (IoTClass::early_label; not in labels)
    early_shed: int = 0  # early records dropped: too many waiting, or paused


class RecentKeys:
    """The last *capacity* record keys seen, to drop a record that arrives twice (Zeek
    publishes again what the bridge has not acknowledged when a bridge says hello), and
    whether the bridge is done with each (settled) or still has it (in flight)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._d: OrderedDict[Any, bool] = OrderedDict()  # key -> settled

    def __len__(self) -> int:
        return len(self._d)

    def admit(self, keys: Iterable[Any]) -> tuple[list[int], list[int]]:
        """``(fresh, settled)``: indices of the keys not seen before (nor earlier in *keys*),
        remembered as in flight; and of the duplicates of records already settled (those
        of records in flight are in neither: the first copy's outcome answers for them)."""
        fresh, settled = [], []
        d = self._d
        for i, k in enumerate(keys):
            st = d.get(k)
            if st is None:
                d[k] = False
                fresh.append(i)
            elif st:
                settled.append(i)
        while len(d) > self.capacity:
            d.popitem(last=False)
        return fresh, settled

    def fresh(self, keys: Iterable[Any]) -> list[int]:
        """Indices of the keys not seen before (nor earlier in *keys*); remembers them."""
        return self.admit(keys)[0]

    def settle(self, keys: Iterable[Any]) -> None:
        """The bridge is done with these records: a later copy is acknowledged at once."""
        d = self._d
        for k in keys:
            if k in d:
                d[k] = True

    def forget(self, keys: Iterable[Any]) -> None:
        """These records were not done (the scorer failed, shutdown): a later copy is new."""
        for k in keys:
            self._d.pop(k, None)


def _keys(table: FlowTable) -> list[int]:
    """The duplicate-detection key of each row: the hash of (uid, start, device), 64 bits,
    about 70 bytes a record kept (a clash among 100,000 keys is a one in a billion event,
    and costs one record)."""
    return list(
        map(hash, zip(table.uid.tolist(), table.start.tolist(), table.device_keys().tolist()))
    )


def _record_id(table: FlowTable, i: int) -> rc.RecordId:
    """How Zeek names row *i* (uid, device MAC, device IP, start)."""
    return (
        str(table.uid[i]),
        str(table.device_mac[i]),
        fb._ip_text(table.device_ip[i].tobytes()),
        float(table.start[i]),
    )


def _shed_reason(v: Any) -> str | None:
    """Why a verdict is no verdict: the record was shed (a dispatcher outcome), else None."""
    return None if v is None else getattr(v, "shed", None)


def _is_label(v: Any) -> bool:
    """Whether a verdict is a label to send: not None, not shed, not held back by the log
    policy (a dispatcher outcome's ``send``)."""
    return v is not None and getattr(v, "shed", None) is None and getattr(v, "send", True)


class _Acks:
    """What one batch tells Zeek besides its labels: the records the bridge is done with
    (``IoTClass::ack``) and those it shed, by reason (``IoTClass::shed``). Records shed
    because the bridge is stopping are not named: Zeek keeps them for the next bridge."""

    __slots__ = ("bridge", "done", "shed", "settled")

    def __init__(self, bridge: Bridge):
        self.bridge = bridge
        self.done: list[rc.RecordId] = []
        self.shed: dict[str, list[rc.RecordId]] = {}
        self.settled: list[FlowTable] = []  # tables whose keys become settled

    def done_table(self, t: FlowTable | None, settle: bool = False) -> None:
        if t is None or not len(t):
            return
        if self.bridge.acks:
            self.done += [_record_id(t, i) for i in range(len(t))]
        if settle and self.bridge.recent is not None:
            self.bridge.recent.settle(_keys(t))

    def done_row(self, t: FlowTable, i: int, key: Any) -> None:
        if self.bridge.acks:
            self.done.append(_record_id(t, i))
        if self.bridge.recent is not None:
            self.bridge.recent.settle((key,))

    def shed_row(self, t: FlowTable, i: int, key: Any, reason: str) -> None:
        b = self.bridge
        if b.recent is not None:  # never labelled: a copy (Zeek publishes it again) is scored
            b.recent.forget((key,))
        if b.acks and reason not in KEPT_BY_ZEEK:
            self.shed.setdefault(reason, []).append(_record_id(t, i))

    def shed_table(self, t: FlowTable, reason: str) -> None:
        if self.bridge.acks and len(t):
            self.shed.setdefault(reason, []).extend(_record_id(t, i) for i in range(len(t)))

    def frames(self) -> list[bytes]:
        topic = self.bridge.labels_topic
        out = [rc.ack_message(topic, self.done)] if self.done else []
        out += [rc.shed_message(topic, ids, reason) for reason, ids in self.shed.items()]
        return out


class _Drain:
    __slots__ = ("records",)

    def __init__(self, records: int):
        self.records = records


class _EarlyTick:
    """In the queue: early records are waiting (in ``Bridge._early``) to be scored."""

    __slots__ = ()


class Bridge:
    """Connects a :class:`~iotcls.bridge.zeek_ws.ZeekClient` (or any transport calling
    :meth:`on_message` / :meth:`on_connect` and offering an async ``send(bytes)``) to a
    scorer. Run :meth:`run` as a task next to the client.

    ``max_inflight`` batches are scored at once (1: each batch's labels are sent before the
    next batch is taken; more keeps several scorers busy). Matrices are assembled in arrival
    order either way: a batch is decoded and assembled before its first await, and batches
    start in order. ``max_live_records`` bounds the records decoded and not yet done (queued
    or in a batch being scored; the offline hold is not counted): beyond it, and after
    :meth:`pause`, records are refused, counted in ``stats.shed`` and reported to
    ``on_shed(reason)``. ``send_many`` (optional) sends a batch's label frames at once.

    Acknowledgements (once :meth:`on_connect` ran, that is, toward Zeek): with each batch's
    labels goes one ``IoTClass::ack`` naming every record of the batch the bridge is done
    with (labelled, label held back by the log policy, unusable, or a copy of one already
    done) and one ``IoTClass::shed`` per reason for those shed unlabelled (overload); Zeek
    keeps every other record and publishes it again to the next bridge that says hello:
    those of a batch the scorer failed, and those shed because the bridge is stopping.
    """

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
        max_inflight: int = 1,
        max_live_records: int | None = None,
        on_shed: Shed | None = None,
        send_many: SendMany | None = None,
        dedupe: int = 100_000,
    ):
        """``dedupe``: how many recent record keys (uid, start, device) are remembered to
        drop records that arrive twice (0: none)."""
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.layout, self.scorer, self.send = layout, scorer, send
        self.send_many = send_many
        self.max_inflight, self.max_live_records = max_inflight, max_live_records
        self.on_shed = on_shed
        self.labels_topic, self.name = labels_topic, name
        self.batch_size, self.max_delay_s = batch_size, max_delay_s
        self.assembler = FlowAssembler(layout, max_devices)
        self.offline_forced = offline
        self.offline = bool(offline)
        self.welcome: rc.Welcome | None = None
        self.stats = BridgeStats()
        self.recent = RecentKeys(dedupe) if dedupe > 0 else None
        self.acks = False  # send IoTClass::ack and IoTClass::shed (set by on_connect)
        self._door: list = []  # records refused at the door, waiting to be named in a shed
        self.session_records = 0  # since the last hello: what IoTClass::drained reports
        self._early: list[FlowRecord] = []  # early records waiting to be scored
        self.session_labels = 0
        self._queue: asyncio.Queue = asyncio.Queue()
        self._held: list[FlowRecord] = []
        self._warned: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._task_records = 0
        self._slots: asyncio.Semaphore | None = None  # made in the running loop
        self._paused = False
        self.idle = asyncio.Event()
        self.idle.set()

    # -- state ------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Records decoded and waiting for a batch."""
        return self._queue.qsize()

    @property
    def batches_in_flight(self) -> int:
        return len(self._tasks)

    @property
    def live_records(self) -> int:
        """Records decoded and not yet done (queued, or in a batch between assembly and its
        last label handed to the connection); the offline hold is not counted."""
        return self._queue.qsize() + self._task_records

    @property
    def held(self) -> int:
        """Records held for an offline drain."""
        return len(self._held)

    def pause(self) -> None:
        """Take no more records (shutting down): later ones are shed as ``paused``."""
        self._paused = True

    # -- transport callbacks ----------------------------------------------------------------
    async def on_connect(self, ack: bj.Ack) -> None:
        self.session_records = self.session_labels = 0
        self.acks = True
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
        if self._paused:
            return self._shed(SHED_PAUSED)
        if (
            self.max_live_records is not None
            and not self.offline
            and self.live_records >= self.max_live_records
        ):
            if self.acks and len(self._door) < 16 * self.batch_size:
                self._door.append(rec)  # named to Zeek as shed with the next batch
            return self._shed(SHED_BACKLOG)
        self.stats.records += 1
        self.session_records += 1
        self.idle.clear()
        self._queue.put_nowait(rec)

    def _shed(self, reason: str) -> None:
        self.stats.shed += 1
        if self.on_shed is not None:
            self.on_shed(reason)

    def add_early(self, rec: FlowRecord) -> None:
        """An early record (a prefix of a window's final record): scored as soon as the
        loop gets to it, with its device's history as it stands, and never joins that
        history (its final record will). Live and offline alike: it is what lets a new
        device be labelled within seconds."""
        if self._paused or len(self._early) >= 16 * self.batch_size:
            self.stats.early_shed += 1
            self._warn_once("early-shed", "dropping early records: the bridge is behind")
            return
        self.stats.early_records += 1
        self.idle.clear()
        if not self._early:
            self._queue.put_nowait(_EarlyTick())
        self._early.append(rec)

    def on_message(self, obj: Any) -> None:
        name = rc.event_name(obj)
        if name in (rc.FLOW_EVENT, rc.EARLY_FLOW_EVENT):
            early = name == rc.EARLY_FLOW_EVENT
            try:
                rec = rc.early_flow_record(obj) if early else rc.flow_record(obj)
            except rc.RecordError as e:
                self.stats.bad_records += 1
                self._warn_once("bad", f"skipped undecodable flow records, first: {e}")
                return
            if early:
                self.add_early(rec)
            else:
                self._add(rec)
        elif name == rc.FLOWS_EVENT:
            self._on_flows(obj)
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

    def _on_flows(self, obj: Any) -> None:
        """``IoTClass::flows``: packed records of the native capture plugin, final and early
        in publishing order. Each line is decoded on its own and taken as its own event would
        be (final: :meth:`_add`, early: :meth:`add_early`), so a bad line costs only itself
        (counted in ``stats.bad_records``, as a bad ``IoTClass::flow`` is); an event of
        another shape counts as one bad record."""
        try:
            lines = rc.packed_records(obj)
        except rc.RecordError as e:
            self.stats.bad_records += 1
            self._warn_once("bad", f"skipped undecodable flow records, first: {e}")
            return
        for line in lines:
            try:
                rec, early = rc.packed_flow_record(line)
            except rc.RecordError as e:
                self.stats.bad_records += 1
                self._warn_once("bad", f"skipped undecodable flow records, first: {e}")
                continue
            if early:
                self.add_early(rec)
            else:
                self._add(rec)

    def _on_welcome(self, w: rc.Welcome) -> None:
        self.welcome = w
        if self.offline_forced is None:
            self.offline = w.offline
        log.info(
            "Zeek node %s: window %.0f s, %d packets, %d payload bytes%s",
            w.node,
            w.window_s,
            w.packets,
            w.payload_bytes,
            ", offline" if w.offline else "",
        )
        lay = self.layout
        if w.schema_version != SCHEMA_VERSION:
            log.error(
                "Zeek sends flow record schema %d, this bridge reads %d: upgrade the one "
                "that is behind",
                w.schema_version,
                SCHEMA_VERSION,
            )
        if w.packets < lay.packets:
            log.warning(
                "the model reads %d packets per flow, Zeek records %d: set IoTClass::packets=%d",
                lay.packets,
                w.packets,
                lay.packets,
            )
        if w.payload_bytes < lay.required_payload_bytes():
            log.warning(
                "the model reads %d payload bytes per packet, Zeek keeps %d: set "
                "IoTClass::payload_bytes=%d",
                lay.required_payload_bytes(),
                w.payload_bytes,
                lay.required_payload_bytes(),
            )
        if abs(w.window_s - lay.window_s) > 1e-9:
            log.warning(
                "the model's windows are %.0f s, Zeek's %.0f s: set IoTClass::window_length",
                lay.window_s,
                w.window_s,
            )

    # -- processing -----------------------------------------------------------------------
    async def run(self) -> None:
        """Consume decoded records for ever (cancel the task to stop)."""
        while True:
            item = await self._queue.get()
            if isinstance(item, _Drain):
                await self._drain(item)
            elif isinstance(item, _EarlyTick):
                await self._run_early()
            elif self.offline:
                self._held.append(item)
            else:
                batch = [item]
                await self._fill(batch)
                await self.submit(batch)
            self._check_idle()

    def _check_idle(self) -> None:
        if self._queue.empty() and not self._tasks and not self._early:
            self.idle.set()

    async def submit(self, batch: list) -> None:
        """Scores *batch*: in place with ``max_inflight`` 1, else in a task once fewer than
        ``max_inflight`` batches are being scored."""
        if not batch:
            return
        if self.max_inflight == 1:
            await self.process(batch)
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_inflight)
        await self._slots.acquire()
        n = len(batch)
        task = asyncio.create_task(self.process(batch))
        self._tasks.add(task)
        self._task_records += n

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            self._task_records -= n
            assert self._slots is not None
            self._slots.release()
            if not t.cancelled() and t.exception() is not None:
                log.error("scoring a batch failed: %s", t.exception())
            self._check_idle()

        task.add_done_callback(done)

    async def settle(self) -> None:
        """Waits until no batch is being scored."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def flush(self, timeout: float) -> None:
        """Shutdown: waits (up to *timeout*) for the queue to be taken, then scores what is
        held for an offline drain, in start order; call :meth:`settle` to wait for labels."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self._queue.empty() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)
        held, self._held = self._held, []
        if held:
            log.info("scoring %d records held for an offline drain", len(held))
            held.sort(key=lambda r: r.start)
            for i in range(0, len(held), self.batch_size):
                await self.submit(held[i : i + self.batch_size])
        await asyncio.sleep(0)  # let new tasks assemble and submit

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
                await self.submit(batch)
                batch.clear()
                await self._drain(item)
                return
            if isinstance(item, _EarlyTick):  # early labels must not wait for a batch
                await self._run_early()
                continue
            if self.offline:
                self._held.append(item)
            else:
                batch.append(item)

    async def _drain(self, d: _Drain) -> None:
        await self.settle()  # every earlier batch's labels first
        held, self._held = self._held, []
        held.sort(key=lambda r: r.start)  # stable: arrival order breaks ties
        for i in range(0, len(held), self.batch_size):
            await self.process(held[i : i + self.batch_size])
        if d.records != self.session_records:
            log.warning(
                "Zeek published %d flow records, the bridge received %d",
                d.records,
                self.session_records,
            )
        await self._send(
            rc.drained_message(self.labels_topic, self.session_records, self.session_labels)
        )
        log.info("drained: %d records, %d labels", self.session_records, self.session_labels)

    async def process(self, batch: list[FlowRecord | fb.RawFlow]) -> int:
        """Assemble, score and send labels for *batch* (and, toward Zeek, what became of
        each record: see the class); returns the labels sent."""
        door = self._take_door()
        if not batch and not door:
            return 0
        acks = _Acks(self)
        if door:
            acks.shed_table(self.assembler.decode(door).table, "label_backlog")
        if not batch:
            await self._send_all(acks.frames())
            return 0
        dec = self.assembler.decode(batch)
        if dec.errors:
            self._refuse(len(dec.errors))
            self._warn_once("bad", f"skipped undecodable flow records, first: {dec.errors[0][1]}")
        table, again = self._fresh(dec.table)
        acks.done_table(again)
        if not len(table):
            await self._send_all(acks.frames())
            return 0
        order = np.argsort(table.start, kind="stable")  # start order; arrival breaks ties
        if np.any(order != np.arange(len(order))):
            table = table.take(order)
        whole = table
        mats, table, bad = self.assembler.assemble_finite(table)
        if len(bad):
            self._refuse(len(bad))
            self._warn_once(
                "nonfinite",
                "skipped flow records whose values make no finite "
                "matrix row (a negative count or offset?)",
            )
            acks.done_table(whole.take(bad), settle=True)  # unusable: done with
        n = len(table)
        if not n:
            await self._send_all(acks.frames())
            return 0
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
            if self.recent is not None:  # Zeek keeps them: a copy is scored again
                self.recent.forget(_keys(table))
            await self._send_all(acks.frames())
            return 0
        self.stats.scored += n
        frames: list[bytes] = []
        keys = _keys(table) if self.recent is not None else [None] * n
        for i, v in enumerate(verdicts):
            shed = _shed_reason(v)
            if shed is not None:
                self.stats.unlabelled += 1
                acks.shed_row(table, i, keys[i], shed)
                continue
            acks.done_row(table, i, keys[i])
            if not _is_label(v):
                self.stats.unlabelled += 1
                continue
            try:
                frame = self.label_frame(fb.head_record(table, i), v)
            except (rc.RecordError, bj.BrokerJSONError, ValueError, TypeError, AttributeError) as e:
                self.stats.label_errors += 1
                self._warn_once("label", f"cannot send a label, first: {e}")
                continue
            frames.append(frame)
        sent = len(frames)
        # one write: a label never reaches Zeek without the acknowledgements of its batch
        await self._send_all(frames + acks.frames())
        self.stats.labels += sent
        self.session_labels += sent
        return sent

    def _take_door(self) -> list:
        door, self._door = self._door, []
        return door

    async def _run_early(self) -> None:
        batch, self._early = self._early, []
        for i in range(0, len(batch), self.batch_size):
            await self.process_early(batch[i : i + self.batch_size])

    async def process_early(self, recs: list[FlowRecord]) -> int:
        """Score early records against their devices' history (not joining it) and send
        their labels as early labels; returns the labels sent."""
        t = self.assembler.table(recs)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            rows = self.layout.encode_rows(t)
        ok = np.isfinite(rows).all(axis=1)
        if not ok.all():
            self.stats.early_shed += int((~ok).sum())
            t, rows = t.take(np.flatnonzero(ok)), rows[ok]
        if not len(t):
            return 0
        mats = self.assembler.seq.peek(rows, t.start, list(t.device_keys()))
        try:
            verdicts = await self._score(mats, t, early=True)
            if len(verdicts) != len(t):
                raise ValueError(f"{len(verdicts)} verdicts for {len(t)} records")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.stats.scorer_failures += 1
            log.error("scorer failed on %d early records: %s: %s", len(t), type(e).__name__, e)
            return 0
        frames = []
        for i, v in enumerate(verdicts):
            if not _is_label(v):
                continue
            try:
                frames.append(self.label_frame(fb.head_record(t, i), v, early=True))
            except (rc.RecordError, bj.BrokerJSONError, ValueError, TypeError, AttributeError) as e:
                self.stats.label_errors += 1
                self._warn_once("label", f"cannot send a label, first: {e}")
        await self._send_all(frames)
        self.stats.early_labels += len(frames)
        return len(frames)

    def _refuse(self, n: int) -> None:
        """*n* decoded records are not records after all: counted as bad, not as taken."""
        self.stats.records -= n
        self.session_records -= n
        self.stats.bad_records += n

    def _fresh(self, table: FlowTable) -> tuple[FlowTable, FlowTable | None]:
        """*table* without the records seen before (same uid, start and device), which are
        counted in ``stats.duplicates``; and the table of those among them the bridge is done
        with already (to acknowledge again: Zeek did not get the first acknowledgement)."""
        if self.recent is None or not len(table):
            return table, None
        keep, settled = self.recent.admit(_keys(table))
        dup = len(table) - len(keep)
        again = None
        if dup:
            self.stats.duplicates += dup
            self.stats.records -= dup  # a copy still counts in session_records: Zeek counts it
            self._warn_once(
                "dup",
                "dropped flow records that arrived twice (same uid, start "
                "and device); counted as duplicates",
            )
            if settled:
                again = table.take(np.asarray(settled, np.int64))
            table = table.take(np.asarray(keep, np.int64))
        return table, again

    def label_frame(self, rec: FlowRecord, verdict: Any, early: bool = False) -> bytes:
        """What is sent for one label: Zeek's label event, or early label event (the
        Suricata bridge writes an EVE line instead)."""
        return rc.label_message(self.labels_topic, rc.log_entry(rec, verdict), early)

    async def _score(
        self, mats: np.ndarray, table: FlowTable, early: bool = False
    ) -> Sequence[Any]:
        """The scorer's verdicts; for early records its ``early`` method where it has one
        (a scorer that keeps device state keeps it out of early labels)."""
        scorer = getattr(self.scorer, "early", self.scorer) if early else self.scorer
        call = type(scorer).__call__ if not inspect.isroutine(scorer) else None
        if inspect.iscoroutinefunction(scorer) or inspect.iscoroutinefunction(call):
            return await scorer(mats, table)
        r = await asyncio.to_thread(scorer, mats, table)
        if inspect.isawaitable(r):
            r = await r
        return r

    async def _send(self, frame: bytes) -> None:
        if self.send is not None:
            await self.send(frame)

    async def _send_all(self, frames: list[bytes]) -> None:
        if not frames:
            return
        if self.send_many is not None:
            await self.send_many(frames)
        else:
            for f in frames:
                await self._send(f)

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", msg)


def attach(
    bridge: Bridge, url: str, topics: Sequence[str] = ("zeek/iotcls/flows",), **client_options: Any
) -> ZeekClient:
    """A :class:`~iotcls.bridge.zeek_ws.ZeekClient` wired to *bridge* (hello on connect,
    flow records via the raw fast path, labels sent through the client)."""
    from .zeek_ws import ZeekClient

    client = ZeekClient(
        url,
        list(topics),
        on_raw=bridge.on_raw,
        on_message=bridge.on_message,
        on_connect=bridge.on_connect,
        **client_options,
    )
    bridge.send, bridge.send_many = client.send, client.send_many
    return client


async def run(bridge: Bridge, client: ZeekClient) -> None:
    """Run the client and the bridge until cancelled (or the client is stopped)."""
    task = asyncio.create_task(bridge.run(), name="iotcls-bridge")
    try:
        await client.run()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
