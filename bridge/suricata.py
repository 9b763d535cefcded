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
from . import safejson
from .serve_bridge import ServeBridge

log = logging.getLogger("iotcls.suricata")

RECORD_VERSION = 1  # the "v" of the script's datagrams
EVENT_TYPE = "iot_class"
MAX_DATAGRAM = 65536
_REJECT_LOG_S = 10.0
# the label's connection fields are EVE's own (timestamp, flow_id, src/dest); the rest of
# the iot_class.log columns go under "iot_class"
_ENVELOPE = ("ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto")
_EVE_PROTO = {
    PROTO_TCP: "TCP",
    PROTO_UDP: "UDP",
    PROTO_ICMP: "ICMP",
    PROTO_ICMP6: "IPv6-ICMP",
    2: "IGMP",
    132: "SCTP",
}


class DatagramError(ValueError):
    """A datagram line that is not a flow record of the script; the message says why and
    ``kind`` names the counter (``malformed``: not a record at all, ``version``, ``bad_field``:
    a field missing, mistyped or out of range)."""

    def __init__(self, message: str, kind: str = "bad_field"):
        super().__init__(message)
        self.kind = kind


# What a record may hold. Every field is checked here, at the edge, so that nothing out of
# range reaches the matrix code: a negative byte count made a non-finite row (log1p(-1)),
# a NaN label, and a device history that failed its next records; a start of 1e300 failed
# the label's timestamp, and with it the whole batch.
MAX_DEPTH = 4  # a record is one flat object of scalars and lists of scalars
MAX_TIME_S = float(2**33)  # window times: seconds since the epoch (until year 2242)
MAX_PACKETS = 1024  # entries in offsets_us, sizes, directions, payloads
MAX_PAYLOAD = 65535  # bytes per packet payload
MAX_COUNT = 2**63 - 1  # total_bytes, total_packets (an int64 column)
MAX_SIZE = 2**31 - 1  # one packet's length (an int32 column)
MAX_OFFSET_US = 2**53  # exact as a float


def _field(d: dict, name: str, kind: type | tuple[type, ...]) -> Any:
    v = d.get(name)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise DatagramError(f"field {name!r} missing or not {getattr(kind, '__name__', kind)}")
    return v


def _int(d: dict, name: str, lo: int, hi: int) -> int:
    v = _field(d, name, int)
    if not lo <= v <= hi:
        raise DatagramError(f"field {name!r} is {_short(v)}, not in {lo}..{hi}")
    return v


def _short(v: Any) -> str:
    """A peer's number for a message: huge integers are not printed whole."""
    if isinstance(v, int) and v.bit_length() > 64:
        return f"a {v.bit_length()}-bit integer"
    return repr(v)[:40]


def _ints(d: dict, name: str, lo: int, hi: int) -> list[int]:
    v = _field(d, name, list)
    if len(v) > MAX_PACKETS:
        raise DatagramError(f"field {name!r} has {len(v)} entries, at most {MAX_PACKETS}")
    for x in v:
        if not isinstance(x, int) or isinstance(x, bool):
            raise DatagramError(f"field {name!r} must hold integers")
        if not lo <= x <= hi:
            raise DatagramError(f"field {name!r} holds {_short(x)}, not in {lo}..{hi}")
    return v


def _time(d: dict, name: str) -> float:
    v = _field(d, name, (int, float))
    try:
        t = float(v)
    except OverflowError:
        t = math.inf
    if not (math.isfinite(t) and 0.0 <= t <= MAX_TIME_S):
        raise DatagramError(f"field {name!r} is {_short(v)}, not a time in seconds since the epoch")
    return t


def _payloads(d: dict) -> list[bytes]:
    v = _field(d, "payloads", list)
    if len(v) > MAX_PACKETS:
        raise DatagramError(f"field 'payloads' has {len(v)} entries, at most {MAX_PACKETS}")
    if not all(isinstance(x, str) and len(x) <= 2 * MAX_PAYLOAD for x in v):
        raise DatagramError(
            f"field 'payloads' must hold hex strings of at most {MAX_PAYLOAD} bytes"
        )
    try:
        return [bytes.fromhex(x) for x in v]
    except ValueError:
        raise DatagramError("field 'payloads' must hold hex strings") from None


def _address(d: dict, name: str) -> str:
    v = _field(d, name, str)
    try:
        if len(v) > 45:
            raise ValueError
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise DatagramError(f"field {name!r} is not an IP address") from None


