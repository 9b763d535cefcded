"""Synthetic but well-formed flow records: many devices, each with a few remotes.

For load and end-to-end tests, where what matters is that records look like a sensor's
(varied sizes, directions, payload bytes, increasing window starts per device), not that they
come from a real capture. Deterministic for a seed.
"""

from __future__ import annotations

import numpy as np

from iotcls.schema import PROTO_TCP, PROTO_UDP, FlowRecord


def device_mac(i: int) -> str:
    return "02:00:" + ":".join(f"{(i >> s) & 255:02x}" for s in (24, 16, 8, 0))


def device_ip(i: int) -> str:
    return f"192.168.{(i >> 8) & 255}.{i & 255}"


def synthetic_records(
    n: int,
    devices: int = 200,
    seed: int = 0,
    packets: int = 10,
    payload_bytes: int = 64,
    start: float = 1_700_000_000.0,
    uid_prefix: str = "C",
) -> list[FlowRecord]:
    """``n`` records over ``devices`` devices, round robin; uids ``C<17 digits>``."""
    rng = np.random.default_rng(seed)
    remotes = rng.integers(1, 223, size=(devices, 4, 4))
    out = []
    for k in range(n):
        d = k % devices
        rip = remotes[d, int(rng.integers(0, 4))]
        proto = PROTO_TCP if rng.random() < 0.7 else PROTO_UDP
        npk = int(rng.integers(1, packets + 1))
        offs = np.sort(rng.random(npk) * 30.0)
        offs[0] = 0.0
        sizes = rng.integers(40, 1500, size=npk)
        dirs = rng.integers(0, 2, size=npk)
        plen = rng.integers(0, payload_bytes + 1, size=npk)
        payloads = [rng.integers(0, 256, size=int(m), dtype=np.uint8).tobytes() for m in plen]
        t0 = start + (k // devices) * 1.0 + d * 1e-3
        out.append(
            FlowRecord(
                device_mac=device_mac(d),
                device_ip=device_ip(d),
                device_port=int(rng.integers(1024, 65536)),
                remote_ip=".".join(str(int(x)) for x in rip),
                remote_port=int(rng.choice([53, 80, 123, 443, 8883])),
                proto=proto,
                start=round(t0, 6),
                last=round(t0 + float(offs[-1]), 6),
                total_bytes=int(sizes.sum()) + int(rng.integers(0, 5000)),
                total_packets=npk + int(rng.integers(0, 20)),
                offsets=[round(float(o), 6) for o in offs],
                sizes=[int(s) for s in sizes],
                directions=[int(x) for x in dirs],
                payloads=payloads,
                uid=f"{uid_prefix}{k:017d}",
                device_is_orig=bool(rng.random() < 0.8),
            )
        )
    return out
