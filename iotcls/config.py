"""The ``iotcls serve`` configuration: one YAML file, every key optional.

The defaults live in the dataclasses below and, with their comments, in :data:`DEFAULT_YAML`
(what ``iotcls serve --print-config`` prints); a test keeps the two equal. A wrong value is a
:class:`ConfigError` whose message is one line naming the file and the dotted key, so an
operator can fix the file without reading a traceback.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

SHED_POLICIES = ("labelled-first", "oldest", "newest")
LOG_POLICIES = ("changes", "all")
DEVICES = ("auto", "cpu", "cuda")
EXPLAIN = ("logged", "all", "none")
CURVE = ("auto", "on", "off")
MAX_FILE_BYTES = 1 << 20  # a configuration is a few kB; a bigger file is no configuration
MAX_TEXT = 4096  # characters in one string value (a path, a URL, a topic)
MAX_LIST = 64  # entries in one list value
# The largest value of every number, so that a typo (or 10^20) fails here, in one line, and
# not later, in a crash loop: (dotted key, largest value).
UPPER = {
    "zeek.reconnect_max_s": 3600.0,
    "bridge.queue_records": 10_000_000,
    "bridge.inflight_per_scorer": 64,
    "bridge.scorer_timeout_s": 3600.0,
    "bridge.max_attempts": 100,
    "bridge.recent_label_s": 7 * 86400.0,
    "bridge.max_devices": 10_000_000,
    "bridge.shutdown_timeout_s": 3600.0,
    "scorers.count": 256,
    "scorers.batch_size": 4096,
    "scorers.max_wait_ms": 10_000.0,
    "scorers.threads": 1024,
    "scorers.row_cache": 10_000_000,
    "scorers.heartbeat_s": 3600.0,
    "scorers.restart_backoff_s": 3600.0,
    "log.interval_s": 30 * 86400.0,
    "record.max_mb": 1 << 24,
    "record.retention_days": 3650.0,
    "record.segment_records": 1_000_000,
    "record.segment_s": 86400.0,
}
SWITCHES = {"bridge.curve"}  # choices that also take YAML's true/false (on/off, yes/no)
_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60
_SHOW.maxlist = _SHOW.maxtuple = _SHOW.maxdict = _SHOW.maxset = 4
_SHOW.maxlevel = 2
_SHOW.maxlong = 40


def show(v: Any) -> str:
    """A value for an error message, bounded: a YAML alias bomb is a small graph that a full
    ``repr`` would expand into gigabytes."""
    try:
        return _SHOW.repr(v)
    except (ValueError, RecursionError):  # an int too long to print
        return f"<{type(v).__name__}>"


class ConfigError(ValueError):
    """A one-line, user-facing configuration error."""


@dataclass
class ZeekConfig:
    enabled: bool = True
    url: str = "ws://127.0.0.1:27759/v1/messages/json"
    topics: list[str] = field(default_factory=lambda: ["zeek/iotcls/flows"])
    label_topic: str = "zeek/iotcls/labels"
    reconnect_max_s: float = 5.0
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""


@dataclass
class BridgeConfig:
    bind: list[str] = field(default_factory=lambda: ["tcp://127.0.0.1:27760"])
    curve: str = "auto"
    keys_dir: str = "/etc/iotcls/keys"
    queue_records: int = 20_000
    inflight_per_scorer: int = 2
    scorer_timeout_s: float = 10.0
    max_attempts: int = 3
    shed_policy: str = "labelled-first"
    recent_label_s: float = 300.0
    max_devices: int = 100_000
    shutdown_timeout_s: float = 10.0


@dataclass
class ScorersConfig:
    count: int = 1
    model: str = ""
    device: str = "auto"
    batch_size: int = 256
    max_wait_ms: float = 2.0
    threads: int = 1
    row_cache: int = 50_000
    explain: str = "logged"
    heartbeat_s: float = 1.0
    restart_backoff_s: float = 1.0


@dataclass
class LogConfig:
    policy: str = "changes"
    interval_s: float = 300.0


@dataclass
class MetricsConfig:
    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = 9464


@dataclass
class SuricataConfig:
    enabled: bool = False
    socket: str = "/run/iotcls/suricata.sock"
    eve_log: str = "/var/log/suricata/iot_class.json"
    community_id: bool = False
    community_id_seed: int = 0


@dataclass
class RecordConfig:
    enabled: bool = False
    directory: str = "/var/lib/iotcls/store"
    max_mb: int = 2048
    retention_days: float = 30.0
    segment_records: int = 20_000
    segment_s: float = 300.0


@dataclass
class Config:
    zeek: ZeekConfig = field(default_factory=ZeekConfig)
    suricata: SuricataConfig = field(default_factory=SuricataConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    scorers: ScorersConfig = field(default_factory=ScorersConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    record: RecordConfig = field(default_factory=RecordConfig)

    def to_dict(self) -> dict:
        return {f.name: _section_dict(getattr(self, f.name)) for f in fields(self)}


def _section_dict(section: Any) -> dict:
    return {f.name: _copy(getattr(section, f.name)) for f in fields(section)}


def _copy(v: Any) -> Any:
    return list(v) if isinstance(v, list) else v


DEFAULT_YAML = """\
# iotcls serve configuration. Every key is optional; the values shown are the defaults.
# Use it with: iotcls serve --config FILE

