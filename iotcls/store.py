"""The flow store: what ``iotcls serve`` received and the labels it gave, kept on disk.

A store is a directory of *segments*, each one ``.npz`` file (numpy's zip of arrays) holding
a run of flow records as a :class:`~iotcls.flowtable.FlowTable` (the columnar form of the one
flow record, :mod:`iotcls.schema`: one array per field, nothing defined twice) plus one
label per record: the label, confidence, trust and reason the model gave, the model's name,
whether the label went to the sensor's log, and which sensor sent the record. ``iotcls
inventory``, ``iotcls train`` and ``iotcls evaluate`` read it directly (no pcap needed).

Why segments, and why like this:

* **Whole or absent.** A segment is written to a temporary file in the same directory,
  synced, then renamed over its final name, so a crash or a full disk never leaves a torn
  segment under a name readers look at (they skip ``.tmp`` files). A segment that is damaged
  anyway (a bad disk, a hand edit) is skipped with a warning naming it; the others are read.
* **Bounded.** The writer deletes the oldest segments beyond ``record.max_mb`` and those
  older than ``record.retention_days`` (``record:`` in the serve configuration).
* **Never in the way.** Segments are compressed and written in a worker thread; a write that
  fails (disk full) costs that segment's records, is logged and counted, and serving goes on.

Only final records are kept (an early record is a prefix of its window's final record), and
the payload bytes a record holds are those the serving model's layout reads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .flowtable import FlowTable
from .schema import SCHEMA_VERSION

log = logging.getLogger("iotcls.store")

STORE_FORMAT = "iotcls-store"
STORE_VERSION = 1
SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".npz"
_TEXT = {"device_mac", "uid"}  # FlowTable's object columns, stored as unicode arrays


@dataclass
class Labels:
    """One label per record, as the service gave it ("" and zeros where none was given:
    the record was shed, or its label lost)."""

    label: np.ndarray  # (n,) str
    confidence: np.ndarray  # (n,) float32
    trusted: np.ndarray  # (n,) bool
    reason: np.ndarray  # (n,) str
    model: np.ndarray  # (n,) str: the model that gave the label
    sent: np.ndarray  # (n,) bool: the log policy sent it to the sensor's log
    sensor: np.ndarray  # (n,) str: zeek, suricata

    def __len__(self) -> int:
        return len(self.label)

    @classmethod
    def of(cls, outcomes: Sequence[Any], sensor: str) -> Labels:
        """From the outcomes of one scoring call (None: no label), in record order."""
        n = len(outcomes)
        got = [o for o in outcomes if o is not None]
        has = np.array([o is not None for o in outcomes], bool)

        def col(name: str, dtype, empty) -> np.ndarray:
            out = np.full(n, empty, dtype=dtype)
            if len(got):
                out[has] = [getattr(o, name) for o in got]
            return out

        return cls(
            label=col("label", object, ""),
            confidence=col("confidence", np.float32, 0.0),
            trusted=col("trusted", bool, False),
            reason=col("reason", object, ""),
            model=col("model", object, ""),
            sent=col("send", bool, False),
            sensor=np.full(n, sensor, object),
        )

    @classmethod
    def concat(cls, parts: Sequence[Labels]) -> Labels:
        return cls(
            **{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)}
        )

    def take(self, index: np.ndarray) -> Labels:
        return Labels(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


# -- one segment on disk --------------------------------------------------------------------
def segment_arrays(table: FlowTable, labels: Labels, window_s: float) -> dict[str, np.ndarray]:
    """The arrays of one segment file: the table's columns (``t_<field>``), the labels'
    (``l_<field>``) and what the file is."""
    out: dict[str, np.ndarray] = {}
    for f in fields(FlowTable):
        a = getattr(table, f.name)
        out[f"t_{f.name}"] = a.astype(str) if f.name in _TEXT else a
    for f in fields(Labels):
        a = getattr(labels, f.name)
        out[f"l_{f.name}"] = a.astype(str) if a.dtype == object else a
    out.update(
        format=np.array(STORE_FORMAT),
        version=np.array(STORE_VERSION),
        schema_version=np.array(SCHEMA_VERSION),
        window_s=np.array(float(window_s)),
    )
    return out


class SegmentError(ValueError):
    """A segment that cannot be read: the message names the file and why."""


def read_segment(path: Path) -> tuple[FlowTable, Labels, float]:
    """One segment's records, labels and window length; SegmentError if it is damaged."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise SegmentError(
            f"{path}: not a readable segment ({type(e).__name__}: {str(e)[:120]})"
        ) from None
    if str(data.get("format", "")) != STORE_FORMAT:
        raise SegmentError(f"{path}: not an iotcls store segment")
    if int(data.get("version", -1)) != STORE_VERSION:
        raise SegmentError(
            f"{path}: store segment version {int(data.get('version', -1))} is "
            f"not supported (this is {STORE_VERSION})"
        )
    try:
        tcols = {f.name: data[f"t_{f.name}"] for f in fields(FlowTable)}
        lcols = {f.name: data[f"l_{f.name}"] for f in fields(Labels)}
    except KeyError as e:
        raise SegmentError(f"{path}: segment lacks {e.args[0]}") from None
    for name in _TEXT:
        tcols[name] = tcols[name].astype(object)
    for f in fields(Labels):
        if lcols[f.name].dtype.kind == "U":
            lcols[f.name] = lcols[f.name].astype(object)
    table, labels = FlowTable(**tcols), Labels(**lcols)
    n = len(table)
    bad = [k for k, v in {**tcols, **lcols}.items() if len(v) != n]
    if bad or table.offsets.ndim != 2 or table.payload.ndim != 3:
        raise SegmentError(f"{path}: columns of different lengths or shapes ({', '.join(bad[:3])})")
    return table, labels, float(data.get("window_s", 60.0))


