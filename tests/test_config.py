"""The serve configuration: defaults, the commented YAML, and one-line errors."""

import subprocess
import sys
from dataclasses import fields

import pytest
import yaml

from iotcls import config as c


def test_default_yaml_is_exactly_the_defaults():
    assert c.loads(c.DEFAULT_YAML) == c.Config()
    # every key of every section is spelled out in the printed file
    d = yaml.safe_load(c.DEFAULT_YAML)
    assert d == c.Config().to_dict()
    for section in fields(c.Config):
        for f in fields(getattr(c.Config(), section.name)):
            assert f.name in d[section.name]


@pytest.mark.e2e
def test_print_config_prints_the_commented_default():
    out = subprocess.run(
        [sys.executable, "-m", "iotcls", "serve", "--print-config"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == c.DEFAULT_YAML
    assert out.stdout.count("\n  # ") >= 20  # commented, key by key


def test_partial_file_keeps_other_defaults(tmp_path):
    p = tmp_path / "serve.yaml"
    p.write_text("scorers:\n  count: 2\n  max_wait_ms: 5\nbridge:\n  bind: tcp://0.0.0.0:9000\n")
    cfg = c.load(p)
    assert cfg.scorers.count == 2 and cfg.scorers.max_wait_ms == 5.0
    assert isinstance(cfg.scorers.max_wait_ms, float)
    assert cfg.bridge.bind == ["tcp://0.0.0.0:9000"]
    assert cfg.bridge.queue_records == 20_000 and cfg.zeek == c.ZeekConfig()
    assert c.loads("") == c.Config() and c.loads("log:\n") == c.Config()


@pytest.mark.parametrize(
    "text, message",
    [
        ("scorers: {count: two}", "scorers.count: must be an integer, not 'two'"),
        ("scorers: {count: true}", "scorers.count: must be an integer, not True"),
        ("scorers: {count: -1}", "scorers.count: must not be negative"),
        ("scorers: {row_cache: -5}", "scorers.row_cache: must not be negative"),
        ("scorers: {device: gpu}", "scorers.device: must be one of auto, cpu, cuda, not 'gpu'"),
        ("scorers: {max_wait_ms: .inf}", "scorers.max_wait_ms: must be a number, not inf"),
        (
            "scorers: {heartbeat_s: 20}",
            "scorers.heartbeat_s: must be shorter than bridge.scorer_timeout_s (10.0)",
        ),
        ("bridge: {queue_records: 0}", "bridge.queue_records: must be at least 1"),
        (
            "bridge: {shed_policy: random}",
            "bridge.shed_policy: must be one of labelled-first, oldest, newest, not 'random'",
        ),
        ("bridge: {bind: [localhost:1]}", "bridge.bind: 'localhost:1' is not a ZeroMQ address"),
        (
            "bridge: {bind: []}",
            "bridge.bind: must be a non-empty list of at most 64 strings, not []",
        ),
        (
            "scorers: {batch_size: 100000000000000000000}",
            "scorers.batch_size: must be at most 4096, not 100000000000000000000",
        ),
        ("bridge: {queue_records: 1000000000}", "bridge.queue_records: must be at most 1e+07"),
        (
            "bridge: {scorer_timeout_s: 1.0e+300}",
            "bridge.scorer_timeout_s: must be at most 3600, not 1e+300",
        ),
        ("scorers: {count: 100000}", "scorers.count: must be at most 256"),
        (
            "bridge: {curve: sometimes}",
            "bridge.curve: must be one of auto, on, off, not 'sometimes'",
        ),
        (
            "zeek: {topics: [[a]]}",
            "zeek.topics: must be a non-empty list of at most 64 strings, not [['a']]",
        ),
        ("x: " + "9" * 5000, "not valid YAML: Exceeds the limit"),
        ("[" * 100000, "not valid YAML"),
        ("bridge: {queue: 5}", "bridge.queue: unknown key (known: bind,"),
        (
            "scorer: {count: 1}",
            "scorer: unknown section (known: bridge, log, metrics, record, scorers, suricata, zeek)",
        ),
        ("zeek: {url: http://x}", "zeek.url: must be a ws:// or wss:// URL, not 'http://x'"),
        ("log: {policy: sometimes}", "log.policy: must be one of changes, all, not 'sometimes'"),
        (
            "metrics: {enabled: yes please}",
            "metrics.enabled: must be true or false, not 'yes please'",
        ),
        ("metrics: {port: 70000}", "metrics.port: must be a TCP port (1-65535), not 70000"),
        ("metrics: 3", "metrics: must be a mapping, not 3"),
        ("- a\n- b", "expected a mapping of sections, got list"),
        ("zeek: [1", "not valid YAML at line 1"),
    ],
)
def test_bad_values_are_one_line_errors_naming_file_and_key(tmp_path, text, message):
    p = tmp_path / "serve.yaml"
    p.write_text(text)
    with pytest.raises(c.ConfigError) as e:
        c.load(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and message in msg and "\n" not in msg


def test_curve_takes_yaml_switches():
    assert c.loads("bridge: {curve: on}").bridge.curve == "on"
    assert c.loads("bridge: {curve: no}").bridge.curve == "off"
    assert c.loads("bridge: {curve: auto}").bridge.curve == "auto"


def test_billion_laughs_fails_fast_in_bounded_memory(tmp_path):
    """Nine levels of aliases, each nine times the last, in a known key: refused at once in
    one short line, without expanding (a full repr of the value takes gigabytes)."""
    import time
    import tracemalloc

    levels = "".join(
        f"    - &a{i} [" + ", ".join([f"*a{i - 1}"] * 9 if i else ["lol"] * 9) + "]\n"
        for i in range(10)
    )
    p = tmp_path / "bomb.yaml"
    p.write_text("zeek:\n  topics:\n" + levels)
    tracemalloc.start()
    t0 = time.monotonic()
    with pytest.raises(c.ConfigError) as e:
        c.load(p)
    took = time.monotonic() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    msg = str(e.value)
    assert "zeek.topics: must be a non-empty list" in msg and len(msg) < 400 and "\n" not in msg
    assert took < 5 and peak < 50 * 2**20, (took, peak)


def test_unreadable_file(tmp_path):
    with pytest.raises(c.ConfigError, match="cannot read config: No such file"):
        c.load(tmp_path / "missing.yaml")
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"zeek: {url: \xff}")
    with pytest.raises(c.ConfigError, match="not UTF-8"):
        c.load(p)
    p = tmp_path / "huge.yaml"
    p.write_bytes(b"# " + b"x" * (2 << 20))
    with pytest.raises(c.ConfigError, match="bigger than 1048576 bytes"):
        c.load(p)


@pytest.mark.e2e
def test_cli_reports_config_errors_in_one_line(tmp_path):
    p = tmp_path / "serve.yaml"
    p.write_text("bridge:\n  max_attempts: 0\n")
    out = subprocess.run(
        [sys.executable, "-m", "iotcls", "serve", "--config", str(p)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr == f"iotcls serve: error: {p}: bridge.max_attempts: must be at least 1\n"
    out = subprocess.run(
        [sys.executable, "-m", "iotcls", "serve", "--scorers", "-2"], capture_output=True, text=True
    )
    assert out.stderr == "iotcls serve: error: --scorers: scorers.count: must not be negative\n"
    p.write_text("scorers:\n  batch_size: 100000000000000000000\n")  # crash-looped the scorers
    out = subprocess.run(
        [sys.executable, "-m", "iotcls", "serve", "--config", str(p)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and out.stderr == (
        f"iotcls serve: error: {p}: scorers.batch_size: must be at most 4096, not "
        "100000000000000000000\n"
    )


@pytest.mark.e2e
def test_unusable_model_is_a_one_line_error(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_text("not a model\n")
    for extra in ([], ["--scorer-only", "--connect", "tcp://127.0.0.1:9", "--name", "s"]):
        out = subprocess.run(
            [sys.executable, "-m", "iotcls", "serve", "--model", str(bad), *extra],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and f"error: {bad}: " in lines[0], out.stderr
