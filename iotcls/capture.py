"""Capture sets: which pcaps to read, which devices in them, and what their labels are.

Three ways to name captures, the same in every command that reads pcaps
(:func:`add_capture_arguments`, :func:`specs_from_args`):

* **IoT Sentinel layout**: a directory of ``<label>/*.pcap`` with
  ``<label>/_iotdevice-mac.txt`` (or one such ``<label>`` directory). The directory name
  labels every record whose device is that MAC *in that directory's captures*: a label belongs
  to a capture file, not to a MAC, since some hubs appear under two directories. When the top
  directory holds ``devices.csv`` (``mac,device,type``), ``--labels type`` (the default there)
  maps directory names to the ``type`` column; ``--labels dir`` keeps directory names.
* **Manifest**: a CSV file with columns ``pcap,mac,label``; one row per labelled device of a
  capture; relative paths resolve against the manifest's directory; an empty label selects the
  device without labelling it.
* **Unlabelled**: any pcap/pcapng files (or directories of them) with ``--devices
  MAC[,MAC...]`` or ``--local-nets CIDR[,CIDR...]``.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass, field
from pathlib import Path

from .flows import DeviceSelector
from .pcap import int_to_mac, mac_to_int

PCAP_SUFFIXES = (".pcap", ".pcapng", ".cap", ".dmp")
MAC_FILE = "_iotdevice-mac.txt"
DEVICES_CSV = "devices.csv"


def _cli_error(msg: str) -> Exception:
    from .cli import CliError

    return CliError(msg)


@dataclass(frozen=True)
class CaptureSpec:
    """One pcap to read: its devices (MAC -> label, "" for none) and/or local networks."""

    pcap: Path
    capture_id: str
    labels: dict[str, str] = field(default_factory=dict)
    local_nets: tuple[str, ...] = ()

    @property
    def labelled(self) -> bool:
        return any(self.labels.values())

    def selector(self) -> DeviceSelector:
        return DeviceSelector.from_lists(list(self.labels), list(self.local_nets))

    def label_of(self, device: str) -> str:
        return self.labels.get(device, "")


def _norm_mac(mac: str, where: str) -> str:
    try:
        return int_to_mac(mac_to_int(mac))
    except ValueError:
        raise _cli_error(f"{where}: not a MAC address: {mac.strip()!r}") from None


def _split_list(value: str | None) -> list[str]:
    return [x.strip() for x in (value or "").split(",") if x.strip()]


def add_capture_arguments(parser: argparse.ArgumentParser, many: bool = True) -> None:
    """The options every pcap-reading command shares."""
    from .schema import DEFAULT_PACKETS, DEFAULT_WINDOW_S

    parser.add_argument(
        "captures",
        nargs="+" if many else None,
        metavar="CAPTURES" if many else "PCAP",
        help="pcap/pcapng files, directories in the IoT Sentinel layout (<label>/*.pcap + "
        f"<label>/{MAC_FILE}), or CSV manifests (pcap,mac,label)",
    )
    parser.add_argument(
        "--devices", metavar="MAC[,MAC...]", help="device MACs to follow in unlabelled captures"
    )
    parser.add_argument(
        "--local-nets",
        metavar="CIDR[,CIDR...]",
        help="devices are the endpoints inside these networks",
    )
    parser.add_argument(
        "--labels",
        type=_labels_option,
        default=None,
        metavar="type|dir|CSV",
        help="IoT Sentinel layout: label by devices.csv's type (default when "
        "devices.csv exists) or by directory name; flow stores: the "
        "device list of iotcls inventory (devices.csv)",
    )
    parser.add_argument(
        "--window",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"flow window length (default {DEFAULT_WINDOW_S:g})",
    )
    parser.add_argument(
        "--packets",
        type=int,
        default=None,
        metavar="N",
        help=f"first packets kept per flow (default {DEFAULT_PACKETS})",
    )
    parser.add_argument(
        "--payload-bytes",
        type=int,
        default=None,
        metavar="B",
        help="payload bytes kept per packet (default: what the layout needs)",
    )


def _labels_option(value: str) -> str:
    """``--labels``: ``type`` or ``dir`` (IoT Sentinel layout), or a device list (``.csv``)."""
    if value in ("type", "dir") or value.lower().endswith(".csv"):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: expected type, dir or a devices.csv file")


def sentinel_labels(args: argparse.Namespace) -> str | None:
    """How IoT Sentinel directories are labelled (``--labels type|dir``), None: the default."""
    mode = getattr(args, "labels", None)
    return mode if mode in ("type", "dir") else None


def _find_pcaps(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in PCAP_SUFFIXES)


def _read_mac_file(path: Path) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise _cli_error(f"{path}: cannot read MAC file: {e.strerror or e}") from None
    macs = [_norm_mac(tok, str(path)) for tok in text.replace(",", " ").split()]
    if not macs:
        raise _cli_error(f"{path}: MAC file is empty")
    return macs


def _read_devices_csv(path: Path) -> dict[str, str]:
    """directory (device) name -> type."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise _cli_error(f"{path}: cannot read: {e.strerror or e}") from None
    except csv.Error as e:
        raise _cli_error(f"{path}: not a valid CSV file: {e}") from None
    out = {}
    for i, row in enumerate(rows, start=2):
        if not {"device", "type"} <= set(row) or not row["device"] or not row["type"]:
            raise _cli_error(f"{path}: line {i}: expected columns mac,device,type")
        out[row["device"].strip()] = row["type"].strip()
    return out


