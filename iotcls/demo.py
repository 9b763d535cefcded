"""A small home network written from behaviour profiles: the capture ``iotcls demo`` classifies.

The product ships no third-party capture, so the demo writes its own. Each profile below says,
in our own words, how a kind of home device behaves: how it asks for an address (DHCP host
name, vendor class, parameter list), which names it resolves, and which sessions it keeps
(cloud TLS, MQTT, local discovery, time), with their ports, packet sizes and timing. The
network is then rendered into Ethernet frames with :mod:`iotcls.pcapgen`. Nothing is copied
from a real capture: the device makes, names and addresses are made up (MACs are locally
administered, public addresses come from the documentation ranges of RFC 5737), so the
shipped model may well call a made-up device ``untrusted``, which is the honest answer.

Deterministic for a seed: the same bytes every run.
"""

from __future__ import annotations

import heapq
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import pcapgen as g

ROUTER_MAC = "02:1c:00:00:00:01"
ROUTER_IP = "192.168.50.1"
LAN = "192.168.50.0/24"
START = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC


@dataclass(frozen=True)
class Session:
    """One kind of conversation a device keeps, repeated every ``every_s`` seconds.

    ``exchange``: the application messages in order, (direction, size of payload in bytes),
    direction 1 from the device; ``first``: the first bytes of the device's first message
    (a protocol's greeting); ``gap_s``: mean pause between messages of one exchange.
    """

    proto: str  # "tcp" or "udp"
    remote: str  # a name resolved first (when it has a dot and no digits only), or an address
    port: int
    exchange: tuple[tuple[int, int], ...]
    every_s: float
    first: bytes = b""
    gap_s: float = 0.05
    local_port: int | None = None  # fixed source port (discovery protocols); else ephemeral


@dataclass(frozen=True)
class Profile:
    """How one made-up device type behaves on the network."""

    kind: str
    hostname: str
    vendor_class: str
    params: bytes  # DHCP parameter request list
    sessions: tuple[Session, ...]


TLS_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
MQTT_CONNECT = b"\x10\x2c\x00\x04MQTT\x04\xc2\x00\x3c"
NTP_REQUEST = b"\x23" + b"\x00" * 47
SSDP_NOTIFY = b"NOTIFY * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n"
MDNS_ANNOUNCE = b"\x00\x00\x84\x00\x00\x00\x00\x03"
HTTP_GET = b"GET /api/v1/status HTTP/1.1\r\nHost: "

PROFILES: tuple[Profile, ...] = (
    Profile(
        "smart plug",
        "plug-kitchen",
        "demo-plug 2.1",
        bytes([1, 3, 6, 15, 28, 42]),
        (
            Session(
                "tcp",
                "plug.cloud.example",
                443,
                ((1, 517), (0, 1400), (1, 126), (0, 51), (1, 37), (0, 37)),
                30.0,
                TLS_HELLO,
            ),
            Session("udp", "time.demo.example", 123, ((1, 48), (0, 48)), 120.0, NTP_REQUEST),
        ),
    ),
    Profile(
        "camera",
        "cam-porch",
        "demo-cam linux 4.9",
        bytes([1, 3, 6, 12, 15, 28, 42, 121]),
        (
            Session(
                "tcp",
                "video.cam.example",
                443,
                (
                    (1, 517),
                    (0, 2800),
                    (1, 1448),
                    (1, 1448),
                    (1, 1448),
                    (1, 1448),
                    (0, 66),
                    (1, 1448),
                    (1, 900),
                ),
                10.0,
                TLS_HELLO,
                gap_s=0.01,
            ),
            Session(
                "udp", "239.255.255.250", 1900, ((1, 310),), 45.0, SSDP_NOTIFY, local_port=1900
            ),
        ),
    ),
    Profile(
        "light hub",
        "hub-lights",
        "demo-hub",
        bytes([1, 3, 6, 15, 28, 33, 121]),
        (
            Session(
                "tcp", "hub.lights.example", 80, ((1, 180), (0, 420)), 20.0, HTTP_GET, gap_s=0.12
            ),
            Session("udp", "224.0.0.251", 5353, ((1, 260),), 30.0, MDNS_ANNOUNCE, local_port=5353),
        ),
    ),
    Profile(
        "thermostat",
        "thermo-hall",
        "demo-thermo 0.9",
        bytes([1, 3, 6, 12, 15, 42]),
        (
            Session(
                "tcp",
                "mqtt.thermo.example",
                8883,
                ((1, 517), (0, 1300), (1, 60), (0, 4), (1, 88), (0, 2)),
                60.0,
                MQTT_CONNECT,
                gap_s=0.2,
            ),
            Session("udp", "time.demo.example", 123, ((1, 48), (0, 48)), 300.0, NTP_REQUEST),
        ),
    ),
    Profile(
        "speaker",
        "speaker-living",
        "demo-audio os 12",
        bytes([1, 3, 6, 15, 26, 28, 51, 58, 59, 43]),
        (
            Session(
                "tcp",
                "stream.audio.example",
                443,
                (
                    (1, 517),
                    (0, 1448),
                    (0, 1448),
                    (0, 1448),
                    (0, 1448),
                    (1, 40),
                    (0, 1448),
                    (0, 1448),
                ),
                15.0,
                TLS_HELLO,
                gap_s=0.02,
            ),
            Session("udp", "224.0.0.251", 5353, ((1, 140),), 60.0, MDNS_ANNOUNCE, local_port=5353),
        ),
    ),
)


