"""The bridge process of ``iotcls serve``: Zeek in, matrices to scorers, labels back to Zeek.

Pieces and who owns what:

* :class:`~iotcls.bridge.zeek_ws.ZeekClient`: the WebSocket session (handshake, reconnects,
  lenient frames);
* :class:`~iotcls.bridge.core.Bridge`: decoding ``IoTClass::flow``, matrix assembly with the
  pcap path's code, hello/welcome, the offline hold and ``drain``, label events; here it is
  :class:`ServeBridge`, which lets batches be scored concurrently;
* :class:`DispatchScorer`: the Bridge's scorer, backed by the
  :class:`~iotcls.bridge.dispatch.Dispatcher` (bounded queue, shed policy, log policy,
  scorer processes over ZeroMQ);
* :class:`~iotcls.scorer.supervisor.Supervisor`: the local scorer processes.

Shutdown (SIGINT/SIGTERM): stop taking records from Zeek (later ones are counted as shed for
``shutdown``), hand what the Bridge holds to the dispatcher, let it finish what is queued and
in flight (``bridge.shutdown_timeout_s``), send those labels, stop the scorers, close the
connection to Zeek, write the flow store's last segment, print the summary line. A part that
stops because of an error stops the service the same way, and the exit status says so
(non-zero: systemd's ``Restart=on-failure`` restarts it).

Reload (SIGHUP, ``iotcls reload``, ``systemctl reload iotcls``): see :meth:`Service.reload`.
Recording (``record:``): see :class:`DispatchScorer` and :mod:`iotcls.store`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from iotcls.bundle import BundleError
from iotcls.config import Config, ConfigError
from iotcls.config import load as load_config
from iotcls.flowtable import FlowTable
from iotcls.scorer.service import EXIT_MODEL, check_bundle, load_bundle
from iotcls.scorer.supervisor import Supervisor, scorer_command
from iotcls.store import Labels, Recorder
from iotcls.trust.decision import DeviceConsistency, TrustState
from iotcls.trust.dhcp_identity import DhcpIdentity
from iotcls.trust.dns_names import DnsNames

from . import curve as cv
from .core import Bridge
from .dispatch import Dispatcher, Outcome
from .metrics import PrometheusExporter, ServeMetrics
from .serve_bridge import ServeBridge
from .suricata import SuricataSide
from .zeek_ws import ZeekClient, tls_context

log = logging.getLogger("iotcls.serve")

STRATEGY = "sequence"


class _Group:
    """The outcomes of one scoring call, gathered until every record has one."""

    __slots__ = ("verdicts", "outcomes", "flows", "left", "done")

    def __init__(self, n: int, flows: list[int], done: asyncio.Future):
        self.verdicts: list[Outcome | None] = [None] * n  # every outcome (labels to send: send)
        self.outcomes: list[Outcome | None] = [None] * n  # every label given, sent or not
        self.flows, self.left, self.done = flows, n, done


class DispatchScorer:
    """The Bridge's scorer: ``await scorer(matrices, table)`` -> one verdict per matrix (an
    :class:`Outcome`, which has the fields of :class:`~iotcls.bridge.records.Verdict`).

    A verdict is the record's :class:`Outcome`: a label to send, one the log policy keeps
    from Zeek (``send`` false) or a shed record (``shed`` says why); the Bridge sends the
    first kind and tells Zeek what became of the others. With a
    *recorder* (``record:``), every final record and the label it was given (sent or not)
    go to the flow store (:mod:`iotcls.store`) once the batch is labelled; ``sensor`` names
    where the records came from.
    """

    def __init__(
        self, dispatcher: Dispatcher, recorder: Recorder | None = None, sensor: str = "zeek"
    ):
        self.dispatcher, self.recorder, self.sensor = dispatcher, recorder, sensor

    async def __call__(
        self, matrices: np.ndarray, table: FlowTable, early: bool = False
    ) -> list[Outcome | None]:
        n = len(matrices)
        if n == 0:
            return []
        flows = np.any(matrices != 0, axis=2).sum(axis=1).tolist()  # rows holding a flow
        group = _Group(n, flows, asyncio.get_running_loop().create_future())
        self.dispatcher.submit(
            matrices, list(table.device_keys()), [(group, i) for i in range(n)], early=early
        )
        verdicts = await group.done
        if self.recorder is not None and not early:
            self.recorder.add(table, Labels.of(group.outcomes, self.sensor))
        return verdicts

    async def early(self, matrices: np.ndarray, table: FlowTable) -> list[Outcome | None]:
        """Early records: labelled as the others, changing no device state."""
        return await self(matrices, table, early=True)

    @staticmethod
    def deliver(outcomes: list[Outcome]) -> None:
        """The dispatcher's callback: fills in verdicts, completes finished calls."""
        for o in outcomes:
            group, i = o.ctx
            if o.shed is None:
                group.outcomes[i] = o
                if o.send:  # the outcome is the verdict (records.Verdict's fields)
                    o.strategy, o.n_flows = STRATEGY, group.flows[i]
            # every outcome: the Bridge sends the labels and tells Zeek what became of the rest
            group.verdicts[i] = o
            group.left -= 1
            if group.left == 0 and not group.done.done():
                group.done.set_result(group.verdicts)


