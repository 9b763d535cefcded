"""An in-process WebSocket server that speaks Zeek's ``/v1/messages/json`` API the way Zeek
8.2.2 does (tests/fixtures/zeek-8.2.2/websocket): subscription array first, then an ack;
errors with Zeek's codes and contexts, the connection staying open; events checked against
the declarations of the iotcls Zeek scripts, which are read from main.zeek itself, so a
label the bridge encodes with a wrong type is refused here as Zeek would refuse it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from iotcls.bridge import broker_json as bj

MAIN_ZEEK = Path(__file__).resolve().parents[1] / "zeek-scripts" / "iotcls" / "main.zeek"
ERR_DECODE = "failed to decode JSON object"
ERR_TOPIC = "no topic in top-level JSON object"
ERR_EVENT = "failed to create Zeek event"


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
    for m in re.finditer(r"global\s+(\w+)\s*:\s*event\s*\((.*?)\)\s*;", _strip_comments(text),
                         re.S):  # fmt: skip
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
        "string": ("string", str), "count": ("count", int), "int": ("integer", int),
        "double": ("real", float), "bool": ("boolean", bool), "addr": ("address", str),
        "port": ("port", str), "subnet": ("subnet", str), "time": ("timestamp", str),
        "interval": ("timespan", str), "transport_proto": ("enum-value", str),
    }  # fmt: skip
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
            check(x, ztype[len("vector of "):], records)
        return
    if ztype in records:
        fields = records[ztype]
        if t != "vector" or len(d) != len(fields):
            raise TypeClash(f"{t} of {len(d) if isinstance(d, list) else '?'} for record {ztype}")
        for x, (_, ft) in zip(d, fields):
            check(x, ft, records)
        return
    raise TypeClash(f"type {ztype} not modelled")


@dataclass
class Received:
    topic: str
    name: str
    args: list  # decoded values
    raw: dict  # the typed JSON


@dataclass
class FakeZeek:
    """Start with :meth:`start`; ``ack=False`` behaves like Zeek without a cluster backend."""

    ack: bool = True
    version: str = "8.2.2"
    on_event: Callable[["FakeZeek", Received], Any] | None = None
    received: list[Received] = field(default_factory=list)
    errors_sent: list[str] = field(default_factory=list)
    subscriptions: list[list[str]] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        text = MAIN_ZEEK.read_text()
        self.records = zeek_records(text)
        self.events = zeek_events(text)
        self.node_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, "fakezeek"))
        self._server = None
        self._clients: dict[ServerConnection, list[str]] = {}
        self._n = 0
        self.client_added = asyncio.Event()

    async def start(self, port: int = 0) -> "FakeZeek":
        self._server = await serve(self._handle, "127.0.0.1", port or self.port, compression=None)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Like Zeek terminating: close every client with 1001 "Terminating"."""
        for ws in list(self._clients):
            await ws.close(1001, "Terminating")
        self._server.close()
        await self._server.wait_closed()
        self._clients.clear()
        self.client_added.clear()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/messages/json"

    @property
    def acked_clients(self) -> int:
        return len(self._clients)

    async def publish(self, topic: str, frame: bytes) -> int:
        """Send a frame (already rendered as Zeek renders it) to subscribed, acked clients."""
        n = 0
        for ws, prefixes in list(self._clients.items()):
            if any(topic.startswith(p) for p in prefixes):
                try:
                    await ws.send(frame, text=True)
                    n += 1
                except ConnectionClosed:
                    pass
        return n

    async def send_raw(self, frame: bytes | str) -> None:
        for ws in list(self._clients):
            await ws.send(frame if isinstance(frame, str) else frame, text=True)

    async def _error(self, ws: ServerConnection, code: str, context: str) -> None:
        self.errors_sent.append(context)
        await ws.send(json.dumps({"type": "error", "code": code, "context": context},
                                 separators=(",", ":")))  # fmt: skip

    async def _handle(self, ws: ServerConnection) -> None:
        if ws.request.path != "/v1/messages/json":
            await self._error(ws, "invalid_uri", "Invalid URI - use /v1/messages/json")
            await ws.close(1008, "Invalid URI - use /v1/messages/json")
            return
        try:
            first = await ws.recv()
            try:
                subs = json.loads(first)
            except ValueError:
                subs = None
            if not isinstance(subs, list):
                await self._error(ws, "deserialization_failed", "subscriptions not an array")
                await ws.wait_closed()
                return
            if not all(isinstance(s, str) for s in subs):
                await self._error(ws, "deserialization_failed",
                                  "individual subscription not a string")  # fmt: skip
                await ws.wait_closed()
                return
            if not self.ack:  # no cluster backend: accepted, never acked
                await ws.wait_closed()
                return
            self.subscriptions.append(subs)
            endpoint = f"{self.node_id}-websocket-{self._n}"
            self._n += 1
            await ws.send(json.dumps({"type": "ack", "endpoint": endpoint,
                                      "version": self.version}, separators=(",", ":")))  # fmt: skip
            self._clients[ws] = subs
            self.client_added.set()
            async for msg in ws:
                await self._message(ws, msg)
        except ConnectionClosed:
            pass
        finally:
            self._clients.pop(ws, None)

    async def _message(self, ws: ServerConnection, msg: str | bytes) -> None:
        try:
            obj = json.loads(msg)
            value = bj.decode(obj)  # Broker's decoder: the data must be valid Broker data
        except (ValueError, TypeError):
            await self._error(ws, "deserialization_failed", ERR_DECODE)
            return
        topic = obj.get("topic")
        if not isinstance(topic, str):
            await self._error(ws, "deserialization_failed", ERR_TOPIC)
            return
        ev = bj.decode_event(value)
        decl = self.events.get(ev.name) if ev else None
        try:
            if ev is None or decl is None or len(ev.args) != len(decl):
                raise TypeClash("no such event")
            for node, (_, ztype) in zip(obj["data"][2]["data"][1]["data"], decl):
                check(node, ztype, self.records)
        except TypeClash:
            await self._error(ws, "deserialization_failed", ERR_EVENT)
            return
        rec = Received(topic, ev.name, list(ev.args), obj)
        self.received.append(rec)
        if self.on_event is not None:
            r = self.on_event(self, rec)
            if asyncio.iscoroutine(r):
                await r

    def events_named(self, name: str) -> list[Received]:
        return [r for r in self.received if r.name == name]


def welcome_frame(topic: str, offline: bool, packets: int = 10, payload_bytes: int = 64,
                  window_s: float = 60.0, schema: int = 1) -> bytes:  # fmt: skip
    """IoTClass::welcome as the scripts send it."""
    return bj.render_zeek(topic, bj.encode_event("IoTClass::welcome", [
        bj.Count(schema), "standalone", bj.Timespan(round(window_s * 1e9)), bj.Count(packets),
        bj.Count(payload_bytes), offline,
    ]))  # fmt: skip


def drain_frame(topic: str, records: int) -> bytes:
    return bj.render_zeek(topic, bj.encode_event("IoTClass::drain", [bj.Count(records)]))


def addr(s: str):
    return ipaddress.ip_address(s)
