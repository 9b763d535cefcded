"""The dispatcher over real ZeroMQ sockets, with real scorers (threads and processes)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from iotcls import wire
from iotcls.bridge.dispatch import Dispatcher, LabelPolicy, Outcome
from iotcls.bundle import ModelBundle
from iotcls.config import Config
from iotcls.layout import MatrixLayout
from iotcls.predict import Predictor
from iotcls.scorer.service import Scorer, ScorerSettings
from iotcls.testing.shared import sentinel_device_table
from tiny_model import tiny_bundle

LAYOUT = MatrixLayout(history=2, packets=4, payload_bytes=4)
CLASSES = ["cam", "plug", "hub"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    b = tiny_bundle(LAYOUT, CLASSES, seed=3)
    return str(b.save(tmp_path_factory.mktemp("model") / "m.pt"))


def config(**bridge) -> Config:
    cfg = Config()
    cfg.bridge.bind = ["tcp://127.0.0.1:*"]
    cfg.log.policy = "all"
    for k, v in bridge.items():
        setattr(cfg.bridge, k, v)
    return cfg


def matrices(n: int, seed: int = 0) -> np.ndarray:
    m = np.random.default_rng(seed).random((n, *LAYOUT.shape), dtype=np.float32)
    return m


def run(coro, timeout: float = 40.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(cond, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class ThreadScorer:
    """A real scorer (real DEALER socket, real model) on a thread of the test process."""

    def __init__(self, model_path: str, addr: str, name: str, **kw):
        self.scorer = Scorer(
            Predictor(ModelBundle.load(model_path)), ScorerSettings(addr, name, **kw)
        )
        self.thread = threading.Thread(target=self.scorer.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.scorer.stop()
        self.thread.join(10)


def scorer_process(model_path: str, addr: str, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "iotcls",
            "serve",
            "--scorer-only",
            "--connect",
            addr,
            "--name",
            name,
            "--model",
            model_path,
            "--torch-device",
            "cpu",
            "--log-level",
            "warning",
        ],
        start_new_session=True,
    )


# -- labels ------------------------------------------------------------------------------
@pytest.mark.e2e
def test_labels_match_the_predictor_exactly(model_path):
    """Records split over batches and a scorer process come back as the offline labels."""
    m = matrices(300)
    predictor = Predictor(ModelBundle.load(model_path))
    expected = predictor.predict(m)
    # trust rule 5 runs in the dispatcher, over each device's labels in arrival order
    predictor.check_devices(expected, np.arange(300) % 5, np.arange(300))
    out: list[Outcome] = []

    async def main():
        d = Dispatcher(config(), LAYOUT, out.extend)
        (addr,) = await d.start()
        proc = scorer_process(model_path, addr, "p0")
        try:
            await until(lambda: d.scorers == ["p0"], 30, "the scorer to connect")
            for s in range(0, 300, 7):  # many small submits: batches form by credit
                d.submit(
                    m[s : s + 7],
                    [f"d{i % 5}" for i in range(s, min(s + 7, 300))],
                    list(range(s, min(s + 7, 300))),
                )
                await asyncio.sleep(0)
            assert await d.drain(20) == 0
            await d.stop_scorers()
            assert proc.wait(10) == 0
        finally:
            proc.kill()
            await d.close()
        return d

    d = run(main())
    assert sorted(o.ctx for o in out) == list(range(300))
    by = {o.ctx: o for o in out}
    assert [by[i].label for i in range(300)] == list(expected.label)
    np.testing.assert_allclose(
        [by[i].confidence for i in range(300)], expected.confidence, rtol=1e-6
    )
    assert [by[i].trusted for i in range(300)] == list(expected.trusted)
    assert [by[i].reason for i in range(300)] == list(expected.reason)
    assert all(o.shed is None and o.send for o in out)
    assert d.metrics.records_in == 300 and d.metrics.labelled == 300
    assert d.metrics.shed_total == 0 and d.metrics.batch_size.count == d.metrics.batches_sent


@pytest.mark.e2e
def test_killed_scorer_loses_nothing(model_path):
    """SIGKILL a scorer process holding batches: they are re-sent, each record labelled once."""
    cfg = config(scorer_timeout_s=2.0)
    n = 4000
    m = matrices(n, seed=1)
    out: list[Outcome] = []

    async def main():
        d = Dispatcher(cfg, LAYOUT, out.extend)
        (addr,) = await d.start()
        victim = scorer_process(model_path, addr, "victim")
        helper = ThreadScorer(model_path, addr, "helper", batch_size=64)
        try:
            await until(lambda: sorted(d.scorers) == ["helper", "victim"], 30, "both scorers")
            killed_with = 0
            for s in range(0, n, 50):
                d.submit(m[s : s + 50], ["dev"] * 50, list(range(s, s + 50)))
                await asyncio.sleep(0.002)
                if s >= n // 2 and not killed_with:
                    vic = d._scorers.get(b"victim")
                    if vic is not None and vic.inflight:
                        killed_with = sum(len(b.items) for b in vic.inflight.values())
                        os.kill(victim.pid, signal.SIGKILL)
            assert killed_with > 0, "the victim never held a batch"
            # no supervisor here: the dispatcher notices by the victim's silence
            assert await d.drain(30) == 0
        finally:
            victim.kill()
            helper.stop()
            await d.close()
        return d, killed_with

    d, killed_with = run(main(), 60)
    assert sorted(o.ctx for o in out) == list(range(n))  # every record exactly once
    assert all(o.label is not None for o in out)
    assert d.metrics.scorers_lost >= 1 and d.metrics.batches_resent >= 1
    assert d.metrics.labelled == n and d.metrics.shed_total == 0


def test_supervisor_notice_resends_at_once(model_path):
    """scorer_lost() (what the supervisor calls) re-sends without waiting for a timeout."""
    cfg = config(scorer_timeout_s=60.0)
    out: list[Outcome] = []

    async def main():
        d = Dispatcher(cfg, LAYOUT, out.extend)
        (addr,) = await d.start()
        # a scorer that takes work and never answers: a raw DEALER saying hello
        ctx = zmq.Context.instance()
        mute = ctx.socket(zmq.DEALER)
        mute.setsockopt(zmq.ROUTING_ID, b"mute")
        mute.connect(addr)
        mute.send(wire.encode(wire.Hello("mute", 1, "h", "m", LAYOUT.to_dict(), "cpu", 16)))
        await until(lambda: d.scorers == ["mute"], 10, "hello")
        d.submit(matrices(40), ["a"] * 40, list(range(40)))
        await until(lambda: d.inflight == 32, 5, "two batches in flight")
        assert d.pending == 8
        helper = ThreadScorer(model_path, addr, "helper")
        try:
            await until(lambda: "helper" in d.scorers, 10, "helper")
            await until(lambda: len(out) == 8, 10, "the queued 8 labelled")
            assert d.scorer_lost("mute", "process exited with status -9")
            assert not d.scorer_lost("mute", "again")
            await until(lambda: len(out) == 40, 10, "the re-sent 32")
        finally:
            helper.stop()
            mute.close(0)
            await d.close()
        return d

    d = run(main())
    assert sorted(o.ctx for o in out) == list(range(40))
    assert d.metrics.batches_resent == 2 and d.metrics.scorers_lost == 1


# -- shed policy -------------------------------------------------------------------------
def _shed_run(policy: str, labelled_devices: set[str], devices: list[str], queue: int):
    out: list[Outcome] = []

    async def main():
        d = Dispatcher(config(queue_records=queue, shed_policy=policy), LAYOUT, out.extend)
        await d.start()  # no scorer: everything waits, the queue overflows
        for dev in labelled_devices:
            d.policy.decide(dev, "cam", True, time.monotonic())
        d.submit(matrices(len(devices)), devices, list(range(len(devices))))
        pending = [it.ctx for it in d._take(d.pending)]
        await d.close()
        return d, pending

    d, pending = run(main())
    return {o.ctx: o.shed for o in out}, pending, d


def test_shed_labelled_first():
    devs = ["new1", "old", "new2", "old", "new3", "old", "new4"]
    shed, pending, d = _shed_run("labelled-first", {"old"}, devs, queue=4)
    # 7 records, room for 4: the three records of the labelled device go first
    assert shed == {1: "queue_full_labelled", 3: "queue_full_labelled", 5: "queue_full_labelled"}
    assert pending == [0, 2, 4, 6]
    assert d.metrics.shed == {"queue_full_labelled": 3}


def test_shed_labelled_first_falls_back_to_oldest():
    devs = ["a", "b", "old", "c", "d", "e"]
    shed, pending, d = _shed_run("labelled-first", {"old"}, devs, queue=3)
    assert shed == {2: "queue_full_labelled", 0: "queue_full", 1: "queue_full"}
    assert pending == [3, 4, 5]
    assert d.metrics.shed == {"queue_full_labelled": 1, "queue_full": 2}


def test_shed_oldest_and_newest():
    devs = ["a", "old", "b", "old", "c"]
    shed, pending, _ = _shed_run("oldest", {"old"}, devs, queue=2)
    assert shed == {0: "queue_full", 1: "queue_full", 2: "queue_full"} and pending == [3, 4]
    shed, pending, _ = _shed_run("newest", {"old"}, devs, queue=2)
    assert shed == {2: "queue_full", 3: "queue_full", 4: "queue_full"} and pending == [0, 1]


def test_label_policy_changes_and_interval():
    p = LabelPolicy("changes", interval_s=10.0, max_devices=2)
    assert p.decide("a", "cam", True, 0.0)  # first label
    assert not p.decide("a", "cam", True, 1.0)  # unchanged
    assert p.decide("a", "plug", True, 2.0)  # label changed
    assert p.decide("a", "plug", False, 3.0)  # trust changed
    assert not p.decide("a", "plug", False, 12.9)
    assert p.decide("a", "plug", False, 13.0)  # interval since the last one sent
    assert p.recently_labelled("a", 14.0, 5.0) and not p.recently_labelled("a", 20.0, 5.0)
    p.decide("b", "cam", True, 0.0)
    p.decide("c", "cam", True, 0.0)  # "a" is the least recently seen: forgotten
    assert len(p) == 2 and not p.recently_labelled("a", 14.0, 100.0)
    assert p.decide("a", "plug", False, 14.0)  # forgotten: a first label again
    every = LabelPolicy("all", interval_s=10.0, max_devices=10)
    assert all(every.decide("a", "cam", True, t) for t in (0.0, 0.1, 0.2))


def test_max_attempts_sheds_a_poison_batch(model_path):
    """A batch whose scorers keep vanishing is shed as scorer_failed after max_attempts."""
    out: list[Outcome] = []

    async def main():
        d = Dispatcher(config(max_attempts=2), LAYOUT, out.extend)
        (addr,) = await d.start()
        d.submit(matrices(5), ["a"] * 5, list(range(5)))
        ctx = zmq.Context.instance()
        for k in range(2):
            s = ctx.socket(zmq.DEALER)
            name = f"doomed{k}"
            s.setsockopt(zmq.ROUTING_ID, name.encode())
            s.connect(addr)
            s.send(wire.encode(wire.Hello(name, 1, "h", "m", LAYOUT.to_dict(), "cpu", 16)))
            await until(lambda: d.inflight == 5, 10, "the batch in flight")
            d.scorer_lost(name, "process killed by signal 9")
            s.close(0)
        await d.close()
        return d

    d = run(main())
    assert sorted(o.ctx for o in out) == list(range(5))
    assert {o.shed for o in out} == {"scorer_failed"}
    assert d.metrics.shed == {"scorer_failed": 5}


# -- garbage and strangers ---------------------------------------------------------------
def test_garbage_on_the_scorer_socket(model_path, caplog):
    """Garbage from every kind of peer is refused, counted and logged; scoring goes on."""
    out: list[Outcome] = []
    caplog.set_level("WARNING", logger="iotcls.bridge.dispatch")

    async def main():
        d = Dispatcher(config(), LAYOUT, out.extend)
        (addr,) = await d.start()
        port = int(addr.rsplit(":", 1)[1])
        ctx = zmq.Context.instance()
        bad = ctx.socket(zmq.DEALER)
        bad.setsockopt(zmq.ROUTING_ID, b"bad")
        bad.connect(addr)
        bad.send(b"\xc1\xc1 not msgpack")
        bad.send(msgpack.packb({"v": 99, "t": "hello"}))
        bad.send(msgpack.packb({"v": 1, "t": "rep", "id": 1}))
        bad.send_multipart([b"two", b"frames"])
        bad.send(wire.encode(wire.Heartbeat()))  # before hello
        bad.send(wire.encode(wire.Hello("bad", 1, "h", "m", {"history": 9}, "cpu", 8)))
        req = ctx.socket(zmq.REQ)  # a REQ peer adds an empty delimiter frame
        req.connect(addr)
        req.send(b"hello?")
        raw = socket.create_connection(("127.0.0.1", port))  # not even ZMTP: a web client
        raw.sendall(b"GET /metrics HTTP/1.1\r\nHost: bridge\r\n\r\n")
        await until(
            lambda: d.metrics.rejected.get(("zmq", "incompatible_scorer")) == 1,
            10,
            "the incompatible hello",
        )
        assert bad.poll(5000)
        assert wire.decode(bad.recv()) == wire.Reject(f"{wire.REHELLO}: say hello first")
        assert bad.poll(5000)
        reject = wire.decode(bad.recv())
        assert isinstance(reject, wire.Reject) and "layout differs" in reject.reason
        # the differing keys are named, the bridge's values are not: they are no peer's business
        assert not any(c.isdigit() for c in reject.reason), reject.reason
        good = ThreadScorer(model_path, addr, "good")
        try:
            d.submit(matrices(20), ["a"] * 20, list(range(20)))
            assert await d.drain(20) == 0
        finally:
            good.stop()
            for s in (bad, req):
                s.close(0)
            raw.close()
            await d.close()
        return d

    d = run(main())
    assert sorted(o.ctx for o in out) == list(range(20)) and all(o.label for o in out)
    assert d.metrics.rejected == {
        ("zmq", "malformed"): 4,  # not msgpack, reply without fields, 2 frames, REQ delimiter
        ("zmq", "version"): 1,
        ("zmq", "unknown_scorer"): 1,
        ("zmq", "incompatible_scorer"): 1,
    }
    text = caplog.text
    assert (
        "not msgpack" in text and "wire version 99" in text and "frames after the identity" in text
    )
    assert "refused scorer bad" in text and "matrix layout differs" in text


def test_scorer_survives_garbage_from_a_fake_bridge(model_path, caplog):
    """A scorer that gets garbage from its bridge logs it and keeps serving."""
    caplog.set_level("WARNING", logger="iotcls.scorer")
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    s = ThreadScorer(model_path, f"tcp://127.0.0.1:{port}", "s", max_wait_ms=0)
    try:
        assert router.poll(20000)
        ident, data = router.recv_multipart()
        hello = wire.decode(data)
        assert isinstance(hello, wire.Hello) and hello.layout == LAYOUT.to_dict()
        router.send_multipart([ident, wire.encode(wire.Welcome(2, 1.0))])
        for junk in (b"junk", msgpack.packb({"v": 7, "t": "req"}), wire.encode(wire.Heartbeat())):
            router.send_multipart([ident, junk])
        m = matrices(3)
        router.send_multipart([ident, wire.encode(wire.Request(5, m, [1, 2, 3]))])
        deadline = time.monotonic() + 20
        reply = None
        while time.monotonic() < deadline and reply is None:
            if router.poll(1000):
                msg = wire.decode(router.recv_multipart()[1])
                if isinstance(msg, wire.Reply):
                    reply = msg
        assert reply is not None and reply.batch == 5 and len(reply) == 3
        expected = Predictor(ModelBundle.load(model_path)).predict(m)
        assert reply.labels == list(expected.label)
        assert s.scorer.stats.rejected == {"malformed": 1, "version": 1, "unexpected": 1}
    finally:
        s.stop()
        router.close(0)
    assert "not msgpack" in caplog.text and "wire version 7" in caplog.text


def test_batch_buckets():
    """Forward passes come in a dozen sizes (flat scorer memory), never above batch_size."""
    from iotcls.scorer.service import bucket

    assert [bucket(n, 256) for n in (1, 3, 5, 17, 33, 100, 129, 200, 256)] == [
        1,
        4,
        8,
        32,
        48,
        128,
        192,
        256,
        256,
    ]
    assert bucket(260, 300) == 300 and bucket(600, 256) == 600
    assert len({bucket(n, 256) for n in range(1, 257)}) == 12


# -- trust: explain only what is logged --------------------------------------------------
@pytest.fixture(scope="module")
def trust_model_path(tmp_path_factory):
    """A bundle with a fitted trust state (fitted on the model's own labels of random
    matrices, so that every class has references)."""
    from iotcls.trust.layer import fit_state

    b = tiny_bundle(LAYOUT, CLASSES, seed=4)
    x = matrices(600, seed=9)
    y = Predictor(b).predict(x).index
    state, _ = fit_state(b.model, LAYOUT, 1.0, CLASSES, x, y)
    b.trust = state.to_dict()
    return str(b.save(tmp_path_factory.mktemp("trust") / "t.pt"))


def one_at_a_time(
    records: np.ndarray,
    device: str,
    layout: MatrixLayout,
    predictor: Predictor,
    cfg: Config | None = None,
    dispatcher: dict | None = None,
    **settings,
) -> tuple[list[Outcome], Dispatcher, Scorer]:
    """Records of one device, each sent once the previous one's outcome is back, through a
    real dispatcher (``dispatcher``: its keyword arguments) and a real scorer (``settings``:
    its ScorerSettings beyond the address and name)."""
    out: list[Outcome] = []

    async def main():
        d = Dispatcher(cfg or config(), layout, out.extend, **(dispatcher or {}))
        (addr,) = await d.start()
        s = Scorer(predictor, ScorerSettings(addr, "t", max_wait_ms=0, **settings))
        th = threading.Thread(target=s.run, daemon=True)
        th.start()
        try:
            await until(lambda: d.scorers == ["t"], 20, "the scorer")
            for k in range(len(records)):
                d.submit(records[k : k + 1], [device], [k])
                await until(lambda: len(out) == k + 1, 10, f"outcome {k}")
        finally:
            s.stop()
            th.join(10)
            await d.close()
        return d, s

    d, s = run(main())
    return out, d, s


def one_at_a_time_logged(model_path: str, records: np.ndarray):
    """One device's records through a scorer in mode ``logged`` (log policy ``changes``)."""
    cfg = config()
    cfg.log.policy = "changes"
    return one_at_a_time(
        records,
        "d",
        LAYOUT,
        Predictor(ModelBundle.load(model_path), explain=False),
        cfg,
        explain="logged",
    )