zeek:
  # Take flow records from Zeek (the iotcls Zeek scripts); false for a Suricata-only sensor.
  enabled: true
  # Zeek's WebSocket API (Cluster::listen_websocket). The bridge connects, subscribes, and
  # reconnects with backoff when Zeek restarts.
  url: ws://127.0.0.1:27759/v1/messages/json
  # Topic prefixes to subscribe to; the iotcls Zeek scripts publish IoTClass::flow there.
  topics: [zeek/iotcls/flows]
  # Topic the label events are published on; the iotcls Zeek scripts subscribe to it.
  label_topic: zeek/iotcls/labels
  # Longest wait between two reconnection attempts, seconds.
  reconnect_max_s: 5.0
  # TLS (a wss:// url; Zeek's IoTClass::websocket_tls): the CA certificate (PEM) that signed
  # Zeek's; empty: the system's CAs. Zeek's certificate must name the url's host.
  tls_ca: ""
  # The bridge's own certificate and key (PEM), for a Zeek that verifies its clients
  # ($enable_peer_verification=T); empty: none.
  tls_cert: ""
  tls_key: ""

suricata:
  # Take flow records from Suricata (the iotcls Lua output script, see iotcls suricata-config);
  # labels are written as EVE JSON lines (event_type iot_class) to eve_log.
  enabled: false
  # Unix datagram socket the bridge binds and the script sends to (its "socket" setting).
  socket: /run/iotcls/suricata.sock
  # Where the labels go, beside Suricata's eve.json so that its readers find them.
  eve_log: /var/log/suricata/iot_class.json
  # Add the Community ID of each flow (as Suricata's community-id: yes does), with this seed.
  community_id: false
  community_id_seed: 0