def _client_rejections(client: Any, bridge: Bridge) -> dict[tuple[str, str], int]:
    """What the Zeek side refused, as metrics counters."""
    s, b = client.stats, bridge.stats
    out = {
        ("websocket", "malformed"): s.malformed,
        ("websocket", "unexpected"): s.unexpected,
        ("websocket", "handler_error"): s.handler_errors,
        ("websocket", "bad_flow_record"): b.bad_records,
        ("websocket", "duplicate"): b.duplicates,
        ("websocket", "unexpected_event"): b.other_events,
    }
    for code, n in s.zeek_errors.items():
        out[("zeek", code)] = n
    return {k: v for k, v in out.items() if v}


EXIT_ERROR = 1  # stopped by an error while running: worth a restart (Restart=on-failure)
EXIT_UNUSABLE = 2  # the model cannot be used, as at start: a restart would not help
RELOAD_WAIT_S = 120.0  # a reload's scorers have this long to load the model and say hello


def trust_rules(bundle: Any) -> tuple[DeviceConsistency, DhcpIdentity, DnsNames]:
    """Trust rules 5, 6 and 9 as *bundle*'s trust state sets them (the defaults without
    one): the dispatcher applies them, since only the bridge sees each device's labels
    whole."""
    state = TrustState.from_dict(bundle.trust) if bundle.trust else None
    return DeviceConsistency.of(state), DhcpIdentity.of(state), DnsNames.of(state)


