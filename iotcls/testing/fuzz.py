"""A seeded fuzzer for what peers send ``iotcls serve``: Zeek's Broker JSON frames, the packed
flow records of ``IoTClass::flows`` (one line each), Suricata's datagrams, and the scorer wire
format.

Each *target* feeds one input through the code that reads it in the service and says what
happened: ``ok`` (read), ``refused`` (refused with that decoder's own error, which the
service counts and survives) or, raised from the target, anything else: a *crash*, i.e. an
exception the service would not expect at that point. Targets also check what they accept:
a flow record that passed the decoder must encode to a finite matrix row (the promise of
the edge checks), a reply the dispatcher accepts must carry a confidence in [0, 1].

Inputs are seeds (well-formed messages made here, deterministic) mutated by byte edits,
JSON-aware edits (numbers swapped for extreme ones: 1e300, -1, 10^400, NaN; brackets nested
thousands deep; strings and types swapped), msgpack-aware edits (a field replaced by a
value of another type or an extreme one) and packed-line edits (a field or a vector element
replaced by an extreme one, fields and elements dropped or repeated). One :class:`random.Random` per run: the same seed
gives the same inputs. Used by ``tests/test_fuzz_service.py`` (bounded, in CI) and
``benchmarks/fuzz_service.py`` (the long run).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import numpy as np

from iotcls import wire
from iotcls.bridge import broker_json as bj
from iotcls.bridge import flowbatch as fb
from iotcls.bridge import records as rc
from iotcls.bridge import suricata as su
from iotcls.bridge.core import FlowAssembler
from iotcls.bridge.dispatch import verdict_problem
from iotcls.layout import MatrixLayout
from iotcls.testing.fake_zeek import drain_frame, welcome_frame
from iotcls.testing.synth import synthetic_records

LAYOUT = MatrixLayout(history=2, packets=4, payload_bytes=4)
CLASSES = ("cam", "plug", "hub")
MAX_INPUT = 256 * 1024  # inputs are cut to this: memory stays bounded, a run stays fast

EXTREME_NUMBERS = (
    b"0",
    b"-1",
    b"-0",
    b"1e300",
    b"-1e300",
    b"1e400",
    b"-1e18",
    b"1e-400",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"18446744073709551615",
    b"18446744073709551616",
    b"9223372036854775808",
    b"-9223372036854775809",
    b"1" + b"0" * 400,
    b"0.5",
    b"2.5e9",
    b"4294967296",
    b"65536",
    b"1.0",
    b"true",
    b"null",
    b'"1"',
    b"[]",
    b"{}",
    # and plausible ones, so that edited records also get through and reach what follows
    b"1",
    b"7",
    b"443",
    b"65535",
    b"255",
    b"1700000000.25",
    b"1700000060.5",
    b"60.0",
)
EXTREME_VALUES: tuple = (
    0,
    -1,
    1.5,
    math.nan,
    math.inf,
    -math.inf,
    1e300,
    -1e18,
    2**63,
    2**64,
    -(2**63) - 1,
    True,
    None,
    "",
    "x" * 300,
    "PWNED\t<script>",
    b"",
    b"\x00" * 17,
    [],
    [1, 2],
    {},
    {"v": 1},
    [[[[[]]]]],
    "\udcff",
    10**30,
)
_NUMBER_RE = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"')


class Crash(AssertionError):
    """A target's check failed: the input was accepted but is not what the edge promises."""


