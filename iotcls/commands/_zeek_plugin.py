"""Build the native capture plugin (``zeek-plugin/``, ``IoTClass::Capture``) against the
Zeek that ``zeek-config`` describes, and install it where that Zeek finds its plugins.

A sensor operator should not need to know CMake: ``iotcls zeek-install`` does what
``cd zeek-plugin && ./configure && make install`` does (the way zkg builds it too), but checks
first for everything the build needs and says in one line what is missing, so a machine
without a compiler gets that sentence, not a page of CMake output. The build runs in a
temporary directory (an installed iotcls may sit in a read-only site-packages); its log is
kept when it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..cli import CliError
from ._shipped import shipped

PLUGIN = "IoTClass::Capture"
TARBALL = "IoTClass_Capture.tgz"
INSTALLED_NAME = "IoTClass_Capture"
MIN_CMAKE = (3, 15)
NO_PLUGIN_HINT = "or pass --no-plugin to keep the script capture (per-packet script events: slower)"


@dataclass(frozen=True)
class Toolchain:
    """What building the plugin needs, each found."""

    zeek_config: str
    zeek_version: str
    cmake: str
    cxx: str
    make: str
    cmake_dir: Path
    plugin_dir: Path


def plugin_source() -> Path:
    """The plugin's source: in the installed package, else zeek-plugin/ of this checkout."""
    return shipped("iotcls.zeek_plugin", "zeek-plugin", ".", marker="CMakeLists.txt").resolve()


def _out(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout.strip() if r.returncode == 0 else ""


def find_zeek_config(given: str | None = None) -> str:
    """``--zeek-config``, else the one beside ``zeek`` on PATH, else ``zeek-config`` on PATH
    (beside first: a machine with two Zeeks builds for the one it runs)."""
    if given:
        if not os.access(given, os.X_OK):
            raise CliError(f"--zeek-config {given}: not an executable file")
        return given
    zeek = shutil.which("zeek")
    if zeek and os.access(Path(zeek).parent / "zeek-config", os.X_OK):
        return str(Path(zeek).parent / "zeek-config")
    found = shutil.which("zeek-config")
    if not found:
        raise CliError(
            "cannot build the native capture plugin: no zeek-config on PATH (Zeek's "
            f"bin directory, or --zeek-config PATH); {NO_PLUGIN_HINT}"
        )
    return found


def _cmake_version(cmake: str) -> tuple[int, ...]:
    m = re.search(r"version (\d+)\.(\d+)", _out([cmake, "--version"]))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def find_toolchain(zeek_config: str, plugin_dir: Path | None = None) -> Toolchain:
    """Everything the build needs, or a CliError naming the first thing missing."""
    version = _out([zeek_config, "--version"])
    if not version:
        raise CliError(
            f"cannot build the native capture plugin: {zeek_config} --version "
            f"failed; {NO_PLUGIN_HINT}"
        )
    cmake_dir = Path(_out([zeek_config, "--cmake_dir"]) or "/nonexistent")
    if not (cmake_dir / "ZeekPlugin.cmake").is_file():
        raise CliError(
            f"cannot build the native capture plugin: Zeek {version}'s CMake modules "
            f"are missing ({cmake_dir}/ZeekPlugin.cmake, from {zeek_config} "
            f"--cmake_dir): install Zeek's development files; {NO_PLUGIN_HINT}"
        )
    includes = [Path(p) for p in _out([zeek_config, "--include_dir"]).split(":") if p]
    if not any((p / "zeek" / "zeek-config.h").is_file() for p in includes):
        raise CliError(
            f"cannot build the native capture plugin: Zeek {version}'s headers are "
            f"missing (no zeek/zeek-config.h in {zeek_config} --include_dir: "
            f"{':'.join(map(str, includes)) or 'nothing'}); install Zeek's "
            f"development files; {NO_PLUGIN_HINT}"
        )
    cmake = shutil.which("cmake")
    if not cmake:
        raise CliError(
            "cannot build the native capture plugin: no cmake on PATH (CMake "
            f"{'.'.join(map(str, MIN_CMAKE))} or later); {NO_PLUGIN_HINT}"
        )
    if _cmake_version(cmake) < MIN_CMAKE:
        raise CliError(
            f"cannot build the native capture plugin: {cmake} is older than CMake "
            f"{'.'.join(map(str, MIN_CMAKE))}; {NO_PLUGIN_HINT}"
        )
    cxx = (
        os.environ.get("CXX")
        or shutil.which("c++")
        or shutil.which("g++")
        or shutil.which("clang++")
    )
    if not cxx or not shutil.which(cxx):
        raise CliError(
            "cannot build the native capture plugin: no C++ compiler (c++, g++ or "
            f"clang++ on PATH, or $CXX); {NO_PLUGIN_HINT}"
        )
    make = shutil.which("make")
    if not make:
        raise CliError(f"cannot build the native capture plugin: no make on PATH; {NO_PLUGIN_HINT}")
    target = plugin_dir or Path(_out([zeek_config, "--plugin_dir"]) or "/nonexistent")
    return Toolchain(zeek_config, version, cmake, cxx, make, cmake_dir, target)


def _run_logged(cmd: list[str], log: Path, env: dict[str, str]) -> bool:
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=900)
        except subprocess.TimeoutExpired:
            f.write("(timed out after 900 s)\n")
            return False
    return r.returncode == 0


