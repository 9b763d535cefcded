"""Packed flow records (``IoTClass::flows``, bridge/records.py): the native capture plugin's
batches of one-line records. A packed line decodes to exactly the FlowRecord the JSON path
(``IoTClass::flow``) gives for the same record; every malformed form is a RecordError naming
its field and nothing else; the bridge takes each line on its own (a bad one costs only
itself); and, end to end, ``iotcls serve`` labels every good record of a batch once."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random

import pytest

from iotcls.bridge import broker_json as bj
from iotcls.bridge import records as rc
from iotcls.bridge.core import Bridge
from iotcls.layout import MatrixLayout
from iotcls.schema import FlowRecord, early_record
from iotcls.testing.synth import synthetic_records

TOPIC = "zeek/iotcls/flows"
LAYOUT = MatrixLayout(history=2, packets=4, payload_bytes=4)


def via_json(r: FlowRecord, early: bool = False) -> FlowRecord:
    """What the bridge decodes from the record's ``IoTClass::flow`` (``early_flow``) frame."""
    frame = rc.flow_frame(TOPIC, r)
    if early:
        frame = frame.replace(b'"IoTClass::flow"', b'"IoTClass::early_flow"', 1)
        return rc.early_flow_record(bj.parse_frame(frame)[0])
    return rc.flow_record(bj.parse_frame(frame)[0])


def edge_records() -> list[FlowRecord]:
    """Records at the edges of the format: no packets, one empty payload, all payloads empty,
    IPv6, no MAC, device not the originator, counts at their maximum, times at their ends,
    an offset at its maximum, a whole DHCP payload."""
    base = synthetic_records(1, devices=1, seed=3)[0]
    n = len(base.sizes)
    none = dict(offsets=[], sizes=[], directions=[], payloads=[])
    big = 2**64 - 1
    return [
        dataclasses.replace(base, **none, total_packets=0, total_bytes=0),
        dataclasses.replace(base, offsets=[0.0], sizes=[60], directions=[1], payloads=[b""]),
        dataclasses.replace(base, payloads=[b""] * n),
        dataclasses.replace(base, device_ip="2001:db8::1", remote_ip="fe80::aa:1", proto=58),
        dataclasses.replace(base, device_mac="", device_is_orig=False),
        dataclasses.replace(base, device_port=big, remote_port=big, total_bytes=big, proto=big),
        dataclasses.replace(base, sizes=[big] * n, total_packets=big),
        dataclasses.replace(base, start=0.0, last=0.0),
        dataclasses.replace(base, start=1_700_000_000.999999, last=1_700_000_059.000001),
        dataclasses.replace(base, start=float(2**33), last=float(2**33), **none),
        dataclasses.replace(
            base, offsets=[0.0, 1e9], sizes=[1, 2], directions=[0, 1], payloads=[b"", b"x"]
        ),
        dataclasses.replace(base, payloads=[bytes(range(256)) * 2 + bytes(36)] + base.payloads[1:]),
        dataclasses.replace(base, uid="", device_mac="weird, but: text|ok"),
    ]


def test_a_packed_line_decodes_to_what_the_json_path_gives():
    recs = synthetic_records(1500, devices=40, seed=11)
    recs += synthetic_records(300, devices=7, seed=12, packets=4, payload_bytes=0)
    recs += edge_records()
    for r in recs:
        for early in (False, True):
            line = rc.pack_flow_record(r, early)
            assert rc.packed_flow_record(line) == (via_json(r, early), early), line[:200]


def test_early_records_of_real_windows_decode_as_early_flow_events():
    for r in synthetic_records(300, devices=20, seed=5):
        e = early_record(r)
        if e is not None:
            assert rc.packed_flow_record(rc.pack_flow_record(e, True)) == (via_json(e, True), True)


