"""``iotcls serve`` end to end: a real subprocess, a fake Zeek on a real WebSocket, real
scorer processes over ZeroMQ."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from conftest import free_port
from iotcls.bridge import records as rec
from iotcls.bundle import ModelBundle
from iotcls.flowtable import FlowTable
from iotcls.layout import MatrixLayout
from iotcls.model import IoTCNN, ModelConfig
from iotcls.predict import Predictor
from iotcls.store import read_stores
from iotcls.testing.fake_zeek import FakeZeek
from iotcls.testing.synth import synthetic_records
from tiny_model import tiny_bundle

LAYOUT = MatrixLayout(history=2, packets=4, payload_bytes=4)
CLASSES = ["cam", "plug", "hub", "bulb"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    b = tiny_bundle(LAYOUT, CLASSES, seed=5)
    return str(b.save(tmp_path_factory.mktemp("model") / "m.pt"))


class Serve:
    """``iotcls serve`` as a subprocess, its output in files, its metrics over HTTP."""

    def __init__(self, tmp: Path, zeek: FakeZeek, model: str, scorers: int = 1, **extra):
        self.metrics_port = free_port()
        self.zmq_port = free_port()
        self.cfg = tmp / "serve.yaml"
        sections = {
            "zeek": {"url": zeek.url, "reconnect_max_s": 0.5},
            "bridge": {"bind": [f"tcp://127.0.0.1:{self.zmq_port}"], "shutdown_timeout_s": 20.0},
            "scorers": {
                "count": scorers,
                "model": model,
                "device": "cpu",
                "restart_backoff_s": 0.1,
            },
            "log": {"policy": "all"},
            "metrics": {"enabled": True, "port": self.metrics_port},
        }
        for key, value in extra.items():
            section, _, name = key.partition("__")
            sections.setdefault(section, {})[name] = value
        self.cfg.write_text(json.dumps(sections))  # JSON is YAML
        self.out, self.err = tmp / "stdout.txt", tmp / "stderr.txt"
        self.zeek = zeek
        self.proc: subprocess.Popen | None = None

    def start(self) -> Serve:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iotcls", "serve", "--config", str(self.cfg)],
            stdout=self.out.open("w"),
            stderr=self.err.open("w"),
        )
        return self

    def stderr(self) -> str:
        return self.err.read_text()

    def stdout(self) -> str:
        return self.out.read_text()

    async def ready(self, scorers: int = 1, timeout: float = 40.0) -> None:
        await asyncio.wait_for(self.zeek.bridge_connected.wait(), timeout)
        deadline = time.monotonic() + timeout
        while self.stderr().count("connected: model") < scorers:
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, "scorers did not connect:\n" + self.stderr()
            await asyncio.sleep(0.05)

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ).read()
        out = {}
        for line in text.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    async def stop(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "serve did not stop:\n" + self.stderr()
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def summary(self) -> dict[str, str]:
        line = next(ln for ln in self.stdout().splitlines() if "stopped in" in ln)
        return dict(re.findall(r"(\w+)=(\S+)", line))


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(cond, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def expected_labels(records, model_path):
    """The labels ``iotcls classify``'s path gives: offline matrices, the same Predictor."""
    seen = [rec.flow_record(json.loads(rec.flow_frame("t", r))) for r in records]  # as decoded
    t = FlowTable.from_records(seen, LAYOUT.packets, LAYOUT.required_payload_bytes())
    mats, order = LAYOUT.matrices(t)
    p = Predictor(ModelBundle.load(model_path)).predict(mats)
    flows = np.any(mats != 0, axis=2).sum(axis=1)
    return {
        seen[i].uid: (p.label[k], float(p.confidence[k]), bool(p.trusted[k]), int(flows[k]))
        for k, i in enumerate(order)
    }


