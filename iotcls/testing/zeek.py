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
    return (f"no zeek binary in {where}PATH: real-Zeek test not run "
            f"(set ZEEK_HOME or PATH; {REQUIRE_ENV}=1 makes this a failure)")  # fmt: skip


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