def test_logged_mode_explains_exactly_the_labels_sent(trust_model_path):
    """Mode ``logged``: a device's first label, and a later label that differs, get the full
    trust decision (equal to Predictor(explain=True)); a repeat of the last label sent is
    neither explained nor sent."""
    full = Predictor(ModelBundle.load(trust_model_path))  # explain=True: the reference
    assert full.explain
    pool = matrices(200, seed=10)
    ref = full.predict(pool)
    first = 0
    other = int(np.flatnonzero(ref.label != ref.label[first])[0])
    steps = [first, first, other, other]  # one record of device "d" at a time
    out, d, s = one_at_a_time_logged(trust_model_path, pool[steps])
    assert [(o.ctx, o.explained, o.send) for o in out] == [
        (0, True, True),
        (1, False, False),
        (2, True, True),
        (3, False, False),
    ]
    assert s.stats.explained == 2
    for o in out:
        i = steps[o.ctx]
        assert o.label == ref.label[i]
        if o.explained:
            assert (o.trusted, o.reason, o.top_groups) == (
                bool(ref.trusted[i]),
                ref.reason[i],
                list(ref.top_groups[i]),
            )
    assert d.metrics.labels_sent == 2 and d.metrics.labels_suppressed == 2
    assert d.metrics.labelled == 4 and d.metrics.labels_explained == 2