@pytest.mark.e2e
def test_end_to_end_labels_come_back(tmp_path, model_path):
    """Records over a real WebSocket come back as the labels of the offline path, in Zeek's
    label event format; Zeek's drain is answered with the exact counts."""
    records = synthetic_records(240, devices=12, seed=2)

    async def main():
        zeek = await FakeZeek().start()
        serve = Serve(tmp_path, zeek, model_path).start()
        try:
            await serve.ready()
            out = serve.stdout()
            assert (
                "model m@" in out and f"scorers connect to tcp://127.0.0.1:{serve.zmq_port}" in out
            )
            assert f"metrics http://127.0.0.1:{serve.metrics_port}/metrics" in out
            for r in records:
                await zeek.publish_flow(r)
            await until(lambda: len(zeek.labels) == 240, 30, "240 labels")
            await zeek.send_drain(240)
            await until(lambda: zeek.stats.drained, 10, "drained")
            m = serve.metrics()
            assert await serve.stop() == 0
        finally:
            serve.kill()
            await zeek.close()
        return zeek, serve, m

    zeek, serve, m = run(main())
    assert zeek.stats.errors_sent == {}  # every label event was one Zeek accepts
    assert zeek.stats.drained == [(240, 240)]
    want = expected_labels(records, model_path)
    by_uid = {lb.uid: lb.fields for lb in zeek.labels}
    assert sorted(by_uid) == sorted(r.uid for r in records)
    for r in records:
        f = by_uid[r.uid]
        label, conf, trusted, flows = want[r.uid]
        assert (f["label"], f["trusted"], f["n_flows"]) == (label, trusted, flows)
        assert f["confidence"] == pytest.approx(conf, rel=1e-5)
        orig_h, orig_p, resp_h, resp_p = r.conn_id()
        assert (str(f["orig_h"]), f["orig_p"].number, str(f["resp_h"]), f["resp_p"].number) == (
            orig_h,
            orig_p,
            resp_h,
            resp_p,
        )
        assert f["device_mac"] == r.device_mac and str(f["device_ip"]) == r.device_ip
        assert f["strategy"] == "sequence" and f["model"].startswith("m@")
    assert m["iotcls_records_in_total"] == 240 and m["iotcls_labels_out_total"] == 240
    assert m["iotcls_label_latency_seconds_count"] == 240
    s = serve.summary()
    assert (s["records_in"], s["labelled"], s["shed"], s["pending"]) == ("240", "240", "0", "0")


@pytest.mark.e2e
def test_sighup_swaps_the_model_mid_stream_recording_every_record_once(tmp_path, model_path):
    """A serve that records gets SIGHUP (iotcls reload) mid-stream with a new bundle (a
    fifth class) in its model file: every record is labelled exactly once, each label by the
    model it names (the offline path's label of that model), and the store holds every record
    once with the label it was given. A second reload with a bundle of another matrix layout
    is refused in one line and the new model keeps serving."""
    records = synthetic_records(3000, devices=60, seed=12)
    live = tmp_path / "live.pt"
    live.write_bytes(Path(model_path).read_bytes())
    new = tiny_bundle(LAYOUT, [*CLASSES, "kettle"], seed=21).save(tmp_path / "new.pt")
    store = tmp_path / "store"

    async def main():
        zeek = await FakeZeek().start()
        serve = Serve(
            tmp_path,
            zeek,
            str(live),
            scorers=2,
            scorers__batch_size=16,
            record__enabled=True,
            record__directory=str(store),
            record__segment_records=500,
        ).start()
        try:
            await serve.ready(scorers=2)
            for k, r in enumerate(records):
                await zeek.publish_flow(r)
                if k == 1200:  # as an operator installs a fine-tuned bundle:
                    (tmp_path / "staged.pt").write_bytes(new.read_bytes())
                    os.replace(tmp_path / "staged.pt", live)
                    out = subprocess.run(
                        [sys.executable, "-m", "iotcls", "reload", "--pid", str(serve.proc.pid)],
                        capture_output=True,
                        text=True,
                    )
                    assert out.returncode == 0 and "sent SIGHUP" in out.stdout, out.stderr
                if k == 1800:
                    await until(lambda: "reload: serving model" in serve.stdout(), 60, "reload")
            await until(lambda: len(zeek.labels) >= 3000, 60, "3000 labels")
            other = MatrixLayout(history=1, packets=4, payload_bytes=4)
            tiny_bundle(other, CLASSES, seed=1).save(tmp_path / "other.pt")
            os.replace(tmp_path / "other.pt", live)
            serve.proc.send_signal(signal.SIGHUP)
            await until(lambda: "has another matrix layout" in serve.stderr(), 30, "refusal")
            m = serve.metrics()
            assert await serve.stop() == 0
        finally:
            serve.kill()
            await zeek.close()
        return zeek, serve, m

    zeek, serve, m = run(main(), 180)
    uids = [lb.uid for lb in zeek.labels]
    assert len(uids) == 3000 and set(uids) == {r.uid for r in records}  # each exactly once
    old_name = ModelBundle.load(model_path).name.replace("m@", "live@")
    new_name = ModelBundle.load(new).name.replace("new@", "live@")
    want = {old_name: expected_labels(records, model_path), new_name: expected_labels(records, new)}
    models = [lb.fields["model"] for lb in zeek.labels]
    assert set(models) == {old_name, new_name} and models[-1] == new_name
    for lb in zeek.labels:  # each label is what the model it names gives that record
        label, conf, _, _ = want[lb.fields["model"]][lb.uid]
        assert lb.fields["label"] == label and lb.fields["confidence"] == pytest.approx(
            conf, rel=1e-5
        )
    assert "kettle" in {lb.fields["label"] for lb in zeek.labels if lb.fields["model"] == new_name}
    err = serve.stderr()
    assert f"reload: keeping model {new_name}:" in err and "restart serve to change layouts" in err
    assert re.search(
        r"scorer scorer-r1-\d\.1 \(pid \d+ .*connected: model " + re.escape(new_name), err
    )
    s = serve.summary()
    assert (s["records_in"], s["labelled"], s["shed"]) == ("3000", "3000", "0")
    assert m["iotcls_model_reloads_total"] == 1 and m["iotcls_records_stored_total"] >= 2500
    data = read_stores([store])  # every record once, with the label it was given
    assert sorted(data.table.uid.tolist()) == sorted(uids)
    given = {lb.uid: (lb.fields["label"], lb.fields["model"]) for lb in zeek.labels}
    assert {
        u: (lab, mod) for u, lab, mod in zip(data.table.uid, data.labels.label, data.labels.model)
    } == given
    assert set(data.labels.sensor) == {"zeek"} and data.labels.sent.all()


