"""DNS queries as a device's self-description: the names it asks for, by who registered them.

A device's firmware resolves its vendor's servers (``api.dch.dlink.com``,
``bridge.meethue.com``, ``devs.tplinkcloud.com``) at boot and again whenever the answer's TTL
runs out, whether or not the sensor saw the device join. Where the servers' addresses move
between networks and years, their names mostly do not. Trust rule 9
(:mod:`iotcls.trust.dns_names`) and the inventory read them from the query's first payload
bytes, which every sensor keeps.

Names are compared by *registered domain* (the public suffix list's ICANN section, one level
below the public suffix: ``dch.dlink.com`` -> ``dlink.com``, ``ntp.sjtu.edu.cn`` ->
``sjtu.edu.cn``): hosts come and go inside a vendor's domain, the domain stays. Names under no
public suffix (``gw``, ``printer.local``, a search-domain suffix appended by the resolver)
name nothing outside the network and are left out.
"""

from __future__ import annotations

from functools import cache, lru_cache

from publicsuffixlist import PublicSuffixList

DNS_PORT = 53


def query_name(payload: bytes) -> str | None:
    """The name a DNS query asks for, from the first bytes of its UDP payload; None when
    the bytes hold no complete name (a sensor keeps only the first payload bytes)."""
    if len(payload) < 13 or payload[2] & 0x80:  # too short, or a response
        return None
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
