"""The DHCP view (iotcls/dhcp.py) on real DHCP messages of the IoT Sentinel captures: what
names the type stays, what names the unit goes, and every record builder stores the same view."""

from pathlib import Path

import numpy as np

from iotcls.bridge import flowbatch as fb
from iotcls.bridge import records as rc
from iotcls.dhcp import dhcp_view
from iotcls.flows import DeviceSelector, capture_flows
from iotcls.flowtable import FlowTable
from iotcls.pcap import CaptureReader
from iotcls.schema import DHCP_PAYLOAD_BYTES
from iotcls.testing.shared import require, sentinel_dir

DATA = sentinel_dir()  # ../shared, or $IOTCLS_SHARED


def capture(device: str, name: str = "Setup-A-1-STA.pcap") -> tuple[Path, str]:
    p = DATA / device / name
    require(p)
    return p, (DATA / device / "_iotdevice-mac.txt").read_text().strip().lower()


def client_messages(device: str) -> list[bytes]:
    """The whole DHCP messages the device sent (UDP 68 -> 67), straight from the capture."""
    path, _ = capture(device)
    out = []
    for b in CaptureReader(path).batches():
        idx = np.flatnonzero((b.proto == 17) & (b.sport == 68) & (b.dport == 67))
        raw, lens = b.payload(idx, DHCP_PAYLOAD_BYTES)
        out += [raw[i, : lens[i]].tobytes() for i in range(len(idx))]
    assert out, f"no DHCP client message in {path}"
    return out


def test_type_stays_unit_goes():
    msg = client_messages("TP-LinkPlugHS110")[0]
    mac = msg[28:34]
    v = dhcp_view(msg, 64)
    assert len(v) <= 64
    assert b"HS110(EU)" in v and b"udhcp 0.9.9-pre" in v  # host name, vendor class
    assert v[:4] == bytes((msg[0] | 0x80, *msg[1:4])) and v[4:7] == mac[:3]  # marked op, OUI
    assert mac not in v and mac[3:] not in v  # the NIC half of the MAC appears nowhere
    assert msg[4:8] not in v  # nor the transaction id
    codes_end = v.index(b"\xff", 7)
    assert list(v[7:codes_end]) == [53, 61, 12, 60, 55]  # the option order, a fingerprint


def test_mac_derived_host_name_is_blanked():
    msg = client_messages("SmarterCoffee")[0]
    assert b"ESP_07AEFB" in msg
    v = dhcp_view(msg, 64)
    assert b"ESP_000000" in v and b"07AEFB" not in v


def test_unit_valued_options_keep_only_their_codes():
    """A REQUEST's requested address (50) and server id (54) keep their codes, not values;
    the client identifier (61) is never given a value."""
    msg = next(m for m in client_messages("D-LinkSensor") if b"\x35\x01\x03" in m)
    requested = msg[msg.index(b"\x32\x04") + 2 :][:4]
    v = dhcp_view(msg, 200)
    codes = list(v[7 : v.index(b"\xff", 7)])
    assert 50 in codes and 54 in codes and 61 in codes
    assert requested not in v and b"DCH-S150" in v


def test_short_messages_and_views():
    msg = client_messages("TP-LinkPlugHS110")[0]
    assert dhcp_view(msg[:64], 64) == bytes((msg[0] | 0x80, *msg[1:4])) + msg[28:31]
    assert dhcp_view(b"", 64) == b""
    v = dhcp_view(msg, 64)
    assert dhcp_view(v, 64) == v  # a view through a record builder again stays as it is
    assert dhcp_view(msg, 10) == v[:10]


def test_every_builder_stores_the_same_view():
    """The pcap reader, FlowTable.from_records (records holding the whole messages, as
    sensors send them) and the bridge's batch decoder give the same payload slots."""
    path, mac = capture("TP-LinkPlugHS110")
    t = capture_flows(path, DeviceSelector.from_lists([mac])).table
    dh = np.flatnonzero((t.proto == 17) & (t.device_port == 68))
    assert len(dh)
    # the sensor's records: the table's records with their DHCP slots' whole messages
    msgs = iter(client_messages("TP-LinkPlugHS110"))
    replies = []
    for b in CaptureReader(path).batches():
        idx = np.flatnonzero((b.proto == 17) & (b.sport == 67) & (b.dport == 68))
        raw, lens = b.payload(idx, DHCP_PAYLOAD_BYTES)
        replies += [raw[i, : lens[i]].tobytes() for i in range(len(idx))]
    replies = iter(replies)
    recs = t.records()
    for i in dh:
        r = recs[i]
        r.payloads = [next(msgs) if d == 1 else next(replies) for d in r.directions]
        assert max(map(len, r.payloads)) > 240
    generic = FlowTable.from_records(recs, t.packets, t.payload_bytes)
    frames = [rc.flow_frame("zeek/iotcls/flows", r) for r in recs]
    items = [fb.match_flow(f) for f in frames]
    assert all(x is not None for x in items)
    fast = fb.decode_batch(items, t.packets, t.payload_bytes).table
    for got in (generic, fast):
        assert np.array_equal(got.payload, t.payload)
        assert np.array_equal(got.payload_len, t.payload_len)
    view = t.payload[dh[0], 0, : t.payload_len[dh[0], 0]].tobytes()
    assert b"HS110(EU)" in view


def test_identity_of_client_views():
    from iotcls.dhcp import identity_of

    hs110 = identity_of(dhcp_view(client_messages("TP-LinkPlugHS110")[0], 64))
    assert hs110 == "host=HS110(EU) vendor=udhcp 0.9.9-pre params=0103060c0f1c"
    coffee = identity_of(dhcp_view(client_messages("SmarterCoffee")[0], 64))
    assert coffee.startswith("host=ESP_000000 ")  # the MAC-derived part stays blanked
    # every message of a device names the same identity, discover or request (an option cut
    # by the view's width is left out rather than cut)
    for device in ("TP-LinkPlugHS110", "D-LinkSensor", "EdimaxPlug1101W"):
        ids = {identity_of(dhcp_view(m, 64)) for m in client_messages(device)}
        assert len(ids) <= 2 and None not in ids, (device, ids)
    path, mac = capture("TP-LinkPlugHS110")
    reply = next(b for b in CaptureReader(path).batches())
    idx = np.flatnonzero((reply.proto == 17) & (reply.sport == 67))
    raw, lens = reply.payload(idx, DHCP_PAYLOAD_BYTES)
    assert identity_of(dhcp_view(raw[0, : lens[0]].tobytes(), 64)) is None  # a server's
    assert identity_of(b"") is None and identity_of(b"\x81\x01\x06\x00") is None


def test_identities_read_back_from_matrix_rows():
    """layout.dhcp_identities finds the identity in the encoded rows of a real capture: in
    DHCP flows' rows only."""
    from iotcls.dhcp import identity_of
    from iotcls.layout import MatrixLayout

    path, mac = capture("TP-LinkPlugHS110")
    t = capture_flows(path, DeviceSelector.from_lists([mac])).table
    lay = MatrixLayout()
    mats, order = lay.matrices(t)
    ids = lay.dhcp_identities(mats[:, 0])
    dhcp = (t.proto[order] == 17) & (t.device_port[order] == 68)
    assert dhcp.any() and all(ids[~dhcp] == None)  # noqa: E711 (an object array)
    want = identity_of(dhcp_view(client_messages("TP-LinkPlugHS110")[0], 64))
    assert set(ids[dhcp]) - {None} == {want}  # (a window may hold the server's replies only)
    assert all(
        x is None for x in MatrixLayout(payload_mode="none").dhcp_identities(mats[:, 0, :43])
    )
