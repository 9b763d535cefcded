"""DHCP messages as the model sees them: what names the device's type, nothing that names the unit.

A DHCPv4 client says what it is in its options, not in the first bytes of its message: the
host name (option 12: ``HS110(EU)``, ``DCH-S150``), the vendor class (60: ``udhcp
1.21.1--LSDK-10.1.432``), the parameter request list (55) and the order of the options
themselves, the classic DHCP fingerprint. They start at byte 240 of the message, past any
payload prefix a sensor keeps for other packets, so sensors keep the first
:data:`~iotcls.schema.DHCP_PAYLOAD_BYTES` of a DHCPv4 payload and every record builder (the pcap
reader, the bridge's decoders) stores the *view* below in the record's payload slot instead of
the raw prefix. On the IoT Sentinel captures this is what tells same-vendor siblings apart
(docs/model-card.md): TP-Link HS100 from HS110, the D-Link sensor family from each other.

The view, at most the table's payload width:

====================== ==============================================================
bytes                  content
====================== ==============================================================
0-3                    op with its high bit set (a BOOTP op is 1 or 2: the bit marks a
                       view, so a view passed through a record builder again stays as
                       it is), htype, hlen, hops
4-6                    the client hardware address's vendor OUI (BOOTP bytes 28-30)
then                   the option codes in wire order, then 255
then                   ``code, length, value`` of the options in :data:`VALUE_OPTIONS`
                       that are present, in that order
====================== ==============================================================

What names one unit is left out or zeroed: the transaction id, the four addresses, the
NIC half of the hardware address (none of them is copied), option values outside
:data:`VALUE_OPTIONS` (requested and server addresses, lease times: only their codes
remain), the client identifier past its type byte and OUI, and in host names and FQDNs every
run of six or more hex digits (``ESP_07AEFB`` -> ``ESP_000000``: MAC-derived names). A model
that sees unit identity learns a lookup of the physical units, which does not carry to a
second unit of the same type (docs/model-card.md). A message too short to reach its options
(a sensor that kept fewer bytes) gives the first two parts only.
"""

from __future__ import annotations

import re

import numpy as np

from .schema import PROTO_UDP

DHCP_PORTS = (67, 68)
MAGIC = b"\x63\x82\x53\x63"
OPTIONS_AT = 240
# options whose value describes the client's software or asks for something; in this order
VALUE_OPTIONS = (53, 12, 60, 55, 57, 81, 77, 93, 94, 97, 124, 125, 145)
NAME_OPTIONS = (12, 81)  # host name, client FQDN
CLIENT_ID = 61
VIEW_MARK = 0x80
_HEX_RUN = re.compile(rb"[0-9A-Fa-f]{6,}")


def is_dhcp(
    proto: np.ndarray, port_a: np.ndarray, port_b: np.ndarray, ports: tuple[int, int] = DHCP_PORTS
) -> np.ndarray:
    """Which records (or packets) are DHCPv4: UDP with either port 67 or 68 (``ports``:
    another pair, such as DHCPv6's)."""
    lo, hi = ports
    return (proto == PROTO_UDP) & (
        (port_a == lo) | (port_a == hi) | (port_b == lo) | (port_b == hi)
    )


def _unit_free(code: int, value: bytes) -> bytes:
    if code in NAME_OPTIONS:
        return _HEX_RUN.sub(lambda m: b"0" * len(m.group()), value)
    if code == CLIENT_ID:  # type byte, then (usually) the MAC: keep its OUI
        return value[:4] + bytes(max(0, len(value) - 4))
    return value


def dhcp_view(raw: bytes, width: int) -> bytes:
    """The view of one DHCPv4 payload (see the module docstring), at most ``width`` bytes."""
    if not raw or raw[0] & VIEW_MARK:  # nothing, or a view already
        return raw[:width]
    out = bytearray((raw[0] | VIEW_MARK,)) + raw[1:4] + raw[28:31]
    if len(raw) > OPTIONS_AT and raw[OPTIONS_AT - 4 : OPTIONS_AT] == MAGIC:
        opts, i, values = raw[OPTIONS_AT:], 0, {}
        while i < len(opts) and opts[i] != 255:
            code = opts[i]
            if code == 0:  # pad
                i += 1
                continue
            if i + 1 >= len(opts):
                break
            value = opts[i + 2 : i + 2 + opts[i + 1]]
            out.append(code)
            if code in VALUE_OPTIONS and code not in values:
                values[code] = _unit_free(code, value)
            i += 2 + opts[i + 1]
        out.append(255)
        for code in VALUE_OPTIONS:
            if code in values:
                out += bytes((code, len(values[code]))) + values[code]
    return bytes(out[:width])


def put_views(
    payload: np.ndarray,
    payload_len: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    raws: list[bytes],
) -> None:
    """Store the views of DHCP payloads ``raws`` in a table's slots ``(rows, cols)``.

    DHCP packets are a few per device and hour, so a Python loop over them costs nothing
    next to the vectorised rest of the builders that call this."""
    width = payload.shape[2]
    for r, c, raw in zip(rows.tolist(), cols.tolist(), raws):
        v = dhcp_view(raw, width)
        payload[r, c] = 0
        payload[r, c, : len(v)] = np.frombuffer(v, np.uint8)
        payload_len[r, c] = len(v)


IDENTITY_OPTIONS = ((12, "host"), (60, "vendor"), (55, "params"))


def client_options(view: bytes) -> dict[int, bytes] | None:
    """The option values a client's message keeps in its view (:data:`VALUE_OPTIONS`, code
    -> value), or None for a server's message or what is no view. A value the view's width
    cut short is left out."""
    if len(view) < 8 or view[0] != 1 | VIEW_MARK:
        return None
    i = view.find(255, 7) + 1
    if i == 0:
        return None
    values = {}
    while i + 1 < len(view):
        code, n = view[i], view[i + 1]
        if i + 2 + n <= len(view):
            values[code] = view[i + 2 : i + 2 + n]
        i += 2 + n
    return values


def identity_of(view: bytes) -> str | None:
    """A client's DHCP identity from its view: host name, vendor class and parameter request
    list, what a device repeats in every message (discover, request, renewal). None for a
    server's message, or one that carries none of them.

    An option whose value the view's width cut short is left out, so a cut never makes a
    false identity (a request, with more option codes in front, may then lose its list)."""
    values = client_options(view)
    if values is None:
        return None

    def text(code: int) -> str:  # the list as hex, names as text
        v = values[code]
        return v.hex() if code == 55 else v.decode("ascii", "backslashreplace")

    parts = [f"{name}={text(code)}" for code, name in IDENTITY_OPTIONS if code in values]
    return " ".join(parts) or None
