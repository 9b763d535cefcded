"""``iotcls zeek-install``: put the iotcls Zeek scripts where ``zeek iotcls`` finds them, and
build and install the native capture plugin (``zeek-plugin/``) for that Zeek.

Zeek resolves ``zeek -i eth0 iotcls`` (and ``@load iotcls``) through ZEEKPATH, which always
holds the site directory (``<prefix>/share/zeek/site``). This command finds that directory
(``zeek-config --site_dir``, else the ZEEKPATH that ``zeek --help`` prints, else the ZEEKPATH
environment variable) and installs the scripts there as ``site/iotcls``: copied (default)
or linked to this installation of iotcls (``--link``: upgrades of iotcls then reach Zeek
without reinstalling).

The plugin is what keeps a busy Zeek fast (no per-packet script events); without it the
scripts fall back to their own capture and say so at start-up. It is built unless
``--no-plugin`` is given, and everything the build needs is checked before anything is
installed (:mod:`._zeek_plugin`), so a sensor without a compiler gets one line naming what
is missing and nothing half-installed.

The scripts live once in the repository (``zeek-scripts/iotcls``); a wheel ships them as the
package data of ``iotcls.zeek_scripts`` (a directory mapped in pyproject.toml), an editable
install or a source checkout reads them where they are (:func:`scripts_dir`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from pathlib import Path

from .. import __version__
from ..cli import CliError
from . import _zeek_plugin
from ._shipped import shipped

PACKAGE = "iotcls"
MARKER = ".iotcls-install"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--zeek-site",
        metavar="DIR",
        help="Zeek's site directory (default: zeek-config --site_dir, else zeek's ZEEKPATH)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--copy", dest="mode", action="store_const", const="copy", help="copy the scripts (default)"
    )
    mode.add_argument(
        "--link",
        dest="mode",
        action="store_const",
        const="link",
        help="symlink them to this installation of iotcls",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing site/iotcls that iotcls did not install",
    )
    p.set_defaults(mode="copy")
    plugin = p.add_argument_group("the native capture plugin (built with CMake and a C++ compiler)")
    plugin.add_argument(
        "--no-plugin",
        action="store_true",
        help="install the scripts only; Zeek then uses the script capture "
        "(per-packet script events, up to 3x the CPU on a busy link)",
    )
    plugin.add_argument(
        "--zeek-config",
        metavar="PATH",
        help="the Zeek to build for (default: the zeek-config beside zeek on "
        "PATH, else zeek-config on PATH)",
    )
    plugin.add_argument(
        "--plugin-dir",
        metavar="DIR",
        help="install the plugin here (default: zeek-config --plugin_dir); Zeek "
        "finds it there through ZEEK_PLUGIN_PATH",
    )


def scripts_dir() -> Path:
    """The directory holding ``__load__.zeek`` of the iotcls Zeek package."""
    return shipped("iotcls.zeek_scripts", "zeek-scripts", PACKAGE, marker="__load__.zeek")


def _run(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else (r.stdout or r.stderr)


def _site_in(zeekpath: str) -> Path | None:
    for entry in zeekpath.split(":"):
        entry = entry.strip()
        if entry and Path(entry).name == "site":
            return Path(entry)
    return None


def find_site_dir() -> tuple[Path, str]:
    """Zeek's site directory and how it was found; CliError when there is no Zeek."""
    zc = shutil.which("zeek-config")
    if zc:
        out = (_run([zc, "--site_dir"]) or "").strip()
        if out and "\n" not in out:
            return Path(out), f"{zc} --site_dir"
    zk = shutil.which("zeek")
    if zk:
        m = re.search(r"\$ZEEKPATH\s*\|\s*file search path \((.*)\)", _run([zk, "--help"]) or "")
        site = _site_in(m.group(1)) if m else None
        if site:
            return site, f"the ZEEKPATH of {zk} --help"
    env = os.environ.get("ZEEKPATH", "")
    site = _site_in(env)
    if site:
        return site, "the ZEEKPATH environment variable"
    raise CliError(
        "Zeek not found (no zeek-config or zeek on PATH, no site directory in "
        "ZEEKPATH); pass --zeek-site DIR, Zeek's share/zeek/site"
    )


def _ours(target: Path) -> bool:
    """Whether *target* holds an iotcls install (so it may be replaced without --force)."""
    if target.is_symlink():
        return (target.resolve() / "__load__.zeek").is_file() and "module IoTClass;" in (
            target.resolve() / "main.zeek"
        ).read_text(errors="replace")
    return (target / MARKER).is_file()