def _document(data: bytes) -> dict:
    try:
        d = safejson.loads(data, MAX_DEPTH)
    except safejson.JSONDepthError as e:
        raise DatagramError(f"not a record: {e}", "malformed") from None
    except (ValueError, UnicodeDecodeError):
        raise DatagramError("not JSON", "malformed") from None
    if not isinstance(d, dict):
        raise DatagramError("not a JSON object", "malformed")
    if d.get("v") != RECORD_VERSION:
        raise DatagramError(
            f"record version {_short(d.get('v'))}, this bridge reads {RECORD_VERSION}", "version"
        )
    return d


def parse_datagram(data: bytes) -> FlowRecord:
    """The flow record in one line of a datagram of the script (a datagram holds one or
    more records, one JSON object a line); DatagramError says what is wrong. Every field
    is checked for type and range (see the limits above)."""
    return parse_line(data)[0]


def parse_line(data: bytes) -> tuple[FlowRecord, bool]:
    """:func:`parse_datagram`, and whether the record is an early one (``"early": true``)."""
    d = _document(data)
    early = d.get("early", False)
    if not isinstance(early, bool):
        raise DatagramError(f"early must be true or false, not {_short(early)}")
    return _record(d), early


def _record(d: dict) -> FlowRecord:
    try:
        ips = [_address(d, "device_ip"), _address(d, "remote_ip")]
        start, last = _time(d, "start"), _time(d, "last")
        if last < start:
            raise DatagramError("start and last are not times in order")
        offsets = _ints(d, "offsets_us", 0, MAX_OFFSET_US)
        return FlowRecord(
            device_mac="",
            device_ip=ips[0],
            device_port=_int(d, "device_port", 0, 65535),
            remote_ip=ips[1],
            remote_port=_int(d, "remote_port", 0, 65535),
            proto=_int(d, "proto", 0, 255),
            start=start,
            last=last,
            total_bytes=_int(d, "total_bytes", 0, MAX_COUNT),
            total_packets=_int(d, "total_packets", 0, MAX_COUNT),
            offsets=[x / 1e6 for x in offsets],
            sizes=_ints(d, "sizes", 0, MAX_SIZE),
            directions=_ints(d, "directions", 0, 1),
            payloads=_payloads(d),
            uid=str(_int(d, "flow_id", 0, 2**64 - 1)),
            device_is_orig=_field(d, "device_is_orig", bool),
        )
    except (ValueError, TypeError, OverflowError) as e:  # lengths differ, and the like
        if isinstance(e, DatagramError):
            raise
        raise DatagramError(str(e)[:200]) from None


def record_datagram(r: FlowRecord, flow_id: int | None = None) -> bytes:
    """One record as the script sends it (one line; tests, benchmarks, the fuzzer)."""
    return json.dumps(
        {
            "v": RECORD_VERSION,
            "flow_id": int(r.uid) if flow_id is None else flow_id,
            "device_ip": r.device_ip,
            "device_port": r.device_port,
            "remote_ip": r.remote_ip,
            "remote_port": r.remote_port,
            "proto": r.proto,
            "start": r.start,
            "last": r.last,
            "total_bytes": r.total_bytes,
            "total_packets": r.total_packets,
            "offsets_us": [round(o * 1e6) for o in r.offsets],
            "sizes": list(r.sizes),
            "directions": list(r.directions),
            "payloads": [p.hex() for p in r.payloads],
            "device_is_orig": bool(r.device_is_orig),
        },
        separators=(",", ":"),
    ).encode()


# --------------------------------------------------------------------------------------------
# labels out


_ICMP4_PEER = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 10: 9, 9: 10, 17: 18, 18: 17}
_ICMP6_PEER = {
    128: 129,
    129: 128,
    133: 134,
    134: 133,
    135: 136,
    136: 135,
    130: 131,
    131: 130,
    139: 140,
    140: 139,
    144: 145,
    145: 144,
}


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
    out.update(
        event_type=EVENT_TYPE,
        src_ip=src,
        src_port=sport,
        dest_ip=dst,
        dest_port=dport,
        proto=_EVE_PROTO.get(rec.proto, str(rec.proto)),
    )
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


class SocketInUse(OSError):
    """Another process is bound to the Suricata socket; the message names it."""


def _holders(path: Path) -> list[str]:
    """``pid (command)`` of the processes holding a Unix socket bound to *path*, as far as
    /proc lets this user see (Linux)."""
    inodes = set()
    try:
        with open("/proc/net/unix") as f:
            next(f, None)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == str(path):
                    inodes.add(f"socket:[{parts[6]}]")
    except OSError:
        return []
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")) if inodes else ():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                out.append(f"{pid} ({cmd[:80]})")
        except OSError:
            continue
    return out


