"""Datasets: flow-sequence matrices with labels, device and capture ids, saved as ``.npz``.

A :class:`Dataset` row is one flow record seen as a matrix (the record and its device's
previous records, :mod:`iotcls.layout`). Rows are ordered by capture, then by the layout's
assemble order (device, then window start), so a device's history never crosses captures.

Besides what a model trains on (``matrices``, ``labels``), a row carries what evaluation needs
to measure the cost and the delay of a label: the record's window (``timestamps``, ``last``),
its traffic (``total_*``) and the part of it the sensor inspected (``inspected_*``: the first
N packets), the device's first packet in that capture (``device_first_seen``, for time to
first label), and per-capture totals (``capture_packets``, ``capture_bytes``, the IP
traffic of the whole capture, for traffic selectivity). The ``captures_table`` holds the same
per-capture figures once per capture.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from .capture import CaptureSpec
from .flows import CaptureFlows, capture_flows, capture_flows_many
from .flowtable import FlowTable
from .layout import LayoutError, MatrixLayout

DATASET_FORMAT = "iotcls-dataset"
DATASET_VERSION = 1

_ROW_FIELDS = (
    "matrices",
    "labels",
    "devices",
    "captures",
    "timestamps",
    "last",
    "total_packets",
    "total_bytes",
    "inspected_packets",
    "inspected_bytes",
    "device_first_seen",
    "capture_packets",
    "capture_bytes",
    "uids",
)


class DatasetError(ValueError):
    """A dataset file that is missing, not a dataset, or of another version/layout."""


@dataclass
class CaptureTable:
    """One row per capture read (including those that failed: ``error`` says why)."""

    ids: np.ndarray  # str
    pcaps: np.ndarray  # str
    frames: np.ndarray  # int64 records in the file
    packets: np.ndarray  # int64 IP packets
    bytes: np.ndarray  # int64 IP bytes
    device_packets: np.ndarray  # int64 packets of selected devices (mirrored count twice)
    device_bytes: np.ndarray  # int64
    records: np.ndarray  # int64 rows kept in the dataset
    warnings: np.ndarray  # int64 warning count
    errors: np.ndarray  # str, "" when the file was read

    @classmethod
    def empty(cls) -> CaptureTable:
        s = np.zeros(0, dtype="U1")
        i = np.zeros(0, np.int64)
        return cls(s, s, i, i, i, i, i, i, i, s)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Dataset:
    matrices: np.ndarray  # (n, K+1, W) float32
    labels: np.ndarray  # (n,) str, "" unlabelled
    devices: np.ndarray  # (n,) str: MAC, else IP
    captures: np.ndarray  # (n,) str capture id
    timestamps: np.ndarray  # (n,) float64 window start
    last: np.ndarray  # (n,) float64 last packet of the window
    total_packets: np.ndarray  # (n,) int64
    total_bytes: np.ndarray  # (n,) int64
    inspected_packets: np.ndarray  # (n,) int64 min(N, total_packets)
    inspected_bytes: np.ndarray  # (n,) int64 IP lengths of the first N packets
    device_first_seen: np.ndarray  # (n,) float64 device's first packet in the capture
    capture_packets: np.ndarray  # (n,) int64 IP packets of the row's whole capture
    capture_bytes: np.ndarray  # (n,) int64
    uids: np.ndarray  # (n,) str connection uid
    layout: MatrixLayout
    captures_table: CaptureTable = field(default_factory=CaptureTable.empty)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels.tolist()) - {""})

    def label_counts(self) -> dict[str, int]:
        names, counts = np.unique(self.labels, return_counts=True)
        return {str(k): int(v) for k, v in zip(names, counts)}

    def take(self, index: np.ndarray) -> Dataset:
        kw = {k: getattr(self, k)[index] for k in _ROW_FIELDS}
        return Dataset(**kw, layout=self.layout, captures_table=self.captures_table)

    @classmethod
    def empty(cls, layout: MatrixLayout) -> Dataset:
        s = np.zeros(0, dtype="U1")
        f = np.zeros(0, np.float64)
        i = np.zeros(0, np.int64)
        return cls(
            np.zeros((0, *layout.shape), np.float32), s, s, s, f, f, i, i, i, i, f, i, i, s, layout
        )

    @classmethod
    def concat(cls, parts: list[Dataset], layout: MatrixLayout) -> Dataset:
        for p in parts:
            layout.check_compatible(p.layout, "dataset part")
        if not parts:
            return cls.empty(layout)
        kw = {k: np.concatenate([getattr(p, k) for p in parts]) for k in _ROW_FIELDS}
        ct = CaptureTable(
            **{
                f.name: np.concatenate([getattr(p.captures_table, f.name) for p in parts])
                for f in fields(CaptureTable)
            }
        )
        return cls(**kw, layout=layout, captures_table=ct)

    # -- files --------------------------------------------------------------------------
    def save(self, path: str | Path, compress: bool = False) -> None:
        arrays = {k: getattr(self, k) for k in _ROW_FIELDS}
        for k in ("labels", "devices", "captures", "uids"):
            arrays[k] = np.asarray(arrays[k]).astype(str)
        for f in fields(CaptureTable):
            a = getattr(self.captures_table, f.name)
            arrays[f"ct_{f.name}"] = a.astype(str) if a.dtype.kind in "OUS" else a
        arrays["format"] = np.array(DATASET_FORMAT)
        arrays["version"] = np.array(DATASET_VERSION)
        arrays["layout"] = np.array(self.layout.to_yaml())
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save = np.savez_compressed if compress else np.savez
        with path.open("wb") as f:  # an explicit handle: numpy would append ".npz"
            save(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Dataset:
        path = Path(path)
        if not path.exists():
            raise DatasetError(f"{path}: dataset file not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise DatasetError(f"{path}: not a dataset file ({e})") from None
        if str(data.get("format", "")) != DATASET_FORMAT:
            raise DatasetError(f"{path}: not an iotcls dataset file")
        if int(data.get("version", -1)) != DATASET_VERSION:
            raise DatasetError(
                f"{path}: dataset version {int(data.get('version', -1))} is not "
                f"supported (this is {DATASET_VERSION})"
            )
        missing = [k for k in _ROW_FIELDS if k not in data]
        if missing:
            raise DatasetError(f"{path}: dataset lacks {', '.join(missing)}")
        try:
            layout = MatrixLayout.from_yaml(str(data["layout"]))
        except LayoutError as e:
            raise DatasetError(f"{path}: {e}") from None
        if data["matrices"].shape[1:] != layout.shape:
            raise DatasetError(
                f"{path}: matrices of shape {data['matrices'].shape[1:]} do not "
                f"match the layout's {layout.shape}"
            )
        ct = CaptureTable.empty()
        if all(f"ct_{f.name}" in data for f in fields(CaptureTable)):
            ct = CaptureTable(**{f.name: data[f"ct_{f.name}"] for f in fields(CaptureTable)})
        return cls(**{k: data[k] for k in _ROW_FIELDS}, layout=layout, captures_table=ct)


# --------------------------------------------------------------------------------------------
# building


@dataclass
class CaptureMatrices:
    """One capture's records and matrices: ``matrices[i]`` belongs to ``table`` row
    ``order[i]``; ``flows`` has the reader's statistics and warnings."""

    spec: CaptureSpec
    table: FlowTable  # records kept (labelled specs: only labelled devices)
    matrices: np.ndarray
    order: np.ndarray
    flows: CaptureFlows

    @property
    def labels(self) -> np.ndarray:
        """Per table row."""
        return np.array(
            [self.spec.label_of(m) for m in self.table.device_mac.tolist()], dtype=object
        )


