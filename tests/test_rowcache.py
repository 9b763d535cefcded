"""The scorer's row cache gives the model's own logits, encoding each distinct flow once."""

import numpy as np
import pytest
import torch

from iotcls.bundle import ModelBundle
from iotcls.layout import MatrixLayout
from iotcls.predict import Predictor
from iotcls.rowcache import RowCache
from synth_devices import LAYOUT, make_data
from tiny_model import tiny_bundle


@pytest.fixture(scope="module")
def data():
    x, y, caps = make_data(["cam", "plug", "hub"], 3, flows=40, seed=1)
    return x.astype(np.float32)


def plain_logits(model, x):
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def test_cached_logits_equal_the_model(data):
    b = tiny_bundle(LAYOUT, ["cam", "plug", "hub"], seed=4)
    cache = RowCache(b.model, capacity=10_000)
    expected = plain_logits(b.model, data)
    got = np.concatenate([cache.logits(data[s : s + 37]).numpy() for s in range(0, len(data), 37)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # each flow is the current row once and a history row of the device's next matrices:
    # with history 2, at most a third of the present rows are new
    assert cache.stats.hit_rate > 0.6
    rows = data.reshape(-1, data.shape[2])
    distinct = len({r[1:].tobytes() for r in rows if r.any()})
    assert len(cache) == distinct


def test_a_small_ring_still_gives_right_answers(data):
    b = tiny_bundle(LAYOUT, ["cam", "plug", "hub"], seed=5)
    cache = RowCache(b.model, capacity=3)
    got = np.concatenate([cache.logits(data[s : s + 5]).numpy() for s in range(0, 200, 5)])
    np.testing.assert_allclose(got, plain_logits(b.model, data[:200]), rtol=1e-5, atol=1e-6)
    assert len(cache) <= 3


def test_rel_time_is_not_part_of_the_key(data):
    """The same flow at another age is a hit, and its age still reaches the model."""
    b = tiny_bundle(LAYOUT, ["cam", "plug", "hub"], seed=6)
    cache = RowCache(b.model, capacity=100)
    x = data[10:11].copy()
    older = x.copy()
    older[:, 1:, 0] = np.minimum(older[:, 1:, 0] + 0.2, 1.0) * (older[:, 1:].any(axis=2))
    cache.logits(x)
    hits = cache.stats.hits
    got = cache.logits(older).numpy()
    assert cache.stats.hits - hits == int(older[0].any(axis=1).sum())
    np.testing.assert_allclose(got, plain_logits(b.model, older), rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain_logits(b.model, older), plain_logits(b.model, x))


def test_predictor_with_a_row_cache_labels_alike(data):
    b = tiny_bundle(LAYOUT, ["cam", "plug", "hub"], seed=7)
    p0, p1 = Predictor(b, explain=False), Predictor(b, explain=False, row_cache=1000)
    a, c = p0.predict(data), p1.predict(data)
    assert list(a.label) == list(c.label)
    np.testing.assert_allclose(a.confidence, c.confidence, rtol=1e-5)
    assert p1.row_cache is not None and p1.row_cache.stats.hits > 0


def test_default_model_through_the_cache(sample):
    """The shipped model on a real device's matrices (the sample capture)."""
    from iotcls.capture import CaptureSpec
    from iotcls.dataset import capture_matrices

    b = ModelBundle.load()
    spec = CaptureSpec(sample.pcap, "sample", {m: "" for m in sample.macs})
    x = capture_matrices(spec, b.layout).matrices.astype(np.float32)
    assert len(x) > 20
    cache = RowCache(b.model, capacity=1000)
    got = np.concatenate([cache.logits(x[s : s + 16]).numpy() for s in range(0, len(x), 16)])
    np.testing.assert_allclose(got, plain_logits(b.model, x), rtol=1e-4, atol=1e-5)
    assert cache.stats.hit_rate > 0.5


def test_bad_capacity():
    b = tiny_bundle(MatrixLayout(history=1, packets=2, payload_bytes=2), ["a", "b"], seed=0)
    with pytest.raises(ValueError, match="capacity"):
        RowCache(b.model, capacity=0)
