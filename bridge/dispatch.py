"""The bridge's side of scoring: a bounded queue of matrices, handed to scorers by credit.

Flow of a record: :meth:`Dispatcher.submit` queues its matrix; whenever a scorer has credit
(it holds fewer than ``inflight_per_scorer`` batches), the oldest queued records, at most the
scorer's batch size, go to it as one request; its reply becomes one :class:`Outcome` per
record, handed to the ``deliver`` callback (which sends the label events to Zeek).

Guarantees
----------
* **Bounded.** At most ``queue_records`` records wait; in flight are at most
  ``scorers x inflight_per_scorer x batch_size`` more. Device state is LRU-bounded.
* **Nothing vanishes.** Every submitted record ends as exactly one outcome: labelled, or shed
  with a reason (``queue_full``, ``queue_full_labelled``, ``scorer_failed``, ``shutdown``),
  and every shed is counted in :class:`~iotcls.bridge.metrics.ServeMetrics`.
* **Scorer loss.** A scorer that leaves, dies (the supervisor calls :meth:`scorer_lost`),
  becomes unreachable, stays silent ``scorer_timeout_s``, or holds a batch that long without
  answering it (heartbeats or not: a scorer that is alive but never answers must not keep
  records for ever) has its in-flight batches put back at the head of the queue and re-sent
  elsewhere. A late reply to a re-sent batch is ignored, so no record is labelled twice. A
  record sent ``max_attempts`` times is shed as ``scorer_failed``: a batch that kills its
  scorer must not kill them all in turn.
* **Replies are checked like records.** Each label of a reply must be one of the model's
  classes, its confidence a number in [0, 1], its reason and feature groups plain words; a
  record whose label fails is refused (counted in ``rejected{socket="zmq",kind="bad_reply"}``)
  and re-sent like a record of a lost batch, the rest of the reply is used. Nothing a scorer
  sends reaches Zeek or the trust rules unchecked.

Shed policy (``bridge.shed_policy``), applied when a record arrives at a full queue:
``labelled-first`` sheds the oldest waiting record of a device that already had a label in
the last ``recent_label_s`` (judged when the record arrived), else the oldest waiting record;
``oldest`` sheds the oldest; ``newest`` sheds the arriving record.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from iotcls import wire
from iotcls.config import Config
from iotcls.layout import NO_NAMES, MatrixLayout
from iotcls.trust.decision import INCONSISTENT, DeviceConsistency
from iotcls.trust.dhcp_identity import DhcpIdentity
from iotcls.trust.dns_names import DnsNames

from . import curve as cv
from .metrics import ServeMetrics

log = logging.getLogger("iotcls.bridge.dispatch")

SHED_QUEUE_FULL = "queue_full"
SHED_QUEUE_FULL_LABELLED = "queue_full_labelled"
SHED_SCORER_FAILED = "scorer_failed"
SHED_SHUTDOWN = "shutdown"
SHED_LABEL_BACKLOG = "label_backlog"  # counted by the bridge, before the dispatcher
SHED_REASONS = (
    SHED_QUEUE_FULL,
    SHED_QUEUE_FULL_LABELLED,
    SHED_SCORER_FAILED,
    SHED_SHUTDOWN,
    SHED_LABEL_BACKLOG,
)


@dataclass(slots=True)
class Item:
    seq: int
    device: str
    matrix: np.ndarray  # (rows, width) float32
    ctx: Any  # the caller's handle, returned in the outcome
    arrived: float  # time.monotonic() at submit
    labelled: bool  # the device had a recent label when the record arrived
    attempts: int = 0
    identity: str | None = None  # the device's latest DHCP identity as the record arrived
    names: frozenset[str] = NO_NAMES  # the names it had used in (m)DNS by then (rule 9)
    early: bool = False  # an early record: its label changes no device state (see submit)


@dataclass(slots=True)
class Outcome:
    """What became of one record: a label (``shed`` is None) or a shed reason."""

    ctx: Any
    device: str
    label: str | None = None
    confidence: float = 0.0
    trusted: bool = False
    reason: str = ""
    top_groups: list[str] = field(default_factory=list)
    model: str = ""
    shed: str | None = None
    send: bool = False  # the log policy says: send this label to Zeek
    latency_s: float = 0.0
    explained: bool = True  # trusted/reason/top_groups are the full trust decision
    # filled in by the consumer, so that an outcome serves as a label verdict as it is
    strategy: str = "sequence"
    n_flows: int = 0


class LabelPolicy:
    """Per device: which labels go back to Zeek, and which devices count as recently labelled.

    ``changes``: the first label of a device, any label whose label or trust differs from the
    last one sent, and otherwise one label every ``interval_s``. ``all``: every label.
    """

    def __init__(self, policy: str, interval_s: float, max_devices: int):
        self.policy, self.interval_s, self.max_devices = policy, interval_s, max_devices
        # device -> [last sent label, last sent trusted, last sent time, last labelled time,
        #            cheap trust of the last fully judged label]
        self._state: OrderedDict[str, list] = OrderedDict()

    def __len__(self) -> int:
        return len(self._state)

    def recently_labelled(self, device: str, now: float, recent_s: float) -> bool:
        st = self._state.get(device)
        return st is not None and now - st[3] <= recent_s

    def hint(self, device: str, now: float) -> tuple[bool, str, bool, bool]:
        """``(due, last label sent, its trust, cheap trust of the last label judged)``: due
        means the next label is sent whatever it is (the device's first, the interval is
        over, or policy ``all``)."""
        st = self._state.get(device)
        if st is None:
            return True, "", False, False
        due = self.policy == "all" or now - st[2] >= self.interval_s
        return due, st[0], st[1], st[4]

    def touch(self, device: str, now: float) -> None:
        """A label not sent: the device still counts as recently labelled."""
        st = self._state.get(device)
        if st is not None:
            st[3] = now
            self._state.move_to_end(device)

    def decide(
        self, device: str, label: str, trusted: bool, now: float, cheap: bool | None = None
    ) -> bool:
        """Whether to send this fully judged label; ``cheap`` is its confidence criterion
        alone (default: ``trusted``), remembered for :meth:`hint` whether sent or not."""
        cheap = trusted if cheap is None else cheap
        st = self._state.get(device)
        if st is None:
            self._state[device] = [label, trusted, now, now, cheap]
            if len(self._state) > self.max_devices:
                self._state.popitem(last=False)
            return True
        self._state.move_to_end(device)
        st[3], st[4] = now, cheap
        if (
            self.policy == "all"
            or label != st[0]
            or trusted != st[1]
            or now - st[2] >= self.interval_s
        ):
            st[0], st[1], st[2] = label, trusted, now
            return True
        return False


@dataclass
class _Batch:
    id: int
    items: list[Item]
    sent: float


MAX_SCORER_BATCH = 4096  # a hello may ask for more; it gets this many records at most
_WORD_RE = re.compile(r"[A-Za-z0-9_.:+@=-]{1,64}")  # a reason, a feature group (name=value)
_MAX_GROUPS = 32
_MAX_MODEL = 200


def _model_problem(model: str) -> str | None:
    """Why a reply's model name cannot go into a log line, or None."""
    if len(model) > _MAX_MODEL or not model.isprintable():
        return (
            f"model name {model[:40]!r} is not a printable name of at most {_MAX_MODEL} characters"
        )
    return None


