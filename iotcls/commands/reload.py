"""``iotcls reload``: tell a running ``iotcls serve`` to load its model bundle again (SIGHUP).

The service loads ``scorers.model`` of its configuration file again (or the ``--model`` path
it was started with), starts scorers of the new bundle beside the running ones and retires
the old ones once the new ones are up: no record is lost or labelled twice, and each label's
``model`` column names the model that gave it. Under systemd, ``systemctl reload iotcls``
does the same (the unit's ``ExecReload``); in Docker, ``docker kill -s HUP``. The service's
log says when the new model serves, or why the old one stays.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from ..cli import CliError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pid",
        type=int,
        help="the serve process (default: the one running iotcls serve, found in /proc)",
    )


def serve_processes(proc: Path = Path("/proc")) -> list[tuple[int, str]]:
    """(pid, command line) of every ``iotcls serve`` bridge process (not its scorers)."""
    out = []
    for d in proc.iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode("utf-8", "replace") for a in argv if a]
        # the program (or python's -m module) is iotcls, and its command serve
        at = next((i for i, a in enumerate(args[:4]) if Path(a).name == "iotcls"), None)
        if at is not None and args[at + 1 : at + 2] == ["serve"] and "--scorer-only" not in args:
            out.append((int(d.name), " ".join(args)))
    return sorted(out)


def run(args: argparse.Namespace) -> int:
    pid = args.pid
    if pid is None:
        found = serve_processes()
        if not found:
            raise CliError("no iotcls serve process is running (give --pid PID)")
        if len(found) > 1:
            listed = "; ".join(f"pid {p}: {c[:80]}" for p, c in found)
            raise CliError(f"{len(found)} iotcls serve processes, give --pid: {listed}")
        pid = found[0][0]
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise CliError(f"no process {pid}") from None
    except PermissionError:
        raise CliError(f"not allowed to signal process {pid} (run as its user)") from None
    print(
        f"iotcls reload: sent SIGHUP to iotcls serve (pid {pid}); its log says when the new "
        "model serves"
    )
    return 0
