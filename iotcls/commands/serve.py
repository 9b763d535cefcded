"""``iotcls serve``: the bridge and its scorer processes, running beside Zeek.

One process is the bridge: it connects to Zeek's WebSocket API, turns IoTClass::flow events
into flow-sequence matrices, hands them to scorers over ZeroMQ, and sends the labels back to
Zeek (which writes iot_class.log). It also starts ``scorers.count`` local scorer processes and
restarts them if they die. ``--scorer-only`` runs just a scorer, for another machine.

Exit status: 0 after SIGINT/SIGTERM, 2 for a start-up error (configuration, model, keys, a
socket in use: one line on stderr; restarting would not help), 1 when the service stops
because of an error while running (systemd's ``Restart=on-failure`` restarts it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from ..cli import CliError
from ..config import DEFAULT_YAML, DEVICES, Config, ConfigError, load, override


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML configuration (see --print-config)")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the default configuration, with comments, and exit",
    )
    p.add_argument("--scorers", type=int, metavar="N", help="scorer processes to start")
    p.add_argument("--model", metavar="PATH", help="model bundle (default: the bundled model)")
    from ..cli import add_renamed

    add_renamed(
        p,
        "--device",
        "--torch-device",
        dest="device",
        choices=DEVICES,
        help="where scorers run the model",
    )
    p.add_argument(
        "--scorer-only",
        action="store_true",
        help="run one scorer that connects to a bridge (see --connect)",
    )
    p.add_argument(
        "--connect",
        metavar="ADDR",
        help="bridge address for --scorer-only, e.g. tcp://bridge:27760",
    )
    p.add_argument("--name", help="scorer name (--scorer-only; default: host:pid)")
    p.add_argument(
        "--curve",
        choices=("auto", "on", "off"),
        help="CURVE on the scorer link (default: bridge.curve; auto: on unless loopback)",
    )
    p.add_argument(
        "--keys",
        metavar="DIR",
        help="CURVE key directory (default: bridge.keys_dir; see iotcls keys)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="default: info",
    )
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)


def configure(args: argparse.Namespace) -> Config:
    try:
        cfg = load(args.config)
        if args.scorers is not None:
            override(cfg, "scorers.count", args.scorers, "--scorers")
        if args.model is not None:
            override(cfg, "scorers.model", args.model, "--model")
        if args.device is not None:
            override(cfg, "scorers.device", args.device, "--device")
        if args.curve is not None:
            override(cfg, "bridge.curve", args.curve, "--curve")
        if args.keys is not None:
            override(cfg, "bridge.keys_dir", args.keys, "--keys")
    except ConfigError as e:
        raise CliError(str(e)) from None
    return cfg


def setup_logging(level: str, who: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s {who} %(levelname)s %(message)s",
        stream=sys.stderr,
        force=True,
    )


def run(args: argparse.Namespace) -> int:
    if args.print_config:
        sys.stdout.write(DEFAULT_YAML)
        return 0
    cfg = configure(args)
    if args.scorer_only:
        return _run_scorer(args, cfg)
    if args.connect or args.name:
        raise CliError("--connect and --name go with --scorer-only")
    setup_logging(args.log_level, "iotcls-serve")
    from ..bridge.curve import KeyFileError
    from ..bridge.serving import Service
    from ..bundle import BundleError

    try:
        return asyncio.run(
            Service(cfg, args.config, args.log_level, model_fixed=args.model is not None).run()
        )
    except (OSError, BundleError, KeyFileError) as e:
        raise CliError(str(e)) from None


def _run_scorer(args: argparse.Namespace, cfg: Config) -> int:
    import os
    import socket

    from ..bridge import curve as cv
    from ..scorer.service import ScorerSettings, serve_scorer

    if not args.connect:
        raise CliError("--scorer-only needs --connect ADDR (the bridge's scorer address)")
    name = args.name or f"{socket.gethostname()}:{os.getpid()}"
    keys = None
    if cv.enabled(cfg.bridge.curve, [args.connect]):
        try:
            keys = cv.client_keys(cfg.bridge.keys_dir)
        except cv.KeyFileError as e:
            raise CliError(str(e)) from None
    setup_logging(args.log_level, f"iotcls-{name}")
    s = cfg.scorers
    settings = ScorerSettings(
        connect=args.connect,
        name=name,
        batch_size=s.batch_size,
        max_wait_ms=s.max_wait_ms,
        heartbeat_s=s.heartbeat_s,
        parent_pid=args.parent_pid,
        explain=s.explain,
        row_cache=s.row_cache,
        keys=keys,
    )
    return serve_scorer(s.model, s.device, s.threads, settings)
