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
connection to Zeek, print the summary line. A part that stops because of an error stops the
service the same way, and the exit status says so (non-zero: systemd's
``Restart=on-failure`` restarts it).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time
from typing import Any, Callable

import numpy as np

from iotcls.config import Config
from iotcls.flowtable import FlowTable

from .core import Bridge
from .dispatch import Dispatcher, Outcome
from .metrics import PrometheusExporter, ServeMetrics
from .serve_bridge import ServeBridge

log = logging.getLogger("iotcls.serve")

STRATEGY = "sequence"


class _Group:
    """The outcomes of one scoring call, gathered until every record has one."""

    __slots__ = ("verdicts", "flows", "left", "done")

    def __init__(self, n: int, flows: list[int], done: asyncio.Future):
        self.verdicts: list[Outcome | None] = [None] * n
        self.flows, self.left, self.done = flows, n, done


class DispatchScorer:
    """The Bridge's scorer: ``await scorer(matrices, table)`` -> one verdict per matrix (an
    :class:`Outcome`, which has the fields of :class:`~iotcls.bridge.records.Verdict`).

    A verdict is None when the record was shed (see the dispatcher) or when the log policy
    keeps its label from Zeek; the dispatcher's metrics tell the two apart.
    """

    def __init__(self, dispatcher: Dispatcher):
        self.dispatcher = dispatcher

    async def __call__(self, matrices: np.ndarray, table: FlowTable,
                       early: bool = False) -> list[Outcome | None]:  # fmt: skip
        n = len(matrices)
        if n == 0:
            return []
        flows = np.any(matrices != 0, axis=2).sum(axis=1).tolist()  # rows holding a flow
        group = _Group(n, flows, asyncio.get_running_loop().create_future())
        self.dispatcher.submit(matrices, list(table.device_keys()), [(group, i) for i in range(n)],
                               early=early)  # fmt: skip
        return await group.done

    async def early(self, matrices: np.ndarray, table: FlowTable) -> list[Outcome | None]:
        """Early records: labelled as the others, changing no device state."""
        return await self(matrices, table, early=True)

    @staticmethod
    def deliver(outcomes: list[Outcome]) -> None:
        """The dispatcher's callback: fills in verdicts, completes finished calls."""
        for o in outcomes:
            group, i = o.ctx
            if o.shed is None and o.send:  # the outcome is the verdict (records.Verdict's fields)
                o.strategy, o.n_flows = STRATEGY, group.flows[i]
                group.verdicts[i] = o
            group.left -= 1
            if group.left == 0 and not group.done.done():
                group.done.set_result(group.verdicts)


def _client_rejections(client: Any, bridge: Bridge) -> dict[tuple[str, str], int]:
    """What the Zeek side refused, as metrics counters."""
    s, b = client.stats, bridge.stats
    out = {("websocket", "malformed"): s.malformed, ("websocket", "unexpected"): s.unexpected,
           ("websocket", "handler_error"): s.handler_errors,
           ("websocket", "bad_flow_record"): b.bad_records,
           ("websocket", "duplicate"): b.duplicates,
           ("websocket", "unexpected_event"): b.other_events}  # fmt: skip
    for code, n in s.zeek_errors.items():
        out[("zeek", code)] = n
    return {k: v for k, v in out.items() if v}


EXIT_ERROR = 1  # stopped by an error while running: worth a restart (Restart=on-failure)
EXIT_UNUSABLE = 2  # the model cannot be used, as at start: a restart would not help


