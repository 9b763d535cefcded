"""The bridge's WebSocket client for Zeek's ``/v1/messages/json`` API.

Protocol (Broker's web-socket.rst, checked against Zeek 8.2.2 in
../shared/fixtures/zeek-8.2.2/websocket): the client sends a JSON array of topic prefixes; Zeek
answers ``{"type": "ack", "endpoint": ..., "version": ...}`` once the subscriptions are
active, then sends data messages for those topics and error messages
(``{"type": "error", "code": ..., "context": ...}``) for client messages it could not use;
the connection stays open after an error.

Behaviour:

* Connects and retries with exponential backoff (``reconnect_min_s`` doubling up to
  ``reconnect_max_s``) until Zeek is up, and again whenever the connection drops.
* A Zeek that accepts the connection but never acks (a standalone Zeek 8.1+ without a
  cluster backend) is reported with that diagnosis, and the client retries.
* Frames are received as bytes: Zeek writes string bytes raw, so a frame may be invalid
  UTF-8 or even invalid JSON; such frames are read leniently or counted and skipped
  (:class:`ClientStats`). Nothing a peer sends can stop the client; every problem is counted
  and logged (at most once per ``log_every_s`` per kind).
* :meth:`send` while disconnected buffers up to ``max_buffer`` frames (oldest dropped and
  counted) and sends them after the next ack.
* ``wss://`` URLs: Zeek's certificate is verified (:func:`tls_context`: a CA file, else the
  system's CAs, and the URL's host name), and the bridge presents its own certificate when
  given one (for a Zeek that verifies its clients). A Zeek whose certificate fails is not
  talked to: the failure is logged, and the client retries.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from . import broker_json as bj

log = logging.getLogger("iotcls.bridge.zeek")

DEFAULT_URL = "ws://127.0.0.1:27759/v1/messages/json"
NO_ACK_HINT = (
    "Zeek accepted the WebSocket connection but sent no ack within {t:.0f} s: it has no cluster "
    "backend (a standalone Zeek 8.1+ needs one; the iotcls scripts load Broker's when none is "
    "set, so check that iotcls is loaded) or it is overloaded; retrying"
)


def tls_context(ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext:
    """The client side of TLS to Zeek's WebSocket server: Zeek's certificate must chain to
    *ca* (a PEM file; empty: the system's CAs) and name the host the URL names; *cert* and
    *key* (PEM) are the bridge's own, for a Zeek that verifies its clients. A file that
    cannot be used is an OSError naming it, in one line."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for what, path, load in (
        ("zeek.tls_ca", ca, lambda: ctx.load_verify_locations(cafile=ca)),
        ("zeek.tls_cert", cert, lambda: ctx.load_cert_chain(cert, key)),
    ):
        if not path:
            continue
        try:
            load()
        except (OSError, ssl.SSLError, ValueError) as e:
            raise OSError(
                f"{what} {path}: cannot be used: {getattr(e, 'strerror', None) or e}"
            ) from None
    return ctx


@dataclass
class ClientStats:
    connects: int = 0  # successful handshakes (ack received)
    attempts: int = 0  # connection attempts
    failures: int = 0  # attempts that failed (refused, handshake error, no ack)
    disconnects: int = 0
    frames: int = 0  # frames received after the ack
    lenient: int = 0  # frames that needed lenient parsing (raw bytes in strings, \v)
    malformed: int = 0  # frames that are not JSON at all: skipped
    unexpected: int = 0  # JSON that is no Broker message (or an ack after the handshake)
    handler_errors: int = 0  # the message handler raised: message skipped
    sent: int = 0
    dropped: int = 0  # outgoing frames dropped from a full buffer
    zeek_errors: Counter = field(default_factory=Counter)  # by Zeek error code


async def _write_all(ws: ClientConnection, frames: list[bytes]) -> None:
    """Text messages queued on the protocol together, then written and drained once (the
    pattern websockets' own ``send`` uses, for many messages); per message where the
    connection offers no such context."""
    ctx, proto = getattr(ws, "send_context", None), getattr(ws, "protocol", None)
    if ctx is None or proto is None or getattr(ws, "fragmented_send_waiter", None) is not None:
        for f in frames:
            await ws.send(f, text=True)
        return
    async with ctx():
        for f in frames:
            proto.send_text(f)


