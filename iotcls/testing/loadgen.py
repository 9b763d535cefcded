"""Load generator: plays Zeek for ``iotcls serve`` and measures what comes back.

It runs a :class:`~iotcls.testing.fake_zeek.FakeZeek` and publishes ``IoTClass::flow`` frames
rendered byte for byte as Zeek renders them. Frames are rendered once per template record;
each send only swaps in a fresh uid (a fixed-width ``C<17 digits>``), so the generator's own
CPU stays small next to what it measures. Every label that comes back is matched to its
record by uid: latency is from the moment the frame was handed to the socket to the moment
its label event was read back, i.e. record arrival -> label sent back, plus two local socket
hops.

Two ways to drive: :meth:`LoadGen.open_loop` sends at a fixed rate whatever happens (latency
under a given load); :meth:`LoadGen.closed_loop` keeps a fixed number of records
outstanding (the highest sustained throughput).
"""

from __future__ import annotations

import asyncio
import os
import time
from array import array
from dataclasses import dataclass, field

import numpy as np

from iotcls.bridge import records as rec
from iotcls.schema import FlowRecord

from .fake_zeek import FakeZeek, Label

TOPIC = "zeek/iotcls/flows"


@dataclass
class LoadResult:
    sent: int
    labelled: int  # labels received for records sent in this run
    seconds: float  # from first send to last label (or end of the run)
    latencies_s: np.ndarray  # one per label received
    outstanding: int  # sent, no label yet at the end
    sent_at_s: np.ndarray | None = None  # per label: when its record was sent, from the start

    def after(self, t_s: float) -> np.ndarray:
        """Latencies of records sent at or after ``t_s`` seconds into the run (warm)."""
        if self.sent_at_s is None:
            return self.latencies_s
        return self.latencies_s[self.sent_at_s >= t_s]

    @property
    def sent_per_s(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    @property
    def labels_per_s(self) -> float:
        return self.labelled / self.seconds if self.seconds else 0.0

    def pct_ms(self, q: float) -> float:
        if not len(self.latencies_s):
            return float("nan")
        return float(np.percentile(self.latencies_s, q) * 1000)


class LoadGen:
    def __init__(self, zeek: FakeZeek, templates: list[FlowRecord]):
        self.zeek = zeek
        zeek.keep_labels = False
        zeek.on_label = self._on_label
        self._tpl: list[tuple[bytes, bytes]] = []
        for r in templates:
            frame = rec.flow_frame(TOPIC, r)
            token = f'"{r.uid}"'.encode()
            if frame.count(token) != 1 or len(r.uid) != 18:
                raise ValueError(f"template uid {r.uid!r} must be C + 17 digits, once per frame")
            self._tpl.append((frame, token))
        self._seq = 0
        self._sent_at: dict[str, float] = {}
        self._lat = array("d")
        self._lat_sent = array("d")
        self._t0 = 0.0
        self._labelled = 0
        self._last_label = 0.0

    def _on_label(self, label: Label) -> None:
        t = self._sent_at.pop(label.uid, None)
        if t is None:
            return  # a label for a record of an earlier run, or an unknown uid
        self._lat.append(label.at - t)
        self._lat_sent.append(t - self._t0)
        self._labelled += 1
        self._last_label = label.at

    def _frames(self, n: int) -> list[bytes]:
        out = []
        ntpl = len(self._tpl)
        now = time.monotonic()
        for _ in range(n):
            frame, token = self._tpl[self._seq % ntpl]
            uid = f"C{self._seq:017d}"
            self._seq += 1
            out.append(frame.replace(token, f'"{uid}"'.encode(), 1))
            self._sent_at[uid] = now
        return out

    def _reset(self) -> None:
        self._sent_at.clear()
        self._lat = array("d")
        self._lat_sent = array("d")
        self._labelled = 0
        self._t0 = time.monotonic()

    async def _settle(self, t0: float, sent: int, settle_s: float) -> LoadResult:
        deadline = time.monotonic() + settle_s
        while self._sent_at and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        end = self._last_label if self._labelled else time.monotonic()
        return LoadResult(
            sent,
            self._labelled,
            max(end - t0, 1e-9),
            np.frombuffer(self._lat, np.float64).copy(),
            len(self._sent_at),
            np.frombuffer(self._lat_sent, np.float64).copy(),
        )

    async def open_loop(
        self, rate: float, seconds: float, settle_s: float = 5.0, tick_s: float = 0.002
    ) -> LoadResult:
        """``rate`` records/s for ``seconds``; then waits up to ``settle_s`` for the labels."""
        self._reset()
        t0 = time.monotonic()
        sent = 0
        while True:
            now = time.monotonic()
            if now - t0 >= seconds:
                break
            due = int((now - t0) * rate) - sent
            if due > 0:
                await self.zeek.publish_frames(self._frames(due), TOPIC)
                sent += due
            await asyncio.sleep(tick_s)
        return await self._settle(t0, sent, settle_s)

    async def closed_loop(
        self, window: int, seconds: float, settle_s: float = 5.0, chunk: int = 50
    ) -> LoadResult:
        """Keeps ``window`` records unlabelled at all times, for ``seconds``."""
        self._reset()
        t0 = time.monotonic()
        sent = 0
        while time.monotonic() - t0 < seconds:
            room = window - len(self._sent_at)
            if room >= chunk:
                await self.zeek.publish_frames(self._frames(room), TOPIC)
                sent += room
            else:
                await asyncio.sleep(0.001)
        return await self._settle(t0, sent, settle_s)


# -- memory of a process tree ------------------------------------------------------------
def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def tree_cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by ``pid`` and by its live descendants."""
    own = _cpu_s(pid)
    todo, kids = _children(pid), 0.0
    while todo:
        c = todo.pop()
        kids += _cpu_s(c)
        todo += _children(c)
    return own, kids


def tree_rss_mib(pid: int) -> tuple[float, float]:
    """RSS of ``pid`` and of all its descendants, MiB."""
    own = _rss_kib(pid) / 1024
    todo, kids = _children(pid), 0.0
    while todo:
        c = todo.pop()
        kids += _rss_kib(c) / 1024
        todo += _children(c)
    return own, kids


@dataclass
class RssSampler:
    pid: int
    period_s: float = 1.0
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # t, bridge, scorers

    async def run(self) -> None:
        t0 = time.monotonic()
        while True:
            own, kids = tree_rss_mib(self.pid)
            self.samples.append((time.monotonic() - t0, own, kids))
            await asyncio.sleep(self.period_s)

    def slope_mib_per_min(self, which: int = 1, skip_s: float = 0.0) -> float:
        """Least-squares trend of column ``which`` (1 bridge, 2 scorers), after ``skip_s``."""
        t = np.array([s[0] for s in self.samples if s[0] >= skip_s])
        v = np.array([s[which] for s in self.samples if s[0] >= skip_s])
        if len(t) < 3:
            return float("nan")
        return float(np.polyfit(t, v, 1)[0] * 60.0)
