"""A small interpreter of Elasticsearch ingest pipelines, for the processors iotcls ships.

No Elasticsearch runs here, so the tests execute ``deploy/elastic/zeek.iot_class.json`` with
this. It follows the documented semantics of each processor type (field paths through
objects, ``ignore_missing``, failures, pipeline ``on_failure``) and refuses anything it does
not know (another processor type or option, a condition outside the tiny Painless subset
below), so a pipeline edit that it cannot check fails the test instead of passing unchecked.
"""

from __future__ import annotations

import copy
import json
import re
from datetime import datetime, timezone
from typing import Any

_MISSING = object()


class ProcessorError(Exception):
    def __init__(self, ptype: str, msg: str):
        super().__init__(msg)
        self.ptype = ptype


def _get(doc: dict, path: str) -> Any:
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def _set(doc: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    cur = doc
    for part in parts[:-1]:
        nxt = cur.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"cannot set [{path}]: [{part}] is not an object")
        cur = nxt
    cur[parts[-1]] = value


def _remove(doc: dict, path: str) -> None:
    parts = path.split(".")
    parent = _get(doc, ".".join(parts[:-1])) if len(parts) > 1 else doc
    del parent[parts[-1]]


def _render(template: str, doc: dict) -> str:
    """Mustache as the ingest node uses it: ``{{{a.b}}}`` / ``{{a.b}}`` of the document."""

    def sub(m: re.Match) -> str:
        v = _get(doc, m.group(1).strip())
        return "" if v is _MISSING or v is None else str(v)

    return re.sub(r"\{\{\{?\s*([^{}]+?)\s*\}?\}\}", sub, template)


# ctx.a?.b == 'x' / != 'x' / == null / != null: the only conditions the shipped files use.
_COND = re.compile(r"ctx\.([\w@]+(?:\??\.\w+)*)\s*(==|!=)\s*(null|'[^']*')")


def _condition(expr: str, doc: dict) -> bool:
    m = _COND.fullmatch(expr.strip())
    if not m:
        raise NotImplementedError(f"condition outside the supported subset: {expr!r}")
    v = _get(doc, m.group(1).replace("?", ""))
    v = None if v is _MISSING else v
    want = None if m.group(3) == "null" else m.group(3)[1:-1]
    return (v == want) if m.group(2) == "==" else (v != want)


def _date(value: Any, formats: list[str]) -> str:
    for fmt in formats:
        try:
            if fmt == "UNIX":
                t = datetime.fromtimestamp(float(str(value)), timezone.utc)
            elif fmt == "ISO8601":
                t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            else:
                raise NotImplementedError(f"date format {fmt}")
        except ValueError:
            continue
        # the processor's default output_format, yyyy-MM-dd'T'HH:mm:ss.SSSXXX
        t = t.astimezone(timezone.utc)
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
    raise ValueError(f"unable to parse date [{value}]")


def _convert(value: Any, to: str) -> Any:
    if isinstance(value, list):
        return [_convert(v, to) for v in value]
    s = str(value).lower() if isinstance(value, bool) else str(value)
    if to in ("double", "float"):
        return float(s)
    if to in ("long", "integer"):
        return int(s)
    if to == "boolean":
        if s.lower() not in ("true", "false"):
            raise ValueError(f"[{value}] is not a boolean value")
        return s.lower() == "true"
    if to == "string":
        return s
    raise NotImplementedError(f"convert type {to}")


_OPTIONS = {
    "json": {"field", "target_field"},
    "dot_expander": {"field", "path"},
    "date": {"field", "target_field", "formats"},
    "remove": {"field", "ignore_missing"},
    "rename": {"field", "target_field", "ignore_missing"},
    "uppercase": {"field", "ignore_missing"},
    "gsub": {"field", "pattern", "replacement", "ignore_missing"},
    "convert": {"field", "type", "ignore_missing"},
    "set": {"field", "value"},
    "append": {"field", "value", "allow_duplicates"},
}
COMMON = {"if", "tag", "description"}
SUPPORTED = frozenset(_OPTIONS)


def _run_one(ptype: str, o: dict, doc: dict) -> None:
    unknown = set(o) - _OPTIONS[ptype] - COMMON
    if unknown:
        raise NotImplementedError(f"{ptype} options {sorted(unknown)}")
    if "if" in o and not _condition(o["if"], doc):
        return
    field = o["field"]
    if ptype == "dot_expander":  # a literal dotted key under path; absent: nothing to do
        parent = _get(doc, o["path"]) if "path" in o else doc
        if isinstance(parent, dict) and field in parent:
            _set(parent, field, parent.pop(field))
        return
    v = _get(doc, field)
    if v is _MISSING and ptype not in ("set", "append"):
        if o.get("ignore_missing"):
            return
        raise ProcessorError(ptype, f"field [{field}] not present as part of path [{field}]")
    try:
        if ptype == "json":
            _set(doc, o.get("target_field", field), json.loads(v))
        elif ptype == "date":
            _set(doc, o.get("target_field", "@timestamp"), _date(v, o["formats"]))
        elif ptype == "remove":
            _remove(doc, field)
        elif ptype == "rename":
            if _get(doc, o["target_field"]) is not _MISSING:
                raise ValueError(f"field [{o['target_field']}] already exists")
            _remove(doc, field)
            _set(doc, o["target_field"], v)
        elif ptype == "uppercase":
            _set(doc, field, v.upper())
        elif ptype == "gsub":
            _set(doc, field, re.sub(o["pattern"], o["replacement"], v))
        elif ptype == "convert":
            _set(doc, field, _convert(v, o["type"]))
        elif ptype == "set":
            val = o["value"]
            _set(doc, field, _render(val, doc) if isinstance(val, str) else copy.deepcopy(val))
        elif ptype == "append":
            vals = o["value"] if isinstance(o["value"], list) else [o["value"]]
            vals = [_render(x, doc) if isinstance(x, str) else x for x in vals]
            cur = [] if v is _MISSING else (v if isinstance(v, list) else [v])
            for x in vals:
                if o.get("allow_duplicates", True) or x not in cur:
                    cur.append(x)
            _set(doc, field, cur)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ProcessorError(ptype, str(e)) from None


def simulate(pipeline: dict, doc: dict) -> dict:
    """The document after the pipeline, as ``_ingest/pipeline/_simulate`` would return it."""
    doc = copy.deepcopy(doc)
    for proc in pipeline["processors"]:
        ((ptype, o),) = proc.items()
        if ptype not in SUPPORTED:
            raise NotImplementedError(f"processor type {ptype}")
        try:
            _run_one(ptype, o, doc)
        except ProcessorError as e:
            if not pipeline.get("on_failure"):
                raise
            doc["_ingest"] = {"on_failure_message": str(e), "on_failure_processor_type": e.ptype}
            for handler in pipeline["on_failure"]:
                ((htype, ho),) = handler.items()
                _run_one(htype, ho, doc)
            del doc["_ingest"]
            return doc
    return doc
