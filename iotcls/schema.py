"""The flow record: the one unit that every sensor of iotcls emits.

Both sensors produce it: the pcap reader (:mod:`iotcls.flows`) and the Zeek scripts
(``zeek-scripts/iotcls``, decoded by :mod:`iotcls.bridge`). Training, evaluation and
scoring consume it only through :mod:`iotcls.layout`. A field added here must be added to
the Zeek record ``IoTClass::FlowRecord`` as well; ``SCHEMA_VERSION`` changes with it.

Definition (schema version 2)
-----------------------------
* **Key, device-side.** ``(device_ip, device_port, remote_ip, remote_port, proto)``, plus
  ``device_mac`` when the device is on the sensor's L2 segment. The *device* is the endpoint
  whose MAC is listed (``--devices``), otherwise the endpoint inside the local networks
  (``--local-nets``). When both endpoints are devices, the traffic yields two mirrored
  records, one per device.
* **Window.** A record covers at most ``window_s`` seconds (60 by default). The first window
  of a key starts at its first packet; a packet at or after ``start + window_s`` closes the
  window and starts the next one *at that packet*. A window also ends when the connection
  ends (Zeek) or the capture ends.
* **Metadata.** ``start`` (window start, epoch seconds), ``last`` (time of the window's last
  packet), ``remote_ip`` (raw: private addresses are zeroed by the matrix layout, not here,
  so the log can still name the peer), ``remote_port``, ``device_port``, ``proto`` (IP
  protocol number), ``total_bytes`` (sum of IP lengths), ``total_packets``.
* **First packets.** For the first ``packets`` packets of the window (10 by default):
  ``offsets`` (seconds since ``start``), ``sizes`` (IP length: IPv4 total length, IPv6
  payload length + 40, as Zeek reports it), ``directions`` (1 = device to remote,
  0 = remote to device) and ``payloads`` (the first ``payload_bytes`` bytes of the transport
  payload: TCP data, UDP data; for other protocols the bytes after the IP header, except ICMP
  whose payload is empty as in Zeek's view). DHCPv4 packets (UDP, port 67 or 68) keep their
  first ``DHCP_PAYLOAD_BYTES`` instead: their options, where a client names its type, start
  at byte 240 (:mod:`iotcls.dhcp`; the record builders turn them into a unit-free view).
* **Ports.** TCP/UDP ports as on the wire; for ICMP, as Zeek does: the device-side "port" of
  the originator is the ICMP type and the responder's is the counterpart type or the code;
  other protocols use port 0.
* **Early record.** Every sensor may publish, before the final record of a window, one early
  record of it (:func:`early_record`): the window as it stood at the first moment when either
  its first ``packets`` packets were in, or ``EARLY_IDLE_S`` passed with no packet after the
  latest. It is a prefix of the final record (the same key and start; the packets and totals
  up to that moment), so a device gets a label seconds after its first packet instead of at
  the window's end; the final record follows as before and its label wins.
* **Connection reference.** ``uid`` (Zeek's connection uid, or a stable synthetic one from
  the pcap reader) and ``device_is_orig`` (whether the device originated the connection) so
  that a label can be logged with Zeek's ``id`` fields.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

SCHEMA_VERSION = 2  # 2: DHCPv4 payloads kept to DHCP_PAYLOAD_BYTES

DEFAULT_WINDOW_S = 60.0
DEFAULT_PACKETS = 10
DEFAULT_PAYLOAD_BYTES = 64
DHCP_PAYLOAD_BYTES = 548  # a whole DHCP message of a 576-byte IP datagram
EARLY_IDLE_S = 0.5  # an early record after this long without a packet (see early_record)

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMP6 = 58
PROTO_NAMES = {PROTO_ICMP: "icmp", PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP6: "icmp"}

DIR_TO_REMOTE = 1
DIR_TO_DEVICE = 0

# Remote addresses in these networks carry no information across sites and are zeroed in the
# matrix. The Zeek scripts carry no copy: zeroing happens in Python, on both paths.
PRIVATE_NETS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "::/128",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
)


def is_private(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr in net for net in PRIVATE_NETS if net.version == addr.version)


def proto_name(proto: int) -> str:
    """Zeek's ``transport_proto`` spelling of an IP protocol number."""
    return PROTO_NAMES.get(proto, "unknown_transport")


