"""Fixtures shared by the test modules: the sample capture, written at run time from ../shared."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

from iotcls.testing import zeek
from iotcls.testing.shared import Sample, require, sentinel_dir, write_sample


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> Sample:
    """Several IoT Sentinel devices set up a few seconds apart, in one capture (never tracked)."""
    require(sentinel_dir() / "devices.csv")
    return write_sample(tmp_path_factory.mktemp("sample"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (yet)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- real-Zeek tests: ``@pytest.mark.zeek`` -------------------------------------------------
def pytest_configure(config):
    config.addinivalue_line("markers", "zeek: the test runs a real Zeek (skips without one)")
    exe = zeek.find_zeek()
    if exe and zeek.igmp_shim_needed(exe) and "ZEEKPATH" not in os.environ:
        # a Zeek 8.2 built without Spicy cannot start with its default scripts: every Zeek
        # the tests run (and the btests) gets a search path that stubs out its IGMP analyzer
        shim = Path(tempfile.mkdtemp(prefix="iotcls-zeek-shim-"))
        os.environ["ZEEKPATH"] = zeek.shim_igmp(exe, shim)


def pytest_runtest_setup(item):
    if item.get_closest_marker("zeek") is None or zeek.find_zeek() is not None:
        return
    if zeek.required():
        pytest.fail(zeek.missing_reason().replace("not run", "required and missing"),
                    pytrace=False)  # fmt: skip
    pytest.skip(zeek.missing_reason())


def pytest_terminal_summary(terminalreporter):
    """One line: how many real-Zeek tests ran and how many skipped (and which Zeek)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for outcome in counts:
        for rep in terminalreporter.stats.get(outcome, []):
            if "zeek" in getattr(rep, "keywords", {}) and rep.when in ("call", "setup"):
                if outcome != "passed" or rep.when == "call":
                    counts[outcome] += 1
    exe = zeek.find_zeek()
    which = f"zeek {'.'.join(map(str, zeek.version(exe)))} at {exe}" if exe else "no zeek"
    ran = counts["passed"] + counts["failed"]
    terminalreporter.write_line(
        f"iotcls real-Zeek tests ({which}): {ran} ran ({counts['failed']} failed), "
        f"{counts['skipped']} skipped")  # fmt: skip
