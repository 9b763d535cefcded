"""What the test modules share: the sample capture (written at run time from ../shared), a
free port, and the marks.

* ``zeek``: the test runs a real Zeek (it skips without one, or fails with IOTCLS_REQUIRE_ZEEK=1).
* ``e2e``: the test starts real programs (Zeek, Suricata, Chromium, btest, zkg, or iotcls
  itself: ``iotcls serve``, ``python -m iotcls demo``...), so ``pytest -m "not e2e"`` is the
  fast loop. A ``zeek`` test is ``e2e`` as well; a test that starts one of these programs
  without the mark fails, naming it.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
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


# -- marks: ``@pytest.mark.zeek`` (real-Zeek tests), ``@pytest.mark.e2e`` -----------------------
def pytest_configure(config):
    config.addinivalue_line("markers", "zeek: the test runs a real Zeek (skips without one)")
    config.addinivalue_line(
        "markers",
        "e2e: the test starts real programs (Zeek, iotcls serve, "
        "Suricata, Chromium); -m 'not e2e' leaves them out",
    )
    exe = zeek.find_zeek()
    if exe and zeek.igmp_shim_needed(exe) and "ZEEKPATH" not in os.environ:
        # a Zeek 8.2 built without Spicy cannot start with its default scripts: every Zeek
        # the tests run (and the btests) gets a search path that stubs out its IGMP analyzer
        shim = Path(tempfile.mkdtemp(prefix="iotcls-zeek-shim-"))
        os.environ["ZEEKPATH"] = zeek.shim_igmp(exe, shim)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """A real-Zeek test is an end-to-end test (before ``-m`` selects)."""
    for item in items:
        if item.get_closest_marker("zeek") is not None and item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.e2e)


# Programs whose start makes a test end-to-end (the executable's name), and iotcls itself
# (``iotcls CMD``, ``python -m iotcls CMD``: serve, demo, train...).
E2E_PROGRAMS = {"zeek", "suricata", "chromium", "chromium-browser", "btest", "zkg"}


def e2e_program(args, stand_ins: Path | None = None) -> str | None:
    """The end-to-end program a ``subprocess.Popen(args)`` starts, or None. A program under
    ``stand_ins`` (the tests' temporary directory) is a stand-in a test wrote, not the real one."""
    if isinstance(args, (str, bytes, os.PathLike)):
        args = shlex.split(os.fsdecode(args)) if isinstance(args, (str, bytes)) else [args]
    argv = [os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in args]
    if not argv:
        return None
    exe = Path(argv[0])
    if stand_ins is not None and exe.is_absolute() and exe.resolve().is_relative_to(stand_ins):
        return None
    if exe.name in E2E_PROGRAMS:
        return exe.name
    names = [Path(a).name for a in argv[:3]]
    if "iotcls" in names:
        rest = argv[names.index("iotcls") + 1 :]
        return f"iotcls {rest[0]}" if rest else "iotcls"
    return None


@pytest.fixture(autouse=True)
def _e2e_mark_is_true(request, monkeypatch):
    """A test that starts an end-to-end program must be marked ``e2e``: else the fast loop
    would not be fast. (Programs started by module- or session-scoped fixtures are not seen.)"""
    if request.node.get_closest_marker("e2e") is not None:
        return
    real = subprocess.Popen.__init__
    stand_ins = request.getfixturevalue("tmp_path_factory").getbasetemp().resolve()

    def init(self, args, *a, **kw):
        what = e2e_program(args, stand_ins)
        if what is not None:
            pytest.fail(
                f"{request.node.nodeid} starts {what}: mark it @pytest.mark.e2e", pytrace=False
            )
        real(self, args, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", init)


def pytest_runtest_setup(item):
    if item.get_closest_marker("zeek") is None or zeek.find_zeek() is not None:
        return
    if zeek.required():
        pytest.fail(zeek.missing_reason().replace("not run", "required and missing"), pytrace=False)
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
        f"{counts['skipped']} skipped"
    )