def test_the_format_pinned_by_one_line():
    """The exact text of one record, to hold the plugin's writer against."""
    r = FlowRecord(
        device_mac="aa:bb:cc:dd:ee:0f",
        device_ip="192.168.1.10",
        device_port=51000,
        remote_ip="2001:db8::1",
        remote_port=443,
        proto=6,
        start=1_700_000_000.25,
        last=1_700_000_001.5,
        total_bytes=1600,
        total_packets=3,
        offsets=[0.0, 0.5, 1.25],
        sizes=[60, 1500, 40],
        directions=[1, 0, 1],
        payloads=[b"", b"\x16\x03\xff", b""],
        uid="CHhAvVGS1DHFjwGM9",
        device_is_orig=False,
    )
    line = rc.pack_flow_record(r, early=False)
    assert line == (
        "F2\taa:bb:cc:dd:ee:0f\t192.168.1.10\t51000\t2001:db8::1\t443\t6\t1700000000.250000\t"
        "1700000001.500000\t1600\t3\t0,500000000,1250000000\t60,1500,40\t1,0,1\t,FgP/,\t"
        "CHhAvVGS1DHFjwGM9\tF"
    )
    assert rc.packed_flow_record(line) == (r, False)
    assert rc.pack_flow_record(r, early=True).startswith("E2\t")
    # version 1 (hex payloads), as a spool written before base64 holds it, still decodes
    v1 = rc.pack_flow_record(r, early=True, version=1)
    assert v1.startswith("E\t") and "\t,1603ff,\t" in v1
    assert rc.packed_flow_record(v1) == (r, True)
    assert rc.PACKED_FIELDS[1:] == tuple(f.name for f in dataclasses.fields(FlowRecord))


def test_packing_refuses_text_with_no_packed_form():
    r = synthetic_records(1, seed=1)[0]
    for bad in (dataclasses.replace(r, uid="C\tx"), dataclasses.replace(r, device_mac="é")):
        with pytest.raises(rc.RecordError, match="no packed form"):
            rc.pack_flow_record(bad)


# -- malformed lines -------------------------------------------------------------------------
GOOD = rc.pack_flow_record(synthetic_records(1, devices=1, seed=3)[0])
N = len(GOOD.split("\t")[12].split(","))


def with_field(i: int, value: str, line: str = GOOD) -> str:
    f = line.split("\t")
    f[i] = value
    return "\t".join(f)


def with_element(i: int, k: int, value: str) -> str:
    f = GOOD.split("\t")
    elems = f[i].split(",")
    elems[k] = value
    f[i] = ",".join(elems)
    return "\t".join(f)


