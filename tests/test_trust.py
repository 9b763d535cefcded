"""The trust layer: exact group Shapley values, calibration metrics, the trust decision."""

import io
import itertools
import math

import numpy as np
import pytest
import torch

from iotcls.layout import MatrixLayout
from iotcls.model import IoTCNN, ModelConfig
from iotcls.trust.calibration import (
    expected_calibration_error,
    reliability_bins,
    reliability_diagram,
)
from iotcls.trust.decision import (
    UNKNOWN,
    TrustConfig,
    TrustError,
    TrustState,
    decide,
    device_vote,
    fit_trust,
)
from iotcls.trust.shapley import GroupShapley, coalitions, feature_groups, shapley_matrix

SMALL = MatrixLayout(history=2, packets=3, payload_bytes=2)


# -- players -------------------------------------------------------------------------------
def test_groups_partition_the_matrix():
    for history, expect in [
        ("one", ["meta", "timing", "sizes", "directions", "payload", "history"]),
        ("rows", ["meta", "timing", "sizes", "directions", "payload", "h1", "h2"]),
        ("none", ["meta", "timing", "sizes", "directions", "payload"]),
    ]:
        names, masks = feature_groups(SMALL, history)
        assert names == expect
        cover = masks.sum(0)
        assert cover.max() == 1
        if history != "none":
            assert cover.min() == 1  # every cell belongs to exactly one player
        else:
            assert cover[0].min() == 1 and cover[1:].max() == 0
    # per-group cell counts of row 0: 13 meta, 3 timing, 3 sizes, 3 directions, 3*2 payload
    names, masks = feature_groups(SMALL)
    assert masks.sum((1, 2)).tolist() == [13, 3, 3, 3, 6, 2 * SMALL.width]


def test_empty_groups_are_not_players():
    names, _ = feature_groups(MatrixLayout(history=0, payload_mode="none"))
    assert names == ["meta", "timing", "sizes", "directions"]


# -- exact Shapley values ------------------------------------------------------------------
def test_shapley_matrix_is_efficient_and_symmetric():
    for g in range(1, 8):
        a = shapley_matrix(g)
        full, empty = np.zeros(2**g), np.zeros(2**g)
        full[-1], empty[0] = 1, 1
        np.testing.assert_allclose(a.sum(1), full - empty, atol=1e-12)
        # the symmetric game v(S) = |S|: every player gets exactly 1
        np.testing.assert_allclose(coalitions(g).sum(1) @ a, np.ones(g), atol=1e-12)


def brute_force_shapley(v, g):
    """Mean marginal contribution over all g! orders (the definition)."""
    phi = np.zeros(g)
    for order in itertools.permutations(range(g)):
        s = 0
        for i in order:
            phi[i] += v(s | (1 << i)) - v(s)
            s |= 1 << i
    return phi / math.factorial(g)


def tiny_mlp(layout, n_classes=3, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(layout.rows * layout.width, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, n_classes),
    ).eval()  # fmt: skip


