"""A stand-in for Zeek's WebSocket API, for tests and the serve benchmark.

It speaks the protocol the way Zeek 8.2.2 does (tests/fixtures/zeek-8.2.2/websocket and
Zeek's ``src/cluster/websocket/WebSocket.cc``):

* only ``/v1/messages/json``: any other path gets ``{"type":"error","code":"invalid_uri",...}``
  and a close with code 1008;
* the first client message must be a JSON array of topic prefixes, answered with
  ``{"type":"ack","endpoint":"<uuid>-websocket-<n>","version":"8.2.2"}``; a first message
  that is not an array of strings gets a ``deserialization_failed`` error and never an ack;
* client events are checked against what the iotcls scripts declare (``IoTClass::hello``,
  ``label``, ``drained``), argument types included; anything else gets Zeek's error replies
  (``failed to decode JSON object``, ``no topic in top-level JSON object``,
  ``failed to create Zeek event``), and the connection stays open;
* it publishes ``IoTClass::flow`` events byte for byte as Zeek renders them
  (:func:`iotcls.bridge.records.flow_frame`), answers ``hello`` with ``welcome`` as the scripts
  do, and can send ``drain`` as a Zeek at the end of a trace does.

Labels received are kept as ``(monotonic time, uid, fields)``; with ``strict=False`` (the
benchmark) only the uid is pulled out of each label frame, so the load generator's own CPU
does not limit what it measures.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from iotcls.bridge import broker_json as bj
from iotcls.bridge import records as rec
from iotcls.schema import FlowRecord

ZEEK_VERSION = "8.2.2"
PATH = "/v1/messages/json"
DESER = "deserialization_failed"

# What the iotcls scripts declare for client-sent events: name -> argument @data-types,
# with record arguments as the tuple of their field types.
LABEL_TYPES = tuple(t for _, t in rec.LABEL_FIELDS)
DECLARED: dict[str, tuple] = {
    rec.HELLO_EVENT: ("string", "string"),
    rec.LABEL_EVENT: (LABEL_TYPES,),
    rec.DRAINED_EVENT: ("count", "count"),
}
_UID_RE = re.compile(rb'"@data-type":"string","data":"(C[^"\\]{1,40})"')


def _matches(node: Any, want: Any) -> bool:
    if not isinstance(node, dict) or "@data-type" not in node or "data" not in node:
        return False
    if isinstance(want, tuple):  # a record: a vector of fields of these types
        d = node["data"]
        return (node["@data-type"] == "vector" and isinstance(d, list) and len(d) == len(want)
                and all(_matches(x, w) for x, w in zip(d, want)))  # fmt: skip
    if node["@data-type"] != want:
        return False
    d = node["data"]
    if want == "count":
        return type(d) is int and d >= 0
    if want == "vector":
        return isinstance(d, list)
    return True


def check_event(obj: Any) -> tuple[str, list] | str:
    """``(name, args)`` of a client data message Zeek would accept, else Zeek's error text."""
    if not isinstance(obj, dict):
        return "failed to decode JSON object"
    if not isinstance(obj.get("topic"), str) or not obj["topic"]:
        return "no topic in top-level JSON object"
    try:
        body = obj["data"][2]["data"]
        name = body[0]["data"]
        args = body[1]["data"]
        ok = (obj["@data-type"] == "vector" and obj["data"][0] == {"@data-type": "count", "data": 1}
              and obj["data"][1] == {"@data-type": "count", "data": 1})  # fmt: skip
    except (KeyError, IndexError, TypeError):
        return "failed to create Zeek event"
    want = DECLARED.get(name) if isinstance(name, str) else None
    if not ok or want is None or not isinstance(args, list) or len(args) != len(want):
        return "failed to create Zeek event"
    if not all(_matches(a, w) for a, w in zip(args, want)):
        return "failed to create Zeek event"
    return name, args


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
    ):
        self.host, self.port, self.strict, self.on_label = host, port, strict, on_label
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

    async def start(self) -> "FakeZeek":
        self._server = await serve(self._handle, self.host, self.port, compression=None,
                                   max_size=2**26, server_header=None)  # fmt: skip
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

    # -- sending --------------------------------------------------------------------------
    def _subscribers(self, topic: str) -> list[_Client]:
        return [c for c in self._clients
                if c.acked.is_set() and any(topic.startswith(p) for p in c.topics or ())]  # fmt: skip

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
        await self.publish(topic, bj.render_zeek(topic, bj.encode_event(rec.DRAIN_EVENT, [bj.Count(records)])))

    async def send_raw(self, data: bytes | str) -> None:
        """Anything at all to every acked client (garbage tests)."""
        for c in self._clients:
            if c.acked.is_set():
                await c.ws.send(data, text=True) if isinstance(data, bytes) else await c.ws.send(data)

    async def _error(self, c: _Client, code: str, context: str) -> None:
        self.stats.errors_sent[context] = self.stats.errors_sent.get(context, 0) + 1
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
        await c.ws.send(json.dumps({"type": "ack", "endpoint": f"{self.node_id}-websocket-{c.n}",
                                    "version": ZEEK_VERSION}, separators=(",", ":")))  # fmt: skip
        c.acked.set()
        self.stats.acked += 1

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
            await self._error(c, DESER, "failed to decode JSON object")
            return
        checked = check_event(obj)
        if isinstance(checked, str):
            await self._error(c, DESER, checked)
            return
        name, args = checked
        if name == rec.LABEL_EVENT:
            values = bj.decode(args[0])
            fields = dict(zip((n for n, _ in rec.LABEL_FIELDS), values))
            self._label(Label(time.monotonic(), fields["uid"], fields))
        elif name == rec.HELLO_EVENT:
            self.stats.hellos += 1
            self.bridge_connected.set()
            packets, payload_bytes, window_s, offline = self.settings
            topic = "zeek/iotcls/flows"
            await self.publish(topic, bj.render_zeek(topic, bj.encode_event(rec.WELCOME_EVENT, [
                bj.Count(1), "standalone", bj.Timespan(round(window_s * 1e9)), bj.Count(packets),
                bj.Count(payload_bytes), offline])))  # fmt: skip
        elif name == rec.DRAINED_EVENT:
            self.stats.drained.append((args[0]["data"], args[1]["data"]))

    def _label(self, label: Label) -> None:
        self.stats.labels += 1
        if self.keep_labels:
            self.labels.append(label)
        if self.on_label is not None:
            self.on_label(label)
