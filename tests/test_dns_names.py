"""Trust rule 9 (iotcls.trust.dns_names): the names a device uses in DNS and mDNS, read back
from its records' rows, judged against those its label's class used in training."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from iotcls.dns import is_mdns_name, mdns_name, query_name, registered_domain
from iotcls.layout import MatrixLayout
from iotcls.testing.shared import sentinel_device_table
from iotcls.trust.dns_names import (
    DNS_MISMATCH,
    MAX_NAMES,
    DnsNames,
    fit_names,
    so_far,
)
from test_store import dns_query


def test_query_names():
    assert query_name(dns_query("a.example.com")) == "a.example.com"
    assert query_name(dns_query("A.Example.COM")) == "a.example.com"
    assert query_name(dns_query("a.example.com")[:20]) is None  # cut short
    assert query_name(b"\x12\x34\x81\x80" + bytes(12)) is None  # a response
    assert query_name(b"\x12\x34\x01\x00" + bytes(8) + b"\x7f" + bytes(20)) is None  # label > 63


@pytest.mark.parametrize(
    "name, kept",
    [
        ("DCS-930LB1_1C7185.local", "dcs-930lb1_0.local"),  # the unit's hex run blanked
        ("Philips hue - 2476FF._hap._tcp.local", "philips hue - 0._hap._tcp.local"),
        (" [74:da:38:80:79:fc]._http._tcp.local", " [0]._http._tcp.local"),  # a MAC
        ("_dhnap._tcp.local", "_dhnap._tcp.local"),
        ("dcs-935l.local", "dcs-935l.local"),  # a model number is not a unit's
        ("cafe.local", "cafe.local"),  # hex letters without a digit are a word
        ("58.10.10.10.in-addr.arpa", None),  # a reverse lookup names the network
    ],
)
def test_mdns_names_keep_the_type_and_blank_the_unit(name, kept):
    for flags in (b"\x00\x00", b"\x84\x00"):  # a query, an announcement (a response)
        assert mdns_name(dns_query(name, flags)) == kept
    assert kept is None or is_mdns_name(kept)
    assert registered_domain(name) is None or not is_mdns_name(registered_domain(name))


@pytest.mark.parametrize(
    "name, domain",
    [
        ("api.dch.dlink.com", "dlink.com"),
        ("ntp.sjtu.edu.cn", "sjtu.edu.cn"),  # a two-level public suffix
        ("www.bbc.co.uk", "bbc.co.uk"),
        ("tzinfo-1.us-west-2.elb.amazonaws.com", "amazonaws.com"),  # ICANN section only
        ("dlink.com.", "dlink.com"),
        ("co.uk", None),  # a public suffix names no one
        ("gw", None),  # a local name
        ("mtalk.google.com.belkin", None),  # a resolver's search domain appended: no suffix
        ("printer.local", None),
    ],
)
def test_registered_domains(name, domain):
    assert registered_domain(name) == domain


def test_the_layout_reads_the_domains_back_from_a_real_capture():
    """The rows of a real TP-Link plug setup hold its queries; the domains read back from
    them are the registered domains of the names the inventory reads from the records."""
    from iotcls.device_inventory import _sent

    t = sentinel_device_table("TP-LinkPlugHS110", "Setup-A-1-STA")
    layout = MatrixLayout()
    mats, order = layout.matrices(t)
    rows = layout.dns_names(mats[:, 0])
    read_back = frozenset().union(*rows)
    assert "tplinkcloud.com" in read_back
    dns = np.flatnonzero(t.remote_port == 53)
    names = {query_name(p) for p in _sent(t, dns)} - {None}
    dns_kind = {x for x in read_back if not is_mdns_name(x)}
    assert dns_kind == {registered_domain(n) for n in names} - {None}
    assert all(not d for d, i in zip(rows, order) if t.remote_port[i] != 53)


def test_rule_9_refuses_a_device_whose_every_domain_is_foreign_to_the_class():
    rule = DnsNames({"HueBridge": frozenset({"meethue.com", "ntp.org"}), "Lightify": frozenset()})
    ok = "-"
    assert rule.reason(frozenset(), "HueBridge") == ok  # nothing asked yet: not judged
    assert rule.reason(None, "HueBridge") == ok
    assert rule.reason(frozenset({"meethue.com"}), "HueBridge") == ok
    assert rule.reason(frozenset({"ntp.org", "nuki.io"}), "HueBridge") == ok  # one shared: pass
    assert rule.reason(frozenset({"nuki.io"}), "HueBridge") == DNS_MISMATCH
    assert rule.reason(frozenset({"nuki.io"}), "Lightify") == DNS_MISMATCH  # asked for nothing
    assert rule.reason(frozenset({"nuki.io"}), "a class not in the map") == DNS_MISMATCH
    assert DnsNames().reason(frozenset({"nuki.io"}), "HueBridge") == ok  # no map: rule off
    # each kind on its own: a shared domain does not excuse a foreign mDNS name
    hue = frozenset({"ntp.org", "philips hue - 0._hap._tcp.local"})
    assert rule.reason(hue | {"philips-hue.local"}, "HueBridge") == DNS_MISMATCH
    by_kind = DnsNames({"HueBridge": hue})
    assert by_kind.reason(frozenset({"ntp.org", "localcam.local"}), "HueBridge") == DNS_MISMATCH
    assert by_kind.reason(hue, "HueBridge") == ok
    assert by_kind.reason(frozenset({"localcam.local"}), "HueBridge") == DNS_MISMATCH
    assert by_kind.reason(
        frozenset({"nuki.io", "philips hue - 0._hap._tcp.local"}), "HueBridge"
    ) == (DNS_MISMATCH)
    assert rule.reasons(["HueBridge", "Lightify"], [frozenset({"meethue.com"})] * 2).tolist() == [
        ok,
        DNS_MISMATCH,
    ]


def test_fit_names_maps_each_class_to_what_its_flows_asked():
    rows = [frozenset({"a.com"}), frozenset(), frozenset({"b.com", "a.com"}), frozenset({"c.com"})]
    assert fit_names(rows, ["x", "x", "y", ""]) == {"x": ["a.com"], "y": ["a.com", "b.com"]}


def test_so_far_is_causal_per_device_and_bounded():
    d = [frozenset({"b.com"}), frozenset(), frozenset({"a.com"}), frozenset({"c.com"})]
    groups = np.array([0, 0, 0, 1])
    times = np.array([5.0, 1.0, 9.0, 0.0])
    out = so_far(d, groups, times)
    assert out.tolist() == [
        frozenset({"b.com"}),
        frozenset(),  # before the device's first query
        frozenset({"a.com", "b.com"}),
        frozenset({"c.com"}),  # another device's
    ]
    many = [frozenset({f"d{i:04d}.com"}) for i in range(MAX_NAMES + 10)]
    capped = so_far(many, np.zeros(len(many)), np.arange(len(many), dtype=float))
    assert len(capped[-1]) == MAX_NAMES and "d0000.com" in capped[-1]


def test_the_tracker_is_the_live_twin_of_so_far():
    rng = np.random.default_rng(0)
    pool = [frozenset(), frozenset({"a.com"}), frozenset({"b.com"}), frozenset({"a.com", "c.com"})]
    d = [pool[i] for i in rng.integers(0, 4, 200)]
    groups = rng.integers(0, 5, 200)
    offline = so_far(d, groups, np.arange(200, dtype=float))
    tracker = DnsNames({"x": frozenset({"a.com"})}).online(max_devices=10)
    live = []
    for dom, g in zip(d, groups):
        tracker.note(str(g), dom)
        live.append(tracker.so_far(str(g)))
    assert live == offline.tolist()
    small = DnsNames({"x": frozenset({"a.com"})}).online(max_devices=2)
    for g in range(5):
        small.note(str(g), frozenset({"a.com"}))
    assert len(small) == 2 and small.so_far("0") == frozenset()  # the least recent forgotten
    off = DnsNames().online()
    off.note("0", frozenset({"a.com"}))
    assert len(off) == 0  # no map: nothing is kept


def test_the_map_travels_in_the_trust_state_and_a_state_without_it_turns_the_rule_off():
    from iotcls.trust.decision import TrustState
    from test_trust import fitted_state

    state, _ = fitted_state()
    state.dns_names = {"a": ["x.com"], "b": []}
    buf = io.BytesIO()
    torch.save({"trust": state.to_dict()}, buf)
    buf.seek(0)
    back = TrustState.from_dict(torch.load(buf, weights_only=True)["trust"])
    assert DnsNames.of(back) == DnsNames({"a": frozenset({"x.com"}), "b": frozenset()})
    old = state.to_dict()
    del old["dns_names"]  # a bundle fitted before rule 9
    assert DnsNames.of(TrustState.from_dict(old)).seen == {}