def test_hints_say_what_the_policy_knows():
    """Per record: due (first label of the device, or the interval is over), else the last
    label sent and its trust."""
    from iotcls.bridge.dispatch import Item

    async def main():
        d = Dispatcher(config(), LAYOUT, lambda o: None)
        d.policy = LabelPolicy("changes", 300.0, 100)
        now = time.monotonic()
        d.policy.decide("a", "cam", True, now)
        d.policy.decide("b", "plug", False, now, cheap=True)  # confident, refused in full
        d.policy.decide("b", "plug", False, now, cheap=False)  # not sent, but remembered
        d.policy.decide("old", "hub", True, now - 301.0)
        items = [
            Item(k, dev, np.zeros(LAYOUT.shape, np.float32), k, now, False)
            for k, dev in enumerate(["a", "b", "old", "new"])
        ]
        return d._hints(items)

    h = run(main())
    assert h.due == [False, False, True, True]
    assert h.last_label == ["cam", "plug", "hub", ""]
    assert h.last_trusted == [True, False, True, False]
    assert h.last_cheap == [True, False, True, False]


def test_logged_mode_does_not_reexplain_a_refused_label(trust_model_path, tmp_path):
    """A label the confidence criterion accepts but the full decision refuses (an atypical
    explanation, say) is explained once; its repeats compare cheap trust with the cheap
    trust of the label sent, so they are neither explained nor sent again until due."""
    from iotcls.trust.decision import TrustState

    b = ModelBundle.load(trust_model_path)
    st = TrustState.from_dict(b.trust)
    st.dist_threshold = st.dist_threshold * 1e-6  # every explanation is now atypical
    st.conf_threshold = 0.2  # and every label confident enough for the cheap criterion
    b.trust = st.to_dict()
    trust_model_path = str(b.save(tmp_path / "strict.pt"))
    full = Predictor(ModelBundle.load(trust_model_path))
    pool = matrices(100, seed=11)
    ref = full.predict(pool)
    refused = np.flatnonzero(~ref.trusted & (ref.reason != "low_confidence"))
    assert len(refused)
    i = int(refused[0])
    out, _, s = one_at_a_time_logged(trust_model_path, pool[[i] * 4])
    assert [(o.explained, o.send, o.trusted) for o in out] == [(True, True, False)] + [
        (False, False, True)
    ] * 3
    assert out[0].reason == ref.reason[i]
    assert s.stats.explained == 1


