"""The ``iot_class.log`` schema and writers, in Zeek's ASCII and JSON formats.

The same columns are declared by ``IoTClass::Info`` in ``zeek-scripts/iotcls/main.zeek``; a
test checks that both agree. ``iotcls classify`` writes this log itself; under Zeek, Zeek's
logging framework writes it from the labels the bridge sends back.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

# (name, Zeek type) in log order.
FIELDS: tuple[tuple[str, str], ...] = (
    ("ts", "time"),
    ("uid", "string"),
    ("id.orig_h", "addr"),
    ("id.orig_p", "port"),
    ("id.resp_h", "addr"),
    ("id.resp_p", "port"),
    ("proto", "enum"),
    ("device_mac", "string"),
    ("device_ip", "addr"),
    ("label", "string"),
    ("confidence", "double"),
    ("strategy", "string"),
    ("n_flows", "count"),
    ("trusted", "bool"),
    ("reason", "string"),
    ("top_groups", "vector[string]"),
    ("model", "string"),
)
FIELD_NAMES = tuple(name for name, _ in FIELDS)


@dataclass
class LogEntry:
    ts: float
    uid: str
    orig_h: str
    orig_p: int
    resp_h: str
    resp_p: int
    proto: str
    device_mac: str
    device_ip: str
    label: str
    confidence: float
    strategy: str
    n_flows: int
    trusted: bool = True
    reason: str = "-"
    top_groups: list[str] = field(default_factory=list)
    model: str = ""

    def values(self) -> tuple:
        return (
            self.ts,
            self.uid,
            self.orig_h,
            self.orig_p,
            self.resp_h,
            self.resp_p,
            self.proto,
            self.device_mac,
            self.device_ip,
            self.label,
            self.confidence,
            self.strategy,
            self.n_flows,
            self.trusted,
            self.reason,
            self.top_groups,
            self.model,
        )

    def to_json_dict(self) -> dict:
        """As Zeek writes with ``LogAscii::use_json=T`` (empty strings and vectors kept)."""
        d = dict(zip(FIELD_NAMES, self.values()))
        if not self.device_mac:
            del d["device_mac"]  # unset optional field: Zeek omits it
        return d


def _ascii_value(v, ztype: str) -> str:
    if v is None:
        return "-"
    if ztype == "time":
        return f"{v:.6f}"
    if ztype == "double":
        return "-" if math.isnan(v) else f"{v:.6f}"
    if ztype == "bool":
        return "T" if v else "F"
    if ztype.startswith("vector"):
        return ",".join(_escape(str(x)) for x in v) if v else "(empty)"
    s = str(v)
    if ztype == "string" and s == "":
        return "(empty)" if v is not None else "-"
    return _escape(s)


def _escape(s: str) -> str:
    out = []
    for ch in s:
        if ch in "\t\\," or ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


class LogWriter:
    """Writes ``iot_class.log``; ``fmt`` is ``zeek`` (ASCII with header) or ``json``."""

    def __init__(self, stream: IO[str], fmt: str = "zeek", path: str = "iot_class"):
        if fmt not in ("zeek", "json"):
            raise ValueError(f"log format must be zeek or json, not {fmt!r}")
        self.stream, self.fmt, self.path = stream, fmt, path
        if fmt == "zeek":
            opened = time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime())
            self.stream.write(
                "#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n"
                f"#unset_field\t-\n#path\t{path}\n#open\t{opened}\n"
                "#fields\t" + "\t".join(FIELD_NAMES) + "\n"
                "#types\t" + "\t".join(t for _, t in FIELDS) + "\n"
            )

    def write(self, entry: LogEntry) -> None:
        if self.fmt == "json":
            self.stream.write(json.dumps(entry.to_json_dict(), separators=(",", ":")) + "\n")
            return
        vals = list(entry.values())
        vals[7] = vals[7] or None  # device_mac unset when unknown
        self.stream.write("\t".join(_ascii_value(v, t) for v, (_, t) in zip(vals, FIELDS)) + "\n")

    def close(self) -> None:
        if self.fmt == "zeek":
            closed = time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime())
            self.stream.write(f"#close\t{closed}\n")
        self.stream.flush()


def open_log(directory: Path, fmt: str = "zeek") -> tuple[LogWriter, IO[str]]:
    directory.mkdir(parents=True, exist_ok=True)
    f = open(directory / "iot_class.log", "w", encoding="utf-8")
    return LogWriter(f, fmt), f
