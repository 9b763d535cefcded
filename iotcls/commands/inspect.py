"""``iotcls inspect``: print the flow records the pcap sensor builds from captures."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone

from ..capture import add_capture_arguments, specs_from_args
from ..cli import CliError
from ..schema import DEFAULT_PACKETS, DEFAULT_WINDOW_S, FlowRecord, proto_name

PRIVATE_NETS = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"
HEX_BYTES = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_capture_arguments(parser)
    parser.add_argument(
        "--limit",
        type=int,
        default=100,
        metavar="N",
        help="print at most N records (0: all; default 100)",
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per record instead of a table"
    )


def _endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _packets(r: FlowRecord) -> str:
    return " ".join(
        f"+{off * 1000:.0f}{'↑' if d else '↓'}{size}"
        for off, size, d in zip(r.offsets, r.sizes, r.directions)
    )


def _payload_hex(r: FlowRecord) -> str:
    first = next((p for p in r.payloads if p), b"")
    return first[:HEX_BYTES].hex()


def record_json(r: FlowRecord, capture: str, label: str) -> dict:
    return {
        "capture": capture,
        "start": r.start,
        "last": r.last,
        "uid": r.uid,
        "device_mac": r.device_mac,
        "device_ip": r.device_ip,
        "device_port": r.device_port,
        "remote_ip": r.remote_ip,
        "remote_port": r.remote_port,
        "proto": proto_name(r.proto),
        "ip_proto": r.proto,
        "total_bytes": r.total_bytes,
        "total_packets": r.total_packets,
        "offsets": r.offsets,
        "sizes": r.sizes,
        "directions": r.directions,
        "payloads": [p.hex() for p in r.payloads],
        "device_is_orig": r.device_is_orig,
        "label": label,
    }


def _options(args: argparse.Namespace) -> tuple[float, int, int, str]:
    """Window, packets and payload bytes, checked; and a note when the devices are guessed
    (no --devices or --local-nets: private endpoints). Sets args.local_nets then."""
    from ..flows import check_window

    if args.limit < 0:
        raise CliError(f"--limit must be 0 or more, not {args.limit}")
    note = ""
    if (
        not args.devices
        and not args.local_nets
        and any(not a.endswith(".csv") for a in args.captures)
    ):
        args.local_nets = PRIVATE_NETS
        note = f"devices: endpoints in {PRIVATE_NETS} (no --devices or --local-nets given)"
    window = args.window if args.window is not None else DEFAULT_WINDOW_S
    packets = args.packets if args.packets is not None else DEFAULT_PACKETS
    payload = args.payload_bytes if args.payload_bytes is not None else HEX_BYTES
    if window <= 0 or packets <= 0 or payload < 0:
        raise CliError("--window and --packets must be positive, --payload-bytes not negative")
    try:
        check_window(window)
    except ValueError as e:
        raise CliError(f"--window: {e}") from None
    return window, packets, payload, note


def run(args: argparse.Namespace) -> int:
    from ..flows import iter_capture_flows, read_failure
    from ..pcap import PcapError

    window, packets, payload, note = _options(args)
    specs = specs_from_args(args)
    out = sys.stdout
    if note and not args.json:
        print(note, file=out)
    shown = 0
    failed = 0
    limit = args.limit or None
    header = (
        f"{'start (UTC)':<23} {'uid':<18} {'device':<17} {'device ip:port':<22} "
        f"{'remote ip:port':<22} {'proto':<5} {'bytes':>8} {'pkts':>6}  "
        "first packets (+ms, ↑ to remote / ↓ to device, IP length)  payload"
    )
    for spec in specs:
        if not args.json:
            print(f"\n== {spec.pcap}", file=out)
            print(header, file=out)
        reader = None
        try:
            for table, reader, _ in iter_capture_flows(  # noqa: B007 (the reader is read after the loop)
                spec.pcap, spec.selector(), window, packets, payload
            ):
                for r in table.records():
                    if limit is not None and shown >= limit:
                        break
                    label = spec.label_of(r.device_mac)
                    if spec.labelled and not label:
                        continue
                    shown += 1
                    if args.json:
                        print(json.dumps(record_json(r, spec.capture_id, label)), file=out)
                        continue
                    dev = r.device_mac or "-"
                    print(
                        f"{_time(r.start):<23} {r.uid:<18} {dev:<17} "
                        f"{_endpoint(r.device_ip, r.device_port):<22} "
                        f"{_endpoint(r.remote_ip, r.remote_port):<22} "
                        f"{proto_name(r.proto):<5} {r.total_bytes:>8} {r.total_packets:>6}  "
                        f"{_packets(r)}  {_payload_hex(r)}" + (f"  [{label}]" if label else ""),
                        file=out,
                    )
                if limit is not None and shown >= limit:
                    break
        except PcapError as e:
            failed += 1
            print(f"iotcls inspect: error: {e}", file=sys.stderr)
            continue
        except Exception as e:  # noqa: BLE001 - a bad capture must cost only itself
            failed += 1
            why = read_failure(reader, e) if reader is not None else f"{spec.pcap}: {e!r}"
            print(f"iotcls inspect: error: {why}", file=sys.stderr)
            continue
        if reader is not None:
            st = reader.stats
            for w in st.summary_warnings():
                print(f"iotcls inspect: warning: {w}", file=sys.stderr)
            if not args.json:
                print(
                    f"-- {st.frames:,} frames, {st.ip_packets:,} IP packets, "
                    f"{st.non_ip:,} non-IP, {st.malformed:,} malformed",
                    file=out,
                )
        if limit is not None and shown >= limit:
            if not args.json:
                print(f"-- stopped after {limit} records (--limit)", file=out)
            break
    return 1 if failed else 0