def verdict_problem(r: wire.Reply, i: int, classes: frozenset[str] | None) -> str | None:
    """Why label *i* of reply *r* cannot be used, or None: the label must be one of the
    model's classes (when known), the confidence a number in [0, 1], the reason and the
    feature groups plain words."""
    label, conf = r.labels[i], r.confidence[i]
    if classes is not None and label not in classes:
        return f"label {label[:40]!r} is not a class of the model"
    if isinstance(conf, bool) or not (
        isinstance(conf, (int, float)) and math.isfinite(conf) and 0.0 <= conf <= 1.0
    ):
        return f"confidence {conf!r} is not a number in [0, 1]"
    if r.reason[i] != "-" and not _WORD_RE.fullmatch(r.reason[i]):
        return f"reason {r.reason[i][:40]!r} is not a word"
    groups = r.top_groups[i]
    if len(groups) > _MAX_GROUPS or not all(_WORD_RE.fullmatch(g) for g in groups):
        return "top groups are not at most 32 words"
    return None


@dataclass
class _Scorer:
    name: bytes
    hello: wire.Hello
    credit: int
    batch_size: int
    last_seen: float
    last_sent: float = 0.0
    inflight: dict[int, _Batch] = field(default_factory=dict)
    retiring: bool = False  # a model reload replaced it: no new batches, stop once idle

    @property
    def label(self) -> str:
        return f"{_safe(self.hello.name)} (pid {self.hello.pid} on {_safe(self.hello.host)})"


