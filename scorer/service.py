"""The scorer process: takes matrix batches from the bridge over ZeroMQ and answers with labels.

A scorer is a DEALER socket *connected* to the bridge's ROUTER, so scorers can run anywhere
the bridge's address reaches (``iotcls serve --scorer-only --connect tcp://bridge:27760`` on
a GPU host) and the bridge never needs to know where they are. It introduces itself with a
``hello`` naming its model and matrix layout; the bridge refuses a scorer whose layout differs
from its own, since its matrices would be silently misread.

Batching: requests queue up while the model runs; the next forward pass takes queued requests
up to ``batch_size`` matrices, waiting at most ``max_wait_ms`` after the first one for more to
arrive. Labels (with confidence, trust decision and explanation) come from
:class:`iotcls.predict.Predictor`, the same code ``iotcls classify`` uses.

The loop is single-threaded on purpose: the model call holds the CPU anyway, and one thread
means no locking around the socket. Anything that is not a valid message is logged, counted
and dropped; the scorer keeps serving.

With CURVE (``bridge.curve``, :mod:`iotcls.bridge.curve`) the socket is encrypted and the
scorer proves its key to the bridge, which admits authorized keys only. A model that cannot
be loaded or cannot score exits with status 2 (:data:`EXIT_MODEL`): the same file fails the
same way again, so neither the supervisor nor systemd restarts it.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket as pysocket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import zmq

from iotcls import wire
from iotcls.bridge import curve as cv
from iotcls.bridge.curve import ClientKeys
from iotcls.layout import MatrixLayout

log = logging.getLogger("iotcls.scorer")

EXIT_OK = 0
# the model cannot be loaded or cannot score (a deterministic error: the same file fails the
# same way again, so the supervisor does not restart it, and systemd's
# RestartPreventExitStatus=2 neither)
EXIT_MODEL = 2
EXIT_REJECTED = 3  # the bridge refused this scorer: restarting it would not help


class Model(Protocol):
    """What the scorer needs from a model: :class:`iotcls.predict.Predictor` provides it."""

    @property
    def layout(self) -> MatrixLayout: ...

    def predict(self, matrices: np.ndarray, identities: list[str | None] | None = None): ...


@dataclass
class ScorerSettings:
    connect: str
    name: str
    batch_size: int = 256
    max_wait_ms: float = 2.0
    heartbeat_s: float = 1.0
    parent_pid: int | None = None  # exit when this process is gone (a local scorer's bridge)
    explain: str = "logged"  # which labels get the full trust decision: logged, all, none
    row_cache: int = 50_000  # rows whose packet features are kept (iotcls.rowcache); 0: off
    keys: ClientKeys | None = None  # CURVE: this scorer's key pair and the bridge's key


@dataclass
class ScorerStats:
    batches: int = 0
    matrices: int = 0
    requests: int = 0
    explained: int = 0  # labels given the full trust decision (mode logged)
    rejected: dict[str, int] = field(default_factory=dict)


def resolve_device(device: str) -> str:
    """``auto`` is CUDA when torch sees a GPU; asking for CUDA without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for, but torch sees no CUDA device")
    return device


def load_bundle(path: str):
    """The model bundle (the bundled default when ``path`` is empty); any failure to read
    it is a :class:`~iotcls.bundle.BundleError` naming the file."""
    from iotcls.bundle import BundleError, ModelBundle, default_model_path

    try:
        return ModelBundle.load(path or None)
    except BundleError:
        raise
    except Exception as e:  # a file torch cannot make sense of fails in many ways
        where = path or default_model_path()
        raise BundleError(
            f"{where}: not a readable model file ({type(e).__name__}: {e})"[:300]
        ) from None


def check_bundle(bundle) -> None:
    """Score one matrix with *bundle* the way a scorer will (label and full trust decision),
    or raise :class:`~iotcls.bundle.BundleError` naming the file and what failed.

    Why: a bundle can load and still not score (a trust state fitted for other classes, say);
    the bridge checks once at start, so that such a file stops ``iotcls serve`` with one line
    instead of sending every scorer into a restart loop."""
    from iotcls.bundle import BundleError
    from iotcls.predict import Predictor

    try:
        model = Predictor(bundle, device="cpu", explain=True)
        x = np.zeros((1, bundle.layout.rows, bundle.layout.width), np.float32)
        p = model.predict(x)
        if len(p.label) != 1:
            raise ValueError(f"{len(p.label)} labels for one matrix")
    except Exception as e:
        where = getattr(bundle, "source", "") or "model"
        raise BundleError(f"{where}: unusable model: {first_line(e)}"[:300]) from None


