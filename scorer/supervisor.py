"""Starts the local scorer processes of ``iotcls serve`` and restarts the ones that die.

Each scorer is a child process (``iotcls serve --scorer-only``) in its own session, so a
terminal's Ctrl-C reaches only the bridge, which then drains and stops the scorers in order.
A child that exits unasked is reported to the dispatcher at once (its in-flight batches are
re-sent without waiting for a timeout) and started again after a backoff that doubles while
it keeps dying young. A scorer that cannot use its model (exit status 2: the file fails the
same way every time) or that the bridge refused (exit status 3) is not restarted: it would
fail again. Neither is one that died young ``MAX_YOUNG_DEATHS`` times in a row, whatever the
reason. A slot given up is reported (``on_give_up``); ``iotcls serve`` stops with an error
once every local scorer is given up, so that a service that cannot label says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .service import EXIT_MODEL, EXIT_REJECTED

log = logging.getLogger("iotcls.supervisor")

MAX_BACKOFF_S = 30.0
YOUNG_S = 10.0  # a scorer that dies younger than this doubles the backoff
MAX_YOUNG_DEATHS = 8  # consecutive young deaths after which a slot is given up
FINAL = {EXIT_MODEL: "cannot use its model", EXIT_REJECTED: "was refused by the bridge"}


@dataclass
class _Slot:
    index: int
    generation: int = 0
    proc: asyncio.subprocess.Process | None = None
    name: str = ""
    task: asyncio.Task | None = None
    given_up: str = ""  # why it is no longer restarted


class Supervisor:
    def __init__(
        self,
        count: int,
        command: Callable[[str], list[str]],
        on_exit: Callable[[str, str], None],
        backoff_s: float = 1.0,
        on_restart: Callable[[], None] | None = None,
        on_give_up: Callable[[str, str, int | None], None] | None = None,
        prefix: str = "scorer",
    ):
        """``command(name)`` is the argv of scorer ``name``; ``on_exit(name, why)`` is called
        when one exits unasked, ``on_give_up(name, why, status)`` when it is not restarted.
        Scorers are named ``<prefix>-<slot>.<start>``: a model reload starts its scorers
        under another prefix, since two scorers of one name cannot share the bridge."""
        self.command, self.on_exit, self.backoff_s = command, on_exit, backoff_s
        self.prefix = prefix
        self.on_restart, self.on_give_up = on_restart, on_give_up
        self.slots = [_Slot(i) for i in range(count)]
        self._stopping = False

    def start(self) -> None:
        for slot in self.slots:
            slot.task = asyncio.create_task(self._keep(slot), name=f"scorer-{slot.index}")

    @property
    def pids(self) -> dict[str, int]:
        return {s.name: s.proc.pid for s in self.slots if s.proc and s.proc.returncode is None}

    @property
    def names(self) -> set[str]:
        """The names of the scorers it runs now."""
        return {s.name for s in self.slots if s.name}

    @property
    def all_given_up(self) -> bool:
        return bool(self.slots) and all(s.given_up for s in self.slots)

    def _give_up(self, slot: _Slot, why: str, rc: int | None) -> None:
        slot.given_up = why
        log.error("scorer %s %s; not restarting it", slot.name, why)
        if self.on_give_up:
            self.on_give_up(slot.name, why, rc)

    async def _keep(self, slot: _Slot) -> None:
        backoff = self.backoff_s
        young = 0
        while not self._stopping:
            slot.generation += 1
            slot.name = f"{self.prefix}-{slot.index}.{slot.generation}"
            argv = self.command(slot.name)
            started = time.monotonic()
            try:
                slot.proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
                )
            except OSError as e:
                log.error("cannot start scorer %s: %s", slot.name, e)
                rc = None
            else:
                rc = await slot.proc.wait()
            if self._stopping:
                return
            why = (
                f"process exited with status {rc}"
                if rc is not None and rc >= 0
                else f"process killed by signal {-rc}"
                if rc is not None
                else "process did not start"
            )
            self.on_exit(slot.name, why)
            if rc in FINAL:
                return self._give_up(slot, f"{FINAL[rc]} (exit status {rc})", rc)
            if time.monotonic() - started >= YOUNG_S:
                backoff, young = self.backoff_s, 0  # it ran a while: not a crash loop
            else:
                young += 1
                if young >= MAX_YOUNG_DEATHS:
                    return self._give_up(
                        slot, f"died young {young} times in a row, last: {why}", rc
                    )
            wait, backoff = backoff, min(MAX_BACKOFF_S, max(backoff, 0.1) * 2)
            log.warning("scorer %s: %s; restarting in %.1f s", slot.name, why, wait)
            await asyncio.sleep(wait)
            if self.on_restart:
                self.on_restart()

    async def stop(self, timeout: float = 5.0) -> None:
        """Waits for the scorers to exit (the bridge has asked them to), then terminates."""
        self._stopping = True
        procs = [s.proc for s in self.slots if s.proc and s.proc.returncode is None]
        deadline = time.monotonic() + timeout
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            for p in procs:
                if sig is not None and p.returncode is None:
                    try:
                        p.send_signal(sig)
                    except ProcessLookupError:
                        pass
            waits = [
                asyncio.wait_for(p.wait(), max(0.1, deadline - time.monotonic()))
                for p in procs
                if p.returncode is None
            ]
            if not waits:
                break
            await asyncio.gather(*waits, return_exceptions=True)
            deadline = time.monotonic() + 2.0
        for s in self.slots:
            if s.task and not s.task.done():
                s.task.cancel()
        await asyncio.gather(*(s.task for s in self.slots if s.task), return_exceptions=True)


def scorer_command(
    connect: str,
    config: str | None,
    model: str | None,
    device: str | None,
    log_level: str,
    extra: list[str] | None = None,
    curve: bool = False,
) -> Callable[[str], list[str]]:
    """The argv factory for local scorers: the same config file and overrides as the bridge,
    and CURVE on exactly when the bridge's socket has it (a local scorer connects over
    loopback even when the bridge also binds other addresses)."""
    base = [
        sys.executable,
        "-m",
        "iotcls",
        "serve",
        "--scorer-only",
        "--connect",
        connect,
        "--parent-pid",
        str(os.getpid()),
        "--log-level",
        log_level,
        "--curve",
        "on" if curve else "off",
    ]
    if config:
        base += ["--config", config]
    if model:
        base += ["--model", model]
    if device:
        base += ["--device", device]
    base += extra or []
    return lambda name: [*base, "--name", name]