@pytest.mark.e2e
def test_killed_scorer_loses_nothing(tmp_path, model_path):
    """SIGKILL a scorer process mid-stream: its batches are re-sent, it is restarted, and
    every record is labelled exactly once."""
    records = synthetic_records(2000, devices=100, seed=3)

    async def main():
        zeek = await FakeZeek().start()
        serve = Serve(tmp_path, zeek, model_path, scorers=2, scorers__batch_size=16).start()
        try:
            await serve.ready(scorers=2)
            pids = {}
            for line in serve.stderr().splitlines():
                m = re.search(r"scorer (scorer-\d\.\d) \(pid (\d+)", line)
                if m:
                    pids[m.group(1)] = int(m.group(2))
            victim = pids["scorer-0.1"]
            for k, r in enumerate(records):
                await zeek.publish_flow(r)
                if k == 1000:
                    os.kill(victim, signal.SIGKILL)
            await until(lambda: len(zeek.labels) >= 2000, 40, "2000 labels")
            await until(
                lambda: (
                    "scorer-0.2" in serve.stderr() and serve.stderr().count("connected: model") == 3
                ),
                20,
                "the restart",
            )
            assert await serve.stop() == 0
        finally:
            serve.kill()
            await zeek.close()
        return zeek, serve

    zeek, serve = run(main(), 90)
    uids = [lb.uid for lb in zeek.labels]
    assert len(uids) == 2000 and set(uids) == {r.uid for r in records}  # each exactly once
    err = serve.stderr()
    assert "scorer scorer-0.1: process killed by signal 9; restarting" in err
    s = serve.summary()
    assert (s["records_in"], s["labelled"], s["shed"]) == ("2000", "2000", "0")
    assert int(s["scorers_lost"]) >= 1


@pytest.mark.e2e
def test_garbage_on_every_socket(tmp_path, model_path):
    """Garbage on the WebSocket (from Zeek's side), on the ZeroMQ scorer socket and on the
    metrics port: the service stays up, logs and counts what it rejected, and labels on."""
    records = synthetic_records(20, devices=5, seed=4)

    async def main():
        zeek = await FakeZeek().start()
        serve = Serve(tmp_path, zeek, model_path).start()
        try:
            await serve.ready()
            for junk in (
                b"{not json",
                b"\xff\xfe\x00garbage",
                b"[1, 2, 3]",
                b'{"type": "ack"}',
                b'{"type": "error", "code": "deserialization_failed", "context": "x"}',
                b'{"type":"data-message","topic":"zeek/iotcls/flows","@data-type":"count","data":1}',
                rec.bj.event_message("zeek/iotcls/flows", "Other::event", [1]),
                rec.bj.event_message("zeek/iotcls/flows", rec.FLOW_EVENT, [["too", "short"]]),
            ):
                await zeek.send_raw(junk)
            for c in zeek._clients:  # a binary frame, which Zeek never sends
                await c.ws.send(b"\x00\x01binary")
            ctx = zmq.Context.instance()
            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(f"tcp://127.0.0.1:{serve.zmq_port}")
            dealer.send(b"\x93not msgpack")
            dealer.send_multipart([b"a", b"b"])
            raw = socket.create_connection(("127.0.0.1", serve.zmq_port))
            raw.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)))
            web = socket.create_connection(("127.0.0.1", serve.metrics_port))
            web.sendall(b"\x16\x03\x01garbage, not HTTP\r\n\r\n")
            web.close()
            # libzmq still speaks unversioned ZMTP 1.0, so the raw bytes parse as a 2-frame
            # message from a peer named "T / HTTP/1.1...": 3 malformed messages in all
            await until(
                lambda: (
                    serve.metrics().get(
                        'iotcls_messages_rejected_total{kind="malformed",socket="zmq"}'
                    )
                    == 3
                ),
                10,
                "the ZeroMQ garbage counted",
            )
            for r in records:
                await zeek.publish_flow(r)
            await until(lambda: len(zeek.labels) == 20, 20, "labels after the garbage")
            m = serve.metrics()
            assert serve.proc.poll() is None
            assert zeek.stats.acked == 1  # the WebSocket session survived it all
            assert await serve.stop() == 0
            dealer.close(0)
            raw.close()
        finally:
            serve.kill()
            await zeek.close()
        return serve, m

    serve, m = run(main())
    rejected = {k: v for k, v in m.items() if k.startswith("iotcls_messages_rejected_total")}
    assert rejected == {
        'iotcls_messages_rejected_total{kind="malformed",socket="zmq"}': 3,
        # {not json, bytes that are not even lenient JSON, the binary frame
        'iotcls_messages_rejected_total{kind="malformed",socket="websocket"}': 3,
        # a JSON array, an ack after the handshake
        'iotcls_messages_rejected_total{kind="unexpected",socket="websocket"}': 2,
        # Other::event, and a data message that is no event at all
        'iotcls_messages_rejected_total{kind="unexpected_event",socket="websocket"}': 2,
        'iotcls_messages_rejected_total{kind="bad_flow_record",socket="websocket"}': 1,
        'iotcls_messages_rejected_total{kind="deserialization_failed",socket="zeek"}': 1,
    }
    err = serve.stderr()
    assert "rejected a message on the scorer socket" in err and "not msgpack" in err
    assert "skipped undecodable flow records" in err
    assert "ignoring events 'Other::event'" in err
    assert "skipped a frame that is not JSON" in err
    s = serve.summary()
    assert (s["records_in"], s["labelled"], s["shed"]) == ("20", "20", "0")