def load_model(
    path: str,
    device: str,
    threads: int,
    batch_size: int,
    explain: str = "logged",
    row_cache: int = 0,
):
    """The bundle at ``path`` (the bundled default model when empty) as a Predictor.

    With ``explain`` other than ``all`` the Predictor labels cheaply (confidence criterion)
    and the scorer explains only the labels that will be logged (:meth:`Scorer._explain`).
    ``row_cache``: a scorer sees each device's flows again as history rows of its next
    matrices; caching their packet features cuts the CPU forward pass about threefold.
    """
    import torch

    from iotcls.predict import Predictor

    torch.set_num_threads(threads)
    bundle = load_bundle(path)
    return Predictor(
        bundle,
        device=resolve_device(device),
        batch_size=batch_size,
        explain=explain == "all",
        row_cache=row_cache,
    )


def warm_up(model, batch_size: int) -> float:
    """Run the batch sizes the scorer will use first, once, before it says hello: the first
    passes of a fresh process are many times slower (allocator, kernel selection), and
    without this the first records after a (re)start wait for them. Returns the seconds."""
    t0 = time.perf_counter()
    layout = model.layout
    rng = np.random.default_rng(0)
    for n in sorted({bucket(k, batch_size) for k in (1, 8, 32, 128, batch_size)}):
        x = rng.random((n, layout.rows, layout.width), dtype=np.float32)
        p = model.predict(x)
        if getattr(model, "trust", None) is not None and not model.explain:
            model.assess_subset(x, p, np.arange(min(n, 8)))
    cache = getattr(model, "row_cache", None)
    if cache is not None:
        cache.clear()
    return time.perf_counter() - t0