class Service:
    """``iotcls serve``: the bridge(s), the dispatcher, the local scorers, the flow store and
    the metrics. :meth:`build` wires them, :meth:`run` serves until SIGINT/SIGTERM or an
    error, :meth:`shutdown` stops them in order; SIGHUP (:meth:`reload`) swaps the model.

    :meth:`run` returns the exit status: 0 after SIGINT/SIGTERM, :data:`EXIT_ERROR` when a
    part stopped because of an error (a task that raised or returned on its own),
    :data:`EXIT_UNUSABLE` when every local scorer was given up because the model cannot be
    used. Start-up problems raise (OSError, BundleError, KeyFileError), each one line.

    ``model_fixed``: the model path came from the command line, so a reload reads that path
    again rather than ``scorers.model`` of the configuration file."""

    def __init__(
        self,
        cfg: Config,
        config_path: str | None,
        log_level: str = "info",
        model_fixed: bool = False,
    ):
        self.cfg = cfg
        self.config_path = config_path
        self.log_level = log_level
        self.model_fixed = model_fixed
        self.model_path = cfg.scorers.model
        self.metrics = ServeMetrics()
        self._stop = asyncio.Event()
        self._failure: tuple[int, str] | None = None  # (exit status, why), first one wins
        self.bundle: Any = None
        self.keys: Any = None
        self.exporter: PrometheusExporter | None = None
        self.dispatcher: Dispatcher | None = None
        self.endpoints: list[str] = []
        self.recorder: Recorder | None = None
        self.client: ZeekClient | None = None
        self.zeek_bridge: ServeBridge | None = None
        self.suri: Any = None
        self.bridges: list[ServeBridge] = []
        self.supervisor: Supervisor | None = None  # the one running the current model
        self.supervisors: list[Supervisor] = []  # during a reload, the new one too
        self.tasks: set[asyncio.Task] = set()
        self.zeek_task: asyncio.Task | None = None
        self.reloads = 0
        self._reload_task: asyncio.Task | None = None
        self._reload_again = False

    def fail(self, status: int, why: str) -> None:
        """Stop the service because of an error: it exits with *status* after shutting down."""
        if self._failure is None:
            self._failure = (status, why)
            log.error("stopping: %s", why)
        self._stop.set()

    # -- the whole life -------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        await self.build()
        self._start_tasks()
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait({*self.tasks, stop}, return_when=asyncio.FIRST_COMPLETED)
        self._check_tasks(self.tasks)
        return await self.shutdown()

    # -- build ----------------------------------------------------------------------------
    def _load(self, path: str) -> Any:
        """The bundle at *path* (the default model when empty), checked to score as a
        scorer will: a file that loads but cannot score stops us here, in one line."""
        bundle = load_bundle(path)
        check_bundle(bundle)
        return bundle

    async def build(self) -> None:
        """Loads the model and starts every part but the sensors' tasks; a part that cannot
        start (a busy port, an unwritable store) raises one line, the others are closed."""
        cfg = self.cfg
        self.bundle = self._load(self.model_path)
        self.keys = self._curve_keys()
        if cfg.metrics.enabled:  # first: a busy port is refused before anything else runs
            self.exporter = PrometheusExporter(self.metrics, cfg.metrics.address, cfg.metrics.port)
        consistency, identities, names = trust_rules(self.bundle)
        self.dispatcher = Dispatcher(
            cfg,
            self.bundle.layout,
            DispatchScorer.deliver,
            self.metrics,
            model_id=self.bundle.name,
            consistency=consistency,
            identities=identities,
            classes=self.bundle.classes,
            keys=self.keys,
            names=names,
        )
        try:
            self.endpoints = await self.dispatcher.start()
            if cfg.record.enabled:
                self.recorder = Recorder.from_config(cfg.record, self.bundle.layout.window_s)
            if cfg.suricata.enabled:
                self.suri = await SuricataSide.start(
                    cfg.suricata,
                    self.bundle.layout,
                    self._scorer("suricata"),
                    self.metrics,
                    **self._bridge_options(),
                )
        except BaseException:
            await self.dispatcher.close()
            if self.exporter:
                self.exporter.close()
            raise
        if self.suri is not None:
            self.metrics.rejected_sources.append(self.suri.rejections)
            self.bridges.append(self.suri.bridge)
        if cfg.zeek.enabled:
            self._build_zeek()
        self._add_metric_sources()
        self.supervisor = self._start_scorers(self.model_path, "scorer")
        self.supervisor.on_give_up = self._on_give_up(self.supervisor)
        # Everything allocated so far (torch, the model bundle, numpy, the codecs) lives
        # as long as the process: out of the collector's sight, a full collection scans
        # only what the traffic allocates (a 46 ms pause in the load generator without it).
        gc.freeze()
        self._print_banner()

    def _bridge_options(self) -> dict[str, Any]:
        c = self.cfg
        return dict(
            batch_size=c.scorers.batch_size,
            max_delay_s=c.scorers.max_wait_ms / 1000.0,
            max_devices=c.bridge.max_devices,
            max_live_records=2 * c.bridge.queue_records,
        )

    def _scorer(self, sensor: str) -> DispatchScorer:
        assert self.dispatcher is not None
        return DispatchScorer(self.dispatcher, self.recorder, sensor)

    def _build_zeek(self) -> None:
        """The Zeek side: its ServeBridge, the WebSocket client, their metrics."""
        cfg = self.cfg

        async def send(frame: bytes) -> None:
            assert self.client is not None
            await self.client.send(frame)

        async def send_many(frames: list[bytes]) -> None:
            assert self.client is not None
            await self.client.send_many(frames)

        bridge = ServeBridge(
            self.bundle.layout,
            self._scorer("zeek"),
            send,
            metrics=self.metrics,
            labels_topic=cfg.zeek.label_topic,
            name="iotcls-serve",
            send_many=send_many,
            **self._bridge_options(),
        )
        self.bridges.insert(0, bridge)
        self.zeek_bridge = zb = bridge
        self.client = zc = ZeekClient(
            cfg.zeek.url,
            cfg.zeek.topics,
            on_message=bridge.on_message,
            on_raw=bridge.on_raw,
            on_connect=bridge.on_connect,
            reconnect_max_s=cfg.zeek.reconnect_max_s,
            ssl_context=tls_context(cfg.zeek.tls_ca, cfg.zeek.tls_cert, cfg.zeek.tls_key)
            if cfg.zeek.url.startswith("wss://")
            else None,
        )
        self.metrics.rejected_sources.append(lambda: _client_rejections(zc, zb))
        self.metrics.gauge_sources += [
            (
                "iotcls_zeek_connected",
                "1 while the WebSocket session to Zeek is up",
                lambda: float(zc.connected.is_set()),
            ),
            (
                "iotcls_zeek_buffered_frames",
                "Frames held for Zeek while it is unreachable",
                lambda: zc.buffered,
            ),
        ]
        self.metrics.counter_sources += [
            (
                "iotcls_zeek_frames_dropped",
                "Frames for Zeek dropped from a full buffer while it was unreachable",
                lambda: zc.stats.dropped,
            ),
            (
                "iotcls_zeek_reconnects",
                "WebSocket sessions to Zeek established",
                lambda: zc.stats.connects,
            ),
        ]

    def _add_metric_sources(self) -> None:
        bridges, m = self.bridges, self.metrics
        m.gauge_sources += [
            (
                "iotcls_decoded_waiting",
                "Decoded records waiting for matrix assembly",
                lambda: sum(b.queued for b in bridges),
            ),
            (
                "iotcls_batches_scoring",
                "Batches between assembly and their labels",
                lambda: sum(b.batches_in_flight for b in bridges),
            ),
            (
                "iotcls_live_records",
                "Records decoded and not yet done (bound: 2 x bridge.queue_records per sensor)",
                lambda: sum(b.live_records for b in bridges),
            ),
        ]
        m.counter_sources.append(
            (
                "iotcls_model_reloads",
                "Model reloads that took effect (SIGHUP)",
                lambda: self.reloads,
            )
        )
        rec = self.recorder
        if rec is not None:
            st = rec.stats
            m.counter_sources += [
                (
                    "iotcls_records_stored",
                    "Flow records written to the store (record:)",
                    lambda: st.records,
                ),
                (
                    "iotcls_store_write_errors",
                    "Store segments that could not be written",
                    lambda: st.errors,
                ),
                (
                    "iotcls_store_records_lost",
                    "Records of segments that could not be written",
                    lambda: st.lost,
                ),
            ]

    def _start_scorers(self, model_path: str, prefix: str) -> Supervisor:
        """Starts ``scorers.count`` local scorers of *model_path* named ``<prefix>-N.M``."""
        cfg = self.cfg
        assert self.dispatcher is not None
        connect = self.endpoints[0].replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")
        sup = Supervisor(
            cfg.scorers.count,
            scorer_command(
                connect,
                self.config_path,
                model_path or None,
                cfg.scorers.device,
                self.log_level,
                extra=["--keys", cfg.bridge.keys_dir] if self.keys else None,
                curve=self.keys is not None,
            ),
            on_exit=self.dispatcher.scorer_lost,
            backoff_s=cfg.scorers.restart_backoff_s,
            on_restart=self.metrics.count_restart,
            prefix=prefix,
        )
        sup.start()
        self.supervisors.append(sup)
        return sup

    def _print_banner(self) -> None:
        cfg, b = self.cfg, self.bundle
        print(
            f"iotcls serve: model {b.name} ({len(b.classes)} classes) from "
            f"{b.source}; scorers connect to {', '.join(self.endpoints)}"
            + (" (CURVE)" if self.keys else "")
            + "; "
            f"{cfg.scorers.count} local scorer(s) on {cfg.scorers.device}; "
            + (
                f"zeek {cfg.zeek.url} topics {','.join(cfg.zeek.topics)}; "
                if self.client
                else "zeek off; "
            )
            + (f"suricata {cfg.suricata.socket} -> {cfg.suricata.eve_log}; " if self.suri else "")
            + (f"recording to {cfg.record.directory}; " if self.recorder else "")
            + "metrics "
            + (
                f"http://{cfg.metrics.address}:{self.exporter.port}/metrics"
                if self.exporter
                else "off"
            ),
            flush=True,
        )

    def _start_tasks(self) -> None:
        if self.client is not None and self.zeek_bridge is not None:
            self.zeek_task = asyncio.create_task(self.client.run(), name="zeek")
            self.tasks |= {
                self.zeek_task,
                asyncio.create_task(self.zeek_bridge.run(), name="bridge"),
            }
        if self.suri is not None:
            self.tasks.add(self.suri.task)
        if self.recorder is not None:
            self.tasks.add(asyncio.create_task(self.recorder.run(), name="record"))

    def _curve_keys(self):
        """The CURVE keys when the scorer socket uses CURVE (``bridge.curve``), else None."""
        b = self.cfg.bridge
        if not cv.enabled(b.curve, b.bind):
            if b.curve == "off" and not all(cv.is_loopback(a) for a in b.bind):
                log.warning(
                    "bridge.curve is off and the scorer socket binds %s: any host that "
                    "reaches it can pose as a scorer and read flow records",
                    ", ".join(b.bind),
                )
            return None
        return cv.server_keys(b.keys_dir)

    def _on_give_up(self, supervisor: Supervisor) -> Callable[[str, str, int | None], None]:
        def give_up(name: str, why: str, status: int | None) -> None:
            if supervisor.all_given_up and supervisor is self.supervisor:
                code = EXIT_UNUSABLE if status == EXIT_MODEL else EXIT_ERROR
                self.fail(code, f"no local scorer is left: scorer {name} {why}")

        return give_up

    # -- reload (SIGHUP) ------------------------------------------------------------------
    def request_reload(self) -> None:
        """SIGHUP: reload the model bundle; one reload at a time (a SIGHUP during one runs
        another once it is done)."""
        if self.supervisor is None or self._stop.is_set():
            log.warning(
                "reload: ignored: the service is %s",
                "stopping" if self._stop.is_set() else "still starting",
            )
            return
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True
            log.info("reload: one is under way; another will follow it")
            return
        self._reload_task = asyncio.create_task(self.reload(), name="reload")

    async def reload(self) -> bool:
        """Swap the model without losing or labelling twice a record: load and check the new
        bundle (``scorers.model`` of the configuration file, read again), start scorers of
        it beside the running ones, and once they have all said hello, retire the old ones:
        they get no new batches, answer those they hold, and stop. Every label names the
        model that gave it. A bundle that cannot be used, or has another matrix layout (the
        bridge keeps each device's history in that layout), leaves the old model serving."""
        ok = False
        while True:
            self._reload_again = False
            try:
                ok = await self._reload_once()
            except Exception as e:  # a reload must never take the service down
                log.error("reload: failed: %s: %s", type(e).__name__, e)
                ok = False
            if not self._reload_again or self._stop.is_set():
                return ok

    def _model_path_now(self) -> str:
        """The model path a reload loads: the configuration file's, read again, unless the
        command line named the model."""
        if self.model_fixed or not self.config_path:
            return self.model_path
        return load_config(self.config_path).scorers.model

    async def _reload_once(self) -> bool:
        old, d = self.bundle, self.dispatcher
        assert d is not None and self.supervisor is not None
        try:
            path = self._model_path_now()
            log.info("reload: loading %s", path or "the default model")
            new = await asyncio.to_thread(self._load, path)
        except (BundleError, ConfigError, OSError) as e:
            log.error("reload: keeping model %s: %s", old.name, e)
            return False
        if new.layout != old.layout:
            log.error(
                "reload: keeping model %s: %s has another matrix layout (%s); the "
                "bridge's device histories are in the old one: restart serve to change "
                "layouts",
                old.name,
                new.name,
                new.layout.to_dict(),
            )
            return False
        if new.sha256 == old.sha256:
            log.info("reload: %s is the model serving already", new.name)
            return True
        # while both run, labels of either model's classes are valid
        d.use_model(
            new.name,
            [*old.classes, *[c for c in new.classes if c not in old.classes]],
            *trust_rules(new),
        )
        sup = self._start_scorers(path, f"scorer-r{self.reloads + 1}")
        if not await self._scorers_ready(sup):
            log.error(
                "reload: keeping model %s: the scorers of %s did not connect within %.0f s",
                old.name,
                new.name,
                RELOAD_WAIT_S,
            )
            d.use_model(old.name, old.classes, *trust_rules(old))
            await sup.stop()
            self.supervisors.remove(sup)
            return False
        retired = self.supervisor
        d.retire(retired.names)
        self.supervisor = sup
        sup.on_give_up = self._on_give_up(sup)
        await retired.stop(self.cfg.bridge.shutdown_timeout_s)
        self.supervisors.remove(retired)
        d.use_model(new.name, new.classes)
        self.bundle, self.model_path = new, path
        self.reloads += 1
        msg = f"reload: serving model {new.name} ({len(new.classes)} classes) from {new.source}, was {old.name}"
        log.info("%s", msg)
        print(f"iotcls serve: {msg}", flush=True)
        return True

    async def _scorers_ready(self, sup: Supervisor) -> bool:
        """Whether every scorer of *sup* said hello within RELOAD_WAIT_S (none to wait
        for: at once)."""
        assert self.dispatcher is not None
        deadline = time.monotonic() + RELOAD_WAIT_S
        want = self.cfg.scorers.count
        while time.monotonic() < deadline and not sup.all_given_up and not self._stop.is_set():
            names = sup.names
            if len(names) == want and names <= set(self.dispatcher.scorers):
                return True
            await asyncio.sleep(0.05)
        return want == 0

    # -- shutdown -------------------------------------------------------------------------
    async def shutdown(self) -> int:
        """Stop taking records, label what was taken, stop the scorers, close the sensors'
        connections and the store; returns the exit status."""
        t0 = time.monotonic()
        cfg, d = self.cfg, self.dispatcher
        assert d is not None
        if self._reload_task is not None:  # its scorers, if any, are stopped below
            self._reload_task.cancel()
            await asyncio.gather(self._reload_task, return_exceptions=True)
        for b in self.bridges:
            b.pause()
        for b in self.bridges:
            await b.hand_over(cfg.bridge.shutdown_timeout_s)
        log.info("stopping: finishing %d queued and %d in-flight records", d.pending, d.inflight)
        await d.drain(cfg.bridge.shutdown_timeout_s)
        try:
            await asyncio.wait_for(asyncio.gather(*(b.settle() for b in self.bridges)), 10.0)
        except asyncio.TimeoutError:
            log.warning("shutdown: label events still being sent after 10 s")
        await d.stop_scorers()
        for sup in self.supervisors:
            await sup.stop()
        await self._close_sensors()
        if self.recorder is not None:  # after the labels: every labelled record is in
            await self.recorder.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await d.close()
        if self.exporter:
            self.exporter.close()
        print(
            f"iotcls serve: stopped in {time.monotonic() - t0:.1f} s: {self.metrics.summary()}",
            flush=True,
        )
        if self._failure is not None:
            print(f"iotcls serve: error: {self._failure[1]}", file=sys.stderr, flush=True)
            return self._failure[0]
        return 0

    async def _close_sensors(self) -> None:
        # closing the WebSocket waits for Zeek's close frame, which comes after Zeek has read
        # every label sent before ours: only then are they delivered
        if self.client is not None and self.zeek_task is not None:
            self.client.stop()
            try:
                await asyncio.wait_for(asyncio.shield(self.zeek_task), 15.0)
            except (asyncio.TimeoutError, Exception):
                log.warning("shutdown: Zeek did not close the connection in 15 s")
        if self.suri is not None:
            self.tasks.discard(self.suri.task)
            await self.suri.close()  # after the labels: the EVE file is complete

    def _check_tasks(self, tasks: set[asyncio.Task]) -> None:
        """A task that ended before we were asked to stop ended by an error (it raised, or
        returned when it should run for ever): the service stops and exits non-zero."""
        for t in tasks:
            if not t.done():
                continue
            exc = None if t.cancelled() else t.exception()
            if exc is not None:
                self.fail(
                    EXIT_ERROR, f"{t.get_name()} stopped: {type(exc).__name__}: {str(exc)[:200]}"
                )
            elif not self._stop.is_set():
                self.fail(EXIT_ERROR, f"{t.get_name()} stopped on its own")