@pytest.mark.e2e
def test_sigterm_finishes_in_flight_work(tmp_path, model_path):
    """SIGTERM while records wait and are being scored: all of them are labelled and sent
    before the process exits (status 0)."""
    records = synthetic_records(1500, devices=50, seed=6)

    async def main():
        zeek = await FakeZeek().start()
        # one small batch at a time: the work queues up in the bridge
        serve = Serve(
            tmp_path, zeek, model_path, scorers__batch_size=4, bridge__inflight_per_scorer=1
        ).start()
        try:
            await serve.ready()
            for r in records:
                await zeek.publish_flow(r)
            await until(
                lambda: serve.metrics()["iotcls_records_in_total"] == 1500,
                20,
                "all records received",
            )
            assert len(zeek.labels) < 1500
            rc = await serve.stop(60)
        finally:
            serve.kill()
            await zeek.close()
        return zeek, serve, rc

    zeek, serve, rc = run(main(), 120)
    assert rc == 0
    m = re.search(r"stopping: finishing (\d+) queued and (\d+) in-flight records", serve.stderr())
    assert m and int(m.group(1)) + int(m.group(2)) > 0
    assert len({lb.uid for lb in zeek.labels}) == 1500
    s = serve.summary()
    assert (s["records_in"], s["labelled"], s["shed"], s["pending"]) == ("1500", "1500", "0", "0")


@pytest.mark.e2e
def test_remote_scorer_only(tmp_path, model_path):
    """A bridge with no local scorers serves through a scorer started on its own, as on
    another machine; a scorer whose model has another layout is refused and exits 3."""
    records = synthetic_records(50, devices=5, seed=7)
    torch.manual_seed(0)
    other = MatrixLayout(history=1, packets=4, payload_bytes=4)
    wrong = ModelBundle(
        IoTCNN(
            ModelConfig.from_layout(other, 2, packet_dim=8, meta_dim=8, row_dim=8, hidden=8)
        ).eval(),
        other,
        ["a", "b"],
    ).save(tmp_path / "wrong.pt")

    async def main():
        zeek = await FakeZeek().start()
        serve = Serve(tmp_path, zeek, model_path, scorers=0).start()
        remote = None
        try:
            await asyncio.wait_for(zeek.bridge_connected.wait(), 40)
            addr = f"tcp://127.0.0.1:{serve.zmq_port}"
            scorer = [sys.executable, "-m", "iotcls", "serve", "--scorer-only", "--connect", addr]
            bad = subprocess.Popen(
                [*scorer, "--model", str(wrong), "--name", "wrong-layout"],
                stderr=subprocess.PIPE,
                text=True,
            )
            remote = subprocess.Popen([*scorer, "--model", model_path, "--name", "gpu-host"])
            _, bad_err = bad.communicate(timeout=40)
            assert bad.returncode == 3, bad_err
            assert "refused this scorer: its model's matrix layout differs" in bad_err
            await serve.ready(scorers=1)
            for r in records:
                await zeek.publish_flow(r)
            await until(lambda: len(zeek.labels) == 50, 20, "labels via the remote scorer")
            assert await serve.stop() == 0
            assert remote.wait(10) == 0  # the bridge told it to stop
        finally:
            serve.kill()
            if remote:
                remote.kill()
            await zeek.close()
        return serve

    serve = run(main(), 120)
    assert "scorer gpu-host" in serve.stderr() and "refused scorer wrong-layout" in serve.stderr()
    assert serve.summary()["labelled"] == "50"


