"""Which real Zeek the tests run, and what to say when there is none.

CI on a fresh machine has no Zeek (no package registry it reaches carries one), so the tests
that need one skip there, naming what is missing; ``IOTCLS_REQUIRE_ZEEK=1`` turns that skip
into a failure (a sensor image, a developer machine with Zeek). A Zeek is looked for at
``$ZEEK_HOME/bin/zeek`` first, then on ``PATH``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

REQUIRE_ENV = "IOTCLS_REQUIRE_ZEEK"


def find_zeek() -> str | None:
    home = os.environ.get("ZEEK_HOME")
    if home and os.access(Path(home) / "bin" / "zeek", os.X_OK):
        return str(Path(home) / "bin" / "zeek")
    return shutil.which("zeek")


def missing_reason() -> str:
    home = os.environ.get("ZEEK_HOME")
    where = f"$ZEEK_HOME/bin ({home}) nor " if home else ""
    return (
        f"no zeek binary in {where}PATH: real-Zeek test not run "
        f"(set ZEEK_HOME or PATH; {REQUIRE_ENV}=1 makes this a failure)"
    )


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


@functools.cache
def version(zeek: str) -> tuple[int, int, int]:
    """``zeek --version`` as (major, minor, patch)."""
    out = subprocess.run([zeek, "--version"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    if not m:
        raise RuntimeError(f"{zeek} --version printed no version: {out!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


@functools.cache
def has_plugin(zeek: str, name: str) -> bool:
    r = subprocess.run([zeek, "-N", name], capture_output=True, text=True, timeout=60)
    return r.returncode == 0


def igmp_shim_needed(zeek: str) -> bool:
    """Whether this Zeek is 8.2+ built without Spicy: its default scripts then fail at start
    ("Failed to register IGMP Spicy analyzer"), whatever else is loaded. Packaged Zeeks have
    Spicy; the ones these tests are run with may be built with ``--disable-spicy``."""
    return version(zeek) >= (8, 2, 0) and not has_plugin(zeek, "Zeek::Spicy")


def search_path(zeek: str) -> str:
    """Zeek's own ZEEKPATH, as ``zeek --help`` prints it."""
    out = subprocess.run([zeek, "--help"], capture_output=True, text=True, timeout=60)
    m = re.search(r"file search path \(([^)]*)\)", out.stdout + out.stderr)
    if not m:
        raise RuntimeError(f"{zeek} --help names no search path")
    return m.group(1)


def shim_igmp(zeek: str, into: Path) -> str:
    """A ZEEKPATH for a Zeek that :func:`igmp_shim_needed`: ``.`` first as always, then a
    directory whose ``base/packet-protocols/igmp`` loads nothing (the tests capture IGMP
    themselves; only Zeek's Spicy-based IGMP analyzer is missing), then Zeek's own path."""
    rest = [p for p in search_path(zeek).split(":") if p and p != "."]
    own = next(
        Path(p) / "base" / "packet-protocols"
        for p in rest
        if (Path(p) / "base" / "packet-protocols" / "__load__.zeek").is_file()
    )
    stub = into / "base" / "packet-protocols" / "igmp"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__load__.zeek").write_text(
        "# Test environment only: this Zeek was built without Spicy, which its IGMP\n"
        "# analyzer needs; Zeek's base/packet-protocols/igmp would stop it at start.\n"
    )
    # the directory above now hides Zeek's own: its __load__.zeek (which loads each protocol
    # by its full name, so all but IGMP still come from Zeek) must be there too
    text = (own / "__load__.zeek").read_text().replace("@load ./", f"@load {own}/")
    (stub.parent / "__load__.zeek").write_text(text)
    return ":".join([".", str(into), *rest])


def websocket_subscriber(port: int, topics: list[str], timeout: float = 30.0):
    """A client of the WebSocket server Zeek is starting on *port*, subscribed to *topics*:
    (the open connection, Zeek's ack). Zeek listens only once its scripts are loaded, so
    this retries until *timeout*."""
    import json
    import time

    from websockets.sync.client import connect

    deadline = time.monotonic() + timeout
    while True:
        try:
            ws = connect(f"ws://127.0.0.1:{port}/v1/messages/json", open_timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    ws.send(json.dumps(topics))
    return ws, json.loads(ws.recv())
