"""The third-party data the tests and benchmarks read, where it lives, and the sample made from it.

The repository ships no capture of anyone else's: the IoT Sentinel captures and what a real
Zeek 8.2.2 did with six of them sit beside the project in ``../shared`` (for developers and
CI), and ``IOTCLS_SHARED`` names another place. Tests that need them skip with a reason that
names the missing path (:func:`require`).

The *sample* is a small stand-in for a home network where several devices are set up at once:
one setup capture of each of a few devices, each shifted to start a few seconds after the
previous one, merged by time into one classic pcap. It is written at run time into a
directory the caller owns, never into the repository. Deterministic.
"""

from __future__ import annotations

import csv
import heapq
import os
import struct
from dataclasses import dataclass
from pathlib import Path

SHARED_ENV = "IOTCLS_SHARED"
# (directory, capture): the first setup capture of each device
SAMPLE_CAPTURES = (
    ("Aria", "Setup-A-1-STA"),
    ("D-LinkCam", "Setup-B-1-STA"),
    ("EdimaxPlug1101W", "Setup-A-1-STA"),
    ("HueBridge", "Setup-A-1-STA"),
    ("Lightify", "Setup-C-1-STA"),
    ("TP-LinkPlugHS110", "Setup-A-1-STA"),
    ("WeMoSwitch", "Setup-A-1-STA"),
    ("Withings", "Setup-A-1-STA"),
)
BASE_US = 1_700_000_000 * 1_000_000  # 2023-11-14 22:13:20 UTC
GAP_US = 5_000_000  # each capture starts 5 s after the previous one


def shared_dir() -> Path:
    """``$IOTCLS_SHARED``, else ``shared/`` beside the checkout this module runs from."""
    env = os.environ.get(SHARED_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared"


def sentinel_dir() -> Path:
    return shared_dir() / "data" / "iot-sentinel"


def zeek_fixtures_dir() -> Path:
    """What a real Zeek 8.2.2 did: ``websocket/`` frames and ``captures/<name>/packets.jsonl``."""
    return shared_dir() / "fixtures" / "zeek-8.2.2"


def sentinel_capture(device: str, capture: str) -> Path:
    return sentinel_dir() / device / f"{capture}.pcap"


def sentinel_device_table(device: str, capture: str):
    """The flow records (a :class:`iotcls.flowtable.FlowTable`) of the labelled device in
    one IoT Sentinel capture, by the MAC beside it; the caller is skipped without the data."""
    from iotcls.flows import DeviceSelector, capture_flows

    pcap = require(sentinel_capture(device, capture))
    mac = (pcap.parent / "_iotdevice-mac.txt").read_text().strip()
    return capture_flows(pcap, DeviceSelector.from_lists([mac])).table


def missing(path: Path) -> str | None:
    """The skip reason when ``path`` is absent, else None."""
    if path.exists():
        return None
    return (
        f"{path} is missing: the tests read third-party data from ../shared "
        f"(or ${SHARED_ENV}), never from the repository"
    )


def require(path: Path, module: bool = False) -> Path:
    """``path``, or skip the calling test (``module``: the whole test module, when called at
    its top level) with a reason that names it."""
    why = missing(path)
    if why:
        import pytest

        pytest.skip(why, allow_module_level=module)
    return path


@dataclass(frozen=True)
class Sample:
    pcap: Path
    devices: dict[str, str]  # MAC -> type label, in capture order

    @property
    def macs(self) -> list[str]:
        return list(self.devices)

    def mac_of(self, label: str) -> str:
        return next(m for m, lab in self.devices.items() if lab == label)

    @property
    def devices_arg(self) -> str:
        """The ``--devices`` value."""
        return ",".join(self.devices)


def _records(path: Path) -> list[tuple[int, bytes]]:
    """(timestamp in us, record header tail + data) of a little-endian usec Ethernet pcap."""
    b = path.read_bytes()
    magic, _, _, _, _, _, linktype = struct.unpack_from("<IHHiIII", b, 0)
    if magic != 0xA1B2C3D4 or linktype != 1:
        raise ValueError(f"{path}: expected a little-endian usec Ethernet pcap")
    out, off = [], 24
    while off + 16 <= len(b):
        sec, usec, incl, _ = struct.unpack_from("<IIII", b, off)
        out.append((sec * 1_000_000 + usec, b[off + 8 : off + 16 + incl]))
        off += 16 + incl
    return out


def write_sample(out_dir: Path, data: Path | None = None) -> Sample:
    """Write ``out_dir/sample.pcap`` from the IoT Sentinel captures in ``data``."""
    data = data or sentinel_dir()
    types = {row["device"]: row["type"] for row in csv.DictReader((data / "devices.csv").open())}
    streams, devices = [], {}
    for i, (device, capture) in enumerate(SAMPLE_CAPTURES):
        recs = _records(data / device / f"{capture}.pcap")
        shift = BASE_US + i * GAP_US - recs[0][0]
        streams.append([(t + shift, i, j, rest) for j, (t, rest) in enumerate(recs)])
        mac = (data / device / "_iotdevice-mac.txt").read_text().strip().lower()
        devices[mac] = types[device]
    out_dir.mkdir(parents=True, exist_ok=True)
    pcap = out_dir / "sample.pcap"
    with pcap.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for t, _, _, rest in heapq.merge(*streams):
            f.write(struct.pack("<II", t // 1_000_000, t % 1_000_000) + rest)
    return Sample(pcap, devices)