def _printable(ident: bytes) -> str:
    """A peer identity fit for a log line (garbage peers have garbage identities)."""
    return repr(ident[:40])[2:-1] + ("..." if len(ident) > 40 else "")


def _safe(text: str, n: int = 60) -> str:
    """A peer-chosen string fit for a log line: no control characters, at most *n*."""
    return repr(text[:n])[1:-1] + ("..." if len(text) > n else "")


class Dispatcher:
    """Owns the ROUTER socket scorers connect to, the record queue and the in-flight table."""

    def __init__(
        self,
        cfg: Config,
        layout: MatrixLayout,
        deliver: Callable[[list[Outcome]], None],
        metrics: ServeMetrics | None = None,
        model_id: str = "",
        ctx: zmq.asyncio.Context | None = None,
        consistency: DeviceConsistency | None = None,
        identities: DhcpIdentity | None = None,
        classes: Sequence[str] | None = None,
        keys: cv.ServerKeys | None = None,
        names: DnsNames | None = None,
    ):
        """``classes``: the model's class names, the only labels a reply may carry (None:
        any); ``keys``: CURVE keys, which make the socket accept authorized scorers only."""
        self.cfg, self.b = cfg, cfg.bridge
        self.classes = frozenset(classes) if classes is not None else None
        self.keys = keys
        self.layout = layout
        self._layout_dict = layout.to_dict()
        self.deliver = deliver
        self.metrics = metrics or ServeMetrics()
        self.model_id = model_id
        self.policy = LabelPolicy(cfg.log.policy, cfg.log.interval_s, self.b.max_devices)
        # Trust rule 5 needs each device's earlier labels, which only the bridge sees whole
        # (a device's records may go to any scorer): applied here, to every label.
        self.consistency = (consistency or DeviceConsistency()).online(self.b.max_devices)
        # Rule 6 likewise: each device's latest DHCP identity, noted as its records arrive.
        self.identities = (identities or DhcpIdentity()).online(self.b.max_devices)
        # Rule 9 likewise: the names each device has used in DNS and mDNS.
        self.names = (names or DnsNames()).online(self.b.max_devices)
        # CURVE's ZAP handler belongs to a context: a dispatcher with keys gets its own
        self._own_ctx = ctx is None and keys is not None
        self._ctx = ctx or (
            zmq.asyncio.Context() if keys is not None else zmq.asyncio.Context.instance()
        )
        self._auth: Any = None
        self._sock: zmq.asyncio.Socket | None = None
        self._scorers: dict[bytes, _Scorer] = {}
        self._q_lab: deque[Item] = deque()  # waiting records of recently labelled devices
        self._q_new: deque[Item] = deque()  # all other waiting records
        self._seq = 0
        self._batch_id = 0
        self._flush_scheduled = False
        self._closing = False
        self._tasks: list[asyncio.Task] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._rejected_logged: dict[str, float] = {}
        self.endpoints: list[str] = []

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> list[str]:
        """Binds every ``bridge.bind`` address; returns the addresses actually bound."""
        s = self._ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished scorer is an error, not a black hole
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 0)  # credit bounds what each scorer holds
        s.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
        if self.keys is not None:
            self._auth = cv.authenticator(self._ctx, self.keys)
            cv.serve(s, self.keys)
        for addr in self.b.bind:
            try:
                s.bind(addr)
            except zmq.ZMQError as e:
                s.close()
                raise OSError(f"cannot bind scorer address {addr}: {e}") from None
            self.endpoints.append(s.getsockopt_string(zmq.LAST_ENDPOINT))
        self._sock = s
        self._tasks = [
            asyncio.create_task(self._recv_loop(), name="dispatch-recv"),
            asyncio.create_task(self._watchdog(), name="dispatch-watchdog"),
        ]
        if self.keys is not None:
            mon = s.get_monitor_socket(cv.HANDSHAKE_FAILURES)
            self._tasks.append(asyncio.create_task(self._monitor(mon), name="dispatch-monitor"))
        return self.endpoints

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []
        if self._sock is not None:
            if self.keys is not None:
                self._sock.disable_monitor()
            self._sock.close(linger=0)
            self._sock = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_ctx:
            self._ctx.term()

    async def _monitor(self, mon: zmq.asyncio.Socket) -> None:
        """Counts and logs the peers CURVE turned away (no or unknown keys)."""
        from zmq.utils.monitor import parse_monitor_message

        try:
            while True:
                ev = parse_monitor_message(await mon.recv_multipart())
                kind = cv.failure_kind(ev["event"])
                why = (
                    "its key is not authorized"
                    if kind == "auth_failed"
                    else "no CURVE handshake (no keys, or not a scorer)"
                )
                self._refuse_connection(kind, ev.get("endpoint", b"?"), why)
        finally:
            mon.close(linger=0)

    # -- intake ---------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._q_lab) + len(self._q_new)

    @property
    def inflight(self) -> int:
        return sum(len(b.items) for s in self._scorers.values() for b in s.inflight.values())

    @property
    def scorers(self) -> list[str]:
        return [s.hello.name for s in self._scorers.values()]

    def submit(
        self, matrices: np.ndarray, devices: Sequence[str], ctxs: Sequence[Any], early: bool = False
    ) -> None:
        """Queues one record per matrix; every one of them ends as exactly one outcome."""
        now = time.monotonic()
        n = len(matrices)
        self.metrics.records_in += n
        if self._closing:
            self._shed(
                [Item(0, d, m, c, now, False) for m, d, c in zip(matrices, devices, ctxs)],
                SHED_SHUTDOWN,
            )
            return
        # a DHCP record tells its device's identity: it refines the device's labels from
        # this record on, in the scorer, and is checked by rule 6 (trust.dhcp_identity)
        track = bool(self.identities.rule.seen)
        own = self.layout.dhcp_identities(matrices[:, 0]) if track else None
        # and a (m)DNS record the names it uses, which rule 9 checks every later label with
        track_dns = bool(self.names.rule.seen)
        used = self.layout.dns_names(matrices[:, 0]) if track_dns else None
        labelled_first = self.b.shed_policy == "labelled-first"
        shed: dict[str, list[Item]] = {}
        for i in range(n):
            dev = devices[i]
            lab = labelled_first and self.policy.recently_labelled(dev, now, self.b.recent_label_s)
            item = Item(self._seq, dev, matrices[i], ctxs[i], now, lab, early=early)
            if track:
                # an early record's final record notes the identity, in its place: noted
                # now, it would reach records that start before it (classify's order)
                if not early:
                    self.identities.note(dev, own[i])
                item.identity = self.identities.latest(dev)
            if track_dns:
                if not early:  # as the identity, for the same reason
                    self.names.note(dev, used[i])
                item.names = self.names.so_far(dev)
            self._seq += 1
            (self._q_lab if lab else self._q_new).append(item)
            if self.pending > self.b.queue_records:
                victim, reason = self._victim()
                shed.setdefault(reason, []).append(victim)
        for reason, items in shed.items():
            self._shed(items, reason)
        self._idle.clear()
        self._schedule_flush()

    def _victim(self) -> tuple[Item, str]:
        policy = self.b.shed_policy
        if policy == "newest":
            q = (
                self._q_lab
                if (self._q_lab and (not self._q_new or self._q_lab[-1].seq > self._q_new[-1].seq))
                else self._q_new
            )
            return q.pop(), SHED_QUEUE_FULL
        if policy == "labelled-first" and self._q_lab:
            return self._q_lab.popleft(), SHED_QUEUE_FULL_LABELLED
        return self._pop_oldest(), SHED_QUEUE_FULL

    def _pop_oldest(self) -> Item:
        if self._q_lab and (not self._q_new or self._q_lab[0].seq < self._q_new[0].seq):
            return self._q_lab.popleft()
        return self._q_new.popleft()

    def _shed(self, items: list[Item], reason: str) -> None:
        if not items:
            return
        self.metrics.add_shed(reason, len(items))
        now = time.monotonic()
        self.deliver(
            [
                Outcome(ctx=it.ctx, device=it.device, shed=reason, latency_s=now - it.arrived)
                for it in items
            ]
        )

    def _requeue(self, items: Iterable[Item], why: str) -> None:
        """Puts records back at the head of the queue (or sheds those out of attempts)."""
        back, dead = [], []
        for it in items:
            (dead if it.attempts >= self.b.max_attempts else back).append(it)
        if dead:
            log.warning(
                "shedding %d records sent %d times without an answer (%s)",
                len(dead),
                self.b.max_attempts,
                why,
            )
            self._shed(dead, SHED_SCORER_FAILED)
        if back:
            lab = [it for it in back if it.labelled and self.b.shed_policy == "labelled-first"]
            new = [
                it for it in back if not (it.labelled and self.b.shed_policy == "labelled-first")
            ]
            if lab:
                self._q_lab = deque(sorted([*lab, *self._q_lab], key=lambda it: it.seq))
            if new:
                self._q_new = deque(sorted([*new, *self._q_new], key=lambda it: it.seq))
            self._schedule_flush()

    # -- sending --------------------------------------------------------------------------
    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _take(self, n: int) -> list[Item]:
        out = []
        ql, qn = self._q_lab, self._q_new
        while len(out) < n and (ql or qn):
            if ql and (not qn or ql[0].seq < qn[0].seq):
                out.append(ql.popleft())
            else:
                out.append(qn.popleft())
        return out

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self.pending and self._sock is not None:
            ready = [s for s in self._scorers.values() if s.credit > 0 and not s.retiring]
            if not ready:
                break
            sc = max(ready, key=lambda s: (s.credit, -s.last_sent))
            items = self._take(sc.batch_size)
            self._batch_id += 1
            bid = self._batch_id
            mats = np.stack([it.matrix for it in items])
            hints = self._hints(items)
            for it in items:
                it.attempts += 1
            ids = [it.identity for it in items] if self.identities.rule.seen else None
            data = wire.encode(wire.Request(bid, mats, [it.seq for it in items], hints, ids))
            if not self._send(sc.name, data):
                for it in items:
                    it.attempts -= 1  # never reached the scorer
                self._lose(sc, "unreachable", items)
                continue
            now = time.monotonic()
            sc.inflight[bid] = _Batch(bid, items, now)
            sc.credit -= 1
            sc.last_sent = now
            self.metrics.batches_sent += 1
            self.metrics.batch_size.observe(len(items))
        self._update_gauges()

    def _hints(self, items: list[Item]) -> wire.Hints:
        """What the log policy knows per record before its label (see :class:`wire.Hints`).

        The hint may be stale by the time the label comes back (another record of the
        device was labelled meanwhile); a label the scorer did not explain is then simply
        not sent, and the device's next record is judged against the newer label."""
        now = time.monotonic()
        due, last, lastt, lastc = [], [], [], []
        for it in items:
            d, lb, tr, ch = self.policy.hint(it.device, now)
            due.append(d)
            last.append(lb)
            lastt.append(tr)
            lastc.append(ch)
        return wire.Hints(due, last, lastt, lastc)

    def _send(self, ident: bytes, data: bytes) -> bool:
        assert self._sock is not None
        f = self._sock.send_multipart([ident, data], flags=zmq.DONTWAIT)
        exc = f.exception() if f.done() else None
        if exc is not None:
            log.debug("send to %r failed: %s", ident, exc)
            return False
        return True

    # -- receiving ------------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            try:
                self._on_message(frames)
            except Exception:  # a bug here must not stop the bridge from serving
                log.exception("error handling a scorer message")

    def _reject(self, kind: str, who: str, why: str) -> None:
        n = self.metrics.add_rejected("zmq", kind)
        now = time.monotonic()
        if n <= 5 or now - self._rejected_logged.get(kind, 0.0) >= 10.0:
            self._rejected_logged[kind] = now
            log.warning(
                "rejected a message on the scorer socket from %s (%s, %d so far): %s",
                who,
                kind,
                n,
                why,
            )

    def _refuse_connection(self, kind: str, endpoint: bytes, why: str) -> None:
        """A peer CURVE turned away (it retries: counted each time, logged now and then)."""
        n = self.metrics.add_rejected("zmq", kind)
        now = time.monotonic()
        if n <= 5 or now - self._rejected_logged.get(kind, 0.0) >= 10.0:
            self._rejected_logged[kind] = now
            log.warning(
                "refused a connection on the scorer socket %s (%s, %d so far): %s",
                endpoint.decode("ascii", "replace"),
                kind,
                n,
                why,
            )

    def _on_message(self, frames: list[bytes]) -> None:
        ident = frames[0]
        who = _printable(ident)
        if len(frames) != 2:
            self._reject(
                "malformed", who, f"{len(frames) - 1} frames after the identity, expected 1"
            )
            return
        try:
            msg = wire.decode(frames[1])
        except wire.WireError as e:
            self._reject(e.kind, who, str(e))
            return
        sc = self._scorers.get(ident)
        now = time.monotonic()
        if isinstance(msg, wire.Hello):
            self._on_hello(ident, msg, now)
            return
        if sc is None:
            if isinstance(msg, (wire.Reply, wire.Failure, wire.Heartbeat)):
                # a scorer that outlived a bridge restart or was declared lost: start over
                self._send(ident, wire.encode(wire.Reject(f"{wire.REHELLO}: say hello first")))
            if not isinstance(msg, wire.Bye):
                self._reject("unknown_scorer", who, f"a {type(msg).__name__} before hello")
            return
        sc.last_seen = now
        if isinstance(msg, wire.Reply):
            self._on_reply(sc, msg, now)
        elif isinstance(msg, wire.Failure):
            batch = sc.inflight.pop(msg.batch, None)
            if batch is not None:
                sc.credit += 1
                log.warning(
                    "scorer %s failed a batch of %d: %s", sc.label, len(batch.items), msg.error
                )
                self._requeue(batch.items, f"scorer error: {msg.error}")
                self._stop_if_retired(sc)
        elif isinstance(msg, wire.Bye):
            self._lose(sc, f"left ({msg.reason or 'no reason'})")
        elif isinstance(msg, wire.Heartbeat):
            pass
        else:
            self._reject("unexpected", who, f"a {type(msg).__name__} message")

    def _on_hello(self, ident: bytes, h: wire.Hello, now: float) -> None:
        if h.layout != self._layout_dict:
            diff = {
                k: (h.layout.get(k), v)
                for k, v in self._layout_dict.items()
                if h.layout.get(k) != v
            }
            keys = ", ".join(sorted(diff)) or "its keys"
            why = f"its model's matrix layout differs from the bridge's ({keys})"
            log.error(
                "refused scorer %s (pid %d on %s, model %s): %s: %s",
                _safe(h.name),
                h.pid,
                _safe(h.host),
                _safe(h.model),
                why,
                _safe(str(diff or h.layout), 300),
            )
            self.metrics.add_rejected("zmq", "incompatible_scorer")
            # only the names of the differing keys: the bridge's values are not for any peer
            self._send(ident, wire.encode(wire.Reject(why)))
            return
        if (
            self.classes is not None
            and h.classes is not None
            and not set(h.classes) <= self.classes
        ):
            why = (
                f"its model's classes are not the bridge's ({len(set(h.classes) - self.classes)}"
                " unknown): its labels would be refused"
            )
            log.error(
                "refused scorer %s (pid %d on %s, model %s): %s",
                _safe(h.name),
                h.pid,
                _safe(h.host),
                _safe(h.model),
                why,
            )
            self.metrics.add_rejected("zmq", "incompatible_scorer")
            self._send(ident, wire.encode(wire.Reject(why)))
            return
        old = self._scorers.get(ident)
        if old is not None and old.hello.pid == h.pid and not old.inflight:
            # a hello repeated while the scorer waited for our welcome: answer it again
            old.last_seen = now
            self._send(ident, wire.encode(wire.Welcome(old.credit, self.cfg.scorers.heartbeat_s)))
            return
        self._scorers.pop(ident, None)
        if old is not None and old.inflight:  # it restarted under the same name
            self._lose(old, "said hello again", register=False)
        sc = _Scorer(
            ident, h, self.b.inflight_per_scorer, min(MAX_SCORER_BATCH, max(1, h.batch_size)), now
        )
        self._scorers[ident] = sc
        if not self._send(
            ident, wire.encode(wire.Welcome(sc.credit, self.cfg.scorers.heartbeat_s))
        ):
            self._scorers.pop(ident, None)
            return
        if self.model_id and h.model != self.model_id:
            log.warning(
                "scorer %s runs model %s, the bridge loaded %s (same layout: accepted)",
                sc.label,
                _safe(h.model),
                self.model_id,
            )
        log.info(
            "scorer %s connected: model %s on %s, batch size %d, explains %s labels",
            sc.label,
            _safe(h.model),
            _safe(h.device),
            sc.batch_size,
            _safe(h.explain),
        )
        self._update_gauges()
        self._schedule_flush()

    def _on_reply(self, sc: _Scorer, r: wire.Reply, now: float) -> None:
        batch = sc.inflight.pop(r.batch, None)
        if batch is None:
            self._reject("stale_reply", sc.hello.name, f"reply to batch {r.batch}, not in flight")
            return
        sc.credit += 1
        items = batch.items
        if len(r) != len(items):
            log.warning(
                "scorer %s answered %d labels for a batch of %d; re-sending it",
                sc.label,
                len(r),
                len(items),
            )
            self._reject("bad_reply", sc.label, f"{len(r)} labels for a batch of {len(items)}")
            self._requeue(items, "wrong reply length")
            return
        outcomes: list[Outcome] = []
        used: list[int] = []
        refused: list[Item] = []
        bad_model = _model_problem(r.model)
        for i, it in enumerate(items):
            why = bad_model or verdict_problem(r, i, self.classes)
            if why is None:
                try:
                    outcomes.append(self._judge(r, i, it, now))
                    used.append(i)
                    continue
                except Exception as e:  # a bug on one record must not lose the others
                    why = f"{type(e).__name__}: {e}"
            self._reject("bad_reply", sc.label, f"record {i} of batch {r.batch}: {why}")
            refused.append(it)
        m = self.metrics
        sent = sum(o.send for o in outcomes)
        expl = r.explained
        mode = sc.hello.explain
        m.labels_explained += (
            sum(expl[i] for i in used)
            if expl is not None
            else len(outcomes)
            if mode == "all"
            else 0
        )
        m.labelled += len(outcomes)
        m.labels_sent += sent
        m.labels_suppressed += len(outcomes) - sent
        m.latency.observe([o.latency_s for o in outcomes])
        if math.isfinite(r.score_ms) and r.score_ms >= 0:
            m.score_ms.observe(r.score_ms)
        if outcomes:
            self.deliver(outcomes)
        if refused:
            self._requeue(refused, f"scorer {sc.hello.name}: unusable labels")
        self._stop_if_retired(sc)
        self._schedule_flush()
        self._check_idle()

    def _judge(self, r: wire.Reply, i: int, it: Item, now: float) -> Outcome:
        """The outcome of a checked label: trust rules 5, 6 and 9, then the log policy."""
        full = r.explained is None or r.explained[i]
        label, trusted, reason = r.labels[i], r.trusted[i], r.reason[i]
        # an early record's label is judged against the device's labels as they stand and
        # joins none of them (nor the log policy's): its final record's label will
        consistent = (
            self.consistency.check(it.device, label)
            if it.early
            else self.consistency.observe(it.device, label, r.confidence[i])
        )
        if not consistent and trusted:
            trusted, reason = False, INCONSISTENT
        why = self.identities.rule.reason(it.identity, label) if trusted else "-"
        if why != "-":  # rule 6 (trust.dhcp_identity)
            trusted, reason = False, why
        why = self.names.rule.reason(it.names, label) if trusted else "-"
        if why != "-":  # rule 9 (trust.dns_names)
            trusted, reason = False, why
        if it.early:
            send = True
        elif full:
            cheap = None if r.cheap_trusted is None else r.cheap_trusted[i]
            send = self.policy.decide(it.device, label, trusted, now, cheap)
        else:  # the same label and cheap trust as the last one sent, and not due
            send = False
            self.policy.touch(it.device, now)
        return Outcome(
            ctx=it.ctx,
            device=it.device,
            label=label,
            confidence=float(r.confidence[i]),
            trusted=trusted,
            reason=reason,
            top_groups=list(r.top_groups[i]),
            model=r.model,
            send=send,
            latency_s=now - it.arrived,
            explained=full,
        )

    # -- model reload ---------------------------------------------------------------------
    def use_model(
        self,
        model_id: str,
        classes: Sequence[str],
        consistency: DeviceConsistency | None = None,
        identities: DhcpIdentity | None = None,
        names: DnsNames | None = None,
    ) -> None:
        """A reloaded model's name, classes and (given) trust rules 5, 6 and 9: each
        device's label window starts afresh (its labels were another model's), its DHCP
        identity and (m)DNS names are kept. ``classes`` must include those of scorers
        still running the old model."""
        self.model_id = model_id
        self.classes = frozenset(classes)
        if consistency is not None:
            self.consistency = consistency.online(self.b.max_devices)
        if identities is not None:
            self.identities.rule = identities
        if names is not None:
            self.names.rule = names

    def retire(self, names: set[str]) -> None:
        """Scorers named *names* get no new batches, and are told to stop once they have
        answered the ones they hold (a model reload: nothing is re-sent or lost)."""
        for sc in list(self._scorers.values()):
            if sc.hello.name in names:
                sc.retiring = True
                self._stop_if_retired(sc)
        self._schedule_flush()

    def _stop_if_retired(self, sc: _Scorer) -> None:
        if sc.retiring and not sc.inflight:
            self._send(sc.name, wire.encode(wire.Stop()))

    # -- scorer loss ----------------------------------------------------------------------
    def scorer_lost(self, name: str, why: str) -> bool:
        """Called by the supervisor when a local scorer process exits; True if it was known."""
        for sc in list(self._scorers.values()):
            if sc.hello.name == name:
                self._lose(sc, why)
                return True
        return False

    def _lose(
        self, sc: _Scorer, why: str, items: list[Item] | None = None, register: bool = True
    ) -> None:
        if register:
            self._scorers.pop(sc.name, None)
        batches = list(sc.inflight.values())
        sc.inflight.clear()
        back = [it for b in batches for it in b.items] + (items or [])
        self.metrics.scorers_lost += 1
        self.metrics.batches_resent += len(batches)
        level = logging.INFO if why.startswith("left") and not back else logging.WARNING
        log.log(
            level,
            "scorer %s lost: %s; %d in-flight records go back to the queue",
            sc.label,
            why,
            len(back),
        )
        self._requeue(back, f"scorer {sc.hello.name} {why}")
        self._update_gauges()
        self._check_idle()

    async def _watchdog(self) -> None:
        period = min(0.25, self.b.scorer_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            limit = self.b.scorer_timeout_s
            for sc in list(self._scorers.values()):
                held = min((b.sent for b in sc.inflight.values()), default=now)
                if now - sc.last_seen > limit:
                    self._lose(sc, f"silent for {now - sc.last_seen:.1f} s")
                elif now - held > limit:  # alive (heartbeats) but not answering: same fate
                    self._lose(sc, f"held a batch {now - held:.1f} s without answering it")
            self._update_gauges()

    def _update_gauges(self) -> None:
        m = self.metrics
        m.queue_depth = self.pending
        m.inflight = self.inflight
        m.scorers = len(self._scorers)

    def _check_idle(self) -> None:
        if not self.pending and not any(s.inflight for s in self._scorers.values()):
            self._idle.set()

    # -- shutdown -------------------------------------------------------------------------
    async def drain(self, timeout: float) -> int:
        """Stops intake and finishes queued and in-flight work; sheds what is left after
        ``timeout`` seconds as ``shutdown``. Returns how many records were shed."""
        self._closing = True
        self._check_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        left = self._take(self.pending)
        for sc in self._scorers.values():
            for b in sc.inflight.values():
                left.extend(b.items)
            sc.inflight.clear()
        if left:
            log.warning(
                "shutdown: %d records were not scored in %.1f s; shed as %s",
                len(left),
                timeout,
                SHED_SHUTDOWN,
            )
        self._shed(left, SHED_SHUTDOWN)
        self._update_gauges()
        return len(left)

    async def stop_scorers(self, timeout: float = 5.0) -> None:
        """Asks every connected scorer to leave and waits (briefly) for their goodbyes."""
        for sc in list(self._scorers.values()):
            self._send(sc.name, wire.encode(wire.Stop()))
        deadline = time.monotonic() + timeout
        while self._scorers and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