def write_segment(directory: Path, name: str, arrays: dict[str, np.ndarray]) -> Path:
    """Write one segment whole: a temporary file beside it, synced, renamed over *name*."""
    final = directory / name
    tmp = directory / f".{name}.tmp"
    try:
        with tmp.open("wb") as f:
            np.savez_compressed(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a power cut once the directory is synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return final


def segment_paths(directory: Path) -> list[Path]:
    """The store's segments, oldest first (their names start with the time they were begun)."""
    return sorted(p for p in directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}") if p.is_file())


# -- the writer (iotcls serve) --------------------------------------------------------------
@dataclass
class RecorderStats:
    records: int = 0  # records written to segments
    segments: int = 0
    errors: int = 0  # segments that could not be written
    lost: int = 0  # their records
    deleted: int = 0  # segments removed by the size cap or retention


class Recorder:
    """Keeps what ``iotcls serve`` labels: :meth:`add` per scored batch (cheap: buffers), a
    segment written (in a worker thread) every ``segment_records`` records or ``segment_s``
    seconds, the store kept under its size cap and retention. Run :meth:`run` as a task;
    :meth:`close` writes what is buffered."""

    def __init__(
        self,
        directory: str | Path,
        max_mb: int,
        retention_days: float,
        segment_records: int,
        segment_s: float,
        window_s: float,
    ):
        self.directory = Path(directory)
        self.max_bytes = int(max_mb) << 20
        self.retention_s = float(retention_days) * 86400.0
        self.segment_records, self.segment_s = segment_records, segment_s
        self.window_s = window_s
        self.stats = RecorderStats()
        self._tables: list[FlowTable] = []
        self._labels: list[Labels] = []
        self._rows = 0
        self._since = 0.0  # monotonic time of the first buffered record
        self._seq = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="iotcls-store")
        self._writes: set[asyncio.Future] = set()
        self._warned = 0.0

    @classmethod
    def from_config(cls, cfg: Any, window_s: float) -> Recorder:
        """From a :class:`~iotcls.config.RecordConfig`; makes the directory (an OSError
        names it) and removes temporary files a crash left behind."""
        r = cls(
            cfg.directory,
            cfg.max_mb,
            cfg.retention_days,
            cfg.segment_records,
            cfg.segment_s,
            window_s,
        )
        try:
            r.directory.mkdir(parents=True, exist_ok=True)
            probe = r.directory / f".probe-{os.getpid()}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise OSError(
                f"record.directory {r.directory}: cannot write there: {e.strerror or e}"
            ) from None
        for p in r.directory.glob(".*.tmp"):
            p.unlink(missing_ok=True)
        return r

    @property
    def buffered(self) -> int:
        return self._rows

    def add(self, table: FlowTable, labels: Labels) -> None:
        """Buffers one batch of final records and their labels (row for row)."""
        if not len(table):
            return
        if not self._rows:
            self._since = time.monotonic()
        self._tables.append(table)
        self._labels.append(labels)
        self._rows += len(table)
        if self._rows >= self.segment_records:
            self._flush()

    async def run(self) -> None:
        """Writes a segment once its first record is ``segment_s`` old (for ever)."""
        while True:
            await asyncio.sleep(min(self.segment_s, 1.0))
            if self._rows and time.monotonic() - self._since >= self.segment_s:
                self._flush()

    async def close(self) -> None:
        """Writes what is buffered and waits for every write."""
        self._flush()
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
        self._pool.shutdown(wait=True)

    def _flush(self) -> None:
        if not self._rows:
            return
        tables, labels, n = self._tables, self._labels, self._rows
        self._tables, self._labels, self._rows = [], [], 0
        self._seq += 1
        name = (
            f"{SEGMENT_PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-"
            f"{os.getpid()}-{self._seq:06d}{SEGMENT_SUFFIX}"
        )
        fut = asyncio.get_running_loop().run_in_executor(
            self._pool, self._write, name, tables, labels, n
        )
        self._writes.add(fut)
        fut.add_done_callback(self._writes.discard)

    def _write(self, name: str, tables: list[FlowTable], labels: list[Labels], n: int) -> None:
        """In the worker thread: one segment, then the size cap and retention."""
        try:
            t = FlowTable.concat(tables, tables[0].packets, tables[0].payload_bytes)
            write_segment(
                self.directory, name, segment_arrays(t, Labels.concat(labels), self.window_s)
            )
        except Exception as e:  # a full disk must not stop the labels
            self.stats.errors += 1
            self.stats.lost += n
            now = time.monotonic()
            if now - self._warned >= 60.0:
                self._warned = now
                log.warning(
                    "record: cannot write %s (%d records lost): %s", self.directory / name, n, e
                )
            return
        self.stats.records += n
        self.stats.segments += 1
        self._prune()

    def _prune(self) -> None:
        """Deletes segments past retention, then the oldest beyond the size cap."""
        now = time.time()
        segs = []
        for p in segment_paths(self.directory):
            try:
                st = p.stat()
            except OSError:
                continue
            segs.append((p, st.st_size, st.st_mtime))
        total = sum(s for _, s, _ in segs)
        for p, size, mtime in segs[:-1]:  # never the segment just written
            if now - mtime > self.retention_s or total > self.max_bytes:
                try:
                    p.unlink()
                except OSError:
                    continue
                total -= size
                self.stats.deleted += 1


