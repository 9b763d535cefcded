"""The batch decoder (bridge/flowbatch.py) against the generic codec path: frames as Zeek 8.2
renders them from records of real captures, and the same frames mutated (by hand and at
random), decoded a batch at a time, give exactly the table that records.flow_record_generic
and FlowTable.from_records give, and reject exactly the frames the generic path rejects."""

import random
from dataclasses import fields, replace

import numpy as np
import pytest

from iotcls.bridge import broker_json as bj
from iotcls.bridge import flowbatch as fb
from iotcls.bridge import records as rc
from iotcls.flows import DeviceSelector, capture_flows
from iotcls.flowtable import FlowTable
from iotcls.testing.shared import require, sentinel_capture

FLOWS = "zeek/iotcls/flows"
CAPTURES = [
    require(sentinel_capture("Aria", "Setup-A-1-STA"), module=True),
    require(sentinel_capture("D-LinkCam", "Setup-B-1-STA"), module=True),
]


def _records():
    sel = DeviceSelector.from_lists(nets=["10.0.0.0/8", "192.168.0.0/16"])
    recs = []
    for p in CAPTURES:
        recs += capture_flows(p, sel).table.records()
    return recs


RECORDS = _records()
FRAMES = [rc.flow_frame(FLOWS, r) for r in RECORDS]


def generic(raw: bytes, packets: int, payload_bytes: int):
    """The reference: JSON parser, generic codec, a one-row table (None: rejected)."""
    try:
        rec = rc.flow_record_generic(bj.parse_frame(raw)[0])
        FlowTable.from_records([rec], packets, payload_bytes)
    except (bj.BrokerJSONError, rc.RecordError, OverflowError, ValueError):
        return None
    return rec


def items_of(frames):
    """What the bridge queues: a RawFlow where the frame matches, else the generic record."""
    out = []
    for f in frames:
        m = fb.match_flow(f)
        out.append(m if m is not None else f)
    return out


def check(frames, packets=6, payload_bytes=64):
    ref = [generic(f, packets, payload_bytes) for f in frames]
    items = []
    for f, r in zip(frames, ref):
        m = fb.match_flow(f)
        items.append(m if m is not None else r)  # unmatched: the bridge's JSON path
    keep = [i for i, x in enumerate(items) if x is not None]
    dec = fb.decode_batch([items[i] for i in keep], packets, payload_bytes)
    got_ok = [keep[i] for i in dec.index]
    assert got_ok == [i for i, r in enumerate(ref) if r is not None]
    assert [keep[i] for i, _ in dec.errors] == [i for i in keep if ref[i] is None]
    want = FlowTable.from_records([r for r in ref if r is not None], packets, payload_bytes)
    for f in fields(want):
        assert np.array_equal(getattr(dec.table, f.name), getattr(want, f.name)), f.name
    return dec


@pytest.mark.parametrize("packets,payload_bytes", [(10, 64), (6, 16), (3, 200)])
def test_real_frames_decode_to_the_generic_table_on_the_batch_path(packets, payload_bytes):
    assert len(RECORDS) == 32 and all(fb.match_flow(f) for f in FRAMES)
    groups = [fb.match_flow(f).groups for f in FRAMES]
    assert groups == [fb._BATCH_RE.fullmatch(f).groups() for f in FRAMES]  # envelope shortcut
    assert fb._fast_table(groups, packets, payload_bytes) is not None  # no fallback taken
    check(FRAMES, packets, payload_bytes)


def test_every_timespan_unit_zero_packets_and_start_order():
    r = RECORDS[5]
    four = replace(
        r,
        offsets=r.offsets[:4],
        sizes=r.sizes[:4],
        directions=r.directions[:4],
        payloads=r.payloads[:4],
    )
    vals = rc.flow_values(four)
    vals[10] = [bj.Timespan(0), bj.Timespan(1_000_000), bj.Timespan(2_000), bj.Timespan(2 * 10**9)]
    frames = [
        bj.render_zeek(FLOWS, bj.encode_event(rc.FLOW_EVENT, [vals])),
        rc.flow_frame(FLOWS, replace(r, offsets=[], sizes=[], directions=[], payloads=[])),
        rc.flow_frame(FLOWS, replace(r, payloads=[b""] * len(r.sizes))),
    ]
    assert b'"2s"' in frames[0] and b'"1ms"' in frames[0] and b'"2us"' in frames[0]
    groups = [fb.match_flow(f).groups for f in frames]
    assert fb._fast_table(groups, 10, 64) is not None
    dec = check(frames)
    assert dec.table.n_pkts.tolist() == [4, 0, min(len(r.sizes), 6)]
    assert fb.match_flow(frames[0]).start == r.start
    assert fb.head_record(dec.table, 0) == replace(
        r, offsets=[], sizes=[], directions=[], payloads=[]
    )


