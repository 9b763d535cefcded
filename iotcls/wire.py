"""Messages between the bridge and its scorers: msgpack maps, versioned, checked on receipt.

Every message is one ZeroMQ frame holding a msgpack map with ``v`` (the wire version) and ``t``
(the kind). A scorer connects a DEALER socket to the bridge's ROUTER and says :class:`Hello`
(which model and layout it runs); the bridge answers :class:`Welcome` or :class:`Reject` and
then sends :class:`Request` batches, at most its credit at a time; the scorer answers each
with a :class:`Reply` (or :class:`Failure`), sends :class:`Heartbeat` while idle and
:class:`Bye` when it leaves. Matrices travel as raw little-endian float32 bytes plus their
shape, so neither side pays for per-number encoding.

:func:`decode` turns anything that is not a well-formed message of this version into a
:class:`WireError` with a one-line reason: a receiver logs it, counts it and goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

WIRE_VERSION = 1
# A Reject whose reason starts with this asks the scorer to say hello again (the bridge
# restarted, or gave the scorer up for silent): not a refusal.
REHELLO = "unknown scorer"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class WireError(ValueError):
    """A message that cannot be used; ``kind`` names the counter it is reported under."""

    def __init__(self, message: str, kind: str = "malformed"):
        super().__init__(message)
        self.kind = kind


@dataclass
class Hello:
    name: str
    pid: int
    host: str
    model: str  # model name and content hash, as logged
    layout: dict
    device: str
    batch_size: int
    explain: str = "none"  # which labels get the full trust decision: all, logged, none
    # the model's class names, the labels it can give (None: an older scorer; its labels
    # are still checked one by one)
    classes: list[str] | None = None


@dataclass
class Welcome:
    credit: int
    heartbeat_s: float


@dataclass
class Reject:
    reason: str


@dataclass
class Heartbeat:
    pass


@dataclass
class Hints:
    """Per record, what the bridge's log policy knows before the label: whether the label
    will be sent whatever it is (``due``), else the device's last label sent and its trust,
    and the cheap trust decision (confidence criterion) of the device's last fully judged
    label. A scorer that explains only the labels to be logged explains a record when it is
    due, its label differs, its cheap decision accepts what the last judged label's did not,
    or it refuses (low confidence: untrusted whatever the explanation) a device whose last
    label sent was trusted. Cheap is compared with cheap, so a label whose full decision
    keeps refusing what the confidence criterion accepts is not explained again and again."""

    due: list[bool]
    last_label: list[str]
    last_trusted: list[bool]
    last_cheap: list[bool] | None = None  # None (an older bridge): as last_trusted


@dataclass
class Request:
    batch: int
    matrices: np.ndarray  # (n, rows, width) float32
    refs: list[int]
    hints: Hints | None = None
    # per record, its device's latest DHCP identity (None: none seen); the scorer refines
    # the label with it (iotcls.trust.dhcp_identity). None: no identities (an older bridge)
    identities: list[str | None] | None = None


@dataclass
class Reply:
    batch: int
    labels: list[str]
    confidence: list[float]
    trusted: list[bool]
    reason: list[str]
    top_groups: list[list[str]]
    model: str = ""
    score_ms: float = 0.0
    # per record: whether trusted/reason/top_groups are the full trust decision (None: all
    # are); the others carry only the confidence criterion
    explained: list[bool] | None = None
    # per record, the confidence criterion alone (None: as ``trusted``); what hints compare
    cheap_trusted: list[bool] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Failure:
    batch: int
    error: str


@dataclass
class Stop:
    pass


@dataclass
class Bye:
    reason: str = ""


Message = Hello | Welcome | Reject | Heartbeat | Request | Reply | Failure | Stop | Bye

_KINDS: dict[type, str] = {
    Hello: "hello",
    Welcome: "welcome",
    Reject: "reject",
    Heartbeat: "hb",
    Request: "req",
    Reply: "rep",
    Failure: "fail",
    Stop: "stop",
    Bye: "bye",
}


def encode(msg: Message) -> bytes:
    kind = _KINDS[type(msg)]
    d: dict[str, Any] = {"v": WIRE_VERSION, "t": kind}
    if isinstance(msg, Request):
        m = np.ascontiguousarray(msg.matrices, dtype="<f4")
        if m.ndim != 3:
            raise ValueError(f"request matrices must be 3-d, got shape {m.shape}")
        d.update(id=msg.batch, shape=list(m.shape), m=memoryview(m).cast("B"), refs=msg.refs)
        if msg.hints is not None:
            d.update(due=msg.hints.due, last=msg.hints.last_label, lastt=msg.hints.last_trusted)
            if msg.hints.last_cheap is not None:
                d["lastc"] = msg.hints.last_cheap
        if msg.identities is not None:
            d["ids"] = msg.identities
    elif isinstance(msg, Reply):
        d.update(
            id=msg.batch,
            labels=msg.labels,
            conf=[float(c) for c in msg.confidence],
            trusted=[bool(x) for x in msg.trusted],
            reason=msg.reason,
            groups=msg.top_groups,
            model=msg.model,
            ms=float(msg.score_ms),
        )
        if msg.explained is not None:
            d["expl"] = [bool(x) for x in msg.explained]
        if msg.cheap_trusted is not None:
            d["cheap"] = [bool(x) for x in msg.cheap_trusted]
    elif isinstance(msg, Failure):
        d.update(id=msg.batch, error=msg.error)
    elif isinstance(msg, Hello):
        d.update(
            name=msg.name,
            pid=msg.pid,
            host=msg.host,
            model=msg.model,
            layout=msg.layout,
            device=msg.device,
            batch=msg.batch_size,
            explain=msg.explain,
        )
        if msg.classes is not None:
            d["classes"] = list(msg.classes)
    elif isinstance(msg, Welcome):
        d.update(credit=msg.credit, hb=msg.heartbeat_s)
    elif isinstance(msg, (Reject, Bye)):
        d.update(reason=msg.reason)
    return msgpack.packb(d, use_bin_type=True)


def _get(d: dict, key: str, types: type | tuple, kind: str) -> Any:
    if key not in d:
        raise WireError(f"{kind} message without {key!r}")
    v = d[key]
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in _as_tuple(types)):
        raise WireError(f"{kind} message: {key!r} has type {type(v).__name__}")
    return v


def _as_tuple(t: type | tuple) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def _list_of(d: dict, key: str, types: type | tuple, n: int, kind: str) -> list:
    v = _get(d, key, list, kind)
    if len(v) != n:
        raise WireError(f"{kind} message: {key!r} has {len(v)} entries, expected {n}")
    for x in v:
        if not isinstance(x, types) or (isinstance(x, bool) and bool not in _as_tuple(types)):
            raise WireError(f"{kind} message: {key!r} holds a {type(x).__name__}")
    return v


def decode(data: bytes) -> Message:
    """The message in ``data``; :class:`WireError` for garbage or another version."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        d = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_MESSAGE_BYTES)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise WireError(f"not msgpack ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(d, dict) or "v" not in d:
        raise WireError(f"not an iotcls message (a msgpack {type(d).__name__} without 'v')")
    v = d.get("v")
    if v != WIRE_VERSION:
        raise WireError(
            f"wire version {v!r} (kind {d.get('t')!r}) is not supported, this side speaks "
            f"version {WIRE_VERSION}",
            kind="version",
        )
    kind = d.get("t")
    if kind == "req":
        return _decode_request(d, kind)
    if kind == "rep":
        return _decode_reply(d, kind)
    if kind == "hb":
        return Heartbeat()
    if kind == "hello":
        classes = None
        if "classes" in d:
            classes = _list_of(d, "classes", str, len(_get(d, "classes", list, kind)), kind)
        return Hello(
            name=_get(d, "name", str, kind),
            pid=_get(d, "pid", int, kind),
            host=_get(d, "host", str, kind),
            model=_get(d, "model", str, kind),
            layout=_get(d, "layout", dict, kind),
            device=_get(d, "device", str, kind),
            batch_size=_get(d, "batch", int, kind),
            explain=_get(d, "explain", str, kind) if "explain" in d else "none",
            classes=classes,
        )
    if kind == "welcome":
        return Welcome(_get(d, "credit", int, kind), float(_get(d, "hb", (float, int), kind)))
    if kind == "reject":
        return Reject(_get(d, "reason", str, kind))
    if kind == "fail":
        return Failure(_get(d, "id", int, kind), _get(d, "error", str, kind))
    if kind == "stop":
        return Stop()
    if kind == "bye":
        return Bye(_get(d, "reason", str, kind))
    raise WireError(f"unknown message kind {kind!r}")


