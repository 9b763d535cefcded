"""The ``iotcls`` command line; each subcommand lives in :mod:`iotcls.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# name -> (module under iotcls.commands, one-line help). Modules are imported only for the
# command that runs, so ``iotcls inspect`` does not pay for importing torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "classify a synthetic home network (a capture it writes) end to end"),
    "extract": ("extract", "turn captures into a dataset file of flow-sequence matrices"),
    "inspect": ("inspect", "print the flow records the sensor sees in a capture"),
    "train": ("train", "train a model on a capture set"),
    "evaluate": ("evaluate", "evaluate a model on a capture set"),
    "classify": ("classify", "classify the devices in captures and write iot_class.log"),
    "explain": ("explain", "explain a device's labels (Shapley values over feature groups)"),
    "serve": ("serve", "run the bridge and scorer processes beside Zeek"),
    "reload": ("reload", "make a running iotcls serve load its model bundle again (SIGHUP)"),
    "inventory": ("inventory", "list the devices in a flow store as a CSV the operator labels"),
    "keys": ("keys", "create the CURVE keys that authenticate scorers to the bridge"),
    "zeek-install": ("zeek_install", "install the iotcls Zeek scripts into Zeek's site dir"),
    "suricata-config": ("suricata_config", "print the Suricata Lua output settings"),
    "report": ("report", "write an HTML device inventory from iot_class.log"),
}


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def add_renamed(parser: argparse.ArgumentParser, old: str, new: str, **kw) -> None:
    """Option ``new``, and its former spelling ``old`` still accepted with a one-line notice on
    stderr: one name per meaning across commands (``--devices`` names MACs, ``--torch-device``
    the CPU or GPU), without breaking scripts that used the old one."""
    parser.add_argument(new, **kw)

    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"iotcls: {old} is now {new} (the old spelling will go)", file=sys.stderr)
            setattr(namespace, self.dest, values)

    extra = {k: v for k, v in kw.items() if k in ("dest", "choices", "metavar", "type")}
    parser.add_argument(
        old,
        action=Renamed,
        help=argparse.SUPPRESS,
        dest=kw.get("dest", new.lstrip("-").replace("-", "_")),
        **{k: v for k, v in extra.items() if k != "dest"},
    )


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iotcls", description=__doc__)
    parser.add_argument("--version", action="version", version=f"iotcls {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(f"iotcls.commands.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(f"iotcls.commands.{COMMANDS[args.command][0]}")
    try:
        return int(module.run(args) or 0)
    except CliError as e:
        print(f"iotcls {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