def sentinel_specs(root: Path, labels: str | None = None) -> list[CaptureSpec]:
    """Specs for a directory in the IoT Sentinel layout (or one ``<label>`` directory)."""
    if (root / MAC_FILE).exists():
        dirs, top = [root], root.parent
    else:
        dirs = sorted(d for d in root.iterdir() if d.is_dir() and _find_pcaps(d))
        top = root
    devices_csv = top / DEVICES_CSV
    mode = labels or ("type" if devices_csv.exists() else "dir")
    names: dict[str, str] = {}
    if mode == "type":
        if not devices_csv.exists():
            raise _cli_error(f"{top}: --labels type needs {DEVICES_CSV} (mac,device,type)")
        names = _read_devices_csv(devices_csv)
    specs = []
    for d in dirs:
        mac_file = d / MAC_FILE
        if not mac_file.exists():
            raise _cli_error(f"{d}: no {MAC_FILE} beside its captures")
        macs = _read_mac_file(mac_file)
        label = names.get(d.name, d.name) if mode == "type" else d.name
        for p in _find_pcaps(d):
            specs.append(CaptureSpec(p, f"{d.name}/{p.stem}", {m: label for m in macs}))
    return specs


def manifest_specs(path: Path, local_nets: tuple[str, ...] = ()) -> list[CaptureSpec]:
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            rows = list(reader)
    except OSError as e:
        raise _cli_error(f"{path}: cannot read manifest: {e.strerror or e}") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise _cli_error(f"{path}: not a valid CSV manifest: {e}") from None
    missing = {"pcap", "mac", "label"} - {c.strip() for c in fields}
    if missing:
        raise _cli_error(
            f"{path}: manifest lacks column(s) {', '.join(sorted(missing))} "
            "(expected pcap,mac,label)"
        )
    by_pcap: dict[Path, dict[str, str]] = {}
    for i, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not row["pcap"]:
            raise _cli_error(f"{path}: line {i}: empty pcap")
        p = Path(row["pcap"])
        if not p.is_absolute():
            p = path.parent / p
        mac = _norm_mac(row["mac"], f"{path}: line {i}")
        labels = by_pcap.setdefault(p, {})
        if labels.get(mac, row["label"]) != row["label"]:
            raise _cli_error(f"{path}: line {i}: {mac} has two labels in {row['pcap']}")
        labels[mac] = row["label"]
    if not by_pcap:
        raise _cli_error(f"{path}: manifest has no rows")
    base = path.parent
    specs = []
    for p, labels in by_pcap.items():
        try:
            cid = str(p.relative_to(base).with_suffix(""))
        except ValueError:
            cid = str(p.with_suffix(""))
        specs.append(CaptureSpec(p, cid, labels, local_nets))
    return specs


def specs_from_args(args: argparse.Namespace) -> list[CaptureSpec]:
    """Capture specs from the shared options; raises CliError for a bad set."""
    items = args.captures if isinstance(args.captures, list) else [args.captures]
    devices = [_norm_mac(m, "--devices") for m in _split_list(getattr(args, "devices", None))]
    nets = tuple(_split_list(getattr(args, "local_nets", None)))
    try:
        DeviceSelector.from_lists(devices, nets)
    except ValueError as e:
        raise _cli_error(f"--local-nets: {e}") from None
    specs: list[CaptureSpec] = []
    loose: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            if (p / MAC_FILE).exists() or any(
                (d / MAC_FILE).exists() for d in p.iterdir() if d.is_dir()
            ):
                specs += sentinel_specs(p, sentinel_labels(args))
            else:
                found = _find_pcaps(p)
                if not found:
                    raise _cli_error(
                        f"{p}: no captures here (*.pcap, *.pcapng) and not in the "
                        "IoT Sentinel layout"
                    )
                loose += found
        elif p.suffix.lower() == ".csv":
            if not p.exists():
                raise _cli_error(f"{p}: manifest not found")
            specs += manifest_specs(p, nets)
        else:
            loose.append(p)  # read errors (missing, not a pcap) are reported per file later
    if loose:
        if not devices and not nets:
            raise _cli_error(
                f"{loose[0]}: an unlabelled capture needs --devices MAC[,MAC] "
                "or --local-nets CIDR[,CIDR]"
            )
        for p in loose:
            specs.append(CaptureSpec(p, str(p.with_suffix("")), {m: "" for m in devices}, nets))
    ids: dict[str, int] = {}
    out = []
    for s in specs:  # capture ids must be unique within a set
        k = ids.get(s.capture_id, 0)
        ids[s.capture_id] = k + 1
        out.append(
            s if k == 0 else CaptureSpec(s.pcap, f"{s.capture_id}#{k}", s.labels, s.local_nets)
        )
    return out