F = {name: i for i, name in enumerate(rc.PACKED_FIELDS)}
MALFORMED = {
    "16 fields": ("record", GOOD.rsplit("\t", 1)[0]),
    "18 fields": ("record", GOOD + "\tT"),
    "a newline at the end": ("device_is_orig", GOOD + "\n"),
    "empty": ("record", ""),
    "not ASCII": ("record", with_field(F["uid"], "C\u00e9")),
    "kind X": ("kind", with_field(0, "X")),
    "kind lower case": ("kind", with_field(0, "f2")),
    "kind of version 3": ("kind", with_field(0, "F3")),
    "device_is_orig 1": ("device_is_orig", with_field(16, "1")),
    "non-numeric port": ("device_port", with_field(F["device_port"], "80a")),
    "port with a sign": ("remote_port", with_field(F["remote_port"], "+80")),
    "port with a space": ("remote_port", with_field(F["remote_port"], " 80")),
    "port in hex": ("device_port", with_field(F["device_port"], "0x50")),
    "port with leading zero": ("device_port", with_field(F["device_port"], "080")),
    "empty port": ("device_port", with_field(F["device_port"], "")),
    "negative port": ("device_port", with_field(F["device_port"], "-1")),
    "negative proto": ("proto", with_field(F["proto"], "-6")),
    "negative total_bytes": ("total_bytes", with_field(F["total_bytes"], "-1")),
    "total_packets beyond a count": ("total_packets", with_field(F["total_packets"], str(2**64))),
    "total_bytes of 21 digits": ("total_bytes", with_field(F["total_bytes"], "1" * 21)),
    "a size beyond a count": ("sizes", with_element(F["sizes"], 0, str(2**64))),
    "a negative size": ("sizes", with_element(F["sizes"], 0, "-1")),
    "an empty size": ("sizes", with_element(F["sizes"], 0, "")),
    "a float size": ("sizes", with_element(F["sizes"], 0, "1.5")),
    "direction 2": ("directions", with_element(F["directions"], 0, "2")),
    "direction -1": ("directions", with_element(F["directions"], 0, "-1")),
    "direction T": ("directions", with_element(F["directions"], 0, "T")),
    "a size missing": ("offsets, sizes", with_field(F["sizes"], ",".join(["1"] * (N - 1)))),
    "a direction too many": (
        "offsets, sizes",
        with_field(F["directions"], ",".join(["1"] * (N + 1))),
    ),
    "offsets empty": ("offsets, sizes", with_field(F["offsets"], "")),
    "a payload too many": (
        "offsets, sizes",
        with_field(F["payloads"], ",".join(["AA=="] * (N + 1))),
    ),
    "payloads for no packets": (
        "offsets, sizes",
        with_field(
            F["payloads"],
            "AA==",
            with_field(
                F["offsets"], "", with_field(F["sizes"], "", with_field(F["directions"], ""))
            ),
        ),
    ),
    "base64 unpadded": ("payloads", with_element(F["payloads"], 0, "FgP")),
    "base64 padding inside": ("payloads", with_element(F["payloads"], 0, "Fg==FgP/")),
    "base64 too much padding": ("payloads", with_element(F["payloads"], 0, "F===")),
    "base64 URL alphabet": ("payloads", with_element(F["payloads"], 0, "FgP_")),
    "base64 with a space": ("payloads", with_element(F["payloads"], 0, "FgP/ FgP/")),
    "hex in a version 2 line": ("payloads", with_element(F["payloads"], 0, "1603ff")),
    "bad hex (version 1)": ("payloads", with_field(0, "F", with_element(F["payloads"], 0, "zz"))),
    "odd hex (version 1)": ("payloads", with_field(0, "F", with_element(F["payloads"], 0, "abc"))),
    "upper-case hex (version 1)": (
        "payloads",
        with_field(0, "F", with_element(F["payloads"], 0, "AB")),
    ),
    "bad IPv4": ("device_ip", with_field(F["device_ip"], "1.2.3.256")),
    "IPv4 with a leading zero": ("device_ip", with_field(F["device_ip"], "01.2.3.4")),
    "IPv6 with a scope": ("remote_ip", with_field(F["remote_ip"], "fe80::1%eth0")),
    "no address": ("remote_ip", with_field(F["remote_ip"], "")),
    "a name for an address": ("remote_ip", with_field(F["remote_ip"], "example.com")),
    "NaN start": ("start", with_field(F["start"], "nan")),
    "infinite last": ("last", with_field(F["last"], "inf")),
    "negative start": ("start", with_field(F["start"], "-1.000000")),
    "start not %f": ("start", with_field(F["start"], "1700000000.5")),
    "start in e notation": ("start", with_field(F["start"], "1.7e9")),
    "huge start": ("start", with_field(F["start"], f"{1e300:f}")),
    "start past 2242": ("start", with_field(F["start"], f"{2**33 + 1:f}")),
    "huge offset": ("offsets", with_element(F["offsets"], 0, str(10**18 + 1))),
    "negative offset": ("offsets", with_element(F["offsets"], 1, "-5")),
    "offset in seconds": ("offsets", with_element(F["offsets"], 1, "1.5")),
}