@dataclass
class Device:
    profile: Profile
    mac: str
    ip: str
    joins_at: float


@dataclass
class DemoNetwork:
    devices: list[Device]
    duration_s: float
    names: dict[str, str] = field(default_factory=dict)  # resolved name -> address


def network(duration_s: float = 180.0, join_gap_s: float = 8.0) -> DemoNetwork:
    """One device of each profile, joining ``join_gap_s`` apart."""
    devices = [
        Device(
            p,
            f"02:1c:{i + 1:02x}:00:00:{i + 1:02x}",
            f"192.168.50.{20 + i}",
            START + 2.0 + i * join_gap_s,
        )
        for i, p in enumerate(PROFILES)
    ]
    names: dict[str, str] = {}
    for p in PROFILES:
        for s in p.sessions:
            if _is_name(s.remote) and s.remote not in names:
                names[s.remote] = f"203.0.113.{10 + len(names)}"
    return DemoNetwork(devices, duration_s, names)


def _is_name(remote: str) -> bool:
    return any(c.isalpha() for c in remote)


# --- packets ---------------------------------------------------------------------------------


def _dhcp(
    op: int,
    xid: int,
    mac: str,
    msg_type: int,
    options: list[tuple[int, bytes]],
    yiaddr: str = "0.0.0.0",
) -> bytes:
    import ipaddress

    head = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        op,
        1,
        6,
        0,
        xid,
        0,
        0,
        bytes(4),
        ipaddress.IPv4Address(yiaddr).packed,
        bytes(4),
        bytes(4),
        g.mac_bytes(mac).ljust(16, b"\x00"),
        b"",
        b"",
    )
    opts = bytes([53, 1, msg_type])
    for code, value in options:
        opts += bytes([code, len(value)]) + value
    return head + b"\x63\x82\x53\x63" + opts + b"\xff"


def _dns(ident: int, name: str, answer: str | None) -> bytes:
    import ipaddress

    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    flags, an = (0x8180, 1) if answer else (0x0100, 0)
    msg = struct.pack("!HHHHHH", ident, flags, 1, an, 0, 0) + qname + struct.pack("!HH", 1, 1)
    if answer:
        msg += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4)
        msg += ipaddress.IPv4Address(answer).packed
    return msg


