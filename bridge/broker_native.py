"""Optional second transport: Zeek's native Broker protocol, through Broker's Python bindings.

Use it only where ``import broker`` works (Zeek's own bindings; they are not on PyPI) and the
Zeek node runs the Broker cluster backend and accepts Broker peers (zeekctl nodes do; a
standalone Zeek needs ``Broker::listen()``). It carries the same ``IoTClass`` events as the
WebSocket API. Events are translated to and from Broker's JSON form at the edge, so the
:class:`~iotcls.bridge.core.Bridge` is the same for both transports: incoming events reach
``on_message`` as the JSON objects the WebSocket client would deliver, and ``send`` takes the
JSON frames the bridge produces.

The bindings map ``count`` to ``broker.Count``, ``integer`` to ``int``, vectors to tuples,
timestamps to ``datetime`` and timespans to ``timedelta`` (microseconds), ports to
``broker.Port``; :func:`to_codec` and :func:`to_native` convert between those and the codec's
types. This module could not be exercised against real bindings where it was written.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from . import broker_json as bj

log = logging.getLogger("iotcls.bridge.native")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _bindings():
    try:
        import broker  # Zeek's pybroker
    except ImportError:
        return None
    return broker if hasattr(broker, "Endpoint") and hasattr(broker, "zeek") else None


def available() -> bool:
    """Whether Zeek's Broker bindings can be imported here."""
    return _bindings() is not None


def to_codec(v: Any, broker: Any) -> Any:
    """A value from the bindings to the codec's Python types."""
    if v is None or isinstance(v, (bool, float, str)):
        return v
    if isinstance(v, broker.Count):
        return bj.Count(v.value)
    if isinstance(v, int):
        return bj.Integer(v)
    if isinstance(
        v,
        (
            ipaddress.IPv4Address,
            ipaddress.IPv6Address,
            ipaddress.IPv4Network,
            ipaddress.IPv6Network,
        ),
    ):
        return v
    if isinstance(v, broker.Port):
        names = {broker.Port.TCP: "tcp", broker.Port.UDP: "udp", broker.Port.ICMP: "icmp"}
        return bj.Port(v.number(), names.get(v.type(), "?"))
    if isinstance(v, dt.datetime):
        t = v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)
        return bj.Timestamp((t - _EPOCH) // dt.timedelta(microseconds=1) * 1000)
    if isinstance(v, dt.timedelta):
        return bj.Timespan(v // dt.timedelta(microseconds=1) * 1000)
    if isinstance(v, broker.Enum):
        return bj.Enum(v.name)
    if isinstance(v, (tuple, list)):
        return [to_codec(x, broker) for x in v]
    if isinstance(v, (set, frozenset)):
        return frozenset(bj._hashable(to_codec(x, broker)) for x in v)
    if isinstance(v, dict):
        return {bj._hashable(to_codec(k, broker)): to_codec(x, broker) for k, x in v.items()}
    raise bj.BrokerJSONError(f"no codec type for a {type(v).__name__} from Broker")


def to_native(v: Any, broker: Any) -> Any:
    """A codec value to what the bindings expect."""
    if isinstance(v, bj.Count):
        return broker.Count(int(v))
    if isinstance(v, bj.Integer):
        return int(v)
    if isinstance(v, bool) or v is None or isinstance(v, (float, str)):
        return v
    if isinstance(v, int):
        return broker.Count(v) if v >= 0 else v
    if isinstance(v, bj.Port):
        protos = {"tcp": broker.Port.TCP, "udp": broker.Port.UDP, "icmp": broker.Port.ICMP}
        return broker.Port(v.number, protos.get(v.proto, broker.Port.Unknown))
    if isinstance(v, bj.Timestamp):
        return _EPOCH + dt.timedelta(microseconds=v.ns // 1000)
    if isinstance(v, bj.Timespan):
        return dt.timedelta(microseconds=v.ns // 1000)
    if isinstance(v, bj.Enum):
        return broker.Enum(str(v))
    if isinstance(v, (list, tuple)):
        return tuple(to_native(x, broker) for x in v)
    if isinstance(v, (set, frozenset)):
        return {to_native(x, broker) for x in v}
    if isinstance(v, dict):
        return {to_native(k, broker): to_native(x, broker) for k, x in v.items()}
    return v  # addresses and subnets pass as they are


class NativeBrokerClient:
    """Peers with a Zeek node over Broker and feeds a Bridge like the WebSocket client does."""

    def __init__(
        self,
        host: str,
        port: int,
        topics: list[str],
        *,
        on_message: Callable[[Any], Any],
        on_connect: Callable[[bj.Ack], Any] | None = None,
        retry_s: float = 1.0,
        poll_s: float = 0.05,
    ):
        self.broker = _bindings()
        if self.broker is None:
            raise RuntimeError(
                "Zeek's Broker Python bindings are not importable here "
                "(import broker); use the WebSocket transport"
            )
        self.host, self.port, self.topics = host, port, list(topics)
        self.on_message, self.on_connect = on_message, on_connect
        self.retry_s, self.poll_s = retry_s, poll_s
        self._ep = None
        self._stop = asyncio.Event()
        self.errors = 0

    async def send(self, frame: bytes) -> bool:
        """Publish one frame produced by the bridge (a Broker JSON data message)."""
        msg = bj.decode_message(bj.parse_frame(frame)[0])
        ev = bj.decode_event(msg.data) if isinstance(msg, bj.DataMessage) else None
        if ev is None or self._ep is None:
            return False
        b = self.broker
        self._ep.publish(msg.topic, b.zeek.Event(ev.name, *[to_native(a, b) for a in ev.args]))
        return True

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        b = self.broker
        with b.Endpoint() as ep, ep.make_subscriber(self.topics) as sub:
            ep.peer_nosync(self.host, self.port, self.retry_s)
            self._ep = ep
            if self.on_connect is not None:
                r = self.on_connect(bj.Ack(f"broker:{self.host}:{self.port}", "native"))
                if asyncio.iscoroutine(r):
                    await r
            while not self._stop.is_set():
                for topic, data in sub.poll():
                    try:
                        ev = b.zeek.Event(data)
                        args = [to_codec(a, b) for a in ev.args()]
                        obj = {
                            "type": "data-message",
                            "topic": topic,
                            **bj.encode(bj.encode_event(ev.name(), args)),
                        }
                        r = self.on_message(obj)
                        if asyncio.iscoroutine(r):
                            await r
                    except Exception as e:  # never let one message end the session
                        self.errors += 1
                        log.warning("skipped a Broker message on %s: %s", topic, e)
                await asyncio.sleep(self.poll_s)
            self._ep = None