def _decode_request(d: dict, kind: str) -> Request:
    batch = _get(d, "id", int, kind)
    shape = _get(d, "shape", list, kind)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise WireError(f"req message: bad shape {shape!r}")
    raw = _get(d, "m", bytes, kind)
    n, rows, width = shape
    if len(raw) != n * rows * width * 4:
        raise WireError(f"req message: {len(raw)} matrix bytes for shape {shape}")
    refs = _list_of(d, "refs", int, n, kind)
    m = np.frombuffer(raw, dtype="<f4").reshape(n, rows, width)
    hints = None
    if "due" in d:
        hints = Hints(
            _list_of(d, "due", bool, n, kind),
            _list_of(d, "last", str, n, kind),
            _list_of(d, "lastt", bool, n, kind),
            _list_of(d, "lastc", bool, n, kind) if "lastc" in d else None,
        )
    ids = _list_of(d, "ids", (str, type(None)), n, kind) if "ids" in d else None
    return Request(batch, m, refs, hints, ids)


def _decode_reply(d: dict, kind: str) -> Reply:
    batch = _get(d, "id", int, kind)
    labels = _get(d, "labels", list, kind)
    n = len(labels)
    _list_of(d, "labels", str, n, kind)
    groups = _list_of(d, "groups", list, n, kind)
    if not all(isinstance(g, str) for gs in groups for g in gs):
        raise WireError("rep message: 'groups' holds a non-string")
    return Reply(
        batch=batch,
        labels=labels,
        confidence=_list_of(d, "conf", (float, int), n, kind),
        trusted=_list_of(d, "trusted", bool, n, kind),
        reason=_list_of(d, "reason", str, n, kind),
        top_groups=groups,
        model=_get(d, "model", str, kind),
        score_ms=float(_get(d, "ms", (float, int), kind)),
        explained=_list_of(d, "expl", bool, n, kind) if "expl" in d else None,
        cheap_trusted=_list_of(d, "cheap", bool, n, kind) if "cheap" in d else None,
    )


@dataclass
class WireStats:
    """What a receiver rejected, by kind (malformed, version, unexpected)."""

    rejected: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str) -> None:
        self.rejected[kind] = self.rejected.get(kind, 0) + 1