class ZeekClient:
    """One WebSocket session to Zeek at a time, re-established for ever until :meth:`stop`.

    ``on_raw(frame)`` (optional) sees every frame first, as bytes, and returns True when it
    consumed it (the bridge decodes flow records straight from the bytes there);
    ``on_message(obj)`` gets every other data message as parsed JSON (Broker's typed form),
    ``on_connect(ack)`` runs after each handshake before buffered frames are flushed (the
    bridge sends its hello there), ``on_disconnect()`` after each lost session. Each may be
    a plain or an async function.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        topics: list[str] | tuple[str, ...] = ("zeek/iotcls/flows",),
        *,
        on_message: Callable[[Any], Any] | None = None,
        on_raw: Callable[[bytes], bool] | None = None,
        on_connect: Callable[[bj.Ack], Any] | None = None,
        on_disconnect: Callable[[], Any] | None = None,
        reconnect_min_s: float = 0.1,
        reconnect_max_s: float = 5.0,
        ack_timeout_s: float = 10.0,
        open_timeout_s: float = 5.0,
        app_name: str = "iotcls-bridge",
        max_buffer: int = 100_000,
        log_every_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ):
        """``ssl_context``: for a ``wss://`` URL (default: :func:`tls_context` with the
        system's CAs)."""
        if not all(isinstance(t, str) for t in topics):
            raise ValueError("topics must be strings")
        self.url, self.topics = url, list(topics)
        self.on_message, self.on_raw = on_message, on_raw
        self.on_connect, self.on_disconnect = on_connect, on_disconnect
        self.reconnect_min_s, self.reconnect_max_s = reconnect_min_s, reconnect_max_s
        self.ack_timeout_s, self.open_timeout_s = ack_timeout_s, open_timeout_s
        self.app_name, self.max_buffer, self.log_every_s = app_name, max_buffer, log_every_s
        self.ssl_context = ssl_context
        if url.startswith("wss://") and ssl_context is None:
            self.ssl_context = tls_context()
        self.stats = ClientStats()
        self.ack: bj.Ack | None = None
        self.connected = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._buffer: deque[bytes] = deque()
        self._stop = asyncio.Event()
        self._last_log: dict[str, float] = {}
        self._send_lock = asyncio.Lock()

    # -- public API -----------------------------------------------------------------------
    async def run(self) -> None:
        """Connect, serve, reconnect; returns after :meth:`stop`."""
        delay = self.reconnect_min_s
        while not self._stop.is_set():
            self.stats.attempts += 1
            served = await self._session()
            if self._stop.is_set():
                break
            delay = self.reconnect_min_s if served else min(delay * 2, self.reconnect_max_s)
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass

    def stop(self) -> None:
        self._stop.set()
        ws = self._ws
        if ws is not None:
            asyncio.ensure_future(ws.close())

    async def send(self, frame: bytes) -> bool:
        """Send one frame now, or buffer it until the next session; False if it was buffered."""
        ws = self._ws
        if ws is not None and self.connected.is_set():
            try:
                async with self._send_lock:
                    await ws.send(frame, text=True)
                self.stats.sent += 1
                return True
            except ConnectionClosed:
                pass
        self._buffer_frame(frame)
        return False

    async def send_many(self, frames: list[bytes]) -> int:
        """Send several frames (one WebSocket message each) with one write and one drain, or
        buffer them until the next session; returns how many went out now."""
        if not frames:
            return 0
        ws = self._ws
        if ws is not None and self.connected.is_set():
            try:
                async with self._send_lock:
                    await _write_all(ws, frames)
                self.stats.sent += len(frames)
                return len(frames)
            except ConnectionClosed:
                pass
        for f in frames:
            self._buffer_frame(f)
        return 0

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    # -- internals ------------------------------------------------------------------------
    def _buffer_frame(self, frame: bytes) -> None:
        if len(self._buffer) >= self.max_buffer:
            self._buffer.popleft()
            self.stats.dropped += 1
            self._warn(
                "drop",
                "outgoing buffer full (%d frames): dropped the oldest, %d so far",
                self.max_buffer,
                self.stats.dropped,
            )
        self._buffer.append(frame)

    def _warn(self, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_log.get(kind, -1e9) >= self.log_every_s:
            self._last_log[kind] = now
            log.warning(msg, *args)

    async def _call(self, fn: Callable | None, *args: Any) -> None:
        if fn is None:
            return
        try:
            r = fn(*args)
            if inspect.isawaitable(r):
                await r
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a handler bug must not end the session
            self.stats.handler_errors += 1
            self._warn("handler", "message handler failed: %s: %s", type(e).__name__, e)

    async def _session(self) -> bool:
        """One connection; True if it got as far as the ack."""
        try:
            tls = {"ssl": self.ssl_context} if self.url.startswith("wss://") else {}
            ws = await connect(
                self.url,
                open_timeout=self.open_timeout_s,
                proxy=None,
                compression=None,
                max_size=64 * 2**20,
                additional_headers={"X-Application-Name": self.app_name},
                **tls,
            )
        except (OSError, asyncio.TimeoutError, InvalidHandshake, InvalidURI) as e:
            self.stats.failures += 1
            self._warn(
                "connect", "cannot connect to Zeek at %s: %s", self.url, e or type(e).__name__
            )
            return False
        self._ws = ws
        try:
            if not await self._handshake(ws):
                self.stats.failures += 1
                return False
            self.stats.connects += 1
            log.info(
                "connected to Zeek %s at %s (endpoint %s), subscribed to %s",
                self.ack.version,
                self.url,
                self.ack.endpoint,
                self.topics,
            )
            self._last_log.pop("connect", None)
            self.connected.set()
            await self._call(self.on_connect, self.ack)
            await self._flush_buffer(ws)
            await self._receive(ws)
            return True
        except ConnectionClosed as e:
            if self.connected.is_set():
                self._warn("closed", "Zeek closed the connection: %s", e)
            else:
                self.stats.failures += 1
            return self.connected.is_set()
        except OSError as e:
            self._warn("closed", "connection to Zeek lost: %s", e)
            return self.connected.is_set()
        except Exception as e:  # a bug must cost the session, never the service
            self.stats.handler_errors += 1
            log.error(
                "session with Zeek at %s ended by an error: %s: %s; reconnecting",
                self.url,
                type(e).__name__,
                str(e)[:200],
            )
            return self.connected.is_set()
        finally:
            was = self.connected.is_set()
            self.connected.clear()
            self._ws = None
            await ws.close()
            if was:
                self.stats.disconnects += 1
                await self._call(self.on_disconnect)

    async def _handshake(self, ws: ClientConnection) -> bool:
        try:
            await ws.send(json.dumps(self.topics), text=True)
        except ConnectionClosed:
            pass  # Zeek may have sent an error and closed first (a wrong URL): read it below
        try:
            raw = await asyncio.wait_for(ws.recv(decode=False), timeout=self.ack_timeout_s)
        except asyncio.TimeoutError:
            self._warn("noack", NO_ACK_HINT.format(t=self.ack_timeout_s))
            return False
        try:
            obj, _ = bj.parse_frame(raw)
            msg = bj.decode_message(obj)
        except bj.BrokerJSONError as e:
            self._warn("badack", "Zeek answered the subscription with %r: %s", raw[:200], e)
            return False
        if isinstance(msg, bj.ErrorMessage):
            self.stats.zeek_errors[msg.code] += 1
            self._warn("refused", "Zeek refused the subscription: %s: %s", msg.code, msg.context)
            return False
        if not isinstance(msg, bj.Ack):
            self._warn("badack", "expected an ack from Zeek, got a %s", type(msg).__name__)
            return False
        self.ack = msg
        return True

    async def _flush_buffer(self, ws: ClientConnection) -> None:
        while self._buffer and self.connected.is_set():
            frame = self._buffer[0]
            async with self._send_lock:
                await ws.send(frame, text=True)
            self._buffer.popleft()
            self.stats.sent += 1

    async def _receive(self, ws: ClientConnection) -> None:
        while not self._stop.is_set():
            raw = await ws.recv(decode=False)
            if isinstance(raw, str):  # not with decode=False, but be safe
                raw = raw.encode("utf-8", "surrogateescape")
            self.stats.frames += 1
            try:
                await self._frame(raw)
            except (asyncio.CancelledError, ConnectionClosed):
                raise
            except Exception as e:  # whatever a frame holds, it must not end the session
                self.stats.handler_errors += 1
                self._warn(
                    "frame",
                    "a frame could not be handled (%d so far): %s: %s",
                    self.stats.handler_errors,
                    type(e).__name__,
                    str(e)[:200],
                )

    async def _frame(self, raw: bytes) -> None:
        """One frame from Zeek: the raw handler's, else parsed and dispatched by type."""
        if self.on_raw is not None:
            try:
                if self.on_raw(raw):
                    return
            except Exception as e:  # a handler bug must not end the session
                self.stats.handler_errors += 1
                self._warn("handler", "raw frame handler failed: %s: %s", type(e).__name__, e)
                return
        try:
            obj, lenient = bj.parse_frame(raw)
        except bj.BrokerJSONError as e:
            self.stats.malformed += 1
            self._warn(
                "malformed",
                "skipped a frame that is not JSON (%d so far): %s: %r",
                self.stats.malformed,
                e,
                raw[:120],
            )
            return
        if lenient:
            self.stats.lenient += 1
            self._warn(
                "lenient",
                "frame with raw bytes in strings (%d so far): Zeek strings "
                "holding binary data should be hex-encoded",
                self.stats.lenient,
            )
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "data-message":
            await self._call(self.on_message, obj)
        elif kind == "error":
            self._on_error(obj)
        else:
            self.stats.unexpected += 1
            self._warn(
                "unexpected",
                "skipped an unexpected message (%d so far): %r",
                self.stats.unexpected,
                raw[:120],
            )

    def _on_error(self, obj: dict) -> None:
        try:
            msg = bj.decode_message(obj)
        except bj.BrokerJSONError:
            self.stats.unexpected += 1
            return
        self.stats.zeek_errors[msg.code] += 1
        self._warn(
            f"zeek-{msg.code}",
            "Zeek rejected a message: %s: %s (%d so far)",
            msg.code,
            msg.context,
            self.stats.zeek_errors[msg.code],
        )