def first_line(e: BaseException) -> str:
    """An exception as one log line: its message's first line, else its type."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def model_name(model) -> str:
    bundle = getattr(model, "bundle", None)
    return getattr(bundle, "name", None) or type(model).__name__


def model_classes(model) -> list[str] | None:
    """The class names the model labels with, when it says (the bridge checks them)."""
    classes = getattr(getattr(model, "bundle", None), "classes", None)
    return [str(c) for c in classes] if classes is not None else None


BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def bucket(n: int, batch_size: int) -> int:
    """The batch size a forward pass of ``n`` matrices is padded to (with all-zero ones).

    Why: tensors of ever-changing sizes fragment the heap; a scorer fed random batch sizes
    grew from 270 to over 600 MiB within a minute on the test machine. With a dozen sizes
    it stays at its start size, and the padding costs no measurable time per useful matrix
    (the allocator's reuse pays for it).
    """
    for b in BUCKETS:
        if b >= n:
            return min(b, max(batch_size, n))
    return n


class Scorer:
    def __init__(self, model: Model, settings: ScorerSettings, ctx: zmq.Context | None = None):
        self.model = model
        self.s = settings
        self.model_id = model_name(model)
        self.device = str(getattr(model, "device", "cpu"))
        self.stats = ScorerStats()
        self._ctx = ctx or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._queue: deque[tuple[float, wire.Request]] = deque()
        self._welcomed = False
        self._stopping = False
        self._exit_code = EXIT_OK
        self._last_sent = 0.0
        self._last_hello = 0.0
        self._layout = model.layout.to_dict()
        self._mon: zmq.Socket | None = None
        self._auth_logged = -1e9
        # what this scorer actually does: without a trust state, the confidence criterion
        self.explain_mode = (
            settings.explain if getattr(model, "trust", None) is not None else "none"
        )

    # -- socket ---------------------------------------------------------------------------
    def _open(self) -> zmq.Socket:
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, self.s.name.encode())
        s.setsockopt(zmq.LINGER, 2000)
        s.setsockopt(zmq.RCVHWM, 0)  # the bridge's credit bounds what it sends us
        if self.s.keys is not None:
            cv.connect_as(s, self.s.keys)
            self._mon = s.get_monitor_socket(cv.HANDSHAKE_FAILURES)
        s.connect(self.s.connect)
        return s

    def _check_monitor(self) -> None:
        """Logs (once a minute) that the bridge refused this scorer's CURVE handshake."""
        from zmq.utils.monitor import recv_monitor_message

        while self._mon is not None and self._mon.poll(0):
            ev = recv_monitor_message(self._mon)
            now = time.monotonic()
            if now - self._auth_logged >= 60.0:
                self._auth_logged = now
                log.error(
                    "scorer %s: the bridge at %s refused the CURVE handshake (%s): is "
                    "this scorer's public key in the bridge's authorized/ directory, and "
                    "bridge.key the bridge's?",
                    self.s.name,
                    self.s.connect,
                    cv.failure_kind(ev["event"]),
                )

    def _send(self, msg: wire.Message) -> None:
        assert self._sock is not None
        try:
            self._sock.send(wire.encode(msg), zmq.NOBLOCK)
        except zmq.Again:  # no bridge yet and the pipe is full: the next heartbeat retries
            log.debug("send to bridge would block, dropped %s", type(msg).__name__)
        self._last_sent = time.monotonic()

    def _hello(self) -> None:
        self._send(
            wire.Hello(
                name=self.s.name,
                pid=os.getpid(),
                host=pysocket.gethostname(),
                model=self.model_id,
                layout=self._layout,
                device=self.device,
                batch_size=self.s.batch_size,
                explain=self.explain_mode,
                classes=model_classes(self.model),
            )
        )
        self._last_hello = time.monotonic()

    def _reject_garbage(self, kind: str, why: str) -> None:
        self.stats.rejected[kind] = self.stats.rejected.get(kind, 0) + 1
        n = self.stats.rejected[kind]
        if n <= 10 or n % 1000 == 0:
            log.warning(
                "scorer %s: rejected a message from the bridge (%s, %d so far): %s",
                self.s.name,
                kind,
                n,
                why,
            )

    def _receive(self, timeout_ms: float) -> None:
        """Waits up to ``timeout_ms`` for a message, then takes everything already queued."""
        assert self._sock is not None
        if not self._sock.poll(max(0, math.ceil(timeout_ms)), zmq.POLLIN):
            return
        while True:
            try:
                data = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = wire.decode(data)
            except wire.WireError as e:
                self._reject_garbage(e.kind, str(e))
                continue
            self._handle(msg)

    def _handle(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.Request):
            self._queue.append((time.monotonic(), msg))
        elif isinstance(msg, wire.Welcome):
            if not self._welcomed:
                log.info(
                    "scorer %s: accepted by the bridge at %s (credit %d)",
                    self.s.name,
                    self.s.connect,
                    msg.credit,
                )
            self._welcomed = True
        elif isinstance(msg, wire.Reject):
            if msg.reason.startswith(wire.REHELLO):
                self._welcomed = False
                self._hello()
                return
            log.error(
                "scorer %s: the bridge at %s refused this scorer: %s",
                self.s.name,
                self.s.connect,
                msg.reason,
            )
            self._stopping, self._exit_code = True, EXIT_REJECTED
        elif isinstance(msg, wire.Stop):
            self._stopping = True
        else:
            self._reject_garbage("unexpected", f"a {type(msg).__name__} message")

    # -- scoring --------------------------------------------------------------------------
    def _take_batch(self) -> list[wire.Request]:
        """Queued requests for one forward pass: at least one, at most batch_size matrices."""
        first_at = self._queue[0][0]
        deadline = first_at + self.s.max_wait_ms / 1000.0
        while sum(len(r.refs) for _, r in self._queue) < self.s.batch_size and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            n_before = len(self._queue)
            self._receive(left * 1000.0)
            if len(self._queue) == n_before and time.monotonic() >= deadline:
                break
        taken, total = [], 0
        while self._queue:
            n = len(self._queue[0][1].refs)
            if taken and total + n > self.s.batch_size:
                break
            taken.append(self._queue.popleft()[1])
            total += n
        return taken

    def _score(self, requests: list[wire.Request]) -> None:
        t0 = time.perf_counter()
        shapes = {r.matrices.shape[1:] for r in requests}
        if len(shapes) != 1:
            for r in requests:
                self._send(wire.Failure(r.batch, f"mixed matrix shapes in one batch: {shapes}"))
            return
        n_total = sum(len(r.refs) for r in requests)
        x = np.zeros((bucket(n_total, self.s.batch_size), *shapes.pop()), np.float32)
        ids: list[str | None] | None = None  # the devices' DHCP identities, where sent
        if any(r.identities is not None for r in requests):
            ids = [None] * len(x)
        s = 0
        for r in requests:
            x[s : s + len(r.refs)] = r.matrices
            if ids is not None and r.identities is not None:
                ids[s : s + len(r.refs)] = r.identities
            s += len(r.refs)
        try:
            p = self.model.predict(x, ids)
        except Exception as e:  # a bad batch must not take the scorer down; the bridge decides
            self._fail(requests, f"scoring {len(x)} matrices failed", e)
            return
        k = n_total  # the rest is padding
        cheap = np.asarray(p.trusted[:k], bool).tolist()  # before the full decision
        try:
            explained = self._explain(x, p, requests, k, ids)
        except Exception as e:
            self._fail(requests, "explaining labels failed", e)
            return
        ms = (time.perf_counter() - t0) * 1000.0
        labels = [str(v) for v in p.label[:k]]
        conf = np.asarray(p.confidence[:k], np.float64).tolist()
        trusted = np.asarray(p.trusted[:k], bool).tolist()
        reason = [str(v) for v in p.reason[:k]]
        groups = [list(map(str, g)) for g in p.top_groups[:k]]
        s = 0
        for r in requests:
            n = len(r.refs)
            self._send(
                wire.Reply(
                    batch=r.batch,
                    labels=labels[s : s + n],
                    confidence=conf[s : s + n],
                    trusted=trusted[s : s + n],
                    reason=reason[s : s + n],
                    top_groups=groups[s : s + n],
                    model=self.model_id,
                    score_ms=ms,
                    explained=None if explained is None else explained[s : s + n],
                    cheap_trusted=None if explained is None else cheap[s : s + n],
                )
            )
            s += n
        self.stats.batches += 1
        self.stats.matrices += n_total
        self.stats.requests += len(requests)

    def _fail(self, requests: list[wire.Request], what: str, e: Exception) -> None:
        """Answer every request of a batch that could not be scored with a Failure."""
        msg = first_line(e)
        log.error("scorer %s: %s: %s", self.s.name, what, msg)
        for r in requests:
            self._send(wire.Failure(r.batch, msg))

    def _explain(
        self, x: np.ndarray, p, requests: list[wire.Request], k: int, ids: list[str | None] | None
    ) -> list[bool] | None:
        """``logged`` mode: the full trust decision for the labels the bridge will send.

        A label needs it when its record is due, its label differs from the device's last
        label sent, or its trust may differ (see :class:`iotcls.wire.Hints`); the others are
        not sent, and keep the confidence criterion. Returns which records were
        explained (None: all trust fields are final, as in modes ``all`` and ``none``).
        """
        if self.s.explain != "logged" or getattr(self.model, "trust", None) is None:
            return None
        need = np.ones(k, bool)
        s = 0
        for r in requests:
            n = len(r.refs)
            h = r.hints
            if h is not None:
                lab = [str(v) for v in p.label[s : s + n]]
                tr = np.asarray(p.trusted[s : s + n], bool)
                last_t = np.asarray(h.last_trusted, bool)
                last_c = last_t if h.last_cheap is None else np.asarray(h.last_cheap, bool)
                need[s : s + n] = (
                    np.asarray(h.due, bool)
                    | (np.asarray(lab, object) != np.asarray(h.last_label, object))
                    | np.where(tr, ~last_c, last_t)
                )
            s += n
        idx = np.flatnonzero(need)
        if len(idx):
            self.model.assess_subset(x, p, idx, ids)
        self.stats.explained += len(idx)
        return need.tolist()

    # -- main loop ------------------------------------------------------------------------
    def _parent_gone(self) -> bool:
        return self.s.parent_pid is not None and os.getppid() != self.s.parent_pid

    def run(self) -> int:
        """Serves until told to stop (bridge ``stop``, SIGTERM/SIGINT, or the parent died)."""
        self._sock = self._open()
        self._hello()
        try:
            while True:
                if self._stopping and not self._queue:
                    break
                if self._queue:
                    self._score(self._take_batch())
                    self._receive(0)
                    continue
                self._receive(self.s.heartbeat_s * 1000.0 / 2)
                self._check_monitor()
                now = time.monotonic()
                if self._parent_gone():
                    log.warning("scorer %s: parent process gone, exiting", self.s.name)
                    break
                if not self._welcomed and now - self._last_hello >= self.s.heartbeat_s * 2:
                    self._hello()  # the bridge may not have been up: say hello again
                elif now - self._last_sent >= self.s.heartbeat_s:
                    self._send(wire.Heartbeat())
            if self._exit_code == EXIT_OK:
                self._send(wire.Bye("stopping"))
        finally:
            if self._mon is not None:
                self._sock.disable_monitor()
                self._mon.close(0)
                self._mon = None
            self._sock.close()
        return self._exit_code

    def stop(self) -> None:
        """Finish queued work, then leave (safe from a signal handler)."""
        self._stopping = True


def serve_scorer(model_path: str, device: str, threads: int, settings: ScorerSettings) -> int:
    """The body of ``iotcls serve --scorer-only``: load the model, serve until stopped."""
    try:
        model = load_model(
            model_path, device, threads, settings.batch_size, settings.explain, settings.row_cache
        )
        warm_s = warm_up(model, settings.batch_size)
    except Exception as e:  # the same file fails the same way again: do not restart
        print(f"iotcls scorer {settings.name}: error: {first_line(e)}", file=sys.stderr)
        return EXIT_MODEL
    scorer = Scorer(model, settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: scorer.stop())
    trust = (
        "with a trust state"
        if getattr(model, "trust", None) is not None
        else "without a trust state (confidence criterion)"
    )
    log.info(
        "scorer %s: model %s %s on %s, explaining %s labels, warmed up in %.2f s, connecting to %s",
        settings.name,
        scorer.model_id,
        trust,
        scorer.device,
        settings.explain,
        warm_s,
        settings.connect,
    )
    return scorer.run()
