"""The bridge against a real WebSocket server that follows Zeek 8.2.2's protocol
(iotcls/testing/fake_zeek.py): handshake and ack, retries until Zeek is up, reconnects when it
restarts, survives garbage, flow records in and label events out, the offline drain
handshake; and the record codec (fast paths against the generic codec) on records of real
captures."""

import asyncio
import ipaddress
import json
import logging
from dataclasses import fields

import numpy as np
import pytest

from conftest import free_port
from iotcls.bridge import broker_json as bj
from iotcls.bridge import records as rc
from iotcls.bridge.core import Bridge, FlowAssembler, attach, run
from iotcls.bridge.records import Verdict
from iotcls.bridge.zeek_ws import ZeekClient
from iotcls.flows import DeviceSelector, capture_flows
from iotcls.flowtable import FlowTable
from iotcls.layout import MatrixLayout
from iotcls.logschema import LogEntry
from iotcls.schema import SCHEMA_VERSION, FlowRecord
from iotcls.testing.fake_zeek import FakeZeek, drain_frame, welcome_frame
from iotcls.testing.shared import require, sentinel_capture, zeek_fixtures_dir

FLOWS, LABELS = "zeek/iotcls/flows", "zeek/iotcls/labels"
CAPTURES = {
    name: require(sentinel_capture(*name.split("_")), module=True)
    for name in ("Aria_Setup-A-1-STA", "D-LinkCam_Setup-B-1-STA")
}
WS_FIX = require(zeek_fixtures_dir() / "websocket", module=True)
LAYOUT = MatrixLayout()
FAST = dict(reconnect_min_s=0.02, reconnect_max_s=0.1, ack_timeout_s=0.5, open_timeout_s=1.0)


def real_records() -> list[FlowRecord]:
    sel = DeviceSelector.from_lists(nets=["10.0.0.0/8", "192.168.0.0/16"])
    recs = []
    for path in CAPTURES.values():
        cf = capture_flows(path, sel)
        assert not cf.error
        recs += cf.table.records()
    return recs


RECORDS = real_records()


class ProjectionScorer:
    """Deterministic, real numpy: a fixed random projection of the whole matrix picks one of
    three labels, a softmax gives the confidence. Keeps every matrix it saw."""

    CLASSES = ("Aria", "D-LinkCam", "HueBridge")

    def __init__(self):
        self.w = np.random.default_rng(7).standard_normal((LAYOUT.rows * LAYOUT.width, 3))
        self.seen: list[np.ndarray] = []

    def verdicts(self, mats: np.ndarray) -> list[Verdict]:
        out = []
        for m in mats:  # one matrix at a time: results must not depend on the batching
            logits = m.reshape(-1).astype(np.float64) @ self.w
            row = np.exp(logits - logits.max())
            row /= row.sum()
            i = int(row.argmax())
            conf = float(row[i])
            out.append(
                Verdict(
                    label=self.CLASSES[i],
                    confidence=conf,
                    strategy="flow",
                    n_flows=int(np.any(m != 0, axis=1).sum()),
                    trusted=conf >= 0.5,
                    reason="-" if conf >= 0.5 else "low_confidence",
                    top_groups=["payload", "sizes"],
                    model="projection-test",
                )
            )
        return out

    def __call__(self, mats: np.ndarray, table: FlowTable) -> list[Verdict]:
        self.seen.extend(mats)
        return self.verdicts(mats)


