"""``iotcls keys``: the CURVE keys of the scorer link (see :mod:`iotcls.bridge.curve`).

Writes, in DIR (created mode 0700): the bridge's key pair, a scorer key pair, and the
scorer's public key in ``DIR/authorized/``, the keys the bridge accepts. Secret files are
created mode 0600 by the user who runs the command: run it as the service user (or chown the
directory to it), since the service refuses secret keys that others may read. Existing keys
are kept (rotating a key is deleting it and running the command again), so running it twice
is harmless.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from ..cli import CliError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dir",
        required=True,
        metavar="DIR",
        help="where the keys go (serve's bridge.keys_dir, e.g. /etc/iotcls/keys)",
    )


def _pair(d: Path, name: str) -> str:
    from ..bridge import curve as cv

    if (d / f"{name}.key_secret").exists() or (d / f"{name}.key").exists():
        return f"kept {d / name}.key_secret"
    cv.write_pair(d, name)
    return f"wrote {d / name}.key_secret (0600) and {d / name}.key"


def run(args: argparse.Namespace) -> int:
    from ..bridge import curve as cv

    d = Path(args.dir)
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        (d / cv.AUTHORIZED).mkdir(mode=0o700, exist_ok=True)
        done = [_pair(d, cv.BRIDGE), _pair(d, cv.SCORER)]
        public = d / f"{cv.SCORER}.key"
        allowed = d / cv.AUTHORIZED / public.name
        if not allowed.exists():
            shutil.copyfile(public, allowed)
            os.chmod(allowed, 0o644)
            done.append(f"authorized {allowed}")
    except OSError as e:
        raise CliError(f"{e.filename or d}: {e.strerror or e}") from None
    for line in done:
        print(f"iotcls keys: {line}")
    print(
        f"iotcls keys: set bridge.keys_dir: {d} (and bridge.curve: on to use them on "
        "loopback); a remote scorer needs bridge.key, scorer.key and scorer.key_secret"
    )
    return 0