def build(tools: Toolchain, jobs: int | None = None) -> Path:
    """Builds the plugin in a fresh temporary directory; returns its tarball."""
    work = Path(tempfile.mkdtemp(prefix="iotcls-zeek-plugin-"))
    log = work / "build.log"
    env = {**os.environ, "CXX": tools.cxx}
    steps = [
        [
            tools.cmake,
            "-S",
            str(plugin_source()),
            "-B",
            str(work / "build"),
            f"-DCMAKE_MODULE_PATH={tools.cmake_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ],
        [tools.make, "-C", str(work / "build"), f"-j{jobs or min(os.cpu_count() or 1, 4)}"],
    ]
    for cmd in steps:
        if not _run_logged(cmd, log, env):
            last = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
            raise CliError(
                f"building the native capture plugin against Zeek {tools.zeek_version} "
                f"failed at '{Path(cmd[0]).name}' (log: {log}; last line: "
                f"{last[0] if last else 'none'}); {NO_PLUGIN_HINT}"
            )
    tarball = work / "build" / TARBALL
    if not tarball.is_file():
        raise CliError(f"the plugin build wrote no {TARBALL} (log: {log})")
    return tarball


def _is_ours(path: Path) -> bool:
    marker = path / "__zeek_plugin__"
    return marker.is_file() and marker.read_text(errors="replace").strip() == PLUGIN


def install(tarball: Path, plugin_dir: Path) -> Path:
    """Unpacks *tarball* as ``plugin_dir/IoTClass_Capture``, replacing an earlier install
    of this plugin (never anything else)."""
    target = plugin_dir / INSTALLED_NAME
    if (target.exists() or target.is_symlink()) and not _is_ours(target):
        raise CliError(f"{target} exists and is not the {PLUGIN} plugin; remove it first")
    try:
        plugin_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".iotcls-", dir=plugin_dir))
        with tarfile.open(tarball) as tf:
            if hasattr(tarfile, "data_filter"):  # Python 3.12, and security releases before
                tf.extractall(staging, filter="data")
            else:
                tf.extractall(staging)  # our own tarball, just built
        unpacked = next((p for p in staging.iterdir() if _is_ours(p)), None)
        if unpacked is None:
            shutil.rmtree(staging, ignore_errors=True)
            raise CliError(f"{tarball} holds no {PLUGIN} plugin")
        if target.exists() or target.is_symlink():
            shutil.rmtree(
                target
            ) if target.is_dir() and not target.is_symlink() else target.unlink()
        unpacked.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
    except PermissionError:
        raise CliError(
            f"cannot install the plugin into {plugin_dir}: permission denied (run as "
            "Zeek's owner, or pass --plugin-dir DIR and add DIR to ZEEK_PLUGIN_PATH)"
        ) from None
    except OSError as e:
        raise CliError(f"cannot install the plugin into {plugin_dir}: {e.strerror or e}") from None
    return target


def zeek_lists(tools: Toolchain, plugin_dir: Path) -> bool:
    """Whether the Zeek of *tools* loads the installed plugin (``zeek -N``)."""
    zeek = Path(_out([tools.zeek_config, "--prefix"]) or "/nonexistent") / "bin" / "zeek"
    if not os.access(zeek, os.X_OK):
        return False
    env = dict(os.environ)
    env["ZEEK_PLUGIN_PATH"] = ":".join(filter(None, [str(plugin_dir), env.get("ZEEK_PLUGIN_PATH")]))
    try:
        r = subprocess.run(
            [str(zeek), "-N", PLUGIN], capture_output=True, text=True, env=env, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and PLUGIN in r.stdout