bridge:
  # ZeroMQ addresses the bridge binds; scorer processes connect to one of them. Localhost by
  # default. To accept scorers on other machines (a GPU host) bind e.g. tcp://0.0.0.0:27760
  # and start them there with: iotcls serve --scorer-only --connect tcp://BRIDGE:27760
  # A port of * picks a free one.
  bind: [tcp://127.0.0.1:27760]
  # ZeroMQ CURVE on the scorer socket: only scorers whose public key is in
  # keys_dir/authorized/ may connect, and everything on the link is encrypted.
  #   auto  on when bind holds anything but loopback (127.0.0.1, ::1, ipc://)
  #   on    also on loopback (other local users then cannot pose as scorers)
  #   off   never (an unauthenticated socket: keep it on a network you trust)
  curve: auto
  # Where the CURVE keys are (create them with: iotcls keys --dir DIR); the bridge reads
  # bridge.key_secret and authorized/*.key, a scorer scorer.key_secret and bridge.key.
  keys_dir: /etc/iotcls/keys
  # Records waiting for a scorer, at most; beyond this, records are shed (see shed_policy).
  queue_records: 20000
  # Batches a scorer may hold at once (its credit): 2 lets it score one while the next waits.
  inflight_per_scorer: 2
  # A scorer silent this long (no reply, no heartbeat) is presumed dead; its batches are re-sent.
  scorer_timeout_s: 10.0
  # Times a record is sent to a scorer before it is shed as scorer_failed (a poison batch
  # must not kill every scorer in turn).
  max_attempts: 3
  # Which records to shed when the queue is full:
  #   labelled-first  the oldest waiting record of a device that already has a recent label,
  #                   else the oldest waiting record (new devices get their first label first)
  #   oldest          the oldest waiting record
  #   newest          the arriving record (tail drop)
  shed_policy: labelled-first
  # "Recent label" for labelled-first: a label sent for the device within this many seconds.
  recent_label_s: 300.0
  # Devices whose flow history (and label state) is kept; least recently seen are forgotten.
  max_devices: 100000
  # On SIGINT/SIGTERM, how long to finish in-flight work before shedding it as shutdown.
  shutdown_timeout_s: 10.0

scorers:
  # Scorer processes started by iotcls serve (--scorers N overrides). 0: remote scorers only.
  count: 1
  # Model bundle; empty: the default model bundled with iotcls.
  model: ""
  # cpu, cuda, or auto (cuda when available).
  device: auto
  # Matrices scored in one forward pass, at most.
  batch_size: 256
  # How long the bridge, then each scorer, waits for more records to fill a batch, ms.
  # Larger batches cost less per record (a forward pass has a fixed cost of about 0.5 ms
  # on a CPU); the wait is added to a label's latency at low load only.
  max_wait_ms: 2.0
  # Torch CPU threads per scorer process.
  threads: 1
  # Flows whose packet features a CPU scorer keeps (about 0.5 KB each): a flow comes back
  # as a history row of its device's next matrices, so caching it makes the forward pass
  # about three times cheaper. 0: off. Devices spread over several scorers hit less.
  row_cache: 50000
  # Which labels get the full trust decision (Shapley values over feature groups, the
  # fitted trust criteria, top_groups), about 14x the cost of the label itself on a CPU:
  #   logged  only the labels the log policy sends to Zeek (the others keep the confidence
  #           criterion and are not sent)
  #   all     every label
  #   none    none: trust is the confidence criterion alone
  # A model bundle without a trust state always uses the confidence criterion.
  explain: logged
  # Seconds between a scorer's heartbeats while idle.
  heartbeat_s: 1.0
  # Wait before restarting a scorer process that died (doubles on repeated deaths, max 30 s).
  restart_backoff_s: 1.0

log:
  # Which labels go back to Zeek (and so into iot_class.log):
  #   changes  a device's first label, every change of its label or trust, and otherwise at
  #            most one label per device every interval_s
  #   all      every scored record
  policy: changes
  interval_s: 300.0

metrics:
  # Prometheus endpoint (http://ADDRESS:PORT/metrics), off by default.
  enabled: false
  address: 127.0.0.1
  port: 9464

record:
  # Keep the flow records serve receives (Zeek or Suricata) and the labels it gave them, on
  # disk, for iotcls inventory / train / evaluate (docs/learn.md). Off by default: the
  # records hold the first payload bytes of each flow's first packets.
  enabled: false
  # Where the segments go (seg-*.npz, each written whole: a temporary file, then renamed).
  directory: /var/lib/iotcls/store
  # Size cap, MiB: beyond it the oldest segments are deleted.
  max_mb: 2048
  # Segments older than this many days are deleted.
  retention_days: 30.0
  # A segment is written when it holds this many records, or segment_s after its first one.
  segment_records: 20000
  segment_s: 300.0
"""


def _fail(source: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {msg}")


def _check_value(source: str, key: str, default: Any, v: Any) -> Any:
    """Coerces ``v`` to the type of ``default`` or fails naming the key."""
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise _fail(source, key, f"must be true or false, not {show(v)}")
        return v
    if isinstance(default, int):
        if isinstance(v, bool) or not isinstance(v, int):
            raise _fail(source, key, f"must be an integer, not {show(v)}")
        return _at_most(source, key, v)
    if isinstance(default, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _fail(source, key, f"must be a number, not {show(v)}")
        return float(_at_most(source, key, v))
    if isinstance(default, str):
        if key in SWITCHES and isinstance(v, bool):
            return "on" if v else "off"
        if v is None:
            return ""
        if not isinstance(v, str) or len(v) > MAX_TEXT:
            raise _fail(
                source, key, f"must be a string of at most {MAX_TEXT} characters, not {show(v)}"
            )
        return v
    if isinstance(default, list):
        if isinstance(v, str):
            v = [v]
        if (
            not isinstance(v, list)
            or not v
            or len(v) > MAX_LIST
            or not all(isinstance(x, str) and x and len(x) <= MAX_TEXT for x in v)
        ):
            raise _fail(
                source,
                key,
                f"must be a non-empty list of at most {MAX_LIST} strings, not {show(v)}",
            )
        return list(v)
    raise AssertionError(f"unhandled config type for {key}")  # pragma: no cover


def _at_most(source: str, key: str, v: int | float) -> int | float:
    top = UPPER.get(key)
    if top is not None and v > top:
        raise _fail(source, key, f"must be at most {top:g}, not {show(v)}")
    return v


def validate(cfg: Config, source: str = "config") -> Config:
    """Range and choice checks that types alone do not express, one section at a time."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise _fail(source, key, msg)

    for check in (_check_sensors, _check_bridge, _check_scorers, _check_outputs):
        check(cfg, need)
    return cfg


def _check_sensors(cfg: Config, need: Callable[[bool, str, str], None]) -> None:
    z, su = cfg.zeek, cfg.suricata
    need(
        z.enabled or su.enabled,
        "zeek.enabled",
        "Zeek and Suricata are both disabled: enable one of them (suricata.enabled: true)",
    )
    need(su.socket != "", "suricata.socket", "must be a path")
    need(su.eve_log != "", "suricata.eve_log", "must be a path")
    need(
        0 <= su.community_id_seed < 65536,
        "suricata.community_id_seed",
        f"must be 0-65535, not {su.community_id_seed}",
    )
    need(
        z.url.startswith(("ws://", "wss://")),
        "zeek.url",
        f"must be a ws:// or wss:// URL, not {show(z.url)}",
    )
    need(z.reconnect_max_s > 0, "zeek.reconnect_max_s", "must be positive")
    tls = z.tls_ca or z.tls_cert or z.tls_key
    need(
        not tls or z.url.startswith("wss://"),
        "zeek.url",
        f"must be a wss:// URL when zeek.tls_* are set, not {show(z.url)}",
    )
    need(
        bool(z.tls_cert) == bool(z.tls_key),
        "zeek.tls_cert",
        "tls_cert and tls_key go together (the bridge's certificate and its key)",
    )


def _check_bridge(cfg: Config, need: Callable[[bool, str, str], None]) -> None:
    b = cfg.bridge
    for a in b.bind:
        need(
            a.startswith(("tcp://", "ipc://", "inproc://")),
            "bridge.bind",
            f"{show(a)} is not a ZeroMQ address (tcp://HOST:PORT or ipc://PATH)",
        )
    need(
        b.curve in CURVE, "bridge.curve", f"must be one of {', '.join(CURVE)}, not {show(b.curve)}"
    )
    need(b.keys_dir != "", "bridge.keys_dir", "must be a directory")
    need(b.queue_records >= 1, "bridge.queue_records", "must be at least 1")
    need(b.inflight_per_scorer >= 1, "bridge.inflight_per_scorer", "must be at least 1")
    need(b.scorer_timeout_s > 0, "bridge.scorer_timeout_s", "must be positive")
    need(b.max_attempts >= 1, "bridge.max_attempts", "must be at least 1")
    need(
        b.shed_policy in SHED_POLICIES,
        "bridge.shed_policy",
        f"must be one of {', '.join(SHED_POLICIES)}, not {show(b.shed_policy)}",
    )
    need(b.recent_label_s >= 0, "bridge.recent_label_s", "must not be negative")
    need(b.max_devices >= 1, "bridge.max_devices", "must be at least 1")
    need(b.shutdown_timeout_s >= 0, "bridge.shutdown_timeout_s", "must not be negative")


def _check_scorers(cfg: Config, need: Callable[[bool, str, str], None]) -> None:
    s, b = cfg.scorers, cfg.bridge
    need(s.count >= 0, "scorers.count", "must not be negative")
    need(
        s.device in DEVICES,
        "scorers.device",
        f"must be one of {', '.join(DEVICES)}, not {show(s.device)}",
    )
    need(s.batch_size >= 1, "scorers.batch_size", "must be at least 1")
    need(s.max_wait_ms >= 0, "scorers.max_wait_ms", "must not be negative")
    need(s.threads >= 1, "scorers.threads", "must be at least 1")
    need(s.row_cache >= 0, "scorers.row_cache", "must not be negative")
    need(
        s.explain in EXPLAIN,
        "scorers.explain",
        f"must be one of {', '.join(EXPLAIN)}, not {show(s.explain)}",
    )
    need(s.heartbeat_s > 0, "scorers.heartbeat_s", "must be positive")
    need(
        s.heartbeat_s < b.scorer_timeout_s,
        "scorers.heartbeat_s",
        f"must be shorter than bridge.scorer_timeout_s ({b.scorer_timeout_s})",
    )
    need(s.restart_backoff_s >= 0, "scorers.restart_backoff_s", "must not be negative")


def _check_outputs(cfg: Config, need: Callable[[bool, str, str], None]) -> None:
    lg, m = cfg.log, cfg.metrics
    need(
        lg.policy in LOG_POLICIES,
        "log.policy",
        f"must be one of {', '.join(LOG_POLICIES)}, not {show(lg.policy)}",
    )
    need(lg.interval_s >= 0, "log.interval_s", "must not be negative")
    need(0 < m.port < 65536, "metrics.port", f"must be a TCP port (1-65535), not {m.port}")
    r = cfg.record
    need(r.directory != "", "record.directory", "must be a directory")
    need(r.max_mb >= 1, "record.max_mb", "must be at least 1")
    need(r.retention_days > 0, "record.retention_days", "must be positive")
    need(r.segment_records >= 1, "record.segment_records", "must be at least 1")
    need(r.segment_s > 0, "record.segment_s", "must be positive")


def from_dict(d: Any, source: str = "config") -> Config:
    """A :class:`Config` from parsed YAML; missing keys keep their defaults."""
    cfg = Config()
    if d is None:
        return validate(cfg, source)
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(d).__name__}")
    sections = {f.name for f in fields(cfg)}
    for name, values in d.items():
        if not isinstance(name, str) or name not in sections:
            raise _fail(
                source,
                show(name) if not isinstance(name, str) else name[:60],
                f"unknown section (known: {', '.join(sorted(sections))})",
            )
        section = getattr(cfg, name)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise _fail(source, name, f"must be a mapping, not {show(values)}")
        known = {f.name: f for f in fields(section)}
        for key, v in values.items():
            dotted = f"{name}.{key[:60] if isinstance(key, str) else show(key)}"
            if not isinstance(key, str) or key not in known:
                raise _fail(source, dotted, f"unknown key (known: {', '.join(sorted(known))})")
            setattr(section, key, _check_value(source, dotted, getattr(section, key), v))
    return validate(cfg, source)


def loads(text: str, source: str = "config") -> Config:
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(
            f"{source}: {len(text)} characters: a configuration is at most {MAX_FILE_BYTES}"
        )
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{at}: {problem}"[:300]) from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    except ValueError as e:  # a number too long to read (Python's int digit limit)
        raise ConfigError(f"{source}: not valid YAML: {str(e).splitlines()[0][:120]}") from None
    return from_dict(d, source)


def load(path: str | Path | None) -> Config:
    """The configuration in ``path``, or the defaults when ``path`` is None."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ConfigError(
                f"{p}: bigger than {MAX_FILE_BYTES} bytes: a configuration is a few kB"
            )
        text = data.decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: config is not UTF-8 text") from None
    return loads(text, str(p))


def override(cfg: Config, dotted: str, value: Any, source: str = "command line") -> None:
    """Sets one key (``scorers.count``) with the same checks as the file."""
    name, _, key = dotted.partition(".")
    section = getattr(cfg, name)
    assert is_dataclass(section)
    setattr(section, key, _check_value(source, dotted, getattr(section, key), value))
    validate(cfg, source)