class Service:
    """``iotcls serve``: the bridge(s), the dispatcher, the local scorers and the metrics.

    :meth:`run` returns the exit status: 0 after SIGINT/SIGTERM, :data:`EXIT_ERROR` when a
    part stopped because of an error (a task that raised or returned on its own),
    :data:`EXIT_UNUSABLE` when every local scorer was given up because the model cannot be
    used. Start-up problems raise (OSError, BundleError, KeyFileError), each one line."""

    def __init__(self, cfg: Config, config_path: str | None, log_level: str = "info"):
        self.cfg = cfg
        self.config_path = config_path
        self.log_level = log_level
        self.metrics = ServeMetrics()
        self._stop = asyncio.Event()
        self._failure: tuple[int, str] | None = None  # (exit status, why), first one wins

    def fail(self, status: int, why: str) -> None:
        """Stop the service because of an error: it exits with *status* after shutting down."""
        if self._failure is None:
            self._failure = (status, why)
            log.error("stopping: %s", why)
        self._stop.set()

    def _curve_keys(self):
        """The CURVE keys when the scorer socket uses CURVE (``bridge.curve``), else None."""
        from . import curve as cv

        b = self.cfg.bridge
        if not cv.enabled(b.curve, b.bind):
            if b.curve == "off" and not all(cv.is_loopback(a) for a in b.bind):
                log.warning("bridge.curve is off and the scorer socket binds %s: any host that "
                            "reaches it can pose as a scorer and read flow records",
                            ", ".join(b.bind))  # fmt: skip
            return None
        return cv.server_keys(b.keys_dir)

    def _on_give_up(self, supervisor: Any) -> Callable[[str, str, int | None], None]:
        def give_up(name: str, why: str, status: int | None) -> None:
            if supervisor.all_given_up:
                from iotcls.scorer.service import EXIT_MODEL

                code = EXIT_UNUSABLE if status == EXIT_MODEL else EXIT_ERROR
                self.fail(code, f"no local scorer is left: scorer {name} {why}")

        return give_up

    async def run(self) -> int:
        from iotcls.scorer.service import check_bundle, load_bundle
        from iotcls.scorer.supervisor import Supervisor, scorer_command

        from .zeek_ws import ZeekClient

        cfg = self.cfg
        bundle = load_bundle(cfg.scorers.model)
        check_bundle(bundle)  # a file that loads but cannot score stops us here, in one line
        keys = self._curve_keys()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)

        from iotcls.trust.decision import DeviceConsistency, TrustState
        from iotcls.trust.dhcp_identity import DhcpIdentity

        state = TrustState.from_dict(bundle.trust) if bundle.trust else None
        exporter = None
        if cfg.metrics.enabled:  # first: a busy port is refused before anything else runs
            exporter = PrometheusExporter(self.metrics, cfg.metrics.address, cfg.metrics.port)
        dispatcher = Dispatcher(cfg, bundle.layout, DispatchScorer.deliver, self.metrics,
                                model_id=bundle.name, consistency=DeviceConsistency.of(state),
                                identities=DhcpIdentity.of(state), classes=bundle.classes,
                                keys=keys)  # fmt: skip
        client: ZeekClient | None = None
        suri = None
        try:
            endpoints = await dispatcher.start()
            if cfg.suricata.enabled:
                from .suricata import SuricataSide

                suri = await SuricataSide.start(
                    cfg.suricata, bundle.layout, DispatchScorer(dispatcher), self.metrics,
                    batch_size=cfg.scorers.batch_size,
                    max_delay_s=cfg.scorers.max_wait_ms / 1000.0,
                    max_devices=cfg.bridge.max_devices,
                    max_live_records=2 * cfg.bridge.queue_records,
                )  # fmt: skip
        except BaseException:
            await dispatcher.close()
            if exporter:
                exporter.close()
            raise
        if suri is not None:
            self.metrics.rejected_sources.append(suri.rejections)
        bridges: list[ServeBridge] = [suri.bridge] if suri else []

        async def send(frame: bytes) -> None:
            assert client is not None
            await client.send(frame)

        async def send_many(frames: list[bytes]) -> None:
            assert client is not None
            await client.send_many(frames)

        bridge = ServeBridge(
            bundle.layout, DispatchScorer(dispatcher), send, metrics=self.metrics,
            labels_topic=cfg.zeek.label_topic, name="iotcls-serve",
            batch_size=cfg.scorers.batch_size, max_delay_s=cfg.scorers.max_wait_ms / 1000.0,
            max_devices=cfg.bridge.max_devices, max_live_records=2 * cfg.bridge.queue_records,
            send_many=send_many,
        )  # fmt: skip
        if cfg.zeek.enabled:
            bridges.insert(0, bridge)
            client = ZeekClient(
                cfg.zeek.url, cfg.zeek.topics, on_message=bridge.on_message,
                on_raw=bridge.on_raw, on_connect=bridge.on_connect,
                reconnect_max_s=cfg.zeek.reconnect_max_s,
            )  # fmt: skip
            zc = client
            self.metrics.rejected_sources.append(lambda: _client_rejections(zc, bridge))
            self.metrics.gauge_sources += [
                ("iotcls_zeek_connected", "1 while the WebSocket session to Zeek is up",
                 lambda: float(zc.connected.is_set())),
                ("iotcls_zeek_buffered_frames", "Frames held for Zeek while it is unreachable",
                 lambda: zc.buffered),
            ]  # fmt: skip
            self.metrics.counter_sources += [
                ("iotcls_zeek_frames_dropped", "Frames for Zeek dropped from a full buffer "
                 "while it was unreachable", lambda: zc.stats.dropped),
                ("iotcls_zeek_reconnects", "WebSocket sessions to Zeek established",
                 lambda: zc.stats.connects),
            ]  # fmt: skip
        self.metrics.gauge_sources += [
            ("iotcls_decoded_waiting", "Decoded records waiting for matrix assembly",
             lambda: sum(b.queued for b in bridges)),
            ("iotcls_batches_scoring", "Batches between assembly and their labels",
             lambda: sum(b.batches_in_flight for b in bridges)),
            ("iotcls_live_records", "Records decoded and not yet done (bound: 2 x "
             "bridge.queue_records per sensor)", lambda: sum(b.live_records for b in bridges)),
        ]  # fmt: skip
        connect = endpoints[0].replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")
        supervisor = Supervisor(
            cfg.scorers.count,
            scorer_command(connect, self.config_path, cfg.scorers.model or None,
                           cfg.scorers.device, self.log_level,
                           extra=["--keys", cfg.bridge.keys_dir] if keys else None,
                           curve=keys is not None),  # fmt: skip
            on_exit=dispatcher.scorer_lost,
            backoff_s=cfg.scorers.restart_backoff_s,
            on_restart=self.metrics.count_restart,
        )
        supervisor.on_give_up = self._on_give_up(supervisor)
        supervisor.start()
        # Everything allocated so far (torch, the model bundle, numpy, the codecs) lives
        # as long as the process: out of the collector's sight, a full collection scans
        # only what the traffic allocates (a 46 ms pause in the load generator without it).
        gc.freeze()
        print(
            f"iotcls serve: model {bundle.name} ({len(bundle.classes)} classes) from "
            f"{bundle.source}; scorers connect to {', '.join(endpoints)}"
            + (" (CURVE)" if keys else "") + "; "
            f"{cfg.scorers.count} local scorer(s) on {cfg.scorers.device}; "
            + (f"zeek {cfg.zeek.url} topics {','.join(cfg.zeek.topics)}; " if client else
               "zeek off; ")
            + (f"suricata {cfg.suricata.socket} -> {cfg.suricata.eve_log}; " if suri else "")
            + "metrics "
            + (f"http://{cfg.metrics.address}:{exporter.port}/metrics" if exporter else "off"),
            flush=True,
        )
        tasks: set[asyncio.Task] = set()
        zeek_task = None
        if client is not None:
            zeek_task = asyncio.create_task(client.run(), name="zeek")
            tasks = {zeek_task, asyncio.create_task(bridge.run(), name="bridge")}
        if suri is not None:
            tasks.add(suri.task)
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait({*tasks, stop}, return_when=asyncio.FIRST_COMPLETED)
        self._check_tasks(tasks)
        t0 = time.monotonic()
        for b in bridges:
            b.pause()
        for b in bridges:
            await b.hand_over(cfg.bridge.shutdown_timeout_s)
        log.info("stopping: finishing %d queued and %d in-flight records",
                 dispatcher.pending, dispatcher.inflight)  # fmt: skip
        await dispatcher.drain(cfg.bridge.shutdown_timeout_s)
        try:
            await asyncio.wait_for(asyncio.gather(*(b.settle() for b in bridges)), 10.0)
        except asyncio.TimeoutError:
            log.warning("shutdown: label events still being sent after 10 s")
        await dispatcher.stop_scorers()
        await supervisor.stop()
        # closing the WebSocket waits for Zeek's close frame, which comes after Zeek has read
        # every label sent before ours: only then are they delivered
        if client is not None and zeek_task is not None:
            client.stop()
            try:
                await asyncio.wait_for(asyncio.shield(zeek_task), 15.0)
            except (asyncio.TimeoutError, Exception):
                log.warning("shutdown: Zeek did not close the connection in 15 s")
        if suri is not None:
            tasks.discard(suri.task)
            await suri.close()  # after the labels: the EVE file is complete
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await dispatcher.close()
        if exporter:
            exporter.close()
        print(f"iotcls serve: stopped in {time.monotonic() - t0:.1f} s: {self.metrics.summary()}",
              flush=True)  # fmt: skip
        if self._failure is not None:
            print(f"iotcls serve: error: {self._failure[1]}", file=sys.stderr, flush=True)
            return self._failure[0]
        return 0

    def _check_tasks(self, tasks: set[asyncio.Task]) -> None:
        """A task that ended before we were asked to stop ended by an error (it raised, or
        returned when it should run for ever): the service stops and exits non-zero."""
        for t in tasks:
            if not t.done():
                continue
            exc = None if t.cancelled() else t.exception()
            if exc is not None:
                self.fail(EXIT_ERROR, f"{t.get_name()} stopped: {type(exc).__name__}: "
                                      f"{str(exc)[:200]}")  # fmt: skip
            elif not self._stop.is_set():
                self.fail(EXIT_ERROR, f"{t.get_name()} stopped on its own")
