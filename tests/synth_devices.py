"""Synthetic IoT devices for the trust tests: a few device types with distinct traffic.

Each type emits a mix of flow kinds (its cloud session, its local discovery, and for most a
DNS lookup that all of them share); a capture is one device's session of ~30 flows. The
"kettle" type talks a protocol no other type speaks: the unseen device of the tests.
"""

from __future__ import annotations

import numpy as np

from iotcls.flowtable import FlowTable
from iotcls.layout import MatrixLayout
from iotcls.schema import FlowRecord

LAYOUT = MatrixLayout(history=2, packets=4, payload_bytes=4)

# kind: (proto, remote ip, remote port, sizes, directions, payload prefix, mean gap s)
KINDS = {
    "dns": (17, "192.168.1.1", 53, [70, 130], [1, 0], b"\x12\x34\x01\x00"),
    "tls_a": (6, "52.10.20.30", 443, [60, 60, 580, 1500], [1, 0, 1, 0], b"\x16\x03\x01\x02"),
    "tls_b": (6, "34.90.1.2", 8443, [60, 60, 320, 900], [1, 0, 1, 0], b"\x16\x03\x03\x01"),
    "mqtt": (6, "18.5.6.7", 8883, [60, 60, 120, 64], [1, 0, 1, 0], b"\x10\x2a\x00\x04"),
    "ssdp": (17, "239.255.255.250", 1900, [380], [1], b"M-SE"),
    "coap": (17, "104.16.3.4", 5683, [90, 90], [1, 0], b"\x40\x01\x30\x39"),
    "kettle": (17, "81.2.3.4", 2081, [200, 200, 1200], [1, 0, 0], b"\x7e\x7e\x05\x00"),
}
TYPES = {
    "cam": {"tls_a": 0.6, "dns": 0.2, "ssdp": 0.2},
    "plug": {"mqtt": 0.6, "dns": 0.2, "coap": 0.2},
    "hub": {"tls_b": 0.5, "ssdp": 0.3, "dns": 0.2},
    "sensor": {"coap": 0.6, "tls_b": 0.2, "dns": 0.2},
    "kettle": {"kettle": 1.0},  # the unseen type
}


def session(kind_mix: dict, mac: str, rng: np.random.Generator, t0: float, n: int):
    recs = []
    t = t0
    kinds = list(kind_mix)
    p = np.array([kind_mix[k] for k in kinds])
    for i in range(n):
        kind = kinds[rng.choice(len(kinds), p=p / p.sum())]
        proto, rip, rport, sizes, dirs, pay = KINDS[kind]
        jitter = rng.integers(-8, 9, len(sizes))
        sz = [max(40, s + int(j)) for s, j in zip(sizes, jitter)]
        offs = np.cumsum(np.r_[0.0, rng.exponential(0.05, len(sizes) - 1)]).tolist()
        pays = [
            pay[:2] + bytes(rng.integers(0, 256, 2, dtype=np.uint8)) if d else b"" for d in dirs
        ]
        t += float(rng.exponential(6.0))
        recs.append(
            FlowRecord(
                device_mac=mac,
                device_ip="192.168.1.50",
                device_port=int(rng.integers(1024, 65535)),
                remote_ip=rip,
                remote_port=rport,
                proto=proto,
                start=t,
                last=t + offs[-1],
                total_bytes=sum(sz),
                total_packets=len(sz),
                offsets=offs,
                sizes=sz,
                directions=dirs,
                payloads=pays,
                uid=f"C{i}",
            )
        )
    return recs


def make_data(types: list[str], captures_per_type: int, flows: int = 30, seed: int = 0):
    """``(matrices, labels, captures)`` for the given types, one device per capture."""
    rng = np.random.default_rng(seed)
    mats, labels, caps = [], [], []
    for ti, name in enumerate(types):
        for c in range(captures_per_type):
            mac = f"02:00:00:00:{ti:02x}:{c:02x}"
            recs = session(TYPES[name], mac, rng, 1000.0 * c, flows)
            m, _ = LAYOUT.matrices(FlowTable.from_records(recs, LAYOUT.packets, 8))
            mats.append(m)
            labels += [name] * len(m)
            caps += [f"{name}/{c}"] * len(m)
    return np.concatenate(mats), np.array(labels, object), np.array(caps, object)
