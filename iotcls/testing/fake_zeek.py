"""A stand-in for Zeek's WebSocket API, for tests and the serve benchmark.

It speaks the protocol the way Zeek 8.2.2 does (../shared/fixtures/zeek-8.2.2/websocket and
Zeek's ``src/cluster/websocket/WebSocket.cc``):

* only ``/v1/messages/json``: any other path gets ``{"type":"error","code":"invalid_uri",...}``
  and a close with code 1008;
* the first client message must be a JSON array of topic prefixes, answered with
  ``{"type":"ack","endpoint":"<uuid>-websocket-<n>","version":"8.2.2"}``; a first message
  that is not an array of strings gets a ``deserialization_failed`` error and never an ack;
* client events are checked against the declarations of the iotcls Zeek scripts, read from
  ``main.zeek`` itself (event signatures and record types), so a label the bridge encodes with
  a wrong type is refused here as Zeek would refuse it; anything else gets Zeek's error replies
  (``failed to decode JSON object``, ``no topic in top-level JSON object``,
  ``failed to create Zeek event``), and the connection stays open;
* ``ack=False`` behaves like a Zeek without a cluster backend: accepted, never acked;
* it publishes ``IoTClass::flow`` events byte for byte as Zeek renders them
  (:func:`iotcls.bridge.records.flow_frame`), and the native plugin's batches of packed
  records, ``IoTClass::flows`` (:meth:`FakeZeek.publish_flows`); it answers ``hello`` with
  ``welcome`` as the scripts do, and can send ``drain`` as a Zeek at the end of a trace does.

Every accepted event is kept in ``received`` (and passed to ``on_event``); labels are also
kept as ``(monotonic time, uid, fields)``. With ``strict=False`` (the benchmark) only the uid is
pulled out of each label frame, so the load generator's own CPU does not limit what it
measures; with ``welcome_on_hello=False`` a test answers ``hello`` itself (``on_event``).
Frames are published one at a time (:meth:`FakeZeek.publish`) or many in one socket write
(:meth:`FakeZeek.publish_frames`, the load generator's path).
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from iotcls.bridge import broker_json as bj
from iotcls.bridge import records as rec
from iotcls.schema import SCHEMA_VERSION, FlowRecord

ZEEK_VERSION = "8.2.2"
PATH = "/v1/messages/json"
DESER = "deserialization_failed"

ERR_DECODE = "failed to decode JSON object"
ERR_TOPIC = "no topic in top-level JSON object"
ERR_EVENT = "failed to create Zeek event"
_UID_RE = re.compile(rb'"@data-type":"string","data":"(C[^"\\]{1,40})"')


def main_zeek() -> Path:
    """The iotcls scripts' main.zeek: installed package data, else the source tree."""
    spec = importlib.util.find_spec("iotcls.zeek_scripts")
    for base in list(spec.submodule_search_locations or []) if spec else []:
        p = Path(base) / "iotcls" / "main.zeek"
        if p.is_file():
            return p
    return Path(__file__).resolve().parents[2] / "zeek-scripts" / "iotcls" / "main.zeek"


def _strip_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def zeek_records(text: str) -> dict[str, list[tuple[str, str]]]:
    """``type NAME: record { field: type attrs; ... };`` -> {NAME: [(field, type), ...]}."""
    out = {}
    for m in re.finditer(r"type\s+(\w+)\s*:\s*record\s*\{(.*?)\};", _strip_comments(text), re.S):
        fields = []
        for fm in re.finditer(r"(\w+)\s*:\s*([^;&]+?)\s*(?:&[^;]*)?;", m.group(2)):
            fields.append((fm.group(1), " ".join(fm.group(2).split())))
        out[m.group(1)] = fields
    return out


def zeek_events(text: str, module: str = "IoTClass") -> dict[str, list[tuple[str, str]]]:
    """``global NAME: event(arg: type, ...);`` -> {"Module::NAME": [(arg, type), ...]}."""
    out = {}
    for m in re.finditer(
        r"global\s+(\w+)\s*:\s*event\s*\((.*?)\)\s*;", _strip_comments(text), re.S
    ):
        args = []
        for a in filter(None, (x.strip() for x in m.group(2).split(","))):
            name, _, typ = a.partition(":")
            args.append((name.strip(), " ".join(typ.split())))
        out[f"{module}::{m.group(1)}"] = args
    return out