@dataclass(slots=True)
class FlowRecord:
    device_mac: str
    device_ip: str
    device_port: int
    remote_ip: str
    remote_port: int
    proto: int
    start: float
    last: float
    total_bytes: int
    total_packets: int
    offsets: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    directions: list[int] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    uid: str = ""
    device_is_orig: bool = True

    def __post_init__(self) -> None:
        n = len(self.offsets)
        if not (len(self.sizes) == len(self.directions) == len(self.payloads) == n):
            raise ValueError(
                f"flow record {self.uid or self.key()}: offsets, sizes, directions and payloads "
                f"differ in length ({n}, {len(self.sizes)}, {len(self.directions)}, "
                f"{len(self.payloads)})"
            )

    def key(self) -> tuple[str, int, str, int, int]:
        return (self.device_ip, self.device_port, self.remote_ip, self.remote_port, self.proto)

    @property
    def device(self) -> str:
        """The device identity used for history: its MAC where known, else its IP."""
        return self.device_mac or self.device_ip

    def conn_id(self) -> tuple[str, int, str, int]:
        """Zeek's ``conn_id`` (orig_h, orig_p, resp_h, resp_p) of the connection."""
        if self.device_is_orig:
            return (self.device_ip, self.device_port, self.remote_ip, self.remote_port)
        return (self.remote_ip, self.remote_port, self.device_ip, self.device_port)


def early_cut(
    offsets: list[float],
    total_packets: int,
    packets: int = DEFAULT_PACKETS,
    idle_s: float = EARLY_IDLE_S,
) -> tuple[int, float] | None:
    """(packets in the early record, its time as an offset from the window start) of a window
    whose first packets are at ``offsets`` (of ``total_packets``), or None when it has none.

    The rule every sensor follows: the first moment when ``packets`` packets are in, or
    ``idle_s`` has passed since the latest packet. Both are known from the recorded packets
    alone (a gap after the ``packets``-th packet is too late to matter), which is why the pcap
    reader can derive early records from final ones and a live sensor can publish them as they
    happen, and both give the same record.
    """
    n = min(len(offsets), packets)
    for i in range(n - 1):
        if offsets[i + 1] - offsets[i] >= idle_s:
            return i + 1, offsets[i] + idle_s
    if n == packets:
        return n, offsets[n - 1]
    if n and total_packets == n:
        return n, offsets[n - 1] + idle_s  # all its packets, idle since: unless the window ended
    return None


def early_record(
    rec: FlowRecord,
    packets: int = DEFAULT_PACKETS,
    idle_s: float = EARLY_IDLE_S,
    window_s: float = DEFAULT_WINDOW_S,
) -> FlowRecord | None:
    """The early record of the window ``rec`` is the final record of (see the module
    docstring), or None when there is none: the final record is due first (at the window's
    end, ``start + window_s``) or the early one would hold all the final one does."""
    cut = early_cut(rec.offsets, rec.total_packets, packets, idle_s)
    if cut is None:
        return None
    k, at = cut
    if at >= window_s:
        return None
    return FlowRecord(
        device_mac=rec.device_mac,
        device_ip=rec.device_ip,
        device_port=rec.device_port,
        remote_ip=rec.remote_ip,
        remote_port=rec.remote_port,
        proto=rec.proto,
        start=rec.start,
        last=rec.start + rec.offsets[k - 1],
        total_bytes=int(sum(rec.sizes[:k])),
        total_packets=k,
        offsets=list(rec.offsets[:k]),
        sizes=list(rec.sizes[:k]),
        directions=list(rec.directions[:k]),
        payloads=list(rec.payloads[:k]),
        uid=rec.uid,
        device_is_orig=rec.device_is_orig,
    )