# -- the reader (inventory, train, evaluate) ------------------------------------------------
@dataclass
class StoreData:
    """Every record of one or more stores, in the order read, with its label and the
    segment it came from."""

    table: FlowTable
    labels: Labels
    segment: np.ndarray  # (n,) int: index into ``segments``
    segments: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # damaged segments, each with why
    window_s: float = 60.0

    def __len__(self) -> int:
        return len(self.table)


def is_store(path: str | Path) -> bool:
    """A directory that holds store segments (and no captures of its own)."""
    p = Path(path)
    return p.is_dir() and bool(segment_paths(p))


def _widen(t: FlowTable, packets: int, payload_bytes: int) -> FlowTable:
    """*t* with ``packets`` packet slots of ``payload_bytes`` (zeros added), so segments
    written under different layouts concatenate."""
    if t.packets == packets and t.payload_bytes == payload_bytes:
        return t
    w = FlowTable.allocate(len(t), packets, payload_bytes)
    for f in fields(FlowTable):
        a, b = getattr(t, f.name), getattr(w, f.name)
        if a.ndim == 1:
            setattr(w, f.name, a)
        elif a.ndim == 2:
            b[:, : a.shape[1]] = a
        else:
            b[:, : a.shape[1], : a.shape[2]] = a
    return w