def test_linear_model_closed_form():
    """For logits w.x + b with baseline 0, a group's value is the sum of w_j x_j over it."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(SMALL.rows * SMALL.width, 4)
    names, masks = feature_groups(SMALL)
    ex = GroupShapley(lambda x: lin(x.flatten(1)), names, masks, value="logit")
    x = torch.rand(6, *SMALL.shape)
    target = np.array([0, 1, 2, 3, 0, 1])
    e = ex.explain(x, target=target)
    w = lin.weight.detach().numpy().reshape(4, *SMALL.shape)
    expect = np.einsum("nrw,grw,nrw->ng", x.numpy(), masks.astype(np.float32), w[target])
    np.testing.assert_allclose(e.values, expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(e.target, target)


def test_matches_permutation_definition_on_a_nonlinear_model():
    model = tiny_mlp(SMALL)
    names, masks = feature_groups(SMALL, "rows")  # 7 players: 5040 orders
    ex = GroupShapley(model, names, masks, temperature=1.7)
    x = torch.rand(2, *SMALL.shape)
    e = ex.explain(x, keep_coalitions=True)
    g = len(names)
    for n in range(2):
        cv = e.coalition_values[n]
        ref = brute_force_shapley(lambda s: cv[s], g)
        np.testing.assert_allclose(e.values[n], ref, atol=1e-10)
        # and the coalition values are the model's on the masked inputs
        for s in (0, 5, 2**g - 1):
            keep = masks[[i for i in range(g) if s >> i & 1]].any(0)
            with torch.inference_mode():
                lp = torch.log_softmax(model(x[n : n + 1] * torch.from_numpy(keep)) / 1.7, -1)
            assert cv[s] == pytest.approx(float(lp[0, e.target[n]]), abs=1e-5)


def test_efficiency_on_the_cnn():
    """sum(phi) = log p_c(x) - log p_c(all-zero matrix), on the project's CNN."""
    torch.manual_seed(0)
    model = IoTCNN(ModelConfig.from_layout(SMALL, 5)).eval()
    ex = GroupShapley.for_layout(model, SMALL, temperature=1.3, chunk=64)
    x = torch.rand(40, *SMALL.shape)
    x[:5, 1:] = 0  # first flows of a device: no history
    e = ex.explain(x)
    idx = np.arange(len(x))
    with torch.inference_mode():
        lp = torch.log_softmax(model(x) / 1.3, -1).numpy()
        lp0 = torch.log_softmax(model(torch.zeros(1, *SMALL.shape)) / 1.3, -1).numpy()[0]
    np.testing.assert_array_equal(e.target, lp.argmax(1))
    np.testing.assert_allclose(e.log_probs, lp, atol=1e-5)
    np.testing.assert_allclose(e.values.sum(1), lp[idx, e.target] - lp0[e.target], atol=1e-5)
    assert np.abs(e.values[:5, -1]).max() < 1e-6  # absent history has no effect
    tops = e.top_groups(2)
    assert all(len(t) == 2 and "=" in t[0] for t in tops)


# -- calibration ---------------------------------------------------------------------------
def test_ece_exact():
    conf = np.array([0.95, 0.95, 0.95, 0.95, 0.55, 0.55, 1.0])
    ok = np.array([1, 1, 1, 0, 1, 0, 1], bool)
    b = reliability_bins(conf, ok, n_bins=10)
    assert b.count.tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 0, 5]
    # bin 5: acc 0.5 conf 0.55 (gap .05, 2 labels); bin 9: acc 0.8 conf 0.96 (gap .16, 5)
    assert b.ece == pytest.approx((0.05 * 2 + 0.16 * 5) / 7)
    assert b.mce == pytest.approx(0.16)
    assert expected_calibration_error(conf, ok, 10) == pytest.approx(b.ece)
    with pytest.raises(ValueError):
        expected_calibration_error(np.array([1.2]), np.array([True]))


def test_reliability_png(tmp_path):
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1, 500)
    ok = rng.uniform(size=500) < conf
    p = reliability_diagram(tmp_path / "rel.png", {"raw": (conf, ok), "calibrated": (conf, ok)})
    data = p.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_structured_pass_equals_masked_inputs():
    """The row-reusing pass gives the values of running the CNN on every masked matrix."""
    torch.manual_seed(0)
    model = IoTCNN(ModelConfig.from_layout(SMALL, 4)).eval()
    x = torch.rand(30, *SMALL.shape)
    x[:3, 2:] = 0
    x[3, 0, :13] = 0  # current flow without metadata
    for history in ("one", "rows"):
        fast = GroupShapley.for_layout(model, SMALL, history, temperature=1.2, chunk=100)
        slow = GroupShapley.for_layout(model, SMALL, history, temperature=1.2, structured=False)
        assert fast.structured and not slow.structured
        a, b = fast.explain(x, keep_coalitions=True), slow.explain(x, keep_coalitions=True)
        np.testing.assert_allclose(a.coalition_values, b.coalition_values, atol=2e-5)
        np.testing.assert_allclose(a.values, b.values, atol=2e-5)
    # a player spanning rows cannot use it
    names, masks = feature_groups(SMALL)
    masks = masks.copy()
    masks[0, 1, :13] = True
    masks[-1, 1, :13] = False
    assert not GroupShapley(model, names, masks).structured
