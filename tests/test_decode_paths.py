"""One decode path per ``IoTClass::flow`` frame, one fallback (bridge/flowbatch.py): a batch of
plain frames is decoded at once; a frame the batch decoder declines is found by halving the
batch, and only that frame takes the fallback (JSON and records.flow_record)."""

from dataclasses import fields

import numpy as np

from iotcls.bridge import flowbatch as fb
from iotcls.bridge import records as rc
from iotcls.flowtable import FlowTable
from iotcls.schema import FlowRecord

FLOWS = "zeek/iotcls/flows"


def record(i: int, total_bytes: int = 1500) -> FlowRecord:
    return FlowRecord(
        device_mac=f"02:00:00:00:00:{i % 256:02x}",
        device_ip=f"10.0.0.{i % 250 + 1}",
        device_port=40000 + i,
        remote_ip="93.184.216.34",
        remote_port=443,
        proto=6,
        start=1_700_000_000.0 + i,
        last=1_700_000_001.5 + i,
        total_bytes=total_bytes,
        total_packets=3,
        offsets=[0.0, 0.25, 1.5],
        sizes=[60, 1400, 40],
        directions=[1, 0, 1],
        payloads=[b"", bytes(range(32)), b"\x16\x03"],
        uid=f"C{i:017d}",
        device_is_orig=True,
    )


def table_equal(a: FlowTable, b: FlowTable) -> None:
    for f in fields(a):
        assert np.array_equal(getattr(a, f.name), getattr(b, f.name)), f.name


def test_an_odd_frame_costs_only_itself(monkeypatch):
    # a count of 16 digits is valid Broker JSON the batch decoder declines (it reads 15)
    recs = [record(i, 10**16 if i == 37 else 1500) for i in range(64)]
    items = [fb.match_flow(rc.flow_frame(FLOWS, r)) for r in recs]
    assert all(isinstance(x, fb.RawFlow) for x in items)
    assert fb._fast_table([x.groups for x in items], 10, 64) is None
    fallback = []
    real = fb.fallback_record
    monkeypatch.setattr(fb, "fallback_record", lambda raw: fallback.append(raw) or real(raw))
    dec = fb.decode_batch(items, 10, 64)
    assert len(fallback) == 1 and fallback[0] == items[37].raw
    assert dec.index == list(range(64)) and dec.errors == []
    table_equal(dec.table, FlowTable.from_records(recs, 10, 64))


def test_records_from_the_json_route_keep_their_place():
    recs = [record(i) for i in range(10)]
    items = [
        r if i % 3 == 0 else fb.match_flow(rc.flow_frame(FLOWS, r)) for i, r in enumerate(recs)
    ]
    dec = fb.decode_batch(items, 10, 64)
    assert dec.index == list(range(10)) and dec.errors == []
    table_equal(dec.table, FlowTable.from_records(recs, 10, 64))


def test_a_bad_frame_is_an_error_of_its_own():
    frames = [rc.flow_frame(FLOWS, record(i)) for i in range(8)]
    frames[5] = frames[5].replace(b'"data":"10.0.0.6"', b'"data":"10.0.0.600"')
    items = [fb.match_flow(f) for f in frames]
    dec = fb.decode_batch(items, 10, 64)
    assert dec.index == [0, 1, 2, 3, 4, 6, 7]
    assert [i for i, _ in dec.errors] == [5]
    table_equal(dec.table, FlowTable.from_records([record(i) for i in dec.index], 10, 64))