def claim(path: Path) -> None:
    """Makes *path* free to bind: a stale socket file (nobody bound) is removed, a live one
    is refused with :class:`SocketInUse` naming the process; unlinking it would leave that
    process bound to a name nobody can reach (it would silently receive nothing)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return  # bind fails on it and says why
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        os.unlink(path)  # a stale socket of an earlier run
        return
    except OSError:
        return  # not ours to judge (permissions): bind says what is wrong
    finally:
        probe.close()
    who = _holders(path)
    raise SocketInUse(
        f"the Suricata socket {path} is in use by "
        + (f"process {', '.join(who)}" if who else "another process")
        + ": stop it, or give this service another suricata.socket"
    )


class DatagramReader:
    """Binds the Unix datagram socket and reads it in a thread; ``deliver(list[bytes])`` is
    called in the event loop with the datagrams read since the last call."""

    def __init__(
        self, path: str | Path, deliver, loop: asyncio.AbstractEventLoop, rcvbuf: int = 8 << 20
    ):
        self.path = Path(path)
        self.deliver, self.loop = deliver, loop
        self._pending: list[bytes] = []
        self._lock = threading.Lock()
        self._scheduled = False
        self._stop = threading.Event()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        claim(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.bind(str(self.path))
        except OSError as e:
            s.close()
            raise OSError(
                f"cannot bind the Suricata socket {self.path}: {e.strerror or e}"
            ) from None
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
            except TimeoutError:
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


class SuricataBridge(ServeBridge):
    """The serve bridge for Suricata's records: the same decoding-free intake (records
    arrive parsed), matrix assembly, dispatcher and log policy as for Zeek; labels become
    EVE lines."""

    def __init__(self, *args: Any, community_id_seed: int | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.community_id_seed = community_id_seed
        self.intake = IntakeStats()
        self._reject_logged = 0.0
        self._reject_unlogged = 0

    def label_frame(self, rec: FlowRecord, verdict: Any, early: bool = False) -> bytes:
        """One EVE line; an early record's label is marked ``"early": true`` in its
        ``iot_class`` object (count the final ones: those without it)."""
        event = eve_label(rec, verdict, self.community_id_seed)
        if early:
            event[EVENT_TYPE]["early"] = True
        return json.dumps(event, separators=(",", ":")).encode() + b"\n"

    def take(self, datagrams: list[bytes]) -> None:
        """Datagrams from the socket: records go to the bridge, the rest are refused, one
        line at a time (a bad line never costs the good ones beside it)."""
        for data in datagrams:
            self.intake.datagrams += 1
            for line in data.split(b"\n"):
                try:
                    rec, early = parse_line(line)
                except DatagramError as e:
                    self._reject(str(e), line, e.kind)
                    continue
                except Exception as e:  # a bug must cost this line, not the datagram
                    self._reject(f"{type(e).__name__}: {e}", line, "internal")
                    continue
                if early:
                    self.add_early(rec)
                else:
                    self._add(rec)

    def _reject(self, why: str, data: bytes, kind: str = "malformed") -> None:
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
    async def start(
        cls,
        cfg: SuricataConfig,
        layout,
        scorer,
        metrics,
        *,
        batch_size: int,
        max_delay_s: float,
        max_devices: int,
        max_live_records: int,
    ) -> SuricataSide:
        eve = EveWriter(cfg.eve_log)
        bridge = SuricataBridge(
            layout,
            scorer,
            None,
            metrics=metrics,
            name="iotcls-serve-suricata",
            batch_size=batch_size,
            max_delay_s=max_delay_s,
            max_devices=max_devices,
            max_live_records=max_live_records,
            send_many=eve.write_lines,
            offline=False,
            community_id_seed=cfg.community_id_seed if cfg.community_id else None,
        )
        try:
            reader = DatagramReader(cfg.socket, bridge.take, asyncio.get_running_loop())
        except OSError:
            eve.close()
            raise
        task = asyncio.create_task(bridge.run(), name="suricata-bridge")
        return cls(cfg, bridge, reader, eve, task)

    def rejections(self) -> dict[tuple[str, str], int]:
        out = {("suricata", k): v for k, v in self.bridge.intake.rejected.items()}
        st = self.bridge.stats
        for kind, n in (("bad_flow_record", st.bad_records), ("duplicate", st.duplicates)):
            if n:
                out[("suricata", kind)] = out.get(("suricata", kind), 0) + n
        return out

    def pause(self) -> None:
        self.bridge.pause()

    async def close(self) -> None:
        self.reader.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.eve.close()