def iter_segments(
    paths: Iterable[str | Path],
    warn: Callable[[str], None] | None = None,
    skipped: list[str] | None = None,
) -> Iterator[tuple[Path, FlowTable, Labels, float]]:
    """``(path, records, labels, window_s)`` of every readable segment under *paths*, oldest
    first, one at a time (what fits in memory is one segment); a damaged segment is skipped,
    reported to *warn* (default: a logged warning) with its name and why, and appended to
    *skipped*."""
    warn = warn or (lambda m: log.warning("%s", m))
    for root in paths:
        for p in segment_paths(Path(root)):
            try:
                t, lab, window = read_segment(p)
            except SegmentError as e:
                if skipped is not None:
                    skipped.append(str(e))
                warn(f"skipped {e}")
                continue
            yield p, t, lab, window


def read_stores(
    paths: Iterable[str | Path], warn: Callable[[str], None] | None = None
) -> StoreData:
    """The records of every readable segment under *paths*, at once (see
    :func:`iter_segments`)."""
    tables, labels, seg, names, skipped, windows = [], [], [], [], [], [60.0]
    for p, t, lab, w in iter_segments(paths, warn, skipped):
        seg.append(np.full(len(t), len(names), np.int64))
        names.append(str(p))
        tables.append(t)
        labels.append(lab)
        windows.append(w)
    window = windows[-1]
    if not tables:
        return StoreData(
            FlowTable.empty(1, 0), Labels.of([], ""), np.zeros(0, np.int64), names, skipped, window
        )
    packets = max(t.packets for t in tables)
    pb = max(t.payload_bytes for t in tables)
    table = FlowTable.concat([_widen(t, packets, pb) for t in tables], packets, pb)
    return StoreData(table, Labels.concat(labels), np.concatenate(seg), names, skipped, window)


# -- sessions and datasets --------------------------------------------------------------------
SESSION_GAP_S = 600.0  # a device silent this long starts a new session
SESSION_MAX_S = 3600.0  # and a session is cut after this long