async def until(cond, timeout: float = 5.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def answer_hello(offline: bool):
    """The iotcls script's side of the handshake: hello -> welcome."""

    async def on_event(z: FakeZeek, ev):
        if ev.name == "IoTClass::hello":
            await z.publish(FLOWS, welcome_frame(FLOWS, offline))

    return on_event


def record_id(r: FlowRecord) -> tuple:
    """How Zeek names a record (IoTClass::RecordId)."""
    return (r.uid, r.device_mac, r.device_ip, r.start)


def acked_ids(zeek: FakeZeek, event: str = rc.ACK_EVENT) -> list[tuple]:
    """The records named in every IoTClass::ack (or shed) Zeek received, in order."""
    return [(u, m, str(ip), st) for ev in zeek.events_named(event) for u, m, ip, st in ev.args[0]]


def expected_entry(r: FlowRecord, v: Verdict) -> LogEntry:
    return rc.log_entry(r, v)


def label_values_of(entry: LogEntry) -> list:
    """IoTClass::Label as Zeek would decode it, built independently of the encoder."""
    proto = {"tcp": "tcp", "udp": "udp", "icmp": "icmp"}.get(entry.proto, "?")
    return [
        entry.ts,
        entry.uid,
        ipaddress.ip_address(entry.orig_h),
        bj.Port(entry.orig_p, proto),
        ipaddress.ip_address(entry.resp_h),
        bj.Port(entry.resp_p, proto),
        entry.device_mac,
        ipaddress.ip_address(entry.device_ip),
        entry.label,
        entry.confidence,
        entry.strategy,
        bj.Count(entry.n_flows),
        entry.trusted,
        entry.reason,
        entry.top_groups,
        entry.model,
    ]


# -- the record codec on real records ---------------------------------------------------------
def test_flow_frames_decode_to_the_pcap_records_on_every_path():
    assert len(RECORDS) == 32
    for r in RECORDS:
        raw = rc.flow_frame(FLOWS, r)
        obj, lenient = bj.parse_frame(raw)
        assert not lenient
        assert rc.flow_record_raw(raw) == r
        assert rc.flow_record(obj) == r
        assert rc.flow_record_generic(obj) == r


def test_zeek_time_arithmetic_is_undone_exactly():
    """Zeek sends start as %f of sec+usec/1e6 and offsets as truncated ns of a difference of
    doubles; the decoded floats are those iotcls.flows computes from integer ns."""
    r = RECORDS[0]
    vals = rc.flow_values(r)
    assert vals[6] == r.start  # flows forms start exactly as Zeek does
    ns = [o.ns for o in vals[10]]
    assert ns[1] == 106_685_876  # 0.106686 s as Zeek's double difference, truncated
    assert r.offsets[1] == 0.106686
    assert rc.flow_record_raw(rc.flow_frame(FLOWS, r)).offsets == r.offsets


META = (
    b'{"@data-type":"vector","data":[{"@data-type":"vector","data":[{"@data-type":"count",'
    b'"data":1},{"@data-type":"timestamp","data":"2016-06-09T13:02:23.773"}]}]}'
)


def mutate(raw: bytes, old: bytes, new: bytes) -> bytes:
    assert old in raw
    return raw.replace(old, new, 1)


def test_fast_path_declines_what_it_cannot_prove_and_agrees_with_the_codec():
    r = RECORDS[1]
    raw = rc.flow_frame(FLOWS, r)
    cases = {
        "integer port": (b'"count","data":67}', b'"integer","data":67}'),
        "seconds": (b'"0s"', b'"1min"'),
        "negative count": (b'"count","data":328}', b'"count","data":-328}'),
        "float count": (b'"count","data":328}', b'"count","data":328.0}'),
        "format 2": (
            b'"count","data":1},{"@data-type":"count","data":1}',
            b'"count","data":2},{"@data-type":"count","data":1}',
        ),
        "two arguments": (b"]}]}]}", b']},{"@data-type":"count","data":1}]}]}'),
        "junk between elements": (b'"count","data":328},', b'"count","data":328},7,'),
        "odd hex": (b'"data":"8201', b'"data":"201'),
        "upper hex": (b'"data":"8201', b'"data":"82A1'),
        "escaped uid": (b'"CYYjJ', b'"C\\u0059YjJ'),
        "metadata, unbalanced": (b"]}]}]}", b']}]},{"@data-type":"vector","data":[]}]}]}'),
        "metadata, other key": (
            b"]}]}]}",
            b"]}]}," + META.replace(b'"data":1}', b'"data":200}') + b"]}",
        ),
    }
    for name, (old, new) in cases.items():
        bad = mutate(raw, old, new)
        fast = rc.flow_record_raw(bad)
        try:
            obj, _ = bj.parse_frame(bad)
        except bj.BrokerJSONError:
            assert fast is None, name
            continue
        try:
            generic = rc.flow_record_generic(obj)
        except rc.RecordError:
            generic = None
        assert fast is None or fast == generic, name
        try:
            walked = rc.flow_record(obj)
        except rc.RecordError:
            walked = None
        assert walked == generic, name
    two = FlowRecord(
        **{**{f: getattr(r, f) for f in r.__slots__}, "directions": [2] * len(r.sizes)}
    )
    bad = rc.flow_frame(FLOWS, two)
    assert rc.flow_record_raw(bad) is None
    with pytest.raises(rc.RecordError, match="directions must be 0 or 1"):
        rc.flow_record(bj.parse_frame(bad)[0])
    # network-time metadata (the only kind Zeek attaches) and escapes decode the same
    meta = mutate(raw, b"]}]}]}", b"]}]}," + META + b"]}")
    assert rc.flow_record_raw(meta) == r == rc.flow_record_generic(bj.parse_frame(meta)[0])
    esc = mutate(raw, b'"CYYjJ', b'"C\\u0059YjJ')
    assert rc.flow_record_raw(esc) is None
    assert rc.flow_record(bj.parse_frame(esc)[0]) == r


def test_generic_decoder_names_the_bad_field():
    raw = mutate(rc.flow_frame(FLOWS, RECORDS[1]), b'"count","data":67}', b'"integer","data":67}')
    with pytest.raises(rc.RecordError, match="field remote_port must be count, got Integer"):
        rc.flow_record_generic(bj.parse_frame(raw)[0])


def test_from_records_matches_a_plain_loop():
    """FlowTable.from_records is vectorised for the bridge; check it against the obvious loop."""
    rng = np.random.default_rng(3)
    recs = []
    for i in range(60):
        k = int(rng.integers(0, 14))
        recs.append(
            FlowRecord(
                device_mac="" if i % 3 else f"aa:bb:cc:dd:ee:0{i % 7}",
                device_ip=["10.0.0.1", "2001:db8::5"][i % 2],
                device_port=int(rng.integers(65536)),
                remote_ip=["8.8.8.8", "fe80::1", "192.168.1.1"][i % 3],
                remote_port=int(rng.integers(65536)),
                proto=[6, 17, 1, 58][i % 4],
                start=float(rng.random() * 1e9),
                last=float(rng.random() * 1e9),
                total_bytes=int(rng.integers(10**6)),
                total_packets=int(rng.integers(1000)),
                offsets=[float(x) for x in rng.random(k)],
                sizes=[int(x) for x in rng.integers(1500, size=k)],
                directions=[int(x) for x in rng.integers(2, size=k)],
                payloads=[
                    bytes(rng.integers(256, size=int(rng.integers(0, 90))).astype(np.uint8))
                    for _ in range(k)
                ],
                uid=f"C{i}",
                device_is_orig=bool(i % 2),
            )
        )
    for packets, nbytes in ((10, 64), (3, 5), (12, 0)):
        t = FlowTable.from_records(recs, packets, nbytes)
        ref = FlowTable.allocate(len(recs), packets, nbytes)
        for i, r in enumerate(recs):
            k = min(len(r.offsets), packets)
            ref.device_mac[i], ref.uid[i], ref.n_pkts[i] = r.device_mac, r.uid, k
            ref.device_ip[i] = np.frombuffer(
                ipaddress.ip_address(r.device_ip).packed.rjust(16, b"\0")
                if ":" in r.device_ip
                else b"\0" * 10 + b"\xff\xff" + ipaddress.ip_address(r.device_ip).packed,
                np.uint8,
            )
            ref.remote_ip[i] = np.frombuffer(
                ipaddress.ip_address(r.remote_ip).packed
                if ":" in r.remote_ip
                else b"\0" * 10 + b"\xff\xff" + ipaddress.ip_address(r.remote_ip).packed,
                np.uint8,
            )
            ref.offsets[i, :k], ref.sizes[i, :k] = r.offsets[:k], r.sizes[:k]
            ref.directions[i, :k] = r.directions[:k]
            for j, p in enumerate(r.payloads[:k]):
                p = p[:nbytes]
                ref.payload[i, j, : len(p)] = np.frombuffer(p, np.uint8)
                ref.payload_len[i, j] = len(p)
            for f in (
                "device_port",
                "remote_port",
                "proto",
                "start",
                "last",
                "total_bytes",
                "total_packets",
                "device_is_orig",
            ):
                getattr(ref, f)[i] = getattr(r, f)
        for f in fields(t):
            a, b = getattr(t, f.name), getattr(ref, f.name)
            assert a.dtype == b.dtype and np.array_equal(a, b), f.name
        assert t.records()[5].payloads == [p[:nbytes] for p in recs[5].payloads[:packets]]


def test_assembler_matches_the_offline_path_when_fed_in_start_order():
    order = sorted(range(len(RECORDS)), key=lambda i: RECORDS[i].start)
    asm = FlowAssembler(LAYOUT)
    online = {}
    for lo in range(0, len(order), 7):  # in small batches
        idx = order[lo : lo + 7]
        mats, _ = asm.assemble([RECORDS[i] for i in idx])
        online.update(zip(idx, mats))
    table = FlowTable.from_records(RECORDS, LAYOUT.packets, LAYOUT.required_payload_bytes())
    offline, pos = LAYOUT.matrices(table)
    for m, i in zip(offline, pos):
        assert np.array_equal(online[int(i)], m)


def test_label_messages_encode_the_declared_record():
    v = Verdict("Aria", 0.875, "majority", 4, False, "low_confidence", ["payload"], "m1")
    r = RECORDS[0]
    entry = rc.log_entry(r, v)
    assert (entry.orig_h, entry.orig_p, entry.resp_h, entry.resp_p) == r.conn_id()
    assert entry.proto == "udp" and entry.ts == r.start and entry.device_mac == r.device_mac
    obj = json.loads(rc.label_message(LABELS, entry))
    ev = bj.decode_event(bj.decode_message(obj).data)
    assert ev.name == "IoTClass::label" and ev.args == (label_values_of(entry),)
    types = [n["@data-type"] for n in obj["data"][2]["data"][1]["data"][0]["data"]]
    assert types == [t for _, t in rc.LABEL_FIELDS]
    # counts are JSON integers, reals carry a point (Broker would refuse 4.0 / 1)
    assert obj["data"][2]["data"][1]["data"][0]["data"][11] == {"@data-type": "count", "data": 4}
    assert b'"@data-type":"real","data":0.875}' in rc.label_message(LABELS, entry)


# -- against the WebSocket server -------------------------------------------------------------
def run_async(coro, timeout: float = 20.0):
    async def main():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


def test_retries_until_zeek_is_up_then_says_hello(caplog):
    async def scenario():
        port = free_port()
        zeek = FakeZeek(port=port, welcome_on_hello=False)
        bridge = Bridge(LAYOUT, ProjectionScorer(), labels_topic=LABELS, name="test-bridge")
        client = attach(bridge, f"ws://127.0.0.1:{port}/v1/messages/json", [FLOWS], **FAST)
        task = asyncio.create_task(run(bridge, client))
        await until(lambda: client.stats.failures >= 3, what="failed attempts")
        assert client.stats.connects == 0
        await zeek.start(port)
        await until(lambda: zeek.events_named("IoTClass::hello"), what="hello")
        hello = zeek.events_named("IoTClass::hello")[0]
        assert hello.topic == LABELS
        assert hello.args == ["test-bridge", f"{zeek.node_id}-websocket-0"]
        assert zeek.subscriptions == [[FLOWS]]
        assert client.stats.connects == 1 and client.ack.version == "8.2.2"
        client.stop()
        await task
        await zeek.stop()

    with caplog.at_level(logging.WARNING, "iotcls.bridge.zeek"):
        run_async(scenario())
    assert any("cannot connect to Zeek" in r.message for r in caplog.records)


def test_no_ack_is_diagnosed_and_retried(caplog):
    async def scenario():
        zeek = await FakeZeek(ack=False, welcome_on_hello=False).start()
        client = ZeekClient(zeek.url, [FLOWS], **{**FAST, "ack_timeout_s": 0.2})
        task = asyncio.create_task(client.run())
        await until(lambda: client.stats.failures >= 2, what="two no-ack failures")
        assert client.stats.connects == 0
        client.stop()
        await task
        await zeek.stop()

    with caplog.at_level(logging.WARNING, "iotcls.bridge.zeek"):
        run_async(scenario())
    assert any(
        "sent no ack" in r.message and "cluster backend" in r.message for r in caplog.records
    )


def test_wrong_path_and_bad_subscription_are_reported(caplog):
    async def scenario():
        zeek = await FakeZeek(welcome_on_hello=False).start()
        client = ZeekClient(f"ws://127.0.0.1:{zeek.port}/v1/events", [FLOWS], **FAST)
        task = asyncio.create_task(client.run())
        await until(lambda: client.stats.zeek_errors["invalid_uri"] >= 1, what="invalid_uri")
        client.stop()
        await task
        bad = ZeekClient(zeek.url, [FLOWS], **FAST)
        bad.topics = [FLOWS, 7]  # not a string: Zeek says so and never acks
        task = asyncio.create_task(bad.run())
        await until(lambda: bad.stats.zeek_errors["deserialization_failed"] >= 1, what="refusal")
        assert bad.stats.connects == 0
        bad.stop()
        await task
        await zeek.stop()
        assert zeek.errors_sent[-1] == "individual subscription not a string"

    with caplog.at_level(logging.WARNING, "iotcls.bridge.zeek"):
        run_async(scenario())
    assert any("refused the subscription" in r.message for r in caplog.records)


def test_records_in_labels_out_live():
    async def scenario():
        zeek = FakeZeek(welcome_on_hello=False, on_event=answer_hello(offline=False))
        await zeek.start()
        scorer = ProjectionScorer()
        bridge = Bridge(LAYOUT, scorer, labels_topic=LABELS, max_delay_s=0.005)
        client = attach(bridge, zeek.url, [FLOWS], **FAST)
        task = asyncio.create_task(run(bridge, client))
        await until(lambda: bridge.welcome is not None, what="welcome")
        assert bridge.welcome == rc.Welcome(SCHEMA_VERSION, "standalone", 60.0, 10, 64, False)
        assert not bridge.offline
        for r in RECORDS:
            assert await zeek.publish(FLOWS, rc.flow_frame(FLOWS, r)) == 1
        await until(
            lambda: len(zeek.events_named("IoTClass::label")) == len(RECORDS), what="all labels"
        )
        labels = zeek.events_named("IoTClass::label")
        assert zeek.errors_sent == []  # Zeek accepted every label as declared
        by_uid = {}
        for ev in labels:
            assert ev.topic == LABELS and len(ev.args) == 1
            by_uid.setdefault((ev.args[0][1], str(ev.args[0][7])), []).append(ev.args[0])
        # each label carries its record's identity and the scorer's verdict on its matrix
        assert len(scorer.seen) == len(RECORDS)
        for r in RECORDS:
            got = by_uid[(r.uid, r.device_ip)]
            assert any(
                g[0] == r.start and (str(g[2]), g[3].number, str(g[4]), g[5].number) == r.conn_id()
                for g in got
            )
        assert bridge.stats.records == bridge.stats.labels == len(RECORDS)
        # and with each batch's labels, one IoTClass::ack naming every record of the batch
        await until(lambda: len(acked_ids(zeek)) == len(RECORDS), what="all acks")
        assert sorted(acked_ids(zeek)) == sorted(record_id(r) for r in RECORDS)
        acks = zeek.events_named(rc.ACK_EVENT)
        assert client.stats.sent == len(RECORDS) + 1 + len(acks)  # + hello
        client.stop()
        await task
        await zeek.stop()

    run_async(scenario())


def test_offline_drain_gives_the_offline_matrices_and_confirms_the_counts():
    async def scenario():
        zeek = FakeZeek(welcome_on_hello=False, on_event=answer_hello(offline=True))
        await zeek.start()
        scorer = ProjectionScorer()
        bridge = Bridge(LAYOUT, scorer, labels_topic=LABELS, batch_size=8)
        client = attach(bridge, zeek.url, [FLOWS], **FAST)
        task = asyncio.create_task(run(bridge, client))
        await until(lambda: bridge.offline, what="offline welcome")
        arrival = list(reversed(RECORDS))  # Zeek flushes at connection end, not by start
        for r in arrival:
            await zeek.publish(FLOWS, rc.flow_frame(FLOWS, r))
        await zeek.publish(FLOWS, drain_frame(FLOWS, len(arrival)))
        await until(lambda: zeek.events_named("IoTClass::drained"), what="drained")
        names = [e.name for e in zeek.received]
        assert names[0] == "IoTClass::hello" and names[-1] == "IoTClass::drained"
        assert names.count("IoTClass::label") == len(arrival)  # every label before drained
        assert zeek.events_named("IoTClass::drained")[0].args == [len(arrival), len(arrival)]
        # the matrices are exactly those of the offline path over the same records
        table = FlowTable.from_records(arrival, LAYOUT.packets, LAYOUT.required_payload_bytes())
        offline, _ = LAYOUT.matrices(table)
        got = np.stack(scorer.seen)
        key = lambda m: m.tobytes()  # noqa: E731
        assert sorted(map(key, got)) == sorted(map(key, offline))
        expected = {}
        mats_by_rec = dict(zip(np.argsort([r.start for r in arrival], kind="stable"), got))
        for i, r in enumerate(arrival):
            v = scorer.verdicts(mats_by_rec[i][None])[0]
            expected[(r.uid, r.device_ip, r.start)] = label_values_of(rc.log_entry(r, v))
        for ev in zeek.events_named("IoTClass::label"):
            lab = ev.args[0]
            assert expected.pop((lab[1], str(lab[7]), lab[0])) == lab
        assert expected == {}
        client.stop()
        await task
        await zeek.stop()

    run_async(scenario())


def test_survives_garbage_and_zeek_errors():
    async def scenario():
        zeek = FakeZeek(welcome_on_hello=False, on_event=answer_hello(offline=False))
        await zeek.start()
        bridge = Bridge(LAYOUT, ProjectionScorer(), labels_topic=LABELS, max_delay_s=0.005)
        client = attach(bridge, zeek.url, [FLOWS], **FAST)
        task = asyncio.create_task(run(bridge, client))
        await until(lambda: bridge.welcome is not None, what="welcome")
        sample = json.loads((WS_FIX / "frames.jsonl").read_text().splitlines()[2])
        bad_flow = rc.flow_frame(FLOWS, RECORDS[0]).replace(
            b'"count","data":67}', b'"string","data":"67"}'
        )
        await zeek.send_raw(b"{not json")  # malformed
        await zeek.send_raw(sample["frame"]["latin1"].encode("latin-1"))  # raw bytes, \v
        await zeek.send_raw(b"[1, 2, 3]")  # JSON, but no Broker message
        await zeek.send_raw(b'{"type":"ack","endpoint":"x","version":"y"}')  # ack again
        await zeek.send_raw(
            b'{"type":"error","code":"deserialization_failed",'
            b'"context":"failed to create Zeek event"}'
        )
        await zeek.send_raw(bad_flow)  # a flow event with a wrong field type
        await zeek.publish(FLOWS, bj.render_zeek(FLOWS, bj.encode_event("Other::event", [])))
        # a label with an integer where Zeek declares count: Zeek answers with an error
        await client.send(
            mutate(
                rc.label_message(LABELS, rc.log_entry(RECORDS[0], Verdict("Aria", 0.9, n_flows=3))),
                b'"count","data":3}',
                b'"integer","data":3}',
            )
        )
        for r in RECORDS[:5]:
            await zeek.publish(FLOWS, rc.flow_frame(FLOWS, r))
        await until(lambda: len(zeek.events_named("IoTClass::label")) == 5, what="labels")
        await until(
            lambda: client.stats.zeek_errors["deserialization_failed"] == 2, what="error replies"
        )
        s = client.stats
        assert (s.malformed, s.lenient, s.unexpected, s.handler_errors) == (1, 1, 2, 0)
        assert zeek.errors_sent == ["failed to create Zeek event"]
        assert bridge.stats.bad_records == 1 and bridge.stats.other_events == 2
        assert bridge.stats.records == 5 and client.stats.connects == 1
        client.stop()
        await task
        await zeek.stop()

    run_async(scenario())


def test_reconnects_after_zeek_restarts_and_sends_what_waited():
    async def scenario():
        zeek = FakeZeek(welcome_on_hello=False, on_event=answer_hello(offline=False))
        await zeek.start()
        port = zeek.port
        bridge = Bridge(LAYOUT, ProjectionScorer(), labels_topic=LABELS, max_delay_s=0.005)
        client = attach(bridge, zeek.url, [FLOWS], **FAST)
        task = asyncio.create_task(run(bridge, client))
        await until(lambda: bridge.welcome is not None, what="welcome")
        await zeek.stop()
        await until(lambda: client.stats.disconnects == 1, what="disconnect")
        # records already received are still labelled while Zeek is down: buffered
        assert bridge.on_raw(rc.flow_frame(FLOWS, RECORDS[3]))
        await until(lambda: client.buffered == 2, what="buffered label and ack")
        zeek2 = FakeZeek(welcome_on_hello=False, on_event=answer_hello(offline=False))
        await zeek2.start(port)
        await until(lambda: zeek2.events_named("IoTClass::label"), what="label after restart")
        names = [e.name for e in zeek2.received]
        # hello first, then the backlog
        assert names[:3] == ["IoTClass::hello", "IoTClass::label", rc.ACK_EVENT]
        assert client.stats.connects == 2 and client.buffered == 0
        await zeek2.publish(FLOWS, rc.flow_frame(FLOWS, RECORDS[4]))
        await until(lambda: len(zeek2.events_named("IoTClass::label")) == 2, what="new label")
        client.stop()
        await task
        await zeek2.stop()

    run_async(scenario())


def test_scorer_failure_and_async_scorers():
    async def scenario():
        zeek = FakeZeek(welcome_on_hello=False, on_event=answer_hello(offline=False))
        await zeek.start()
        calls = []

        async def flaky(mats, table):  # async scorers are awaited
            calls.append(len(mats))
            if len(calls) == 1:
                raise RuntimeError("scorer down")
            return [None if i % 2 else Verdict("Aria", 0.7) for i in range(len(mats))]

        bridge = Bridge(LAYOUT, flaky, labels_topic=LABELS, max_delay_s=0.005, batch_size=4)
        client = attach(bridge, zeek.url, [FLOWS], **FAST)
        task = asyncio.create_task(run(bridge, client))
        await until(lambda: bridge.welcome is not None, what="welcome")
        await zeek.publish(FLOWS, rc.flow_frame(FLOWS, RECORDS[0]))
        await until(lambda: bridge.stats.scorer_failures == 1, what="failure")
        for r in RECORDS[1:5]:
            await zeek.publish(FLOWS, rc.flow_frame(FLOWS, r))
        await until(lambda: bridge.stats.scored == 4, what="scored")
        await until(lambda: len(zeek.events_named("IoTClass::label")) == 2, what="labels")
        assert bridge.stats.unlabelled == 1 + 2 and bridge.stats.labels == 2
        client.stop()
        await task
        await zeek.stop()

    run_async(scenario())


def test_native_broker_transport_needs_the_bindings():
    """The optional native transport runs only with Zeek's Broker bindings; here they are
    not installed, and it says so in one line instead of failing later."""
    from iotcls.bridge import broker_native

    try:
        import broker  # noqa: F401

        has = hasattr(broker, "Endpoint")
    except ImportError:
        has = False
    assert broker_native.available() is has
    if not has:
        with pytest.raises(RuntimeError, match=r"Broker Python bindings are not importable"):
            broker_native.NativeBrokerClient("127.0.0.1", 9999, [FLOWS], on_message=print)


def test_fast_label_encoder_is_byte_identical_to_the_codec():
    base = rc.log_entry(RECORDS[0], Verdict("Aria", 0.875, n_flows=2, top_groups=["payload"]))
    variants = [
        {},
        {"confidence": 1e-7, "ts": 1465478143.773797},
        {"confidence": 1.0, "n_flows": 0},
        {
            "orig_h": "2001:db8::1",
            "resp_h": "fe80::2",
            "device_ip": "2001:db8::1",
            "proto": "icmp",
            "orig_p": 128,
            "resp_p": 129,
        },
        {"proto": "unknown_transport", "orig_p": 0, "resp_p": 0},
        {"device_mac": ""},
        {"reason": "low_confidence", "trusted": False, "top_groups": []},
        {"label": 'Hüe "Bridge"\\\n\x00', "model": "m\u2603", "strategy": "majority"},
        {"uid": "C\udc80raw"},  # a string holding a raw byte, as read from Zeek
    ]
    for change in variants:
        e = LogEntry(**{**base.__dict__, **change})
        assert rc.label_message(LABELS, e) == rc.label_message_generic(LABELS, e), change
    for bad in (
        {"orig_h": "10.0.0.256"},
        {"confidence": float("nan")},
        {"n_flows": -1},
        {"resp_p": 70000},
    ):
        with pytest.raises(rc.RecordError):
            rc.label_message(LABELS, LogEntry(**{**base.__dict__, **bad}))


# -- concurrency and intake bounds as options of the Bridge -------------------------------------
class SlowScorer(ProjectionScorer):
    """Async: each call waits for the test to open the gate; counts calls in flight."""

    def __init__(self):
        super().__init__()
        self.gate = asyncio.Event()
        self.active = self.peak = 0

    async def __call__(self, mats, table):
        self.active += 1
        self.peak = max(self.peak, self.active)
        await self.gate.wait()
        self.active -= 1
        return super().__call__(mats, table)


def test_batches_in_flight_are_bounded_and_labels_match_one_at_a_time():
    frames = [rc.flow_frame(FLOWS, r) for r in RECORDS]

    async def labels(max_inflight: int):
        scorer = SlowScorer()
        singles, groups = [], []

        async def send(f):
            singles.append(f)

        async def send_many(fs):
            groups.append(list(fs))

        bridge = Bridge(
            LAYOUT,
            scorer,
            send,
            labels_topic=LABELS,
            batch_size=4,
            max_delay_s=0.0,
            max_inflight=max_inflight,
            send_many=send_many,
        )
        task = asyncio.create_task(bridge.run())
        for f in frames:
            assert bridge.on_raw(f)
            await asyncio.sleep(0)
        await until(lambda: scorer.active == max_inflight, what="batches at the scorer")
        await asyncio.sleep(0.05)
        assert scorer.active == max_inflight and bridge.queued > 0  # the rest waits
        assert bridge.batches_in_flight == (max_inflight if max_inflight > 1 else 0)
        scorer.gate.set()
        await until(
            lambda: bridge.idle.is_set() and bridge.stats.labels == len(frames), what="every label"
        )
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert scorer.peak == max_inflight and not singles
        assert all(1 <= len(g) <= 4 for g in groups)  # one send per batch
        return sorted(f for g in groups for f in g), [m.tobytes() for m in scorer.seen]

    one, mats_one = run_async(labels(1))
    three, mats_three = run_async(labels(3))
    assert len(one) == len(RECORDS) and one == three
    assert sorted(mats_one) == sorted(mats_three)  # same matrices, same history


def test_bounded_intake_sheds_at_the_door_and_after_pause():
    async def scenario():
        scorer = SlowScorer()
        shed, frames = [], []

        async def send(frame):
            frames.append(json.loads(frame))

        bridge = Bridge(
            LAYOUT,
            scorer,
            send,
            labels_topic=LABELS,
            batch_size=4,
            max_delay_s=0.0,
            max_inflight=2,
            max_live_records=10,
            on_shed=shed.append,
        )
        bridge.acks = True  # as after a hello: Zeek is told what became of each record
        task = asyncio.create_task(bridge.run())
        for r in RECORDS[:16]:
            assert bridge.on_raw(rc.flow_frame(FLOWS, r))
        assert bridge.live_records == 10 and bridge.stats.records == 10
        assert shed == ["backlog"] * 6 and bridge.stats.shed == 6
        bridge.pause()
        bridge.on_raw(rc.flow_frame(FLOWS, RECORDS[20]))
        assert shed[-1] == "paused" and bridge.stats.shed == 7 and bridge.stats.records == 10
        scorer.gate.set()
        await bridge.flush(2.0)
        await bridge.settle()
        await until(lambda: bridge.stats.scored == 10, what="the ten taken records scored")
        assert bridge.live_records == 0
        # the six refused at the door are named to Zeek as shed; the one refused after pause()
        # is not (Zeek keeps it for the next bridge)
        sheds = [
            bj.decode_event(bj.decode_message(f).data)
            for f in frames
            if rc.event_name(f) == rc.SHED_EVENT
        ]
        assert [e.args[1] for e in sheds] == ["label_backlog"]
        assert [ids[0] for ids in sheds[0].args[0]] == [r.uid for r in RECORDS[10:16]]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run_async(scenario())


def test_send_many_writes_label_frames_in_order_over_a_real_websocket():
    async def scenario():
        zeek = FakeZeek(welcome_on_hello=False, on_event=answer_hello(offline=False))
        await zeek.start()
        client = ZeekClient(zeek.url, [FLOWS], **FAST)
        task = asyncio.create_task(client.run())
        await until(lambda: client.connected.is_set(), what="ack")
        entries = [rc.log_entry(r, Verdict("Aria", 0.5)) for r in RECORDS[:5]]
        frames = [rc.label_message(LABELS, e) for e in entries]
        assert await client.send_many(frames) == 5 and client.stats.sent == 5
        await until(lambda: len(zeek.events_named("IoTClass::label")) == 5, what="labels")
        got = [e.args[0][1] for e in zeek.events_named("IoTClass::label")]
        assert got == [e.uid for e in entries]
        client.stop()
        await task
        await zeek.stop()
        assert await client.send_many(frames[:2]) == 0 and client.buffered == 2

    run_async(scenario())


def test_fake_zeek_batched_publish_and_strict_checks_in_one_server():
    """The load generator's batched send and the declaration checks live in one FakeZeek."""

    async def scenario():
        zeek = await FakeZeek(offline=False).start()  # answers hello with welcome itself
        bridge = Bridge(LAYOUT, ProjectionScorer(), labels_topic=LABELS, max_delay_s=0.005)
        client = attach(bridge, zeek.url, [FLOWS], **FAST)
        task = asyncio.create_task(run(bridge, client))
        await until(lambda: bridge.welcome is not None, what="welcome")
        await zeek.publish_frames([rc.flow_frame(FLOWS, r) for r in RECORDS[:10]], FLOWS)
        await until(lambda: zeek.stats.labels == 10, what="ten labels")
        assert sorted(lb.uid for lb in zeek.labels) == sorted(r.uid for r in RECORDS[:10])
        assert zeek.stats.flows_sent == 10 and zeek.errors_sent == []
        assert len(zeek.events_named("IoTClass::label")) == 10
        good = rc.label_message(LABELS, rc.log_entry(RECORDS[0], Verdict("Aria", 0.5)))
        assert b'"real","data":0.5}' in good  # the confidence, as a string: Zeek refuses it
        await client.send(good.replace(b'"real","data":0.5}', b'"string","data":"0.5"}'))
        await until(lambda: zeek.errors_sent, what="the refusal")
        assert zeek.errors_sent == ["failed to create Zeek event"]
        client.stop()
        await task
        await zeek.close()

    run_async(scenario())


# -- hardening -----------------------------------------------------------------------------
def test_a_record_that_makes_no_finite_row_is_refused_before_it_joins_the_history():
    """A record with a negative count or offset (a decoder that missed it, a fake sensor)
    is refused with a count, before it enters its device's history: the device's next
    records give finite matrices and labels (the bad row used to poison the next ones)."""
    import copy

    recs = sorted(
        (r for r in RECORDS if r.device_ip == RECORDS[0].device_ip), key=lambda r: r.start
    )[:8]
    bad = copy.deepcopy(recs[1])
    bad.total_bytes = -5
    bad.uid = "Cbad"
    scorer = ProjectionScorer()
    bridge = Bridge(LAYOUT, scorer, labels_topic=LABELS)

    async def main():
        return await bridge.process([recs[0], bad, *recs[1:]])

    sent = run_async(main())
    n = len(recs)
    assert n >= 5 and sent == n and bridge.stats.bad_records == 1
    assert len(scorer.seen) == n and all(np.isfinite(m).all() for m in scorer.seen)


def test_records_that_arrive_twice_are_dropped_and_counted():
    """Zeek publishes again what a lost connection did not acknowledge: a record already
    seen (same uid, start and device) is dropped, in the same batch or a later one."""
    from iotcls.bridge.core import RecentKeys

    scorer = ProjectionScorer()
    bridge = Bridge(LAYOUT, scorer, labels_topic=LABELS)
    recs = RECORDS[:6]

    async def main():
        a = await bridge.process([*recs[:4], recs[0]])
        b = await bridge.process(recs[2:6])
        return a, b

    assert run_async(main()) == (4, 2)
    assert bridge.stats.duplicates == 3 and len(scorer.seen) == 6
    keys = RecentKeys(3)
    assert keys.fresh([1, 2, 1, 3]) == [0, 1, 3] and keys.fresh([4, 1, 2]) == [0]
    assert len(keys) == 3 and keys.fresh([1]) == [0]  # the oldest was forgotten


def test_what_became_of_each_record_goes_back_to_zeek():
    """Toward Zeek, each batch names every record the bridge is done with (IoTClass::ack:
    labelled, label held back by the log policy, unusable) and those it shed (IoTClass::shed,
    by reason); records shed because the bridge stops, and those of a batch the scorer
    failed, are not named: Zeek keeps them and publishes them again, and that copy is scored.
    A copy of a record already done with is acknowledged again, not scored again; a copy of
    a shed record is scored."""
    import copy

    from iotcls.bridge.dispatch import Outcome

    one = list({r.uid: r for r in reversed(RECORDS)}.values())[::-1]  # one record per uid
    recs = one[:8]
    bad = copy.deepcopy(one[8])
    bad.total_bytes = -1  # no finite matrix row: unusable
    fates = ["label", "held", "queue_full", "shutdown", "label", "label", "held", "queue_full"]
    fail = [False]

    async def scorer(mats, table):
        if fail[0]:
            raise RuntimeError("scorer down")
        out = []
        for uid in table.uid.tolist():
            fate = fates[[r.uid for r in recs].index(uid)]
            if fate in ("queue_full", "shutdown"):
                out.append(Outcome(ctx=None, device="d", shed=fate))
            else:
                out.append(
                    Outcome(
                        ctx=None,
                        device="d",
                        label="Aria",
                        confidence=0.9,
                        send=fate == "label",
                        model="m",
                    )
                )
        return out

    async def scenario():
        zeek = FakeZeek(welcome_on_hello=False, on_event=answer_hello(offline=False))
        await zeek.start()
        bridge = Bridge(LAYOUT, scorer, labels_topic=LABELS, max_delay_s=0.005)
        client = attach(bridge, zeek.url, [FLOWS], **FAST)
        task = asyncio.create_task(run(bridge, client))
        await until(lambda: bridge.welcome is not None, what="welcome")
        assert await bridge.process([*recs, bad]) == 3
        await until(lambda: len(zeek.events_named(rc.SHED_EVENT)) == 1, what="shed")
        assert zeek.errors_sent == []  # as main.zeek declares them
        want = {f: sorted(record_id(r) for r, x in zip(recs, fates) if x == f) for f in fates}
        assert sorted(acked_ids(zeek)) == sorted(want["label"] + want["held"] + [record_id(bad)])
        assert sorted(acked_ids(zeek, rc.SHED_EVENT)) == want["queue_full"]
        assert [e.args[1] for e in zeek.events_named(rc.SHED_EVENT)] == ["queue_full"]
        assert len(zeek.events_named(rc.LABEL_EVENT)) == 3
        # Zeek publishes again what it was not told about, and a copy of the rest
        zeek.received.clear()
        fates[3] = "held"  # never labelled: scored again (the others done with: acked again)
        assert await bridge.process(recs) == 0
        await until(lambda: len(acked_ids(zeek)) == 6, what="acks of the copies")
        assert sorted(acked_ids(zeek)) == sorted(want["label"] + want["held"] + want["shutdown"])
        assert sorted(acked_ids(zeek, rc.SHED_EVENT)) == want["queue_full"]
        assert bridge.stats.duplicates == 5
        # a batch the scorer failed is not acknowledged, and its copy is scored later
        zeek.received.clear()
        fail[0] = True
        assert await bridge.process(one[9:11]) == 0
        fail[0] = False
        fates[:2] = ["label", "label"]
        recs[:2] = one[9:11]
        assert await bridge.process(one[9:11]) == 2
        await until(lambda: len(acked_ids(zeek)) == 2, what="acks of the copies")
        assert sorted(acked_ids(zeek)) == sorted(map(record_id, one[9:11]))
        client.stop()
        await task
        await zeek.stop()

    run_async(scenario())


def test_ack_and_shed_frames_are_the_codecs():
    ids = [(r.uid, r.device_mac, r.device_ip, r.start) for r in RECORDS[:5]]
    ids.append(("Cx", "", "fe80::1", 1.25e9))
    assert rc.ack_message(LABELS, ids) == bj.event_message(
        LABELS, rc.ACK_EVENT, [rc.record_ids_generic(ids)]
    )
    assert rc.shed_message(LABELS, ids, "queue_full") == bj.event_message(
        LABELS, rc.SHED_EVENT, [rc.record_ids_generic(ids), "queue_full"]
    )
    assert rc.ack_message(LABELS, []) == bj.event_message(LABELS, rc.ACK_EVENT, [[]])


def test_the_client_survives_whatever_a_frame_holds(caplog):
    """Frames nested 100,000 deep (Python's parser would raise RecursionError, which used
    to end the client's task and the service with it) and a handler that raises: counted,
    logged, and the session goes on."""

    async def main():
        zeek = await FakeZeek().start()
        got = []

        def on_message(obj):
            if rc.event_name(obj) == "Boom::event":
                raise RuntimeError("handler bug")
            got.append(obj)

        client = ZeekClient(zeek.url, [FLOWS], on_message=on_message, **FAST)
        task = asyncio.create_task(client.run())
        try:
            await until(lambda: zeek.acked_clients == 1, 5, "ack")
            await zeek.send_raw(b"[" * 100_000)
            await zeek.send_raw(b'{"type":"data-message","topic":"t",' * 40_000)
            await zeek.send_raw(bj.event_message(FLOWS, "Boom::event", []))
            await zeek.send_raw(bj.event_message(FLOWS, "Fine::event", []))
            await until(lambda: got, 5, "the message after the garbage")
        finally:
            client.stop()
            await asyncio.wait_for(task, 5)
            await zeek.close()
        return client

    client = run_async(main())
    assert client.stats.malformed == 2 and client.stats.handler_errors == 1
    assert client.stats.connects == 1 and client.stats.disconnects == 1


def test_early_records_get_early_labels_and_leave_the_history_alone():
    """Over a real WebSocket: each record's early record (schema.early_record) first, then
    the record. Early ones come back as IoTClass::early_label, scored against the device's
    history as it stands; the final labels, their matrices and the counts are those of the
    records alone (the early ones never join a device's history)."""
    from iotcls.schema import early_record

    early = {r.uid + r.device_ip + repr(r.start): early_record(r) for r in RECORDS}

    async def scenario():
        zeek = FakeZeek(welcome_on_hello=False, on_event=answer_hello(offline=False))
        await zeek.start()
        scorer = ProjectionScorer()
        bridge = Bridge(LAYOUT, scorer, labels_topic=LABELS, max_delay_s=0.005)
        client = attach(bridge, zeek.url, [FLOWS], **FAST)
        task = asyncio.create_task(run(bridge, client))
        await until(lambda: bridge.welcome is not None, what="welcome")
        sent_early = 0
        for r in sorted(RECORDS, key=lambda r: r.start):
            e = early[r.uid + r.device_ip + repr(r.start)]
            if e is not None:
                frame = rc.flow_frame(FLOWS, e).replace(
                    b'"IoTClass::flow"', b'"IoTClass::early_flow"', 1
                )
                assert await zeek.publish(FLOWS, frame) == 1
                sent_early += 1
                await until(lambda n=sent_early: bridge.stats.early_labels == n, what="early")
            assert await zeek.publish(FLOWS, rc.flow_frame(FLOWS, r)) == 1
        await until(
            lambda: len(zeek.events_named("IoTClass::label")) == len(RECORDS), what="all labels"
        )
        early_labels = zeek.events_named("IoTClass::early_label")
        assert sent_early > 10 and len(early_labels) == sent_early
        assert zeek.errors_sent == []  # Zeek accepted the early labels as declared too
        assert bridge.stats.records == bridge.stats.labels == len(RECORDS)
        assert bridge.stats.early_records == bridge.stats.early_labels == sent_early
        client.stop()
        await task
        await zeek.stop()
        return scorer.seen, sent_early

    seen, sent_early = run_async(scenario())
    assert len(seen) == len(RECORDS) + sent_early
    alone = Bridge(LAYOUT, ProjectionScorer())
    mats, _ = alone.assembler.assemble(sorted(RECORDS, key=lambda r: r.start))
    # every final matrix is the one the records alone give (early records joined no history)
    for m in mats:
        assert any(np.array_equal(m, x) for x in seen)