class _Writer:
    """Frames of one device, with its clock and its ephemeral ports."""

    def __init__(self, dev: Device, rng: np.random.Generator):
        self.dev, self.rng = dev, rng
        self.frames: list[tuple[float, bytes]] = []
        self.next_port = 40000 + int(rng.integers(0, 5000))

    def port(self) -> int:
        self.next_port = 40000 + (self.next_port - 40000 + 1 + int(self.rng.integers(0, 7))) % 20000
        return self.next_port

    def ip(
        self,
        t: float,
        src: str,
        dst: str,
        proto: int,
        l4: bytes,
        to_device: bool,
        dst_mac: str | None = None,
    ) -> None:
        dev = self.dev.mac
        src_mac, dmac = (ROUTER_MAC, dev) if to_device else (dev, dst_mac or ROUTER_MAC)
        self.frames.append((t, g.ether(src_mac, dmac, g.ipv4(src, dst, proto, l4))))

    def dhcp(self, t: float) -> float:
        d, p = self.dev, self.dev.profile
        xid = int(self.rng.integers(1, 2**31))
        ident = [(12, p.hostname.encode()), (60, p.vendor_class.encode()), (55, p.params)]
        bcast = "ff:ff:ff:ff:ff:ff"
        for msg, reply, extra in ((1, 2, []), (3, 5, [(50, bytes(map(int, d.ip.split("."))))])):
            self.ip(
                t,
                "0.0.0.0",
                "255.255.255.255",
                17,
                g.udp(68, 67, _dhcp(1, xid, d.mac, msg, extra + ident)),
                False,
                bcast,
            )
            t += 0.004 + float(self.rng.exponential(0.01))
            server = [
                (54, bytes(map(int, ROUTER_IP.split(".")))),
                (51, struct.pack("!I", 86400)),
                (1, bytes([255, 255, 255, 0])),
                (3, bytes(map(int, ROUTER_IP.split(".")))),
            ]
            self.ip(
                t,
                ROUTER_IP,
                d.ip,
                17,
                g.udp(67, 68, _dhcp(2, xid, d.mac, reply, server, d.ip)),
                True,
            )
            t += 0.05 + float(self.rng.exponential(0.05))
        return t

    def resolve(self, t: float, name: str, address: str) -> float:
        sport, ident = self.port(), int(self.rng.integers(0, 65536))
        self.ip(t, self.dev.ip, ROUTER_IP, 17, g.udp(sport, 53, _dns(ident, name, None)), False)
        t += 0.008 + float(self.rng.exponential(0.01))
        self.ip(t, ROUTER_IP, self.dev.ip, 17, g.udp(53, sport, _dns(ident, name, address)), True)
        return t + 0.002

    def session(self, t: float, s: Session, remote: str) -> None:
        d, rng = self.dev, self.rng
        multicast = remote.startswith(("224.", "239."))
        dst_mac = None
        if multicast:
            o = [int(x) for x in remote.split(".")]
            dst_mac = f"01:00:5e:{o[1] & 0x7F:02x}:{o[2]:02x}:{o[3]:02x}"
        sport = s.local_port or self.port()
        if s.proto == "tcp":
            seq, ack = int(rng.integers(0, 2**31)), int(rng.integers(0, 2**31))
            rtt = 0.02 + float(rng.exponential(0.02))
            self.ip(t, d.ip, remote, 6, g.tcp(sport, s.port, flags=0x02, seq=seq), False)
            self.ip(
                t + rtt,
                remote,
                d.ip,
                6,
                g.tcp(s.port, sport, flags=0x12, seq=ack, ack=seq + 1),
                True,
            )
            t += rtt + 0.001
            self.ip(
                t,
                d.ip,
                remote,
                6,
                g.tcp(sport, s.port, flags=0x10, seq=seq + 1, ack=ack + 1),
                False,
            )
            seq, ack = seq + 1, ack + 1
        for k, (direction, size) in enumerate(s.exchange):
            t += 0.001 + float(rng.exponential(s.gap_s))
            size = max(1, size + int(rng.integers(-size // 20 - 1, size // 20 + 2)))
            body = s.first if k == 0 else b""
            if body == HTTP_GET:
                body += s.remote.encode() + b"\r\n\r\n"
            body = body[:size] + rng.integers(0, 256, max(0, size - len(body)), np.uint8).tobytes()
            if s.proto == "tcp":
                a, b_ = (seq, ack) if direction else (ack, seq)
                src, dst = (d.ip, remote) if direction else (remote, d.ip)
                ps, pd = (sport, s.port) if direction else (s.port, sport)
                self.ip(
                    t, src, dst, 6, g.tcp(ps, pd, body, flags=0x18, seq=a, ack=b_), not direction
                )
                if direction:
                    seq += size
                else:
                    ack += size
            elif direction:
                self.ip(t, d.ip, remote, 17, g.udp(sport, s.port, body), False, dst_mac)
            else:
                self.ip(t, remote, d.ip, 17, g.udp(s.port, sport, body), True)
        if s.proto == "tcp":
            t += 0.05
            self.ip(t, d.ip, remote, 6, g.tcp(sport, s.port, flags=0x11, seq=seq, ack=ack), False)
            self.ip(
                t + 0.02,
                remote,
                d.ip,
                6,
                g.tcp(s.port, sport, flags=0x11, seq=ack, ack=seq + 1),
                True,
            )
            self.ip(
                t + 0.021,
                d.ip,
                remote,
                6,
                g.tcp(sport, s.port, flags=0x10, seq=seq + 1, ack=ack + 1),
                False,
            )


def device_frames(net: DemoNetwork, dev: Device, seed: int) -> list[tuple[float, bytes]]:
    """The device's frames: DHCP on joining, then each session on its own schedule, a name
    looked up again before each connection to a named remote (short DNS TTLs, as devices do)."""
    rng = np.random.default_rng(seed)
    w = _Writer(dev, rng)
    t = w.dhcp(dev.joins_at)
    end = START + net.duration_s
    due = [
        (t + 0.2 + 0.3 * k + float(rng.exponential(1.0)), k)
        for k in range(len(dev.profile.sessions))
    ]
    heapq.heapify(due)
    while due:
        at, k = heapq.heappop(due)
        if at >= end:
            continue
        s = dev.profile.sessions[k]
        remote = s.remote
        if _is_name(s.remote):
            remote = net.names[s.remote]
            at = w.resolve(at, s.remote, remote)
        w.session(at, s, remote)
        heapq.heappush(due, (at + s.every_s * float(rng.uniform(0.85, 1.15)), k))
    return [(ts, f) for ts, f in w.frames if ts < end]


def write_demo_pcap(path: str | Path, duration_s: float = 180.0, seed: int = 7) -> DemoNetwork:
    """Write the demo network's capture (classic pcap, Ethernet, microseconds) to ``path``."""
    net = network(duration_s)
    frames = []
    for i, dev in enumerate(net.devices):
        frames += device_frames(net, dev, seed * 1000 + i)
    frames.sort(key=lambda x: x[0])
    g.write_pcap(path, frames)
    return net