def sensor_options(
    layout: MatrixLayout,
    window_s: float | None,
    packets: int | None,
    payload_bytes: int | None,
) -> tuple[MatrixLayout, float, int, int]:
    """The layout with the sensor options applied, and the (window, packets, payload bytes)
    the records need for it. Explicit options override the layout's own values. A window the
    flow builder cannot carry (beyond :data:`~iotcls.flows.MAX_WINDOW_S`, infinite) is a
    LayoutError here, before any capture is read, whether it came from an option or a layout."""
    import dataclasses

    from .flows import check_window

    try:
        check_window(layout.window_s if window_s is None else window_s)
    except ValueError as e:
        raise LayoutError(f"layout: {e}") from None
    changes = {}
    if window_s is not None and window_s != layout.window_s:
        changes["window_s"] = float(window_s)
    if packets is not None and packets != layout.packets:
        changes["packets"] = int(packets)
    if changes:
        layout = dataclasses.replace(layout, **changes)
    need = layout.required_payload_bytes()
    pb = need if payload_bytes is None else max(int(payload_bytes), need)
    return layout, layout.window_s, layout.packets, pb


def _keep_labelled(spec: CaptureSpec, t: FlowTable) -> FlowTable:
    if spec.labelled and len(t):
        labelled = [m for m, lab in spec.labels.items() if lab]
        t = t.take(np.isin(t.device_mac.astype(str), labelled))
    return t


def capture_matrices(
    spec: CaptureSpec,
    layout: MatrixLayout,
    window_s: float | None = None,
    packets: int | None = None,
    payload_bytes: int | None = None,
) -> CaptureMatrices:
    """Read one capture into records and matrices (never raises for a bad file)."""
    layout, w, p, pb = sensor_options(layout, window_s, packets, payload_bytes)
    cf = capture_flows(spec.pcap, spec.selector(), w, p, pb)
    t = _keep_labelled(spec, cf.table)
    mats, order = layout.matrices(t)
    return CaptureMatrices(spec, t, mats, order, cf)


