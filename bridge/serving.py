"""The bridge process of ``iotcls serve``: Zeek in, matrices to scorers, labels back to Zeek.

Pieces and who owns what:

* the Zeek side (:mod:`iotcls.bridge.zeek_ws`, :mod:`iotcls.bridge.records`): the WebSocket
  connection with its handshake and reconnects, decoding ``IoTClass::flow`` events into
  :class:`~iotcls.schema.FlowRecord` and encoding label events;
* the intake (here): records -> rows -> flow-sequence matrices, with the same
  :class:`~iotcls.layout.SequenceAssembler` as every other path, so the matrices are the ones
  ``iotcls classify`` builds;
* the :class:`~iotcls.bridge.dispatch.Dispatcher`: bounded queue, scorers, shed policy;
* the :class:`~iotcls.scorer.supervisor.Supervisor`: the local scorer processes.

Shutdown (SIGINT/SIGTERM): stop taking records from Zeek, let the dispatcher finish what is
queued and in flight (``bridge.shutdown_timeout_s``), send those labels, stop the scorers,
print the summary line.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import numpy as np

from iotcls.config import Config
from iotcls.flowtable import FlowTable
from iotcls.layout import MatrixLayout, SequenceAssembler
from iotcls.schema import FlowRecord

from .dispatch import Dispatcher, Outcome
from .metrics import PrometheusExporter, ServeMetrics

log = logging.getLogger("iotcls.serve")


class Intake:
    """Flow records -> matrices (one per record, in arrival order) -> the dispatcher."""

    def __init__(self, layout: MatrixLayout, dispatcher: Dispatcher, max_devices: int):
        self.layout = layout
        self.dispatcher = dispatcher
        self.assembler = SequenceAssembler(layout, max_devices=max_devices)
        self._payload_bytes = max(1, layout.required_payload_bytes())

    def add(self, records: list[FlowRecord]) -> None:
        """Each record's outcome carries ``(record, n_flows)`` as its context."""
        if not records:
            return
        t = FlowTable.from_records(records, self.layout.packets, self._payload_bytes)
        rows = self.layout.encode_rows(t)
        devices = [r.device for r in records]
        mats = self.assembler.add(rows, t.start, devices)
        flows = np.any(mats != 0, axis=2).sum(axis=1).tolist()  # rows holding a flow
        self.dispatcher.submit(mats, devices, list(zip(records, flows)))


class Service:
    def __init__(self, cfg: Config, config_path: str | None, log_level: str = "info"):
        self.cfg = cfg
        self.config_path = config_path
        self.log_level = log_level
        self.metrics = ServeMetrics()
        self._stop = asyncio.Event()

    def _load_model(self):
        from iotcls.bundle import ModelBundle

        return ModelBundle.load(self.cfg.scorers.model or None)

    async def run(self) -> int:
        from iotcls.scorer.supervisor import Supervisor, scorer_command

        from .zeek_side import ZeekSide

        cfg = self.cfg
        bundle = self._load_model()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        zeek: ZeekSide | None = None

        def deliver(outcomes: list[Outcome]) -> None:
            if zeek is not None:
                zeek.send_labels([o for o in outcomes if o.shed is None and o.send])

        dispatcher = Dispatcher(cfg, bundle.layout, deliver, self.metrics, model_id=bundle.name)
        endpoints = await dispatcher.start()
        exporter = None
        if cfg.metrics.enabled:
            exporter = PrometheusExporter(self.metrics, cfg.metrics.address, cfg.metrics.port)
        intake = Intake(bundle.layout, dispatcher, cfg.bridge.max_devices)
        zeek = ZeekSide(cfg.zeek, intake.add, self.metrics, bundle.layout,
                        is_idle=lambda: dispatcher.pending == 0 and dispatcher.inflight == 0)
        connect = endpoints[0].replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")
        supervisor = Supervisor(
            cfg.scorers.count,
            scorer_command(connect, self.config_path, cfg.scorers.model or None,
                           cfg.scorers.device, self.log_level),  # fmt: skip
            on_exit=dispatcher.scorer_lost,
            backoff_s=cfg.scorers.restart_backoff_s,
            on_restart=lambda: setattr(self.metrics, "scorer_restarts",
                                       self.metrics.scorer_restarts + 1),  # fmt: skip
        )
        supervisor.start()
        print(
            f"iotcls serve: model {bundle.name} ({len(bundle.classes)} classes) from "
            f"{bundle.source}; scorers connect to {', '.join(endpoints)}; "
            f"{cfg.scorers.count} local scorer(s) on {cfg.scorers.device}; "
            f"zeek {cfg.zeek.url} topics {','.join(cfg.zeek.topics)}; metrics "
            + (f"http://{cfg.metrics.address}:{exporter.port}/metrics" if exporter else "off"),
            flush=True,
        )
        zeek_task = asyncio.create_task(zeek.run(), name="zeek")
        stop_task = asyncio.create_task(self._stop.wait())
        await asyncio.wait({zeek_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        t0 = time.monotonic()
        log.info("stopping: finishing %d queued and %d in-flight records",
                 dispatcher.pending, dispatcher.inflight)  # fmt: skip
        zeek.pause()  # no new records; labels still go out
        await dispatcher.drain(cfg.bridge.shutdown_timeout_s)
        await zeek.flush()
        await dispatcher.stop_scorers()
        await supervisor.stop()
        await zeek.close()
        zeek_task.cancel()
        await asyncio.gather(zeek_task, return_exceptions=True)
        await dispatcher.close()
        if exporter:
            exporter.close()
        print(f"iotcls serve: stopped in {time.monotonic() - t0:.1f} s: {self.metrics.summary()}",
              flush=True)  # fmt: skip
        return 0