def plug_matrices() -> tuple[MatrixLayout, np.ndarray]:
    """The default model's layout and the matrices of a real TP-Link HS110 setup capture
    (one device: in start order)."""
    from iotcls.bundle import default_model_path

    layout = ModelBundle.load(default_model_path()).layout
    mats, _ = layout.matrices(sentinel_device_table("TP-LinkPlugHS110", "Setup-A-1-STA"))
    return layout, mats


def test_dhcp_identity_live_equals_classify():
    """The DHCP identity refinement and trust rule 6 in serve: a real capture's records, one
    at a time through a real dispatcher and a real scorer with the default model, come back
    with the labels and trust that the offline path (classify's) gives. The plug's identity
    is declared seen with HS100 only: from its DHCP record on, its labels are refined to
    HS100; then declared seen with no class: its labels fail rule 6 from there on; then
    declared shared by both plugs and ambiguous: they fail as ambiguous."""

    from iotcls.bundle import default_model_path
    from iotcls.trust.decision import DHCP_AMBIGUOUS, DHCP_MISMATCH
    from iotcls.trust.dhcp_identity import DhcpIdentity

    layout, mats = plug_matrices()
    ident = next(x for x in layout.dhcp_identities(mats[:, 0]) if x is not None)
    assert "HS110(EU)" in ident
    first = int(np.flatnonzero(layout.dhcp_identities(mats[:, 0]) != None)[0])  # noqa: E711

    cases = [
        (["TP-LinkPlugHS100"], []),
        (["an unknown type"], []),
        (["TP-LinkPlugHS100", "TP-LinkPlugHS110"], [ident]),
    ]
    for seen_with, ambiguous in cases:
        bundle = ModelBundle.load(default_model_path())
        bundle.trust["dhcp_identities"] = {ident: seen_with}
        bundle.trust["dhcp_ambiguous"] = ambiguous
        ref_p = Predictor(bundle)
        groups, times = np.zeros(len(mats), int), np.arange(len(mats), dtype=float)
        ref = ref_p.label(mats, groups, times)  # offline, as classify: refine, rules 1-9
        why = DHCP_AMBIGUOUS if ambiguous else DHCP_MISMATCH
        if seen_with == ["TP-LinkPlugHS100"]:
            assert set(ref.label[first:]) == {"TP-LinkPlugHS100"}
            assert set(ref.label[:first]) != {"TP-LinkPlugHS100"}
        else:
            assert all(r == why or not ok for r, ok in zip(ref.reason[first:], ref.trusted[first:]))
            assert (ref.reason[first:] == why).any()

        out, _, _ = one_at_a_time(
            mats,
            "plug",
            layout,
            Predictor(bundle),
            dispatcher={
                "identities": DhcpIdentity({ident: frozenset(seen_with)}, frozenset(ambiguous))
            },
        )
        assert [o.label for o in out] == list(ref.label)
        np.testing.assert_allclose([o.confidence for o in out], ref.confidence, rtol=1e-5)
        assert [(o.trusted, o.reason) for o in out] == list(zip(ref.trusted, ref.reason))


