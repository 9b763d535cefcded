"""``iotcls suricata-config``: what Suricata needs to send flow records to ``iotcls serve``.

Prints the ``outputs:`` entry for suricata.yaml, where the Lua output script is installed,
and the script's settings file (``iotcls-suricata.conf``, read from beside the script); with
``--install DIR`` it also copies the script and writes the settings there.

The script lives once in the repository (``suricata/iotcls.lua``); a wheel ships it as the
package data of ``iotcls.suricata_scripts`` (a directory mapped in pyproject.toml), an
editable install or a source checkout reads it where it is (:func:`script_path`).
See docs/suricata.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
from pathlib import Path

from ..cli import CliError
from ..config import ConfigError, load
from ..schema import DEFAULT_PACKETS, DEFAULT_PAYLOAD_BYTES, DEFAULT_WINDOW_S, DHCP_PAYLOAD_BYTES
from ._shipped import shipped

SCRIPT = "iotcls.lua"
SETTINGS = "iotcls-suricata.conf"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="FILE",
        help="the iotcls serve configuration (its suricata.socket is used)",
    )
    p.add_argument(
        "--local-nets",
        metavar="CIDR[,CIDR...]",
        default="",
        help="networks whose endpoints are devices, e.g. 192.168.0.0/16",
    )
    p.add_argument(
        "--devices",
        metavar="IP[,IP...]",
        default="",
        help="device addresses (besides --local-nets)",
    )
    p.add_argument(
        "--install",
        metavar="DIR",
        help="copy the script and write its settings into DIR (Suricata's "
        "scripts-dir, e.g. /etc/suricata/lua-output)",
    )
    p.add_argument(
        "--link-header-bytes",
        type=int,
        default=14,
        metavar="N",
        help="link-layer header length of the capture interface (14: Ethernet)",
    )


def script_path() -> Path:
    """The installed Lua output script."""
    return shipped("iotcls.suricata_scripts", "suricata", SCRIPT)


def _checked(items: str, what: str, single: bool) -> str:
    out = []
    for x in items.split(","):
        x = x.strip()
        if not x:
            continue
        try:
            (ipaddress.ip_address if single else lambda v: ipaddress.ip_network(v, strict=False))(x)
        except ValueError:
            raise CliError(
                f"{what}: not {'an IP address' if single else 'a network (CIDR)'}: {x!r}"
            ) from None
        out.append(x)
    return ",".join(out)


def settings_text(socket: str, local_nets: str, devices: str, link_header_bytes: int) -> str:
    """The script's settings file (key = value lines)."""
    return (
        "# iotcls Suricata output script settings (iotcls suricata-config); each key may be\n"
        "# overridden by an environment variable of Suricata: IOTCLS_<KEY>\n"
        f"socket = {socket}\n"
        f"local_nets = {local_nets}\n"
        f"devices = {devices}\n"
        f"window_s = {DEFAULT_WINDOW_S:g}\n"
        f"packets = {DEFAULT_PACKETS}\n"
        f"payload_bytes = {DEFAULT_PAYLOAD_BYTES}\n"
        f"dhcp_payload_bytes = {DHCP_PAYLOAD_BYTES}\n"
        f"link_header_bytes = {link_header_bytes}\n"
    )


def outputs_snippet(scripts_dir: Path) -> str:
    return (
        "outputs:\n"
        "  - lua:\n"
        "      enabled: yes\n"
        f"      scripts-dir: {scripts_dir}\n"
        "      scripts:\n"
        f"        - {SCRIPT}\n"
    )


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load(args.config)
    except ConfigError as e:
        raise CliError(str(e)) from None
    nets = _checked(args.local_nets, "--local-nets", single=False)
    devices = _checked(args.devices, "--devices", single=True)
    if args.link_header_bytes < 0:
        raise CliError("--link-header-bytes must not be negative")
    script = script_path()
    text = settings_text(cfg.suricata.socket, nets, devices, args.link_header_bytes)
    where = script.parent
    if args.install:
        where = Path(args.install).expanduser()
        try:
            where.mkdir(parents=True, exist_ok=True)
            shutil.copy2(script, where / SCRIPT)
            (where / SETTINGS).write_text(text)
        except OSError as e:
            raise CliError(f"cannot install into {where}: {e.strerror or e}") from None
    print(f"# The iotcls Lua output script is installed at {script}")
    if args.install:
        print(f"# copied to {where / SCRIPT}, settings written to {where / SETTINGS}")
    else:
        print(
            f"# Copy it and its settings (below) into Suricata's Lua script directory, e.g.\n"
            f"#   iotcls suricata-config --local-nets ... --install /etc/suricata/lua-output\n"
            f"# or save the settings as {where / SETTINGS} to use it where it is."
        )
    print("# Add this to suricata.yaml (Suricata 7 with LuaJIT; see docs/suricata.md):")
    print(outputs_snippet(where))
    print(f"# {SETTINGS}:")
    print("\n".join("#   " + line for line in text.splitlines()))
    if not nets and not devices:
        print("# warning: no --local-nets or --devices: the script will see no device")
    if not cfg.suricata.enabled:
        print(
            "# and in the iotcls serve configuration: suricata: {enabled: true} "
            f"(labels go to {cfg.suricata.eve_log})"
        )
    return 0
