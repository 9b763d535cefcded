"""JSON from peers, parsed with a nesting limit.

Python's ``json`` recurses once per ``[`` or ``{``: a frame of 100,000 ``[`` raises
``RecursionError``, which is no ``ValueError`` and so escapes every parser's error handling
(it stopped ``iotcls serve``). Nothing the bridge reads nests deeply (a Broker flow event is
12 levels, a Suricata record 2), so the nesting is measured before parsing and a deeper
document is refused like any other malformed input: with :class:`JSONDepthError`, a
``ValueError``.

The measure ignores brackets inside strings; an unterminated string leaves its brackets
counted, which can only over-count a document that is not JSON anyway.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

MAX_DEPTH = 64  # Broker values nest 12 levels for IoTClass::flow; Zeek tables of records more

_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


class JSONDepthError(ValueError):
    """A document nested deeper than the limit; the message says how deep it goes."""


def depth(data: bytes) -> int:
    """The deepest ``[``/``{`` nesting of *data* outside strings (an upper bound when the
    text is not JSON)."""
    if data.count(b"[") + data.count(b"{") <= 1:
        return int(b"[" in data or b"{" in data)
    bare = _STRING_RE.sub(b"", data) if b'"' in data else data
    steps = _OPEN[np.frombuffer(bare, np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def check_depth(data: bytes, limit: int = MAX_DEPTH) -> None:
    """Raise :class:`JSONDepthError` when *data* nests deeper than *limit*. Cheap when the
    document has fewer brackets than the limit (no nesting can exceed their count)."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return
    d = depth(data)
    if d > limit:
        raise JSONDepthError(f"nested {d} levels deep, the limit is {limit}")


def loads(data: bytes | str, limit: int = MAX_DEPTH, **kw: Any) -> Any:
    """``json.loads`` that refuses documents nested deeper than *limit* (a ValueError)."""
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    check_depth(raw, limit)
    return json.loads(data, **kw)