def test_dns_rule_live_equals_classify():
    """Trust rule 9 in serve: a real capture's records, one at a time through a real
    dispatcher and a real scorer, come back with the trust that the offline path gives.
    With the plug's types declared to have asked only for another domain, its labels fail
    rule 9 from its first DNS query on; with the domains it asks for, only its labels of
    other types do."""
    from iotcls.bundle import default_model_path
    from iotcls.trust.dns_names import DNS_MISMATCH, DnsNames

    layout, mats = plug_matrices()
    asked = layout.dns_names(mats[:, 0])
    first = int(np.flatnonzero([bool(a) for a in asked])[0])
    plugs = ("TP-LinkPlugHS100", "TP-LinkPlugHS110")
    every = sorted(frozenset().union(*asked))  # what the plug asks for, tplinkcloud.com among
    assert "tplinkcloud.com" in every
    for domains in (["example.com"], every):
        bundle = ModelBundle.load(default_model_path())
        bundle.trust["dns_names"] = {c: list(domains) for c in plugs}
        bundle.trust["dns_names"]["Aria"] = ["fitbit.com"]
        ref = Predictor(bundle).label(
            mats, np.zeros(len(mats), int), np.arange(len(mats), dtype=float)
        )
        refused = ref.reason == DNS_MISMATCH
        assert not refused[:first].any()
        if domains == ["example.com"]:
            assert refused[first:].any()
        else:  # only labels of classes that asked for other domains (here: none) fail
            assert not any(lab in plugs for lab in ref.label[refused])
        out, _, _ = one_at_a_time(
            mats,
            "plug",
            layout,
            Predictor(bundle),
            dispatcher={
                "names": DnsNames({k: frozenset(v) for k, v in bundle.trust["dns_names"].items()})
            },
        )
        assert [o.label for o in out] == list(ref.label)
        assert [(o.trusted, o.reason) for o in out] == list(zip(ref.trusted, ref.reason))