@pytest.mark.parametrize("field,line", MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_lines_are_record_errors_naming_the_field(field, line):
    assert rc.packed_flow_record(GOOD)  # the line it was made from is fine
    with pytest.raises(rc.RecordError) as e:
        rc.packed_flow_record(line)
    msg = str(e.value)
    assert msg.startswith(f"{rc.FLOWS_EVENT}: {field}"), msg
    assert len(msg) < 200, msg  # short: the input shown is cut to 80 characters


@pytest.mark.parametrize("value", [None, b"F\t", 5, ["F"]], ids=repr)
def test_what_is_no_string_is_a_record_error(value):
    with pytest.raises(rc.RecordError, match="must be a string"):
        rc.packed_flow_record(value)


def test_random_text_raises_nothing_but_record_errors():
    """Seeded: fields of random characters (tabs, commas, digits, hex, non-ASCII)."""
    rng = random.Random(20261207)
    alphabet = "\t\t\t,,,0123456789abcdef.:-FETx\u00e9\udcff \n"
    fields = GOOD.split("\t")
    for _ in range(20_000):
        if rng.random() < 0.5:
            line = "".join(rng.choice(alphabet) for _ in range(rng.randrange(120)))
        else:
            f = list(fields)
            f[rng.randrange(len(f))] = "".join(
                rng.choice(alphabet) for _ in range(rng.randrange(12))
            )
            line = "\t".join(f)
        try:
            rc.packed_flow_record(line)
        except rc.RecordError:
            pass


# -- the event ---------------------------------------------------------------------------------
def test_flows_frame_carries_the_lines_and_packed_records_gets_them_back():
    lines = [rc.pack_flow_record(r, k == 1) for k, r in enumerate(synthetic_records(5, seed=2))]
    lines.append('garbage, with "quotes", \\ and a \x00')
    frame = rc.flows_frame(TOPIC, lines)
    assert frame.startswith(b'{"type":"data-message","topic":"zeek/iotcls/flows",')
    assert b"\t" not in frame and b"\\t" in frame  # the separator travels escaped
    obj, _ = bj.parse_frame(frame)
    assert rc.event_name(obj) == rc.FLOWS_EVENT
    assert rc.packed_records(obj) == lines
    ev = bj.decode_event(bj.decode_message(obj).data)
    assert ev.name == rc.FLOWS_EVENT and ev.args == (lines,)
    assert rc.packed_records(json.loads(rc.flows_frame(TOPIC, []))) == []
    # with the network-time metadata Zeek may attach
    meta = [(1, bj.Timestamp.from_seconds(1_700_000_000.5))]
    frame = bj.render_zeek(TOPIC, bj.encode_event(rc.FLOWS_EVENT, [lines[:2]], meta))
    assert rc.packed_records(bj.parse_frame(frame)[0]) == lines[:2]
    # records_in: the final records of both events
    objs = [obj, json.loads(rc.flow_frame(TOPIC, synthetic_records(1, seed=9)[0]))]
    with pytest.raises(rc.RecordError):
        rc.records_in(objs)  # the garbage line
    objs[0] = json.loads(rc.flows_frame(TOPIC, lines[:5]))
    assert len(rc.records_in(objs)) == 5  # 4 final + 1 IoTClass::flow; the early one skipped


def _event(args: list, name: str = rc.FLOWS_EVENT) -> dict:
    return json.loads(bj.render_zeek(TOPIC, bj.encode_event(name, args)))


@pytest.mark.parametrize(
    "obj",
    [
        _event([["a"], ["b"]]),  # two arguments
        _event([]),  # none
        _event(["one string"]),  # a string, not a vector
        _event([[bj.Count(1)]]),  # a vector of counts
        _event([["a", bj.Count(1)]]),  # a vector holding a count
        _event([["a"]], name=rc.FLOW_EVENT),  # another event
        {"type": "data-message", "topic": TOPIC, "@data-type": "count", "data": 1},
        [1, 2, 3],
        "text",
        None,
    ],
    ids=lambda o: json.dumps(o)[:60],
)
def test_an_event_of_another_shape_is_one_record_error(obj):
    with pytest.raises(rc.RecordError, match="vector of strings"):
        rc.packed_records(obj)


# -- the bridge ------------------------------------------------------------------------------
def test_the_bridge_takes_each_line_on_its_own(caplog):
    recs = synthetic_records(6, devices=3, seed=8)
    early = early_record(recs[0]) or recs[0]
    lines = [rc.pack_flow_record(r) for r in recs[:3]]
    lines += [rc.pack_flow_record(early, True), "garbage", with_field(13, "2,2", lines[0])]
    lines += [rc.pack_flow_record(r) for r in recs[3:]]
    bridge = Bridge(LAYOUT, lambda m, t: [None] * len(m))
    with caplog.at_level(logging.WARNING, logger="iotcls.bridge"):
        bridge.on_message(json.loads(rc.flows_frame(TOPIC, lines)))
        bridge.on_message(_event([["a"], ["b"]]))  # an event of another shape: one bad record
    s = bridge.stats
    assert (s.records, s.early_records, s.bad_records, s.other_events) == (6, 1, 3, 0)
    assert bridge.queued == 6 + 1  # six records and the early tick
    assert [w.count("undecodable") for w in caplog.messages] == [1]  # warned once
    assert "IoTClass::flows: record has 1 fields" in caplog.text
    assert bridge._early == [via_json(early, True)]
    queued = [bridge._queue.get_nowait() for _ in range(bridge.queued)]
    assert [r for r in queued if isinstance(r, FlowRecord)] == [via_json(r) for r in recs]


# -- end to end ------------------------------------------------------------------------------
@pytest.mark.e2e
def test_serve_labels_every_good_record_of_a_batch_once(tmp_path):
    """FakeZeek publishes one ``IoTClass::flows`` event: 30 good final records, one early
    record (of a 31st window) and one garbage line, then a drain. ``iotcls serve`` labels each
    final record exactly once, as the offline path labels it; the early record gets its early
    label; the garbage is counted as one bad flow record; Zeek's drain is answered with the
    exact counts."""
    from iotcls.testing.fake_zeek import FakeZeek
    from test_serve import Serve, expected_labels, run, until
    from tiny_model import tiny_bundle

    model = str(tiny_bundle(LAYOUT, ["cam", "plug", "hub", "bulb"], seed=5).save(tmp_path / "m.pt"))
    recs = synthetic_records(31, devices=6, seed=21)
    finals, extra = recs[:30], early_record(recs[30])
    assert extra is not None
    lines = [rc.pack_flow_record(extra, early=True)]
    lines += [rc.pack_flow_record(r) for r in finals[:15]]
    lines.append("F\tnot a packed record")
    lines += [rc.pack_flow_record(r) for r in finals[15:]]

    async def main():
        zeek = await FakeZeek().start()
        serve = Serve(tmp_path, zeek, model).start()
        try:
            await serve.ready()
            assert await zeek.publish_flows(lines) == 1
            await until(lambda: len(zeek.labels) >= 30, 30, "30 labels")
            await until(lambda: zeek.events_named(rc.EARLY_LABEL_EVENT), 10, "the early label")
            await zeek.send_drain(30)
            await until(lambda: zeek.stats.drained, 10, "drained")
            await asyncio.sleep(0.3)  # a second label of any record would be here by now
            m = serve.metrics()
            assert await serve.stop() == 0
        finally:
            serve.kill()
            await zeek.close()
        return zeek, serve, m

    zeek, serve, m = run(main())
    assert zeek.stats.errors_sent == {}
    assert sorted(lb.uid for lb in zeek.labels) == sorted(r.uid for r in finals)  # once each
    want = expected_labels(finals, model)
    for lb in zeek.labels:
        label, conf, trusted, flows = want[lb.uid]
        assert (lb.fields["label"], lb.fields["trusted"], lb.fields["n_flows"]) == (
            label,
            trusted,
            flows,
        )
        assert lb.fields["confidence"] == pytest.approx(conf, rel=1e-5)
    (early_label,) = zeek.events_named(rc.EARLY_LABEL_EVENT)
    assert early_label.args[0][1] == extra.uid
    assert zeek.stats.drained == [(30, 30)]
    assert m['iotcls_messages_rejected_total{kind="bad_flow_record",socket="websocket"}'] == 1
    # the service counts every record it scores, the early one too
    assert m["iotcls_records_in_total"] == 31 and m["iotcls_labels_out_total"] == 31
    assert "skipped undecodable flow records, first: IoTClass::flows: record has 2 fields" in (
        serve.stderr()
    )
    s = serve.summary()
    assert (s["records_in"], s["labelled"], s["shed"], s["pending"]) == ("31", "31", "0", "0")
