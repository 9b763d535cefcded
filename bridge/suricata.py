"""The Suricata sensor's side of ``iotcls serve``: flow records in over a Unix datagram socket,
labels out as EVE JSON lines beside ``eve.json``.

The Lua output script (``suricata/iotcls.lua``) sends one JSON object per finished flow
window to a Unix datagram socket that this module binds. Datagrams suit both sides: the
script sends with ``MSG_DONTWAIT``, so Suricata never waits for the bridge (a record the
bridge cannot take, because it is not running or its queue is full, is dropped and counted
by the script), and each record arrives whole or not at all. A thread reads the socket, so
that the kernel queue (``net.unix.max_dgram_qlen`` datagrams) is emptied while the event loop
assembles matrices.

Records then take exactly the Zeek path's road: :class:`SuricataBridge` is the serve bridge
(matrix assembly with the pcap path's code, the shared dispatcher and scorer pool, the log
policy); only the label's form differs: an EVE event (``event_type: iot_class``) with
Suricata's ``flow_id``, the flow's addresses as EVE names them, ``community_id`` when
enabled, and the ``iot_class.log`` label fields (:mod:`iotcls.logschema`) under
``iot_class``.

A datagram that is not a record is refused with one log line (then one line per
``_REJECT_LOG_S`` seconds with the count) and counted in
``iotcls_messages_rejected_total{socket="suricata"}``; the service goes on.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import logging
import math
import os
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from iotcls.config import SuricataConfig
from iotcls.logschema import LogEntry
from iotcls.schema import PROTO_ICMP, PROTO_ICMP6, PROTO_TCP, PROTO_UDP, FlowRecord

from . import records as rc

log = logging.getLogger("iotcls.suricata")

RECORD_VERSION = 1  # the "v" of the script's datagrams
EVENT_TYPE = "iot_class"
MAX_DATAGRAM = 65536
_REJECT_LOG_S = 10.0
# the label's connection fields are EVE's own (timestamp, flow_id, src/dest); the rest of
# the iot_class.log columns go under "iot_class"
_ENVELOPE = ("ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto")
_EVE_PROTO = {PROTO_TCP: "TCP", PROTO_UDP: "UDP", PROTO_ICMP: "ICMP", PROTO_ICMP6: "IPv6-ICMP",
              2: "IGMP", 132: "SCTP"}  # fmt: skip


class DatagramError(ValueError):
    """A datagram that is not a flow record of the script; the message says why."""


# --------------------------------------------------------------------------------------------
# records in


def _field(d: dict, name: str, kind: type | tuple[type, ...]) -> Any:
    v = d.get(name)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise DatagramError(f"field {name!r} missing or not {getattr(kind, '__name__', kind)}")
    return v


def _ints(d: dict, name: str) -> list[int]:
    v = _field(d, name, list)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise DatagramError(f"field {name!r} must hold integers")
    return v


def parse_datagram(data: bytes) -> FlowRecord:
    """The flow record in one line of a datagram of the script (a datagram holds one or
    more records, one JSON object a line); DatagramError says what is wrong."""
    try:
        d = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise DatagramError("not JSON") from None
    if not isinstance(d, dict):
        raise DatagramError("not a JSON object")
    if d.get("v") != RECORD_VERSION:
        raise DatagramError(f"record version {d.get('v')!r}, this bridge reads {RECORD_VERSION}")
    ips = []
    for name in ("device_ip", "remote_ip"):
        try:
            ips.append(str(ipaddress.ip_address(_field(d, name, str))))
        except ValueError:
            raise DatagramError(f"field {name!r} is not an IP address") from None
    start, last = (float(_field(d, k, (int, float))) for k in ("start", "last"))
    if not (math.isfinite(start) and math.isfinite(last)) or last < start:
        raise DatagramError("start and last are not times in order")
    offsets = _ints(d, "offsets_us")
    try:
        payloads = [bytes.fromhex(x) for x in _field(d, "payloads", list)]
    except (TypeError, ValueError):
        raise DatagramError("field 'payloads' must hold hex strings") from None
    flow_id = _field(d, "flow_id", int)
    try:
        return FlowRecord(
            device_mac="", device_ip=ips[0], device_port=_field(d, "device_port", int),
            remote_ip=ips[1], remote_port=_field(d, "remote_port", int),
            proto=_field(d, "proto", int), start=start, last=last,
            total_bytes=_field(d, "total_bytes", int),
            total_packets=_field(d, "total_packets", int),
            offsets=[x / 1e6 for x in offsets], sizes=_ints(d, "sizes"),
            directions=_ints(d, "directions"), payloads=payloads, uid=str(flow_id),
            device_is_orig=_field(d, "device_is_orig", bool),
        )  # fmt: skip
    except ValueError as e:  # lengths differ
        raise DatagramError(str(e)) from None


# --------------------------------------------------------------------------------------------
# labels out


_ICMP4_PEER = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 10: 9, 9: 10, 17: 18, 18: 17}
_ICMP6_PEER = {128: 129, 129: 128, 133: 134, 134: 133, 135: 136, 136: 135, 130: 131,
               131: 130, 139: 140, 140: 139, 144: 145, 145: 144}  # fmt: skip


def community_id(src: str, sport: int, dst: str, dport: int, proto: int, seed: int = 0) -> str:
    """Community ID v1 of a connection (originator first), as Suricata's EVE writes it.

    For ICMP the ports are Zeek's (type, counterpart type or code), which is what the
    Community ID's port equivalents are."""
    a, b = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    one_way = False
    if proto in (PROTO_ICMP, PROTO_ICMP6):
        peers = _ICMP4_PEER if proto == PROTO_ICMP else _ICMP6_PEER
        one_way = sport not in peers
    if not one_way and (a, sport) > (b, dport):
        a, b, sport, dport = b, a, dport, sport
    data = struct.pack("!H", seed) + a + b + struct.pack("!BB", proto, 0)
    if proto in (PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMP6, 132):
        data += struct.pack("!HH", sport, dport)
    return "1:" + base64.b64encode(hashlib.sha1(data).digest()).decode()