# -- who may talk to the bridge ----------------------------------------------------------
def _hello(addr: str, name: str, classes=None, batch: int = 16, keys=None):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.ROUTING_ID, name.encode())
    s.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        from iotcls.bridge import curve as cv

        cv.connect_as(s, keys)
    s.connect(addr)
    s.send(
        wire.encode(wire.Hello(name, 1, "h", "m", LAYOUT.to_dict(), "cpu", batch, classes=classes))
    )
    return s


def test_a_scorer_of_other_classes_is_refused_and_batch_sizes_are_capped():
    async def main():
        d = Dispatcher(config(), LAYOUT, lambda o: None, classes=CLASSES)
        (addr,) = await d.start()
        other = _hello(addr, "other", classes=["cam", "PWNED"])
        big = _hello(addr, "big", classes=CLASSES, batch=10**9)
        try:
            await until(lambda: "big" in d.scorers, 10, "the big scorer")
            assert other.poll(5000)
            reject = wire.decode(other.recv())
            assert (
                isinstance(reject, wire.Reject) and "classes are not the bridge's" in reject.reason
            )
            return d._scorers[b"big"].batch_size, d.scorers
        finally:
            other.close(0)
            big.close(0)
            await d.close()

    size, scorers = run(main())
    assert size == 4096 and scorers == ["big"]