MUTATIONS = {
    "integer port": (b'"count","data":67}', b'"integer","data":67}'),
    "minutes": (b'"0s"', b'"1min"'),
    "unit only": (b'"0s"', b'"s"'),
    "ns twice": (b'ns"}', b'nsns"}'),
    "negative count": (b'"count","data":328}', b'"count","data":-328}'),
    "float count": (b'"count","data":328}', b'"count","data":328.0}'),
    "empty count": (b'"count","data":328}', b'"count","data":}'),
    "16-digit size": (b'"count","data":328}', b'"count","data":1000000000000328}'),
    "size beyond int32": (b'"count","data":328}', b'"count","data":3000000000}'),
    "direction 2": (
        b'"count","data":1},{"@data-type":"count","data":1}]}',
        b'"count","data":1},{"@data-type":"count","data":2}]}',
    ),
    "proto beyond int16": (b'"count","data":17}', b'"count","data":70000}'),
    "junk between elements": (b'"count","data":328},', b'"count","data":328},7,'),
    "comma in a count": (b'"count","data":328}', b'"count","data":3,28}'),
    "leading zero, vector count": (b'"count","data":328}', b'"count","data":0328}'),
    "leading zero, scalar count": (b'"count","data":17}', b'"count","data":017}'),
    "leading zero, real": (b'"real","data":1', b'"real","data":01'),
    "odd hex": (b'"data":"8201', b'"data":"201'),
    "upper hex": (b'"data":"8201', b'"data":"82A1'),
    "separator bytes": (b'"data":"8201', b'"data":"82|\x00\x0101'),
    "escaped uid": (b'"C', b'"\\u0043'),
    "escaped topic": (b'"zeek/iotcls', b'"zeek\\/iotcls'),
    "other event": (b'"IoTClass::flow"', b'"IoTClass::flows"'),
    "one payload less": (b'{"@data-type":"string","data":"8201', b"{"),
}


def test_mutated_frames_in_a_batch_of_good_ones_agree_with_the_generic_path():
    base = [f for f in FRAMES if b'"count","data":17}' in f and b'"data":"8201' in f][0]
    bad = []
    for name, (old, new) in MUTATIONS.items():
        assert old in base, name
        bad.append(base.replace(old, new, 1))
    frames = FRAMES[:20] + bad + FRAMES[20:]
    dec = check(frames)
    assert len(dec.errors) >= 10 and len(dec.index) >= 32


def test_random_mutations_agree_with_the_generic_path():
    rng = random.Random(11)
    alphabet = b'0123456789abcdefnsu,{}"|:\x00\x01 '
    frames = []
    for _ in range(300):
        f = bytearray(rng.choice(FRAMES))
        start = f.index(b'"data":[{"@data-type":"vector"')  # the record, not the envelope
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(start, len(f) - 8)
            f[i] = rng.choice(alphabet)
        frames.append(bytes(f))
    for i in range(0, len(frames), 30):  # batches with one or more bad frames
        check(frames[i : i + 30] + FRAMES[i // 3 : i // 3 + 10])


def test_match_flow_accepts_exactly_what_the_batch_regex_accepts():
    """match_flow's shortcuts (the envelope compared as bytes, vectors matched as runs without
    "]" and their "["s counted apart) accept the frames _BATCH_RE matches, with its groups."""
    rng = random.Random(5)
    alphabet = b'0123456789abcdefnsu,{}[]"|:\\ '
    frames = []
    for f in FRAMES:  # a "[" somewhere inside each non-empty vector
        for head in (fb._H_SPAN, fb._H_COUNT, fb._H_STRING):
            start = f.find(b'"vector","data":[' + head)
            end = f.find(b"]", start + 17)
            if start > 0 and end > start + 18:
                i = rng.randrange(start + 18, end)
                frames.append(f[:i] + b"[" + f[i:])
    assert len(frames) > 64
    for _ in range(3000):
        f = bytearray(rng.choice(FRAMES))
        for _ in range(rng.randint(1, 3)):
            i, op = rng.randrange(len(f)), rng.random()
            if op < 0.6:
                f[i] = rng.choice(alphabet)
            elif op < 0.8:
                del f[i]
            else:
                f.insert(i, rng.choice(alphabet))
        frames.append(bytes(f))
    accepted = 0
    for f in frames:
        got, want = fb.match_flow(f), fb._BATCH_RE.fullmatch(f)
        assert (got is None) == (want is None), f
        if got is not None:
            assert got.groups == want.groups()
            accepted += 1
    assert 300 < accepted < len(frames) - 300  # both kinds are exercised