def eve_timestamp(t: float) -> str:
    """EVE's timestamp form (here always UTC)."""
    sec = math.floor(t)
    usec = min(round((t - sec) * 1e6), 999_999)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{usec:06d}+0000"


def eve_label(rec: FlowRecord, verdict: Any, cid_seed: int | None = None) -> dict:
    """The EVE event of record *rec* labelled *verdict* (``cid_seed`` None: no
    community_id)."""
    e: LogEntry = rc.log_entry(rec, verdict)
    src, sport, dst, dport = rec.conn_id()
    out: dict[str, Any] = {"timestamp": eve_timestamp(rec.start)}
    if rec.uid.isdigit():
        out["flow_id"] = int(rec.uid)
    out.update(event_type=EVENT_TYPE, src_ip=src, src_port=sport, dest_ip=dst, dest_port=dport,
               proto=_EVE_PROTO.get(rec.proto, str(rec.proto)))  # fmt: skip
    if cid_seed is not None:
        out["community_id"] = community_id(src, sport, dst, dport, rec.proto, cid_seed)
    out[EVENT_TYPE] = {k: v for k, v in e.to_json_dict().items() if k not in _ENVELOPE}
    return out


class EveWriter:
    """Appends EVE lines to a file; a batch's lines in one write, flushed at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[bytes] | None = open(self.path, "ab")
        self.lines = 0

    async def write_lines(self, lines: list[bytes]) -> None:
        if self._f is None or not lines:
            return
        self._f.write(b"".join(lines))
        self._f.flush()
        self.lines += len(lines)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# --------------------------------------------------------------------------------------------
# the socket


@dataclass
class IntakeStats:
    datagrams: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count


class DatagramReader:
    """Binds the Unix datagram socket and reads it in a thread; ``deliver(list[bytes])`` is
    called in the event loop with the datagrams read since the last call."""

    def __init__(self, path: str | Path, deliver, loop: asyncio.AbstractEventLoop,
                 rcvbuf: int = 8 << 20):  # fmt: skip
        self.path = Path(path)
        self.deliver, self.loop = deliver, loop
        self._pending: list[bytes] = []
        self._lock = threading.Lock()
        self._scheduled = False
        self._stop = threading.Event()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)  # a stale socket of an earlier run
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.bind(str(self.path))
        except OSError as e:
            s.close()
            raise OSError(f"cannot bind the Suricata socket {self.path}: {e.strerror or e}") from None
        os.chmod(self.path, 0o660)  # Suricata's user must share the bridge's group
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(0.2)
        self.sock = s
        self._thread = threading.Thread(target=self._run, name="suricata-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(MAX_DATAGRAM)
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            with self._lock:
                self._pending.append(data)
                if self._scheduled:
                    continue
                self._scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._hand_over)
            except RuntimeError:  # the loop is closed
                return

    def _hand_over(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
            self._scheduled = False
        if batch:
            self.deliver(batch)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# the bridge


def _serve_bridge():
    from .serving import ServeBridge  # serving imports this module for serve

    return ServeBridge


class SuricataBridge(_serve_bridge()):  # type: ignore[misc]
    """The serve bridge for Suricata's records: the same decoding-free intake (records
    arrive parsed), matrix assembly, dispatcher and log policy as for Zeek; labels become
    EVE lines."""

    def __init__(self, *args: Any, community_id_seed: int | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.community_id_seed = community_id_seed
        self.intake = IntakeStats()
        self._reject_logged = 0.0
        self._reject_unlogged = 0

    def label_frame(self, rec: FlowRecord, verdict: Any) -> bytes:
        line = json.dumps(eve_label(rec, verdict, self.community_id_seed),
                          separators=(",", ":"))  # fmt: skip
        return line.encode() + b"\n"

    def take(self, datagrams: list[bytes]) -> None:
        """Datagrams from the socket: records go to the bridge, the rest are refused."""
        for data in datagrams:
            self.intake.datagrams += 1
            for line in data.split(b"\n"):
                try:
                    rec = parse_datagram(line)
                except DatagramError as e:
                    self._reject(str(e), line)
                    continue
                self._add(rec)

    def _reject(self, why: str, data: bytes) -> None:
        kind = "malformed"
        self.intake.rejected[kind] = self.intake.rejected.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._reject_logged < _REJECT_LOG_S:
            self._reject_unlogged += 1
            return
        more = f" ({self._reject_unlogged} more since the last)" if self._reject_unlogged else ""
        log.warning("rejected a datagram on the Suricata socket: %s: %r%s", why, data[:60], more)
        self._reject_logged, self._reject_unlogged = now, 0


@dataclass
class SuricataSide:
    """What ``iotcls serve`` runs for Suricata: the bridge, its socket and its EVE file."""

    cfg: SuricataConfig
    bridge: SuricataBridge
    reader: DatagramReader
    eve: EveWriter
    task: asyncio.Task

    @classmethod
    async def start(cls, cfg: SuricataConfig, layout, scorer, metrics, *, batch_size: int,
                    max_delay_s: float, max_devices: int, max_live_records: int) -> "SuricataSide":  # fmt: skip
        eve = EveWriter(cfg.eve_log)
        bridge = SuricataBridge(
            layout, scorer, None, metrics=metrics, name="iotcls-serve-suricata",
            batch_size=batch_size, max_delay_s=max_delay_s, max_devices=max_devices,
            max_live_records=max_live_records, send_many=eve.write_lines, offline=False,
            community_id_seed=cfg.community_id_seed if cfg.community_id else None,
        )  # fmt: skip
        try:
            reader = DatagramReader(cfg.socket, bridge.take, asyncio.get_running_loop())
        except OSError:
            eve.close()
            raise
        task = asyncio.create_task(bridge.run(), name="suricata-bridge")
        return cls(cfg, bridge, reader, eve, task)

    def rejections(self) -> dict[tuple[str, str], int]:
        return {("suricata", k): v for k, v in self.bridge.intake.rejected.items()}

    def pause(self) -> None:
        self.bridge.pause()

    async def close(self) -> None:
        self.reader.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.eve.close()