@pytest.mark.e2e
def test_curve_admits_authorized_scorers_only(model_path, tmp_path):
    """A dispatcher with CURVE keys: a real scorer with an authorized key labels; a peer
    without keys and one with an unknown key are turned away at the handshake (counted),
    and never see a record."""
    from iotcls.bridge import curve as cv

    keys = tmp_path / "keys"
    out = subprocess.run(
        [sys.executable, "-m", "iotcls", "keys", "--dir", str(keys)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert {p.name: p.stat().st_mode & 0o777 for p in keys.rglob("*")} == {
        "bridge.key_secret": 0o600,
        "scorer.key_secret": 0o600,
        "bridge.key": 0o644,
        "scorer.key": 0o644,
        "authorized": 0o700,
    }
    before = (keys / "bridge.key_secret").read_bytes()
    again = subprocess.run(
        [sys.executable, "-m", "iotcls", "keys", "--dir", str(keys)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and "kept" in again.stdout
    assert (keys / "bridge.key_secret").read_bytes() == before  # never overwritten
    server, client = cv.server_keys(keys), cv.client_keys(keys)
    stranger = cv.ClientKeys(cv.KeyPair(*zmq.curve_keypair()), client.server_public)
    outcomes: list[Outcome] = []

    async def main():
        d = Dispatcher(config(), LAYOUT, outcomes.extend, classes=CLASSES, keys=server)
        (addr,) = await d.start()
        rogues = [_hello(addr, "plain"), _hello(addr, "stranger", keys=stranger)]
        good = None
        try:
            good = Scorer(
                Predictor(ModelBundle.load(model_path)), ScorerSettings(addr, "good", keys=client)
            )
            th = threading.Thread(target=good.run, daemon=True)
            th.start()
            await until(lambda: d.scorers == ["good"], 20, "the authorized scorer")
            d.submit(matrices(10), ["a"] * 10, list(range(10)))
            assert await d.drain(20) == 0
            await until(
                lambda: sum(v for (s, k), v in d.metrics.rejected.items() if s == "zmq") >= 2,
                10,
                "the refused handshakes",
            )
            assert all(not r.poll(200) for r in rogues)  # not even a reject
            return dict(d.metrics.rejected), d.scorers
        finally:
            if good is not None:
                good.stop()
            for r in rogues:
                r.close(0)
            await d.close()

    rejected, scorers = run(main())
    assert sorted(o.ctx for o in outcomes) == list(range(10))
    # each refused peer retries (ZeroMQ reconnects): counted at every attempt
    assert rejected.get(("zmq", "auth_failed"), 0) >= 1
    assert rejected.get(("zmq", "handshake_failed"), 0) >= 1
    assert scorers == ["good"]