# -- mutations --------------------------------------------------------------------------------
def _byte_edit(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op == 1:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2 and b:
            del b[pos : pos + rng.randint(1, 16)]
        elif op == 3:
            b[pos:pos] = bytes([rng.choice(b'[]{}",:\\\x00\n')])
        else:
            return bytes(b[:pos])  # truncated
    return bytes(b)


# JSON edits by weight: most keep the document well-formed (a number or a string swapped),
# so that inputs get past the parser into the decoders behind it
_JSON_OPS = (0,) * 7 + (1,) * 1 + (2,) * 4 + (3,) * 2 + (4,) * 2 + (5,) * 4


def _json_edit(rng: random.Random, data: bytes) -> bytes:
    op = rng.choice(_JSON_OPS)
    if op == 0:  # a number becomes an extreme one
        nums = list(_NUMBER_RE.finditer(data))
        if nums:
            m = rng.choice(nums)
            return data[: m.start()] + rng.choice(EXTREME_NUMBERS) + data[m.end() :]
    if op == 1:  # deep nesting where a value starts
        pos = rng.randrange(len(data) + 1)
        depth = rng.choice((70, 1000, 30_000, 100_000))
        return (
            data[:pos] + b"[" * depth + data[pos:] + (b"]" * depth if rng.random() < 0.5 else b"")
        )
    if op == 2:  # a string becomes another string, or a number
        strs = list(_STRING_RE.finditer(data))
        if strs:
            m = rng.choice(strs)
            new = rng.choice(
                (
                    b'"count"',
                    b'"vector"',
                    b'"timespan"',
                    b'"-5ms"',
                    b'"1e999s"',
                    b'"999999999999999999999us"',
                    b'"::ffff:1.2.3.4"',
                    b'""',
                    b'"zz"',
                    b'"\\ud800"',
                    b'"\\v"',
                    b"12",
                    b"null",
                    b'"9' + b"9" * 5000 + b'ns"',
                )
            )
            return data[: m.start()] + new + data[m.end() :]
    if op == 3:  # a slice repeated (longer vectors, duplicated fields)
        a = rng.randrange(len(data) + 1)
        b = min(len(data), a + rng.randint(1, 200))
        return data[:b] + data[a:b] * rng.randint(1, 50) + data[b:]
    if op == 4:  # a piece of another place spliced in
        a, b = sorted(rng.randrange(len(data) + 1) for _ in range(2))
        c = rng.randrange(len(data) + 1)
        return data[:c] + data[a:b] + data[c:]
    return _byte_edit(rng, data)


def _msgpack_edit(rng: random.Random, data: bytes) -> bytes:
    try:
        d = msgpack.unpackb(data, raw=False)
    except Exception:
        return _byte_edit(rng, data)
    if not isinstance(d, dict) or not d or rng.random() < 0.2:
        return _byte_edit(rng, data)
    key = rng.choice(list(d))
    v = d[key]
    op = rng.randrange(4)
    if op == 0:
        d[key] = rng.choice(EXTREME_VALUES)
    elif op == 1 and isinstance(v, list) and v:
        v[rng.randrange(len(v))] = rng.choice(EXTREME_VALUES)
    elif op == 2 and isinstance(v, list):
        d[key] = v * rng.randint(0, 3)
    else:
        d.pop(key)
    try:
        return msgpack.packb(d, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return _byte_edit(rng, data)


# What a packed line's field may become: empty, signs, NaN, beyond a count, beyond a time,
# vectors of other lengths, bad hex, addresses Python reads but Zeek never writes, non-ASCII.
PACKED_EXTREMES = (
    b"",
    b"-1",
    b"-0",
    b"+1",
    b" 1",
    b"07",
    b"nan",
    b"inf",
    b"-inf",
    b"1e300",
    b"2",
    b"T",
    b"F",
    b"E",
    b"X",
    b"18446744073709551615",
    b"18446744073709551616",
    b"99999999999999999999",
    b"1000000000000000000",
    b"1000000000000000001",
    b"1" * 5000,
    b"0.000000",
    b"1700000000.5",
    b"1700000000.250000",
    b"8589934592.000000",
    b"8589934593.000000",
    b"99999999999999999999.000000",
    b"0,1,2",
    b"1,0",
    b",",
    b",,",
    b"0,,1",
    b"zz",
    b"abc",
    b"AB",
    b"00,ff",
    b"::ffff:1.2.3.4",
    b"fe80::1%eth0",
    b"1.2.3.256",
    b"01.2.3.4",
    b"\xce\xa9",
    b"\xff",
    b"\x00",
    b"\t",
    b"\n",
)


def _packed_edit(rng: random.Random, data: bytes) -> bytes:
    """A packed line with one field, or one element of a comma-separated field, changed."""
    fields = data.split(b"\t")
    i = rng.randrange(len(fields))
    op = rng.randrange(6)
    if op == 0:
        fields[i] = rng.choice(PACKED_EXTREMES)
    elif op == 1:  # one vector element
        elems = fields[i].split(b",")
        elems[rng.randrange(len(elems))] = rng.choice(PACKED_EXTREMES)
        fields[i] = b",".join(elems)
    elif op == 2:  # a vector one longer or shorter
        elems = fields[i].split(b",")
        k = rng.randrange(len(elems))
        elems[k : k + 1] = [] if rng.random() < 0.5 else [elems[k]] * 2
        fields[i] = b",".join(elems)
    elif op == 3:  # a field dropped or repeated
        fields[i : i + 1] = [] if rng.random() < 0.5 else [fields[i]] * rng.randint(2, 3)
    elif op == 4:
        fields[i] = fields[rng.randrange(len(fields))]  # another field's value
    else:
        return _byte_edit(rng, data)
    return b"\t".join(fields)


def mutate(rng: random.Random, seed: bytes, kind: str) -> bytes:
    """One mutated input from *seed* (``kind``: json, msgpack or packed), at most MAX_INPUT
    bytes."""
    out = seed
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if kind == "msgpack":
            out = _msgpack_edit(rng, out) if rng.random() < 0.85 else _byte_edit(rng, out)
        elif kind == "packed":
            out = _packed_edit(rng, out)
        else:
            out = _json_edit(rng, out)
    return out[:MAX_INPUT]


# -- seeds ------------------------------------------------------------------------------------
def _records(n: int = 8) -> list:
    return synthetic_records(n, devices=3, seed=7, packets=LAYOUT.packets, payload_bytes=8)


def broker_seeds() -> list[bytes]:
    """Frames as Zeek 8.2 renders them: flow events, welcome, drain, an ack, errors."""
    topic = "zeek/iotcls/flows"
    out = [rc.flow_frame(topic, r) for r in _records()]
    out += [rc.flows_frame(topic, [x.decode() for x in packed_seeds()[:4]])]
    out += [welcome_frame(topic, False), welcome_frame(topic, True), drain_frame(topic, 12)]
    out += [
        b'{"type":"ack","endpoint":"e-websocket-0","version":"8.2.2"}',
        b'{"type":"error","code":"deserialization_failed","context":"x"}',
        bj.event_message(
            topic, "Other::event", [1, -2, 1.5, "s", bj.Port(80, "tcp"), frozenset({1}), {"k": [1]}]
        ),
    ]
    return out


def packed_seeds() -> list[bytes]:
    """Packed lines as the native plugin writes them: final and early records, one without
    packets, one whose payloads are all empty."""
    recs = _records()
    out = [rc.pack_flow_record(r, early=k % 3 == 1) for k, r in enumerate(recs)]
    r = recs[0]
    none = dataclasses.replace(
        r, offsets=[], sizes=[], directions=[], payloads=[], total_packets=0, total_bytes=0
    )
    out.append(rc.pack_flow_record(none))
    out.append(rc.pack_flow_record(dataclasses.replace(r, payloads=[b""] * len(r.payloads))))
    return [line.encode() for line in out]


def datagram_seeds() -> list[bytes]:
    recs = _records()
    for k, r in enumerate(recs):
        r.uid = str(1_000_000 + k)
    one = [su.record_datagram(r) for r in recs]
    return one + [b"\n".join(one[:3])]


def wire_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    m = rng.random((3, *LAYOUT.shape), dtype=np.float32)
    hints = wire.Hints(
        [True, False, True], ["cam", "", "plug"], [True, False, True], [False, False, True]
    )
    msgs: list[wire.Message] = [
        wire.Hello("s", 1, "h", "m@1", LAYOUT.to_dict(), "cpu", 16, "logged", list(CLASSES)),
        wire.Welcome(2, 1.0),
        wire.Reject("no"),
        wire.Heartbeat(),
        wire.Request(5, m, [1, 2, 3], hints, ["id", None, None]),
        wire.Reply(
            5,
            ["cam", "plug", "hub"],
            [0.9, 0.5, 0.1],
            [True, False, False],
            ["-", "low_confidence", "low_confidence"],
            [["payload=1.0"], [], []],
            "m@1",
            1.5,
            [True, False, True],
            [True, False, False],
        ),
        wire.Failure(5, "boom"),
        wire.Stop(),
        wire.Bye("bye"),
    ]
    return [wire.encode(x) for x in msgs]


# -- targets ------------------------------------------------------------------------------------
def _finite_rows(assembler: FlowAssembler, table) -> None:
    """What the bridge does with decoded records: matrices, and none of them non-finite."""
    if not len(table):
        return
    mats, _, _ = assembler.assemble_finite(table)
    if not np.isfinite(mats).all():
        raise Crash("a decoded record gave a non-finite matrix")


@dataclass
class Target:
    """One decoder: its seeds, how to mutate them, and what reading an input means."""

    name: str
    seeds: list[bytes]
    kind: str  # json or msgpack
    read: Callable[[bytes], str]  # "ok" or "refused"; raises on a crash


def broker_target() -> Target:
    """The Zeek side: the raw fast path, else the JSON parser and the codec, the flow record
    decoders (batch and one by one), welcome and drain, and matrix assembly."""
    asm = FlowAssembler(LAYOUT)

    def read(raw: bytes) -> str:
        item = fb.match_flow(raw)
        if item is not None:
            dec = fb.decode_batch([item], LAYOUT.packets, LAYOUT.required_payload_bytes())
            _finite_rows(asm, dec.table)
            return "refused" if dec.errors else "ok"
        try:
            obj, _ = bj.parse_frame(raw)
            msg = bj.decode_message(obj)
        except bj.BrokerJSONError:
            return "refused"
        if not isinstance(msg, bj.DataMessage):
            return "ok"
        name = rc.event_name(obj)
        try:
            if name == rc.FLOW_EVENT:  # as the bridge takes it: decoded with its batch
                dec = asm.decode([rc.flow_record(obj)])
                _finite_rows(asm, dec.table)
                if dec.errors:
                    return "refused"
            elif name == rc.FLOWS_EVENT:  # as the bridge takes it: line by line
                return _read_packed(asm, rc.packed_records(obj))
            elif name in (rc.WELCOME_EVENT, rc.DRAIN_EVENT):
                ev = rc.control_event(obj)
                if ev is not None:
                    rc.welcome_from(ev) if name == rc.WELCOME_EVENT else rc.drain_from(ev)
        except rc.RecordError:
            return "refused"
        return "ok"

    return Target("broker_json", broker_seeds(), "json", read)


def _read_packed(asm: FlowAssembler, lines: list[str]) -> str:
    """Packed lines as Bridge._on_flows reads them: each on its own, the final records then
    decoded with their batch and assembled (early ones are scored, so encoded, too)."""
    out, recs = "ok", []
    for line in lines:
        try:
            recs.append(rc.packed_flow_record(line)[0])
        except rc.RecordError:
            out = "refused"
    if recs:
        dec = asm.decode(recs)
        _finite_rows(asm, dec.table)
        if dec.errors:
            out = "refused"
    return out


def packed_target() -> Target:
    """The native plugin's packed lines (``IoTClass::flows``), one input a line; the bytes
    are read as the JSON parser would hand them over (lenient: invalid UTF-8 as surrogates)."""
    asm = FlowAssembler(LAYOUT)

    def read(data: bytes) -> str:
        line = data.decode("utf-8", "surrogateescape")
        out = _read_packed(asm, [line])
        if out == "ok":
            _same_as_json(*rc.packed_flow_record(line))
        return out

    return Target("packed_flow_line", packed_seeds(), "packed", read)


def _same_as_json(rec: rc.FlowRecord, early: bool) -> None:
    """The promise of the packed format, on whatever the fuzzer got accepted: the record
    packed again decodes to exactly what its ``IoTClass::flow`` frame decodes to."""
    try:
        packed = rc.packed_flow_record(rc.pack_flow_record(rec, early))
        via_json = rc.flow_record(bj.parse_frame(rc.flow_frame("zeek/iotcls/flows", rec))[0])
    except (rc.RecordError, bj.BrokerJSONError) as e:
        raise Crash(f"an accepted packed record has no twin on the other path: {e}") from None
    if packed != (via_json, early):
        raise Crash("a packed record decodes otherwise than its IoTClass::flow frame")


def datagram_target() -> Target:
    """The Suricata side: one datagram, line by line, as SuricataBridge.take reads it; an
    accepted record must assemble to a finite matrix."""
    asm = FlowAssembler(LAYOUT)

    def read(data: bytes) -> str:
        out = "ok"
        for line in data.split(b"\n"):
            try:
                rec = su.parse_datagram(line)
            except su.DatagramError:
                out = "refused"
                continue
            dec = asm.decode([rec])
            if dec.errors:
                raise Crash(f"an accepted record does not decode: {dec.errors[0][1]}")
            _finite_rows(asm, dec.table)
        return out

    return Target("suricata_datagram", datagram_seeds(), "json", read)


def wire_target() -> Target:
    """The scorer link: a message decoded, and a reply's labels checked as the dispatcher
    checks them (an accepted confidence is a number in [0, 1])."""
    classes = frozenset(CLASSES)

    def read(data: bytes) -> str:
        try:
            msg = wire.decode(data)
        except wire.WireError:
            return "refused"
        if isinstance(msg, wire.Reply):
            for i in range(len(msg)):
                if verdict_problem(msg, i, classes) is None and not 0.0 <= msg.confidence[i] <= 1.0:
                    raise Crash("a reply's confidence passed the check out of [0, 1]")
        if isinstance(msg, wire.Request) and msg.matrices.shape[0] != len(msg.refs):
            raise Crash("a request's matrices and refs differ in number")
        return "ok"

    return Target("scorer_wire", wire_seeds(), "msgpack", read)


def targets() -> list[Target]:
    return [broker_target(), packed_target(), datagram_target(), wire_target()]


# -- running -------------------------------------------------------------------------------------
@dataclass
class Totals:
    name: str
    inputs: int = 0
    ok: int = 0
    refused: int = 0
    crashes: int = 0
    hangs: int = 0  # inputs that took longer than the hang limit
    slowest_s: float = 0.0
    seconds: float = 0.0
    examples: list[tuple[str, bytes]] = field(default_factory=list)  # first crashes and hangs


def run(
    target: Target, n: int, seed: int, hang_s: float = 1.0, clock: Callable[[], float] | None = None
) -> Totals:
    """*n* inputs (the seeds themselves first, then mutations) through *target*."""
    import time

    clock = clock or time.perf_counter
    rng = random.Random(f"{seed}:{target.name}")
    t = Totals(target.name)
    t_start = clock()
    for k in range(n):
        data = (
            target.seeds[k]
            if k < len(target.seeds)
            else mutate(rng, rng.choice(target.seeds), target.kind)
        )
        t0 = clock()
        try:
            result = target.read(data)  # ok, refused, or hang (a timer interrupted it)
        except Exception as e:  # noqa: BLE001 - that is the point
            result = "crash"
            t.crashes += 1
            if len(t.examples) < 5:
                t.examples.append((f"{type(e).__name__}: {str(e)[:200]}", data[:300]))
        dt = clock() - t0
        t.slowest_s = max(t.slowest_s, dt)
        if result == "ok":
            t.ok += 1
        elif result == "refused":
            t.refused += 1
        if result == "hang" or dt > hang_s:
            t.hangs += 1
            if len(t.examples) < 5:
                t.examples.append((f"took {dt:.2f} s", data[:300]))
        t.inputs += 1
    t.seconds = clock() - t_start
    return t
