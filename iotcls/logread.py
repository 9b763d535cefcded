"""Reading ``iot_class.log`` back, in either format Zeek (or ``iotcls classify``) writes.

The columns come from :data:`iotcls.logschema.FIELDS`; this module only undoes the writers'
encodings (Zeek ASCII escapes, unset and empty markers, vectors; JSON with epoch or ISO 8601
timestamps), so that reports and tests read the log the way a SIEM would. Every problem is a
:class:`LogReadError` naming the file and line, because an operator fixing a log cut short by a
crash needs to know where, not a traceback.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from .logschema import FIELDS

ZEEK_TYPES = dict(FIELDS)
# What a report cannot do without; the other columns are read when present.
REQUIRED = ("ts", "device_ip", "label", "confidence", "trusted")
MAX_TIME = 253402300800.0  # 10000-01-01 UTC: Python's dates end before it


class LogReadError(ValueError):
    """A one-line error: ``FILE:LINE: what is wrong``."""


@dataclass(frozen=True)
class LogRow:
    """One log entry, typed: ``values`` maps field names to Python values (None when unset)."""

    path: str
    line: int
    values: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.values.get(name)


def _unescape(s: str) -> str:
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), s)


def _parse_ascii(raw: str, ztype: str, header: _AsciiHeader) -> Any:
    if raw == header.unset:
        return None
    if ztype.startswith(("vector", "set")):
        if raw == header.empty:
            return []
        return [_unescape(x) for x in raw.split(header.set_sep)]
    if raw == header.empty and ztype == "string":
        return ""
    return _typed(_unescape(raw), ztype)


def _typed(v: Any, ztype: str) -> Any:
    """Converts a decoded value to its Python type; ValueError says what it expected."""
    if ztype == "time":
        return _time(v)
    if ztype == "double":
        f = float(v)
        if isinstance(v, bool) or math.isinf(f):
            raise ValueError(f"not a number: {v!r}")
        return f
    if ztype in ("count", "port", "int"):
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError(f"not an integer: {v!r}")
        return int(v)
    if ztype == "bool":
        if isinstance(v, bool):
            return v
        if v in ("T", "F"):
            return v == "T"
        raise ValueError(f"not T or F: {v!r}")
    if ztype.startswith(("vector", "set")):
        if not isinstance(v, list):
            raise ValueError(f"not a list: {v!r}")
        return [str(x) for x in v]
    if not isinstance(v, str):
        raise ValueError(f"not a string: {v!r}")
    return v


def _time(v: Any) -> float:
    """Epoch seconds in [0, :data:`MAX_TIME`): what a date can be written for. A time outside
    (1e300, a negative one) is an error here, with its file and line, rather than a crash
    wherever a report or a SIEM export formats it."""
    if isinstance(v, str) and not re.fullmatch(r"[0-9.]+", v):
        # LogAscii::json_timestamps = JSON::TS_ISO8601 (Security Onion's setting).
        try:
            t = datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError, OSError):
            raise ValueError(f"not a time: {v!r}") from None
    elif isinstance(v, bool):
        raise ValueError(f"not a time: {v!r}")
    else:
        t = float(v)
    if not 0 <= t < MAX_TIME:  # NaN included
        raise ValueError(f"time {v!r} is outside 1970 to 9999")
    return t


@dataclass
class _AsciiHeader:
    sep: str = "\t"
    set_sep: str = ","
    empty: str = "(empty)"
    unset: str = "-"
    path: str = ""
    fields: tuple[str, ...] = ()
    types: tuple[str, ...] = ()


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="\n")
    return open(path, encoding="utf-8", newline="\n")


def read_log(path: str | Path) -> Iterator[LogRow]:
    """The entries of one iot_class.log (Zeek ASCII or JSON lines, ``.gz`` too)."""
    p = Path(path)
    try:
        with _open(p) as f:
            lines = enumerate(f, 1)
            for lineno, line in lines:
                s = line.rstrip("\r\n")
                if not s.strip():
                    continue
                if s.startswith("#"):
                    yield from _read_ascii(p, lineno, s, lines)
                elif s.lstrip().startswith("{"):
                    yield from _read_json(p, lineno, s, lines)
                else:
                    raise LogReadError(
                        f"{p}:{lineno}: not an iot_class.log: expected a Zeek "
                        "ASCII header (#separator) or a JSON object"
                    )
                return
    except OSError as e:
        raise LogReadError(f"{p}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise LogReadError(f"{p}: not a text log: {e}") from None


def _read_ascii(
    p: Path, lineno: int, first: str, lines: Iterator[tuple[int, str]]
) -> Iterator[LogRow]:
    header = _AsciiHeader()
    in_header = True
    line = first
    while True:
        s = line.rstrip("\r\n")
        if s.startswith("#"):
            _header_line(p, lineno, s, header)
            in_header = True
        elif s:
            if in_header:
                _check_header(p, lineno, header)
                in_header = False
            yield _ascii_row(p, lineno, s, header)
        nxt = next(lines, None)
        if nxt is None:
            return
        lineno, line = nxt


def _header_line(p: Path, lineno: int, s: str, h: _AsciiHeader) -> None:
    if s.startswith("#separator "):
        h.sep = _unescape(s[len("#separator ") :])
        return
    key, _, value = s.partition(h.sep)
    if key == "#set_separator":
        h.set_sep = _unescape(value)
    elif key == "#empty_field":
        h.empty = value
    elif key == "#unset_field":
        h.unset = value
    elif key == "#path":
        h.path = value
    elif key == "#fields":
        h.fields = tuple(value.split(h.sep))
    elif key == "#types":
        h.types = tuple(value.split(h.sep))
    # #open, #close and comments carry nothing a reader needs.


def _check_header(p: Path, lineno: int, h: _AsciiHeader) -> None:
    if h.path and not h.path.startswith("iot_class"):
        raise LogReadError(f"{p}:{lineno}: this is Zeek's {h.path} log, not iot_class")
    if not h.fields:
        raise LogReadError(f"{p}:{lineno}: entry before the #fields header line")
    missing = [f for f in REQUIRED if f not in h.fields]
    if missing:
        raise LogReadError(f"{p}:{lineno}: the #fields header lacks {', '.join(missing)}")
    if h.types and len(h.types) != len(h.fields):
        raise LogReadError(
            f"{p}:{lineno}: #types has {len(h.types)} columns, #fields {len(h.fields)}"
        )


def _ascii_row(p: Path, lineno: int, s: str, h: _AsciiHeader) -> LogRow:
    cols = s.split(h.sep)
    if len(cols) != len(h.fields):
        raise LogReadError(f"{p}:{lineno}: {len(cols)} columns, the header has {len(h.fields)}")
    values: dict[str, Any] = {}
    for i, (name, raw) in enumerate(zip(h.fields, cols)):
        ztype = ZEEK_TYPES.get(name) or (h.types[i] if h.types else "string")
        try:
            values[name] = _parse_ascii(raw, ztype, h)
        except (ValueError, OverflowError) as e:
            raise LogReadError(f"{p}:{lineno}: {name}: {e}") from None
    _check_required(p, lineno, values)
    return LogRow(str(p), lineno, values)


def _read_json(
    p: Path, lineno: int, first: str, lines: Iterator[tuple[int, str]]
) -> Iterator[LogRow]:
    yield _json_row(p, lineno, first)
    for lineno, line in lines:
        s = line.strip()
        if s:
            yield _json_row(p, lineno, s)


def _json_row(p: Path, lineno: int, s: str) -> LogRow:
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        raise LogReadError(f"{p}:{lineno}: not valid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise LogReadError(f"{p}:{lineno}: not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise LogReadError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    values: dict[str, Any] = {}
    for name, v in obj.items():
        if v is None:
            values[name] = None
            continue
        ztype = ZEEK_TYPES.get(name)
        if ztype is None:
            values[name] = v  # a column added by a local Zeek script: kept, not typed
            continue
        try:
            values[name] = _typed(v, ztype)
        except (ValueError, TypeError, OverflowError) as e:
            raise LogReadError(f"{p}:{lineno}: {name}: {e}") from None
    _check_required(p, lineno, values)
    return LogRow(str(p), lineno, values)


def _check_required(p: Path, lineno: int, values: dict[str, Any]) -> None:
    missing = [f for f in REQUIRED if values.get(f) is None]
    if missing:
        raise LogReadError(f"{p}:{lineno}: no {', '.join(missing)} (not an iot_class entry?)")


def read_logs(paths: list[str | Path]) -> list[LogRow]:
    """The entries of several logs (rotated files, several sensors), in time order."""
    rows = [r for p in paths for r in read_log(p)]
    rows.sort(key=lambda r: r["ts"])
    return rows