def zkg_copy(site: Path) -> Path | None:
    """zkg's install of the package in *site*, if any: zkg keeps the scripts in
    ``site/packages/iotcls`` and links ``site/iotcls`` to it. Zeek must find one copy only
    (two define everything twice)."""
    target = site / PACKAGE
    if target.is_symlink() and Path(os.readlink(target)).parts[:1] == ("packages",):
        return site / "packages" / PACKAGE
    if (site / "packages" / PACKAGE / "__load__.zeek").is_file():
        return site / "packages" / PACKAGE
    return None


def install(site: Path, mode: str = "copy", force: bool = False) -> tuple[Path, list[str]]:
    """Install into *site*/iotcls; returns the target and what was done, one line each."""
    src = scripts_dir()
    if not site.is_dir():
        raise CliError(f"{site} is not a directory")
    target = site / PACKAGE
    zkg = zkg_copy(site)
    if zkg is not None and not force:
        raise CliError(
            f"zkg has installed iotcls in {zkg}: Zeek already finds it as "
            f"'{PACKAGE}'; keep that copy, or run 'zkg remove {PACKAGE}' first "
            "(two copies define everything twice)"
        )
    done = []
    if target.is_symlink() or target.exists():
        if not force and not _ours(target):
            raise CliError(
                f"{target} exists and was not installed by iotcls; use --force to replace it"
            )
        if target.is_symlink() or target.is_file():
            target.unlink()
        else:
            shutil.rmtree(target)
        done.append(f"removed the previous {target}")
    try:
        if mode == "link":
            target.symlink_to(src, target_is_directory=True)
            done.append(f"linked {target} -> {src}")
        else:
            target.mkdir()
            names = sorted(p.name for p in src.glob("*.zeek"))
            for name in names:
                shutil.copy2(src / name, target / name)
            (target / MARKER).write_text(f"iotcls {__version__} from {src}\n")
            done.append(f"copied {', '.join(names)} from {src} to {target}")
    except OSError as e:
        raise CliError(f"cannot install into {target}: {e.strerror or e}") from None
    return target, done


def _plugin(args: argparse.Namespace) -> _zeek_plugin.Toolchain | None:
    """The toolchain for the plugin, checked before anything is installed (None: --no-plugin)."""
    if args.no_plugin:
        return None
    given = Path(args.plugin_dir).expanduser() if args.plugin_dir else None
    return _zeek_plugin.find_toolchain(_zeek_plugin.find_zeek_config(args.zeek_config), given)


def run(args: argparse.Namespace) -> int:
    if args.zeek_site:
        site, how = Path(args.zeek_site).expanduser(), "--zeek-site"
    else:
        site, how = find_site_dir()
    tools = _plugin(args)
    if tools is not None:
        print(
            f"building the native capture plugin for Zeek {tools.zeek_version} "
            f"({tools.zeek_config}) ...",
            flush=True,
        )
        tarball = _zeek_plugin.build(tools)
    target, done = install(site, args.mode, args.force)
    print(f"Zeek site directory: {site} (from {how})")
    for line in done:
        print(line)
    if tools is not None:
        installed = _zeek_plugin.install(tarball, tools.plugin_dir)
        shutil.rmtree(tarball.parent.parent, ignore_errors=True)
        listed = _zeek_plugin.zeek_lists(tools, tools.plugin_dir)
        print(
            f"installed the native capture plugin {_zeek_plugin.PLUGIN} in {installed}"
            + (
                ""
                if listed
                else f" (zeek -N does not list it: add {tools.plugin_dir} to ZEEK_PLUGIN_PATH)"
            )
        )
    else:
        print("no native capture plugin (--no-plugin): Zeek uses the script capture")
    print(
        f"Zeek now finds the package as '{PACKAGE}':\n"
        f"  zeek -i eth0 {PACKAGE} 'IoTClass::device_nets={{192.168.0.0/16}}'\n"
        f"  zeek -r capture.pcap {PACKAGE}\n"
        f"  zeekctl: add '@load {PACKAGE}' to local.zeek, then 'zeekctl deploy'\n"
        "and run the bridge beside it: iotcls serve"
    )
    if how == "--zeek-site":
        print(f"(make sure {site} is in Zeek's ZEEKPATH)")
    return 0