class TypeClash(ValueError):
    pass


def check(node: Any, ztype: str, records: dict) -> None:
    """Raise TypeClash unless *node* (Broker typed JSON) converts to Zeek type *ztype*."""
    if not isinstance(node, dict) or "@data-type" not in node or "data" not in node:
        raise TypeClash("not a typed value")
    t, d = node["@data-type"], node["data"]
    simple = {
        "string": ("string", str),
        "count": ("count", int),
        "int": ("integer", int),
        "double": ("real", float),
        "bool": ("boolean", bool),
        "addr": ("address", str),
        "port": ("port", str),
        "subnet": ("subnet", str),
        "time": ("timestamp", str),
        "interval": ("timespan", str),
        "transport_proto": ("enum-value", str),
    }
    if ztype in simple:
        want, pytype = simple[ztype]
        if t != want or not isinstance(d, pytype) or (pytype is int and isinstance(d, bool)):
            raise TypeClash(f"{t} {d!r} for {ztype}")
        bj.decode(node)  # value syntax (addresses, ports, counts >= 0, ...)
        return
    if ztype.startswith("vector of "):
        if t != "vector":
            raise TypeClash(f"{t} for {ztype}")
        for x in d:
            check(x, ztype[len("vector of ") :], records)
        return
    if ztype in records:
        fields = records[ztype]
        if t != "vector" or len(d) != len(fields):
            raise TypeClash(f"{t} of {len(d) if isinstance(d, list) else '?'} for record {ztype}")
        for x, (_, ft) in zip(d, fields):
            check(x, ft, records)
        return
    raise TypeClash(f"type {ztype} not modelled")


def check_event(obj: Any, events: dict, records: dict) -> tuple[str, list] | str:
    """``(name, decoded args)`` of a client data message Zeek would accept (the event declared
    in main.zeek, every argument convertible to its declared type), else Zeek's error text."""
    if not isinstance(obj, dict):
        return ERR_DECODE
    try:
        value = bj.decode(obj)  # Broker's decoder: the data must be valid Broker data
    except (ValueError, TypeError):
        return ERR_DECODE
    if not isinstance(obj.get("topic"), str) or not obj["topic"]:
        return ERR_TOPIC
    ev = bj.decode_event(value)
    decl = events.get(ev.name) if ev else None
    try:
        if ev is None or decl is None or len(ev.args) != len(decl):
            raise TypeClash("no such event")
        for node, (_, ztype) in zip(obj["data"][2]["data"][1]["data"], decl):
            check(node, ztype, records)
    except (TypeClash, KeyError, IndexError, TypeError):
        return ERR_EVENT
    return ev.name, list(ev.args)


@dataclass
class Received:
    topic: str
    name: str
    args: list  # decoded values
    raw: dict  # the typed JSON


@dataclass
class Label:
    at: float  # time.monotonic() when received
    uid: str
    fields: dict | None  # the label's fields (strict mode)


@dataclass
class FakeZeekStats:
    clients: int = 0
    acked: int = 0
    flows_sent: int = 0
    labels: int = 0
    hellos: int = 0
    drained: list[tuple[int, int]] = field(default_factory=list)
    errors_sent: dict[str, int] = field(default_factory=dict)


class _Client:
    def __init__(self, ws: ServerConnection, n: int):
        self.ws, self.n = ws, n
        self.topics: list[str] | None = None
        self.acked = asyncio.Event()


