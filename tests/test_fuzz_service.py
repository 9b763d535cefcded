"""Fuzzing what peers send ``iotcls serve`` (seeded, bounded: seconds in CI): Broker JSON
frames from Zeek, Suricata datagrams, scorer wire messages. Every input is read or refused
with its decoder's own error; none raises anything else, none takes long, and what is
accepted is what the edges promise (finite matrix rows, confidences in [0, 1]). The long run
(100,000 inputs per decoder) is ``benchmarks/fuzz_service.py``."""

from __future__ import annotations

import json
import math

import msgpack
import pytest

from iotcls import wire
from iotcls.bridge import broker_json as bj
from iotcls.testing import fuzz

N = 6000  # inputs per decoder: about 3 s each on the 2-core VM
HANG_S = 1.0


@pytest.mark.parametrize("target", fuzz.targets(), ids=lambda t: t.name)
def test_fuzz_decoder(target):
    t = fuzz.run(target, N, seed=20261207, hang_s=HANG_S)
    assert t.inputs == N
    assert (t.crashes, t.hangs) == (0, 0), t.examples
    assert t.ok >= len(target.seeds) and t.refused > N // 2  # both sides are exercised


def test_fuzz_is_deterministic():
    a = [fuzz.mutate(fuzz.random.Random(5), s, "json") for s in fuzz.broker_seeds()]
    b = [fuzz.mutate(fuzz.random.Random(5), s, "json") for s in fuzz.broker_seeds()]
    assert a == b


# the inputs of the issue, each a decoder's own error (they used to raise something else)
def test_the_reported_inputs_are_refused_by_their_decoders():
    targets = {t.name: t for t in fuzz.targets()}
    broker, datagram, scorer = (
        targets[n] for n in ("broker_json", "suricata_datagram", "scorer_wire")
    )
    assert broker.read(b"[" * 100_000) == "refused"
    with pytest.raises(bj.BrokerJSONError, match="nested 100000 levels deep"):
        bj.parse_frame(b"[" * 100_000)
    seed = json.loads(fuzz.datagram_seeds()[0])
    for over in (
        {"offsets_us": [10**400]},
        {"start": 1e300, "last": 1e300},
        {"start": -1e18},
        {"total_bytes": -1},
        {"total_packets": -1},
    ):
        assert datagram.read(json.dumps({**seed, **over}).encode()) == "refused", over
    assert datagram.read(b"[" * 30_000) == "refused"
    rep = msgpack.unpackb(fuzz.wire_seeds()[5], raw=False)
    rep["conf"] = [math.nan, 0.5, 0.1]
    data = msgpack.packb(rep, use_bin_type=True)
    msg = wire.decode(data)
    from iotcls.bridge.dispatch import verdict_problem

    assert "not a number in [0, 1]" in verdict_problem(msg, 0, frozenset(fuzz.CLASSES))
    assert scorer.read(data) == "ok"  # decoded; the dispatcher refuses record 0
