"""DNS and mDNS as a device's self-description: the names it asks for and announces.

A device's firmware resolves its vendor's servers (``api.dch.dlink.com``,
``bridge.meethue.com``, ``devs.tplinkcloud.com``) at boot and again whenever the answer's TTL
runs out, whether or not the sensor saw the device join. Where the servers' addresses move
between networks and years, their names mostly do not. Trust rule 9
(:mod:`iotcls.trust.dns_names`) and the inventory read them from the query's first payload
bytes, which every sensor keeps.

DNS names are compared by *registered domain* (the public suffix list's ICANN section, one level
below the public suffix: ``dch.dlink.com`` -> ``dlink.com``, ``ntp.sjtu.edu.cn`` ->
``sjtu.edu.cn``): hosts come and go inside a vendor's domain, the domain stays. Names under no
public suffix (``gw``, ``printer.local``, a search-domain suffix appended by the resolver)
name nothing outside the network and are left out.

On the local link a device announces itself in multicast DNS (UDP 5353): its host name
(``DCS-930LB1_1C7185.local``, ``Lightify-017b5f6b.local``) and services
(``Philips hue - 2476FF._hap._tcp.local``, ``_dhnap._tcp.local``), again and again. The first
name of each mDNS message it sends (question or answer, at byte 12) is kept, lower case,
with every MAC address and every run of four or more hex digits that holds a digit replaced
by ``0`` (``dcs-930lb1_0.local``): as in DHCP host names (:mod:`iotcls.dhcp`), that run
names the unit, the rest its type. Reverse lookups (``.arpa``) name the network, not the device, and are
left out. mDNS names keep their ``.local`` ending, which no registered domain has, so the two
kinds stay apart (:func:`is_mdns_name`).
"""

from __future__ import annotations

import re
from functools import cache, lru_cache

from publicsuffixlist import PublicSuffixList

DNS_PORT = 53
MDNS_PORT = 5353
MDNS_SUFFIX = ".local"
_UNIT_RUN = re.compile(r"(?:[0-9a-f]{2}[:-]){5}[0-9a-f]{2}|[0-9a-f]{4,}")  # a MAC, a hex run


def query_name(payload: bytes) -> str | None:
    """The name a DNS query asks for, from the first bytes of its UDP payload; None when
    the bytes hold no complete name (a sensor keeps only the first payload bytes)."""
    if len(payload) < 13 or payload[2] & 0x80:  # too short, or a response
        return None
    return first_name(payload)


def first_name(payload: bytes) -> str | None:
    """The name at byte 12 of a DNS message (a query's question, an announcement's first
    answer), lower case; None when the bytes hold no complete, printable one."""
    i, labels = 12, []
    while i < len(payload):
        n = payload[i]
        if n == 0:
            name = ".".join(labels)
            return name.lower() if name and name.isprintable() else None
        if n > 63 or i + 1 + n > len(payload):
            return None
        labels.append(payload[i + 1 : i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    return None


@cache
def _suffixes() -> PublicSuffixList:
    """The list, parsed once per process (about 50 ms); read-only afterwards."""
    return PublicSuffixList(only_icann=True, accept_unknown=False)


@lru_cache(maxsize=4096)  # names come from the wire: bounded
def registered_domain(name: str) -> str | None:
    """``name``'s registered domain (``a.b.example.co.uk`` -> ``example.co.uk``), or None when
    it is a public suffix itself or under none."""
    try:
        return _suffixes().privatesuffix(name.lower().rstrip("."))
    except (ValueError, UnicodeError):  # malformed labels on the wire
        return None


def query_domain(payload: bytes) -> str | None:
    """The registered domain of the name a DNS query asks for, or None."""
    name = query_name(payload)
    return registered_domain(name) if name else None


def mdns_name(payload: bytes) -> str | None:
    """The first name of an mDNS message a device sent, with its unit's hex runs blanked
    (module docstring); None for reverse lookups and for bytes that hold no complete name."""
    name = first_name(payload) if len(payload) >= 13 else None
    if not name or name.endswith(".arpa"):
        return None
    name = _UNIT_RUN.sub(lambda m: "0" if any(c.isdigit() for c in m[0]) else m[0], name)
    return name if name.endswith(MDNS_SUFFIX) else name + MDNS_SUFFIX


def is_mdns_name(name: str) -> bool:
    return name.endswith(MDNS_SUFFIX)