class FakeZeek:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        strict: bool = True,
        on_label: Callable[[Label], None] | None = None,
        packets: int = 10,
        payload_bytes: int = 64,
        window_s: float = 60.0,
        offline: bool = False,
        *,
        ack: bool = True,
        version: str = ZEEK_VERSION,
        on_event: Callable[[FakeZeek, Received], Any] | None = None,
        welcome_on_hello: bool = True,
    ):
        self.host, self.port, self.strict, self.on_label = host, port, strict, on_label
        self.ack, self.version, self.on_event = ack, version, on_event
        self.welcome_on_hello = welcome_on_hello
        text = main_zeek().read_text()
        self.records, self.events = zeek_records(text), zeek_events(text)
        self.received: list[Received] = []  # every accepted event (strict mode)
        self.errors_sent: list[str] = []  # the context of every error reply, in order
        self.subscriptions: list[list[str]] = []  # of acked clients
        self.client_added = asyncio.Event()
        self.settings = (packets, payload_bytes, window_s, offline)
        self.node_id = str(uuid.uuid4())
        self.stats = FakeZeekStats()
        self.labels: list[Label] = []
        self.keep_labels = True
        self._clients: list[_Client] = []
        self._server = None
        self.bridge_connected = asyncio.Event()
        # cleared: stop reading what clients send (a Zeek too busy to take labels); TCP then
        # pushes back on the client
        self.reading = asyncio.Event()
        self.reading.set()
        self.rcvbuf: int | None = None  # SO_RCVBUF for new connections (backpressure tests)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{PATH}"

    @property
    def acked_clients(self) -> int:
        return sum(c.acked.is_set() for c in self._clients)

    def events_named(self, name: str) -> list[Received]:
        return [r for r in self.received if r.name == name]

    async def start(self, port: int = 0) -> FakeZeek:
        """Listen (on *port*, e.g. the one a stopped FakeZeek had, to play a restart)."""
        self.port = port or self.port
        self._server = await serve(
            self._handle, self.host, self.port, compression=None, max_size=2**26, server_header=None
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Like Zeek terminating: close every client with 1001 Terminating."""
        for c in list(self._clients):
            try:
                await c.ws.close(1001, "Terminating")
            except ConnectionClosed:
                pass
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.client_added.clear()

    async def stop(self) -> None:
        """The same as :meth:`close`."""
        await self.close()

    # -- sending --------------------------------------------------------------------------
    def _subscribers(self, topic: str) -> list[_Client]:
        return [
            c
            for c in self._clients
            if c.acked.is_set() and any(topic.startswith(p) for p in c.topics or ())
        ]

    async def publish(self, topic: str, frame: bytes) -> int:
        """Sends one rendered frame to every client subscribed to ``topic``."""
        n = 0
        for c in self._subscribers(topic):
            try:
                await c.ws.send(frame, text=True)
                n += 1
            except ConnectionClosed:
                pass
        return n

    async def publish_flow(self, r: FlowRecord, topic: str = "zeek/iotcls/flows") -> int:
        n = await self.publish(topic, rec.flow_frame(topic, r))
        self.stats.flows_sent += 1
        return n

    async def publish_flows(self, lines: list[str], topic: str = "zeek/iotcls/flows") -> int:
        """One ``IoTClass::flows`` event holding *lines* (packed records, or anything at all:
        garbage tests), as the native capture plugin publishes a batch."""
        n = await self.publish(topic, rec.flows_frame(topic, lines))
        self.stats.flows_sent += len(lines)
        return n

    async def publish_frames(self, frames: list[bytes], topic: str = "zeek/iotcls/flows") -> None:
        """Many pre-rendered flow frames at once (the load generator's path).

        The frames go through the connection's protocol object and out in one socket write,
        as a busy Zeek's output buffer would send them, so that the generator's own system
        calls stay small next to what it measures."""
        for c in self._subscribers(topic):
            ws = c.ws
            if ws.state.name != "OPEN":
                continue
            for f in frames:
                ws.protocol.send_text(f)
            ws.transport.write(b"".join(ws.protocol.data_to_send()))
            while ws.transport.get_write_buffer_size() > 4 << 20 and ws.state.name == "OPEN":
                await asyncio.sleep(0.001)  # the reader is behind: TCP backpressure
        self.stats.flows_sent += len(frames)

    async def send_drain(self, records: int, topic: str = "zeek/iotcls/flows") -> None:
        await self.publish(topic, drain_frame(topic, records))

    async def send_raw(self, data: bytes | str) -> None:
        """Anything at all to every acked client (garbage tests)."""
        for c in self._clients:
            if c.acked.is_set():
                await c.ws.send(data, text=True) if isinstance(data, bytes) else await c.ws.send(
                    data
                )

    async def _error(self, c: _Client, code: str, context: str) -> None:
        self.stats.errors_sent[context] = self.stats.errors_sent.get(context, 0) + 1
        self.errors_sent.append(context)
        msg = json.dumps({"type": "error", "code": code, "context": context}, separators=(",", ":"))
        await c.ws.send(msg)

    # -- receiving ------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        self.stats.clients += 1
        c = _Client(ws, self.stats.clients - 1)
        path = ws.request.path if ws.request is not None else ""
        if path != PATH:
            await self._error(c, "invalid_uri", f"Invalid URI - use {PATH}")
            await ws.close(1008, f"Invalid URI - use {PATH}")
            return
        self._clients.append(c)
        if self.rcvbuf is not None:
            import socket

            sock = ws.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        try:
            async for raw in ws:
                await self.reading.wait()
                if c.topics is None:
                    await self._subscribe(c, raw)
                else:
                    await self._message(c, raw)
        except ConnectionClosed:
            pass
        finally:
            self._clients.remove(c)

    async def _subscribe(self, c: _Client, raw: str | bytes) -> None:
        try:
            topics = json.loads(raw)
        except ValueError:
            topics = None
        if not isinstance(topics, list):
            c.topics = []  # Zeek counts the message; the client never gets an ack
            await self._error(c, DESER, "subscriptions not an array")
            return
        if not all(isinstance(t, str) for t in topics):
            c.topics = []
            await self._error(c, DESER, "individual subscription not a string")
            return
        c.topics = topics
        if not self.ack:  # no cluster backend: accepted, never acked
            return
        self.subscriptions.append(topics)
        n = self.stats.acked
        await c.ws.send(
            json.dumps(
                {
                    "type": "ack",
                    "endpoint": f"{self.node_id}-websocket-{n}",
                    "version": self.version,
                },
                separators=(",", ":"),
            )
        )
        c.acked.set()
        self.stats.acked += 1
        self.client_added.set()

    async def _message(self, c: _Client, raw: str | bytes) -> None:
        if not c.acked.is_set():
            return  # Zeek queues these until an ack that never comes
        if not self.strict:
            data = raw.encode() if isinstance(raw, str) else raw
            if b'"IoTClass::label"' in data:
                m = _UID_RE.search(data)
                if m:
                    self._label(Label(time.monotonic(), m.group(1).decode(), None))
                    return
        try:
            obj = json.loads(raw)
        except ValueError:
            await self._error(c, DESER, ERR_DECODE)
            return
        checked = check_event(obj, self.events, self.records)
        if isinstance(checked, str):
            await self._error(c, DESER, checked)
            return
        name, args = checked
        got = Received(obj["topic"], name, args, obj)
        self.received.append(got)
        if name == rec.LABEL_EVENT:
            fields = dict(zip((n for n, _ in rec.LABEL_FIELDS), args[0]))
            self._label(Label(time.monotonic(), fields["uid"], fields))
        elif name == rec.HELLO_EVENT:
            self.stats.hellos += 1
            self.bridge_connected.set()
            if self.welcome_on_hello:
                packets, payload_bytes, window_s, offline = self.settings
                topic = "zeek/iotcls/flows"
                await self.publish(
                    topic, welcome_frame(topic, offline, packets, payload_bytes, window_s)
                )
        elif name == rec.DRAINED_EVENT:
            self.stats.drained.append((int(args[0]), int(args[1])))
        if self.on_event is not None:
            r = self.on_event(self, got)
            if asyncio.iscoroutine(r):
                await r

    def _label(self, label: Label) -> None:
        self.stats.labels += 1
        if self.keep_labels:
            self.labels.append(label)
        if self.on_label is not None:
            self.on_label(label)


def welcome_frame(
    topic: str,
    offline: bool,
    packets: int = 10,
    payload_bytes: int = 64,
    window_s: float = 60.0,
    schema: int = SCHEMA_VERSION,
) -> bytes:
    """IoTClass::welcome as the scripts send it."""
    return bj.render_zeek(
        topic,
        bj.encode_event(
            "IoTClass::welcome",
            [
                bj.Count(schema),
                "standalone",
                bj.Timespan(round(window_s * 1e9)),
                bj.Count(packets),
                bj.Count(payload_bytes),
                offline,
            ],
        ),
    )


def drain_frame(topic: str, records: int) -> bytes:
    return bj.render_zeek(topic, bj.encode_event("IoTClass::drain", [bj.Count(records)]))


def addr(s: str):
    return ipaddress.ip_address(s)