@pytest.mark.e2e
def test_a_zeek_that_does_not_read_labels_cannot_grow_memory(tmp_path, model_path):
    """Zeek stops reading (labels back up over TCP): records beyond the bound are shed as
    label_backlog, counted; once Zeek reads again, every labelled record's label arrives."""
    records = synthetic_records(6000, devices=100, seed=8)

    async def main():
        zeek = await FakeZeek().start()
        zeek.rcvbuf = 4096
        serve = Serve(tmp_path, zeek, model_path, bridge__queue_records=200).start()
        try:
            await serve.ready()
            zeek.reading.clear()
            for r in records:
                await zeek.publish_flow(r)
            await until(
                lambda: serve.metrics()["iotcls_records_in_total"] == 6000, 30, "all records in"
            )
            m = serve.metrics()
            assert m["iotcls_live_records"] <= 400 + 256  # + one batch being filled
            for c in zeek._clients:  # read again, at full speed
                c.ws.transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20
                )
            zeek.reading.set()
            await until(lambda: serve.metrics()["iotcls_live_records"] == 0, 30, "the backlog sent")
            rc = await serve.stop()
        finally:
            zeek.reading.set()
            serve.kill()
            await zeek.close()
        return zeek, serve, m, rc

    zeek, serve, m, rc = run(main(), 90)
    assert rc == 0
    s = serve.summary()
    shed = int(re.search(r"label_backlog:(\d+)", serve.stdout()).group(1))
    assert shed > 0 and m['iotcls_records_shed_total{reason="label_backlog"}'] > 0
    assert int(s["records_in"]) == 6000 == int(s["labelled"]) + int(s["shed"])
    assert len(zeek.labels) == int(s["labelled"])  # every label made was delivered


@pytest.mark.e2e
def test_offline_trace_is_held_until_drain(tmp_path, model_path):
    """A Zeek reading a trace (welcome says offline): records are held until its drain, then
    scored in start order, all labels sent before ``drained`` (the classify path's labels)."""
    records = synthetic_records(120, devices=6, seed=9)
    shuffled = records[::2] + records[1::2]  # arrival order is not start order

    async def main():
        zeek = await FakeZeek(offline=True).start()
        serve = Serve(tmp_path, zeek, model_path).start()
        try:
            await serve.ready()
            await asyncio.sleep(0.2)  # the welcome reaches the bridge
            for r in shuffled:
                await zeek.publish_flow(r)
            await asyncio.sleep(0.5)
            assert zeek.labels == []  # held
            await zeek.send_drain(120)
            await until(lambda: zeek.stats.drained, 20, "drained")
            n_at_drained = len(zeek.labels)
            assert await serve.stop() == 0
        finally:
            serve.kill()
            await zeek.close()
        return zeek, n_at_drained

    zeek, n_at_drained = run(main())
    assert zeek.stats.drained == [(120, 120)] and n_at_drained == 120
    want = expected_labels(records, model_path)
    assert {lb.uid: lb.fields["label"] for lb in zeek.labels} == {u: w[0] for u, w in want.items()}


# -- hardening: what peers send cannot stop, fool or starve the service ------------------
@pytest.mark.e2e
def test_deeply_nested_frames_do_not_stop_the_service(tmp_path, model_path):
    """100,000 ``[`` in one WebSocket frame (and other deep frames) are refused as malformed;
    the service labels on and exits 0 when asked (it used to stop at once, with exit status
    0, so systemd did not restart it). A record Zeek publishes twice is labelled once."""
    records = synthetic_records(30, devices=5, seed=11)

    async def main():
        zeek = await FakeZeek().start()
        serve = Serve(tmp_path, zeek, model_path).start()
        try:
            await serve.ready()
            for junk in (
                b"[" * 100_000,
                b'{"a":' * 50_000,
                b"[" * 65 + b"]" * 65,
                b'{"type":"data-message","topic":"t","data":' + b"[" * 1000,
            ):
                await zeek.send_raw(junk)
            for r in records:
                await zeek.publish_flow(r)
            for r in records[:3]:  # published again, as after a reconnect
                await zeek.publish_flow(r)
            await until(lambda: len(zeek.labels) >= 30, 20, "labels after the deep frames")
            await until(
                lambda: (
                    serve.metrics().get(
                        'iotcls_messages_rejected_total{kind="duplicate",socket="websocket"}'
                    )
                    == 3
                ),
                10,
                "the duplicates counted",
            )
            m = serve.metrics()
            assert serve.proc.poll() is None
            assert await serve.stop() == 0
        finally:
            serve.kill()
            await zeek.close()
        return zeek, serve, m

    zeek, serve, m = run(main())
    assert m['iotcls_messages_rejected_total{kind="malformed",socket="websocket"}'] == 4
    assert sorted(lb.uid for lb in zeek.labels) == sorted(r.uid for r in records)
    assert zeek.stats.acked == 1 and "Traceback" not in serve.stderr()
    s = serve.summary()
    assert (s["records_in"], s["labelled"], s["shed"]) == ("30", "30", "0")