def captures_matrices(
    specs: list[CaptureSpec],
    layout: MatrixLayout,
    window_s: float | None = None,
    packets: int | None = None,
    payload_bytes: int | None = None,
) -> list[CaptureMatrices]:
    """:func:`capture_matrices` for many small captures at once (one flow-builder pass and
    one matrix assembly for all): the same results, a fraction of the fixed costs."""
    layout, w, p, pb = sensor_options(layout, window_s, packets, payload_bytes)
    flows = capture_flows_many([s.pcap for s in specs], [s.selector() for s in specs], w, p, pb)
    tables = [_keep_labelled(s, cf.table) for s, cf in zip(specs, flows)]
    t = FlowTable.concat(tables, p, pb)
    sizes = [len(x) for x in tables]
    # prefixing the capture keeps histories apart and orders the rows capture-major
    caps = np.repeat(np.arange(len(specs)), sizes)
    keys = (
        np.char.add(
            np.char.add(np.char.zfill(caps.astype(str), 6), "|"), t.device_keys().astype(str)
        )
        if len(t)
        else np.zeros(0, str)
    )
    mats, order = layout.assemble(layout.encode_rows(t), t.start, keys)
    out = []
    lo = 0
    for spec, cf, tab, n in zip(specs, flows, tables, sizes):
        out.append(CaptureMatrices(spec, tab, mats[lo : lo + n], order[lo : lo + n] - lo, cf))
        lo += n
    return out


SMALL_CAPTURE = 2 << 20  # bytes: captures up to this size share builder passes
GROUP_BYTES = 16 << 20


def _groups(specs: list[CaptureSpec]) -> list[list[CaptureSpec]]:
    """Runs of consecutive small captures with the same local networks (up to GROUP_BYTES);
    a large capture is a group of its own."""
    groups: list[list[CaptureSpec]] = []
    size = 0
    open_group = False  # may the last group take more captures?
    for s in specs:
        try:
            n = s.pcap.stat().st_size
        except OSError:
            n = 0  # unreadable: the reader reports it, it costs nothing here
        small = n <= SMALL_CAPTURE
        if (
            open_group
            and small
            and size + n <= GROUP_BYTES
            and len(groups[-1]) < 4096
            and groups[-1][0].local_nets == s.local_nets
        ):
            groups[-1].append(s)
            size += n
        else:
            groups.append([s])
            size, open_group = n, small
    return groups


def build_dataset(
    specs: list[CaptureSpec],
    layout: MatrixLayout,
    window_s: float | None = None,
    packets: int | None = None,
    payload_bytes: int | None = None,
    progress: bool = True,
    on_capture: Callable[[CaptureMatrices], None] | None = None,
) -> Dataset:
    """A dataset of every selected device's records in ``specs`` (labelled specs: only the
    labelled devices). ``on_capture`` sees each capture's result (warnings, errors)."""
    from tqdm import tqdm

    layout, w, p, pb = sensor_options(layout, window_s, packets, payload_bytes)
    parts = []
    bar = tqdm(total=len(specs), unit="file", disable=not progress, dynamic_ncols=True)
    for group in _groups(specs):
        bar.set_postfix_str(group[0].capture_id[-40:], refresh=False)
        if len(group) == 1:
            results = [capture_matrices(group[0], layout, w, p, pb)]
        else:
            results = captures_matrices(group, layout, w, p, pb)
        for cm in results:
            if on_capture is not None:
                on_capture(cm)
            parts.append(_dataset_part(cm, layout))
        bar.update(len(group))
    bar.close()
    return Dataset.concat(parts, layout)


def _dataset_part(cm: CaptureMatrices, layout: MatrixLayout) -> Dataset:
    t, o = cm.table, cm.order
    st, bs = cm.flows.stats, cm.flows.builder
    n = len(o)
    devices = t.device_keys()[o].astype(str) if n else np.zeros(0, "U1")
    labels = cm.labels[o].astype(str) if n else np.zeros(0, "U1")
    first = cm.flows.device_first_seen
    cid = cm.spec.capture_id
    ct = CaptureTable(
        ids=np.array([cid]),
        pcaps=np.array([str(cm.spec.pcap)]),
        frames=np.array([st.frames], np.int64),
        packets=np.array([st.ip_packets], np.int64),
        bytes=np.array([st.ip_bytes], np.int64),
        device_packets=np.array([bs.device_packets], np.int64),
        device_bytes=np.array([bs.device_bytes], np.int64),
        records=np.array([n], np.int64),
        warnings=np.array([st.warning_count], np.int64),
        errors=np.array([cm.flows.error]),
    )
    return Dataset(
        matrices=cm.matrices,
        labels=labels,
        devices=devices,
        captures=np.full(n, cid),
        timestamps=t.start[o],
        last=t.last[o],
        total_packets=t.total_packets[o],
        total_bytes=t.total_bytes[o],
        inspected_packets=t.n_pkts[o].astype(np.int64),
        inspected_bytes=t.sizes[o].sum(1).astype(np.int64),
        device_first_seen=np.array([first.get(d, np.nan) for d in devices.tolist()], np.float64),
        capture_packets=np.full(n, st.ip_packets, np.int64),
        capture_bytes=np.full(n, st.ip_bytes, np.int64),
        uids=t.uid[o].astype(str) if n else np.zeros(0, "U1"),
        layout=layout,
        captures_table=ct,
    )