def sessions(devices: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per record, its session id: ``store:<device>@<first start, UTC>``. A session is a
    device's run of records without a gap of ``SESSION_GAP_S``, at most ``SESSION_MAX_S``
    long; it plays the part a capture file plays for pcaps (the unit ``train`` splits by,
    since the flows of one session are as correlated as those of one capture)."""
    n = len(starts)
    out = np.empty(n, object)
    if not n:
        return out
    devices = np.asarray(devices, object)
    order = np.lexsort((starts, devices))
    d, s = devices[order], np.asarray(starts, np.float64)[order]
    begin = np.empty(n, np.float64)
    cur = s[0]
    for i in range(n):  # a loop: each session's start depends on the previous one's
        if (
            i == 0
            or d[i] != d[i - 1]
            or s[i] - s[i - 1] > SESSION_GAP_S
            or s[i] - cur > SESSION_MAX_S
        ):
            cur = s[i]
        begin[i] = cur
    stamp = [time.strftime("%Y%m%dT%H%M%S", time.gmtime(b)) for b in begin]
    out[order] = [f"store:{dev}@{st}" for dev, st in zip(d.tolist(), stamp)]
    return out


MAX_UNLABELLED = 50_000  # records of unlabelled devices a dataset takes from a store


def _bounded(
    data: StoreData, labels: dict[str, str], limit: int, seed: int
) -> tuple[FlowTable, Labels]:
    """Every record of a labelled device, and whole sessions of the unlabelled ones (a
    seeded sample, about *limit* records): a month of a busy network would not fit in
    memory as matrices, and distillation needs a sample of it, not all."""
    t = data.table
    keys = t.device_keys().astype(str)
    unl = np.array([not labels.get(k.lower(), "") for k in keys.tolist()], bool)
    if unl.sum() <= limit:
        return t, data.labels
    caps = sessions(keys, t.start)
    names, inv, sizes = np.unique(caps[unl], return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(names))
    take = order[: int(np.searchsorted(np.cumsum(sizes[order]), limit)) + 1]
    keep = ~unl
    keep[np.flatnonzero(unl)[np.isin(inv, take)]] = True
    idx = np.flatnonzero(keep)
    return t.take(idx), data.labels.take(idx)


def store_dataset(
    data: StoreData,
    layout: Any,
    labels: dict[str, str],
    max_unlabelled: int = MAX_UNLABELLED,
    seed: int = 0,
) -> tuple[Any, Labels]:
    """The :class:`~iotcls.dataset.Dataset` of a store's records (matrices assembled as
    ``iotcls classify`` assembles them: each device's history in start order, across the
    whole store), labelled by ``labels`` (device -> label; "" or absent: unlabelled), and
    the labels the service gave each row. Sessions are its capture ids. Unlabelled devices
    give whole sessions up to about ``max_unlabelled`` records (:func:`_bounded`)."""
    from .dataset import CaptureTable, Dataset

    t = data.table
    if layout.packets > t.packets or (
        layout.payload_mode == "packet" and layout.required_payload_bytes() > t.payload_bytes
    ):
        raise ValueError(
            f"the store's records hold {t.packets} packets of {t.payload_bytes} "
            f"payload bytes; the layout needs {layout.packets} of "
            f"{layout.required_payload_bytes()}"
        )
    if not len(t):
        return Dataset.empty(layout), data.labels
    t, served = _bounded(data, labels, max_unlabelled, seed)
    mats, o = layout.matrices(t)
    dev = t.device_keys()[o].astype(str)
    caps = sessions(dev, t.start[o]).astype(str)
    names, inv = np.unique(caps, return_inverse=True)
    pk = np.bincount(inv, t.total_packets[o], len(names)).astype(np.int64)
    by = np.bincount(inv, t.total_bytes[o], len(names)).astype(np.int64)
    first = {}
    for d, s in zip(dev.tolist(), t.start[o].tolist()):
        first.setdefault(d, s)  # rows are by device, then start: the first is the earliest
    rows = np.bincount(inv, minlength=len(names)).astype(np.int64)
    ct = CaptureTable(
        ids=names,
        pcaps=np.full(len(names), "store"),
        frames=rows,
        packets=pk,
        bytes=by,
        device_packets=pk,
        device_bytes=by,
        records=rows,
        warnings=np.zeros(len(names), np.int64),
        errors=np.full(len(names), ""),
    )
    ds = Dataset(
        matrices=mats,
        labels=np.array([labels.get(d.lower(), "") for d in dev.tolist()], dtype=str),
        devices=dev,
        captures=caps,
        timestamps=t.start[o],
        last=t.last[o],
        total_packets=t.total_packets[o],
        total_bytes=t.total_bytes[o],
        inspected_packets=t.n_pkts[o].astype(np.int64),
        inspected_bytes=t.sizes[o].sum(1).astype(np.int64),
        device_first_seen=np.array([first[d] for d in dev.tolist()], np.float64),
        capture_packets=pk[inv],
        capture_bytes=by[inv],
        uids=t.uid[o].astype(str),
        layout=layout,
        captures_table=ct,
    )
    if not len(ds.labels):
        ds.labels = np.zeros(0, "U1")
    return ds, served.take(o)