class FakeScorer:
    """A scorer that speaks the wire protocol from the test (a real DEALER socket): it
    answers each request with ``answer(refs) -> list of (label, confidence)`` or holds it
    (``answer`` returns None), and sends heartbeats all the while."""

    def __init__(
        self, addr: str, answer, name: str = "fake", keys=None, classes: list[str] | None = CLASSES
    ):
        import threading

        from iotcls import wire

        self.wire, self.answer, self.name = wire, answer, name
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, name.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            from iotcls.bridge import curve as cv

            cv.connect_as(self.sock, keys)
        self.sock.connect(addr)
        self.classes = classes
        self.welcomed = self.stopped = False
        self.requests = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _hello(self) -> None:
        self.sock.send(
            self.wire.encode(
                self.wire.Hello(
                    self.name,
                    os.getpid(),
                    "test",
                    "fake",
                    LAYOUT.to_dict(),
                    "cpu",
                    16,
                    classes=self.classes,
                )
            )
        )

    def _run(self) -> None:
        w = self.wire
        self._hello()
        last = time.monotonic()
        while not self._stop.is_set():
            if self.sock.poll(100):
                msg = w.decode(self.sock.recv())
                if isinstance(msg, w.Welcome):
                    self.welcomed = True
                elif isinstance(msg, w.Reject) and msg.reason.startswith(w.REHELLO):
                    self._hello()
                elif isinstance(msg, w.Stop):
                    self.stopped = True
                    self.sock.send(w.encode(w.Bye("stopping")))
                    return
                elif isinstance(msg, w.Request):
                    self.requests += 1
                    out = self.answer(msg.refs)
                    if out is not None:
                        n = len(out)
                        self.sock.send(
                            w.encode(
                                w.Reply(
                                    msg.batch,
                                    [lb for lb, _ in out],
                                    [c for _, c in out],
                                    [True] * n,
                                    ["-"] * n,
                                    [[] for _ in range(n)],
                                    "fake",
                                )
                            )
                        )
            if time.monotonic() - last >= 0.3:
                self.sock.send(w.encode(w.Heartbeat()))
                last = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close(0)


@pytest.mark.e2e
def test_scorer_replies_are_checked_like_records(tmp_path, model_path):
    """A scorer answers NaN confidence for some records and a forged label (``PWNED\\t<script>``)
    for others: those records are refused one by one (counted as bad replies), re-sent, and
    shed as scorer_failed once out of attempts; the others are labelled. Nothing forged
    reaches Zeek, nothing vanishes (records_in = labelled + shed), the live-record gauge
    returns to 0. (A NaN reply used to make its whole batch vanish, shed 0.)"""
    records = synthetic_records(40, devices=8, seed=12)
    bad: dict[int, tuple[str, float]] = {}

    poisons = [("cam", float("nan")), ("PWNED\t<script>", 0.9), ("cam", 7.5)]

    def answer(refs):
        # the first three records the scorer sees are the poisoned ones, however the bridge
        # batches them (under load the first request can hold fewer than three)
        for ref in refs:
            if len(bad) < len(poisons) and ref not in bad:
                bad[ref] = poisons[len(bad)]
        return [bad.get(ref, ("plug", 0.75)) for ref in refs]

    async def main():
        zeek = await FakeZeek().start()
        serve = Serve(tmp_path, zeek, model_path, scorers=0).start()
        fake = None
        try:
            await asyncio.wait_for(zeek.bridge_connected.wait(), 40)
            fake = FakeScorer(f"tcp://127.0.0.1:{serve.zmq_port}", answer)
            await serve.ready(scorers=1)
            for r in records:
                await zeek.publish_flow(r)
            await until(lambda: len(zeek.labels) >= 37, 20, "the good labels")
            await until(
                lambda: (
                    serve.metrics().get('iotcls_records_shed_total{reason="scorer_failed"}') == 3
                ),
                20,
                "the bad shed",
            )
            await until(lambda: serve.metrics()["iotcls_live_records"] == 0, 10, "live 0")
            m = serve.metrics()
            assert await serve.stop() == 0
        finally:
            serve.kill()
            if fake:
                fake.close()
            await zeek.close()
        return zeek, serve, m

    zeek, serve, m = run(main(), 90)
    assert len(zeek.labels) == 37 and {lb.fields["label"] for lb in zeek.labels} == {"plug"}
    assert zeek.stats.errors_sent == {}
    assert m['iotcls_messages_rejected_total{kind="bad_reply",socket="zmq"}'] == 9  # 3 x 3 tries
    s = serve.summary()
    assert (s["records_in"], s["labelled"], s["shed"]) == ("40", "37", "3")
    err = serve.stderr()
    assert "is not a class of the model" in err and "is not a number in [0, 1]" in err
    assert "PWNED\\t<script>" in err and "PWNED\t" not in err  # logged escaped, never raw


