"""ZeroMQ CURVE between the bridge and its scorers: who may score, and nobody else listens.

Without it, any process that reaches the scorer socket can say hello and receive real flow
matrices (payload bytes included), hold them, and answer with labels of its own. With CURVE
(ZeroMQ's CurveZMQ: Curve25519 keys, every message encrypted and authenticated) the bridge
accepts only scorers whose public key is in ``KEYS/authorized/``, and a scorer talks only to
the bridge whose public key it holds.

Key files (``iotcls keys --dir KEYS`` writes them, in ZeroMQ's own certificate format):

* ``bridge.key_secret``: the bridge's key pair (read by the bridge);
* ``bridge.key``: its public key (every scorer needs it);
* ``scorer.key_secret``: a scorer key pair (local scorers and remote ones: copy it there);
* ``authorized/*.key``: the public keys of the scorers the bridge accepts.

Secret files are created mode 0600 and refused when group or others may read them, the way
ssh treats its keys. ``bridge.curve``: ``auto`` (the default) turns CURVE on when the bridge
binds anything but loopback (or ``ipc://``/``inproc://``), ``on`` and ``off`` force it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth

MODES = ("auto", "on", "off")
BRIDGE, SCORER, AUTHORIZED = "bridge", "scorer", "authorized"
_LOCAL_HOSTS = ("localhost", "ip6-localhost")


class KeyFileError(ValueError):
    """A key file that is missing, unreadable or too open; the message names the file."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 bytes
    secret: bytes


@dataclass(frozen=True)
class ServerKeys:
    """What the bridge needs: its key pair and the directory of authorized scorer keys."""

    pair: KeyPair
    authorized: Path


@dataclass(frozen=True)
class ClientKeys:
    """What a scorer needs: its key pair and the bridge's public key."""

    pair: KeyPair
    server_public: bytes


# -- deciding -------------------------------------------------------------------------------
def is_loopback(address: str) -> bool:
    """Whether a ZeroMQ address stays on this host (tcp to a loopback address, ipc, inproc)."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = urlsplit(address).hostname or ""
    if host in _LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or an interface (eth0, *): others may reach it


def enabled(mode: str, addresses: list[str]) -> bool:
    """CURVE on or off for ``bridge.curve`` *mode* and the bound (or connected) addresses."""
    if mode == "auto":
        return not all(is_loopback(a) for a in addresses)
    return mode == "on"


# -- key files ------------------------------------------------------------------------------
_BANNER = (
    "#   ****  Generated on {when} by iotcls keys  ****\n"
    "#   ZeroMQ CURVE {what} Certificate\n{warn}\n"
)


def _write(path: Path, text: str, mode: int) -> None:
    """Create *path* with *mode* from the start (a secret is never readable by others, not
    even for a moment); refuses to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)  # whatever the umask did


def write_pair(directory: Path, name: str) -> KeyPair:
    """A new key pair as ``name.key`` (public, 0644) and ``name.key_secret`` (0600)."""
    public, secret = zmq.curve_keypair()
    when = datetime.datetime.now().isoformat(timespec="seconds")
    curve_pub = f'curve\n    public-key = "{public.decode()}"\n'
    _write(
        directory / f"{name}.key_secret",
        _BANNER.format(
            when=when,
            what="**Secret**",
            warn="#   Keep this file readable by the iotcls user only.\n",
        )
        + "metadata\n"
        + curve_pub
        + f'    secret-key = "{secret.decode()}"\n',
        0o600,
    )
    _write(
        directory / f"{name}.key",
        _BANNER.format(when=when, what="Public", warn="") + "metadata\n" + curve_pub,
        0o644,
    )
    return KeyPair(public, secret)


def _check_private(path: Path) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise KeyFileError(
            f"{path}: no such key file (create keys with: iotcls keys --dir {path.parent})"
        ) from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read key file: {e.strerror or e}") from None
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"{path}: secret key readable by others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 it"
        )


def _load(path: Path, secret: bool) -> KeyPair:
    if secret:
        _check_private(path)
    try:
        public, sec = zmq.auth.load_certificate(path)
    except FileNotFoundError:
        raise KeyFileError(
            f"{path}: no such key file (create keys with: iotcls keys --dir {path.parent})"
        ) from None
    except (OSError, ValueError) as e:
        raise KeyFileError(f"{path}: not a ZeroMQ CURVE key file ({e})"[:300]) from None
    if not public or (secret and not sec):
        raise KeyFileError(f"{path}: holds no {'secret' if secret else 'public'} key")
    return KeyPair(public, sec or b"")


def server_keys(directory: str | Path) -> ServerKeys:
    """The bridge's keys in *directory*; :class:`KeyFileError` names what is wrong."""
    d = Path(directory)
    pair = _load(d / f"{BRIDGE}.key_secret", secret=True)
    auth = d / AUTHORIZED
    if not auth.is_dir() or not any(auth.glob("*.key")):
        raise KeyFileError(
            f"{auth}: no authorized scorer keys (*.key); iotcls keys --dir {d} "
            "puts the scorer's there"
        )
    return ServerKeys(pair, auth)


def client_keys(directory: str | Path) -> ClientKeys:
    """A scorer's keys in *directory*: its own pair and the bridge's public key."""
    d = Path(directory)
    pair = _load(d / f"{SCORER}.key_secret", secret=True)
    return ClientKeys(pair, _load(d / f"{BRIDGE}.key", secret=False).public)


# -- sockets --------------------------------------------------------------------------------
def serve(sock: zmq.Socket, keys: ServerKeys) -> None:
    """Makes *sock* (before it binds) a CURVE server; ZAP then checks each client's key."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.pair.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.pair.public)
    sock.setsockopt(zmq.ZAP_DOMAIN, b"iotcls")
    try:  # without a ZAP handler, refuse every client rather than accept every key
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    except (AttributeError, zmq.ZMQError):  # a libzmq before 4.3: the handler is always up
        pass


def connect_as(sock: zmq.Socket, keys: ClientKeys) -> None:
    """Makes *sock* (before it connects) a CURVE client of the bridge with that public key."""
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.pair.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.pair.public)
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)


def authenticator(ctx: zmq.asyncio.Context, keys: ServerKeys):
    """The ZAP handler of *ctx* accepting the authorized keys (stop it with ``.stop()``)."""
    from zmq.auth.asyncio import AsyncioAuthenticator

    auth = AsyncioAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="iotcls", location=str(keys.authorized))
    return auth


HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def failure_kind(event: int) -> str:
    """A handshake failure event as a metrics kind."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "auth_failed"
    return "handshake_failed"
