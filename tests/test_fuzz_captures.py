"""Seeded, bounded fuzzing of the pcap and pcapng readers (the hardening issue's proof in CI).

Each format gets a fixed number of mutated captures (:mod:`iotcls.testing.capture_fuzz`:
bit and nibble flips, length-field and option edits, truncation, block splicing) read through
the reader, the flow builder and the matrices with nothing in between to catch errors: any
exception but PcapError, any batch that breaks an invariant, or any input slower than
:data:`SLOW_S` fails the test, with a reproducer written beside it. Real seeds come from the
IoT Sentinel captures when ../shared has them; the synthetic seeds run everywhere. About 15 s
of CPU in all on the 2-core VM; ``benchmarks/fuzz_captures.py`` is the long run.
"""

import resource
import time
from pathlib import Path

import pytest

from iotcls.flows import DeviceSelector, capture_flows_many
from iotcls.testing.capture_fuzz import FORMATS, crash_kind, inputs, run_one, seeds
from iotcls.testing.shared import SAMPLE_CAPTURES, missing, sentinel_capture

PER_SHARD = 1000  # inputs per test, each shard seeded on its own; four shards per format
SHARDS = 4
SLOW_S = 2.0  # one tiny input taking this long is a hang in the making
SEED = 20240601


def real_seeds() -> list[Path]:
    paths = [sentinel_capture(d, c) for d, c in SAMPLE_CAPTURES[:4]]
    return [p for p in paths if missing(p) is None]


@pytest.fixture(scope="module")
def pools() -> dict[str, list[bytes]]:
    real = real_seeds()
    return {fmt: seeds(fmt, real) for fmt in FORMATS}


@pytest.mark.parametrize("shard", range(SHARDS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz_reader(tmp_path, pools, fmt, shard):
    pool = pools[fmt]
    path = tmp_path / f"input.{fmt}"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    crashes: dict[str, str] = {}
    slowest = 0.0
    for i, data, chunk in inputs(fmt, pool, PER_SHARD, SEED + shard):
        path.write_bytes(data)
        t = time.perf_counter()
        try:
            run_one(path, chunk)
        except Exception as e:  # noqa: BLE001 - this is what the test looks for
            kind = crash_kind(e)
            if kind not in crashes:
                keep = tmp_path / f"crash-{len(crashes)}.{fmt}"
                keep.write_bytes(data)
                crashes[kind] = f"input {i} (chunk {chunk}, kept as {keep}): {e}"[:300]
        slowest = max(slowest, time.perf_counter() - t)
    assert not crashes, "\n".join(f"{k}: {v}" for k, v in crashes.items())
    assert slowest < SLOW_S, f"an input took {slowest:.2f} s"
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert grown < 300_000, f"peak RSS grew by {grown:,} KiB"  # bounded, not per input


def test_fuzz_many_small_captures_path(tmp_path, pools):
    """The many-small-files path (one builder pass over merged captures, 1 GiB read chunk):
    groups of mutated captures; none may fail in a way the reader did not foresee (the
    safety net in iotcls.flows would turn that into a per-capture error, which is checked
    for here), and a capture's records must not depend on its neighbours."""
    sel = DeviceSelector.from_lists([], ["0.0.0.0/0", "::/0"])
    gen = {fmt: inputs(fmt, pools[fmt], 10**9, SEED + 1) for fmt in FORMATS}
    for group in range(60):
        paths = []
        for k in range(4):
            fmt = FORMATS[(group + k) % 2]
            _, data, _ = next(gen[fmt])
            paths.append(tmp_path / f"g{k}.{fmt}")
            paths[-1].write_bytes(data)
        out = capture_flows_many(paths, [sel] * len(paths))
        for _p, cf in zip(paths, out):
            assert "cannot read this capture" not in cf.error, cf.error
        alone = capture_flows_many(paths[1:2], [sel])[0]
        assert len(alone.table) == len(out[1].table)