def _keys(tmp: Path, name: str = "keys") -> Path:
    d = tmp / name
    out = subprocess.run(
        [sys.executable, "-m", "iotcls", "keys", "--dir", str(d)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return d


@pytest.mark.e2e
def test_curve_lets_only_authorized_scorers_in(tmp_path, model_path):
    """With ``bridge.curve: on`` a local scorer with the service's keys labels; a scorer
    without keys, one with keys of its own, and a real scorer process whose key is not
    authorized never get a welcome, never see a matrix, and are counted. CURVE is on by
    default when the bridge binds beyond loopback (no keys: one line, exit 2), and a secret
    key that others may read is refused."""
    from iotcls.bridge import curve as cv

    keys = _keys(tmp_path)
    # on by default beyond loopback: without keys, serve says so in one line
    zport = free_port()
    cfg = tmp_path / "open.yaml"
    cfg.write_text(
        json.dumps(
            {
                "bridge": {
                    "bind": [f"tcp://0.0.0.0:{zport}"],
                    "keys_dir": str(tmp_path / "nokeys"),
                },
                "scorers": {"model": model_path},
            }
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "iotcls", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"{tmp_path / 'nokeys' / 'bridge.key_secret'}: no such key file" in out.stderr
    secret = keys / "bridge.key_secret"
    secret.chmod(0o644)
    cfg.write_text(
        json.dumps(
            {
                "bridge": {"bind": [f"tcp://0.0.0.0:{zport}"], "keys_dir": str(keys)},
                "scorers": {"model": model_path},
            }
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "iotcls", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "secret key readable by others (mode 0644)" in out.stderr
    secret.chmod(0o600)

    other = _keys(tmp_path, "other")  # a scorer key the bridge does not know
    (other / "bridge.key").unlink()
    (other / "bridge.key").write_bytes((keys / "bridge.key").read_bytes())
    records = synthetic_records(30, devices=5, seed=13)

    async def main():
        zeek = await FakeZeek().start()
        serve = Serve(
            tmp_path, zeek, model_path, bridge__curve="on", bridge__keys_dir=str(keys)
        ).start()
        rogues, proc = [], None
        try:
            await serve.ready()
            assert "(CURVE)" in serve.stdout()
            addr = f"tcp://127.0.0.1:{serve.zmq_port}"
            mine = cv.KeyPair(*zmq.curve_keypair())
            rogues = [
                FakeScorer(addr, lambda refs: [("cam", 0.9)] * len(refs), "no-keys"),
                FakeScorer(
                    addr,
                    lambda refs: [("cam", 0.9)] * len(refs),
                    "own-keys",
                    keys=cv.ClientKeys(mine, cv.client_keys(keys).server_public),
                ),
            ]
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "iotcls",
                    "serve",
                    "--scorer-only",
                    "--connect",
                    addr,
                    "--name",
                    "unauthorized",
                    "--model",
                    model_path,
                    "--curve",
                    "on",
                    "--keys",
                    str(other),
                ],
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in records:
                await zeek.publish_flow(r)
            await until(lambda: len(zeek.labels) == 30, 20, "labels from the real scorer")
            await until(
                lambda: (
                    serve.metrics().get(
                        'iotcls_messages_rejected_total{kind="auth_failed",socket="zmq"}', 0
                    )
                    >= 2
                ),
                20,
                "the refused handshakes",
            )
            m = serve.metrics()
            assert await serve.stop() == 0
            proc.terminate()
            _, proc_err = proc.communicate(timeout=20)
        finally:
            serve.kill()
            for r in rogues:
                r.close()
            if proc and proc.poll() is None:
                proc.kill()
            await zeek.close()
        return zeek, serve, m, rogues, proc_err

    zeek, serve, m, rogues, proc_err = run(main(), 120)
    assert all(not r.welcomed and r.requests == 0 for r in rogues)
    assert "refused the CURVE handshake (auth_failed)" in proc_err
    assert m["iotcls_scorers"] == 1 and {lb.fields["model"][:2] for lb in zeek.labels} == {"m@"}
    assert "scorer unauthorized" not in serve.stderr() and "scorer no-keys" not in serve.stderr()


@pytest.mark.e2e
def test_a_scorer_holding_a_batch_loses_it_heartbeats_or_not(tmp_path, model_path):
    """A scorer that takes batches and never answers, heartbeating all the while, loses them
    after ``scorer_timeout_s`` to the real scorer: every record is labelled."""
    records = synthetic_records(30, devices=5, seed=14)

    async def main():
        zeek = await FakeZeek().start()
        serve = Serve(
            tmp_path, zeek, model_path, bridge__scorer_timeout_s=2.0, scorers__heartbeat_s=0.5
        ).start()
        hog = None
        try:
            await serve.ready()
            hog = FakeScorer(f"tcp://127.0.0.1:{serve.zmq_port}", lambda refs: None, "hog")
            await until(lambda: hog.welcomed, 10, "the hog welcomed")
            for r in records:
                await zeek.publish_flow(r)
                await asyncio.sleep(0.01)
            await until(lambda: len(zeek.labels) == 30, 30, "every label")
            assert hog.requests >= 1
            assert await serve.stop() == 0
        finally:
            serve.kill()
            if hog:
                hog.close()
            await zeek.close()
        return zeek, serve

    zeek, serve = run(main(), 90)
    assert sorted(lb.uid for lb in zeek.labels) == sorted(r.uid for r in records)
    assert "scorer hog (pid" in serve.stderr() and "without answering it" in serve.stderr()
    s = serve.summary()
    assert (s["records_in"], s["labelled"], s["shed"]) == ("30", "30", "0")


def _bad_trust_bundle(path: Path) -> str:
    """A bundle whose trust state was fitted for other classes than its model's."""
    from iotcls.trust.layer import fit_state

    b = tiny_bundle(LAYOUT, CLASSES, seed=5)
    other = tiny_bundle(LAYOUT, CLASSES + ["tv"], seed=6)
    x = np.random.default_rng(9).random((300, *LAYOUT.shape), dtype=np.float32)
    state, _ = fit_state(
        other.model, LAYOUT, 1.0, CLASSES + ["tv"], x, Predictor(other).predict(x).index
    )
    b.trust = state.to_dict()
    return str(b.save(path))


def test_check_bundle_scores_one_matrix_as_a_scorer_would(model_path):
    """What loads may still not score: check_bundle says so in one line naming the file."""
    from iotcls.bundle import BundleError
    from iotcls.scorer.service import check_bundle
    from iotcls.trust.layer import fit_state

    b = ModelBundle.load(model_path)
    check_bundle(b)
    other = tiny_bundle(LAYOUT, CLASSES + ["tv"], seed=6)
    x = np.random.default_rng(9).random((300, *LAYOUT.shape), dtype=np.float32)
    state, _ = fit_state(
        other.model, LAYOUT, 1.0, CLASSES + ["tv"], x, Predictor(other).predict(x).index
    )
    b.trust = state.to_dict()  # in memory, past whatever the loader checks
    with pytest.raises(BundleError) as e:
        check_bundle(b)
    assert str(e.value).startswith(f"{model_path}: unusable model: ") and "\n" not in str(e.value)


@pytest.mark.e2e
def test_an_unusable_model_stops_serve_once_and_never_loops(tmp_path, model_path):
    """A bundle whose trust classes differ from its model's: ``serve`` refuses it at start
    (one line, exit 2) and so does ``--scorer-only``. Replaced under a running service, the
    restarted scorer exits 2, is not restarted, and the service stops with exit 2 (it used
    to restart every scorer for ever with nothing labelled)."""
    bad = _bad_trust_bundle(tmp_path / "bad.pt")
    for extra in ([], ["--scorer-only", "--connect", "tcp://127.0.0.1:9", "--name", "s"]):
        out = subprocess.run(
            [sys.executable, "-m", "iotcls", "serve", "--model", bad, *extra],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and f"error: {bad}: " in lines[0], out.stderr

    live = tmp_path / "live.pt"
    live.write_bytes(Path(model_path).read_bytes())

    async def main():
        zeek = await FakeZeek().start()
        serve = Serve(tmp_path, zeek, str(live)).start()
        try:
            await serve.ready()
            pid = int(re.search(r"scorer scorer-0\.1 \(pid (\d+)", serve.stderr()).group(1))
            live.write_bytes(Path(bad).read_bytes())
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while serve.proc.poll() is None:
                assert time.monotonic() < deadline, serve.stderr()
                await asyncio.sleep(0.1)
        finally:
            serve.kill()
            await zeek.close()
        return serve

    serve = run(main(), 120)
    err = serve.stderr()
    assert serve.proc.returncode == 2, err
    assert err.count("iotcls scorer scorer-0.2: error: ") == 1 and "scorer-0.3" not in err
    assert "scorer scorer-0.2 cannot use its model (exit status 2); not restarting it" in err
    assert err.rstrip().splitlines()[-1].startswith("iotcls serve: error: no local scorer is left")


def test_a_part_that_stops_on_an_error_makes_the_exit_status_non_zero():
    """A task of the service that raises, or returns when it should run for ever, stops the
    service with exit status 1 (systemd restarts it); after a stop request it is no error."""
    from iotcls.bridge.serving import EXIT_ERROR, Service
    from iotcls.config import Config

    async def main():
        async def boom():
            raise RuntimeError("the session broke")

        async def quits():
            return None

        out = []
        for body in (boom, quits):
            svc = Service(Config(), None)
            t = asyncio.create_task(body(), name="zeek")
            await asyncio.wait({t})
            svc._check_tasks({t})
            out.append(svc._failure)
        svc = Service(Config(), None)
        svc._stop.set()  # asked to stop: the task's end is no error
        t = asyncio.create_task(quits(), name="bridge")
        await asyncio.wait({t})
        svc._check_tasks({t})
        out.append(svc._failure)
        return out

    boom, quits, asked = run(main())
    assert boom == (EXIT_ERROR, "zeek stopped: RuntimeError: the session broke")
    assert quits == (EXIT_ERROR, "zeek stopped on its own") and asked is None
