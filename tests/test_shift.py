"""Trust under shift: DHCP removed from a dataset, training's DHCP dropout, rule 7 and the
feature-space open-set signal (docs/trust.md)."""

import numpy as np
import torch

from iotcls.layout import MatrixLayout
from iotcls.trust.dhcp_identity import DHCP_AMBIGUOUS, DHCP_NEEDED, DhcpIdentity, fit_needed
from iotcls.trust.shift import dhcp_rows, remove_dhcp


def _row(layout: MatrixLayout, port: int, udp: bool = True, fill: float = 0.5) -> np.ndarray:
    r = np.zeros(layout.width, np.float32)
    r[1] = fill
    r[6], r[7] = port / 65535.0, 40000 / 65535.0
    r[9] = float(udp)
    r[8] = float(not udp)
    return r


def test_dhcp_rows_and_remove_dhcp_rebuild_histories():
    layout = MatrixLayout()
    rows = np.stack(
        [
            _row(layout, 53),
            _row(layout, 67),
            _row(layout, 443, udp=False),
            _row(layout, 547),
            _row(layout, 123),
        ]
    )
    starts = np.arange(5, dtype=float)
    devices = np.zeros(5, int)
    mats, order = layout.assemble(rows, starts, devices)
    back = np.empty_like(order)
    back[order] = np.arange(5)
    mats = mats[back]
    assert dhcp_rows(mats[:, 0]).tolist() == [False, True, False, True, False]
    assert not dhcp_rows(np.zeros(layout.width)).any()  # an empty row is no DHCP flow
    keep, rebuilt = remove_dhcp(mats, devices, starts, layout)
    assert keep.tolist() == [0, 2, 4]
    want, o = layout.assemble(rows[[0, 2, 4]], starts[[0, 2, 4]], devices[[0, 2, 4]])
    assert np.array_equal(rebuilt, want[np.argsort(o)])
    assert not dhcp_rows(rebuilt).any()
    assert np.array_equal(rebuilt[2, 1, 1:], rows[2, 1:]) and np.array_equal(
        rebuilt[2, 2, 1:], rows[0, 1:]
    )


def test_training_drops_dhcp_rows_and_moves_older_ones_up():
    from iotcls.train import drop_dhcp_rows

    x = torch.arange(1, 5, dtype=torch.float32)[None, :, None].repeat(2, 1, 3)  # rows 1,2,3,4
    dhcp = torch.tensor([[False, True, False, True], [True, False, False, False]])
    gen = torch.Generator().manual_seed(0)
    out = drop_dhcp_rows(x, dhcp, 1.0, gen)
    assert out[0, :, 0].tolist() == [1, 3, 0, 0]  # DHCP rows out, the older row moved up
    assert out[1, :, 0].tolist() == [1, 2, 3, 4]  # a DHCP current flow stays
    assert torch.equal(drop_dhcp_rows(x, dhcp, 0.0, gen), x)


def test_training_moves_public_remotes_consistently_within_a_matrix():
    from iotcls.train import move_remotes

    layout = MatrixLayout()
    a, b = [8, 8, 4, 4], [8, 8, 8, 8]
    x = torch.zeros(3, 4, layout.width)
    for m in range(3):
        for r, ip in enumerate([a, b, a, [0, 0, 0, 0]]):  # row 3: a private remote
            x[m, r, 1:5] = torch.tensor(ip, dtype=torch.float32) / 255.0
        x[m, :3, 6] = 443 / 65535.0
    gen = torch.Generator().manual_seed(1)
    out = move_remotes(x, 1.0, gen)
    octets = torch.round(out[:, :, 1:5] * 255.0)
    for m in range(3):
        assert torch.equal(octets[m, 0], octets[m, 2])  # the same server stays the same
        assert not torch.equal(octets[m, 0], octets[m, 1])
        # one offset per octet for the whole matrix: a's and b's octets keep their difference
        diff = torch.remainder(octets[m, 1] - octets[m, 0], 256)
        assert diff.tolist() == [0, 0, 4, 4]
        assert not torch.equal(octets[m, 0], torch.tensor(a, dtype=torch.float32))
        assert torch.equal(out[m, 3], x[m, 3])  # private (zero) remotes and empty rows stay
    assert not torch.equal(octets[0], octets[1])  # each matrix moves elsewhere
    assert torch.equal(out[:, :, 5:], x[:, :, 5:])  # only the address columns change
    assert torch.equal(move_remotes(x, 0.0, gen), x)


def test_rule_7_holds_back_classes_until_the_identity_is_known():
    seen = {"a": ["X", "Y"], "b": ["Z"], "c": ["W"]}
    pred = ["Z"] * 10 + ["W"] * 10
    truth = ["Z"] * 7 + ["V"] * 3 + ["W"] * 9 + ["V"]
    conf = np.r_[np.full(7, 0.95), [0.95, 0.95, 0.5], np.full(10, 0.95)]
    need = fit_needed(seen, ["a"], pred, truth, np.ones(20, bool), conf, max_error=0.05)
    assert need == ["X", "Y", "Z"]  # ambiguous identity's classes; Z: 2 confident errors
    rule = DhcpIdentity(
        {k: frozenset(v) for k, v in seen.items()}, frozenset(["a"]), frozenset(need)
    )
    assert rule.reason(None, "Z") == DHCP_NEEDED
    assert rule.reason(None, "W") == "-"
    assert rule.reason("b", "Z") == "-"  # the identity is known: rule 7 is done
    assert rule.reason("a", "X") == DHCP_AMBIGUOUS


def test_feature_distance_flags_features_far_from_their_class():
    from iotcls.trust.features import FeatureDistance, fit_features

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.out = torch.nn.Linear(4, 2)
    model.forward = lambda x: model.out(x.reshape(len(x), -1)[:, :4])  # features: 4 columns
    rng = np.random.default_rng(0)
    centre = np.array([[3.0, 0, 0, 0], [-3.0, 0, 0, 0]])
    y = rng.integers(0, 2, 400)
    x = (centre[y] + rng.normal(0, 0.3, (400, 4))).astype(np.float32)[:, None, :]
    with torch.no_grad():
        model.out.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
        model.out.bias.zero_()
    fd = fit_features(model, x[:300], y[:300], x[300:], y[300:], 2, quantile=0.99)
    assert fd.atypical(x[300:, 0], y[300:]).mean() < 0.05
    far = np.array([[3.0, 4.0, 4.0, 4.0]])  # labelled class 0 with confidence, but far away
    assert fd.atypical(far, np.array([0])).all()
    back = FeatureDistance.from_dict(fd.to_dict())
    assert torch.equal(back.threshold, fd.threshold)
    # a class with too few training matrices has no mean to measure from: never atypical
    few = np.r_[np.flatnonzero(y[:300] == 0), np.flatnonzero(y[:300] == 1)[:3]]
    fd = fit_features(model, x[few], y[few], x[300:], y[300:], 2, quantile=0.99)
    assert np.isinf(fd.threshold[1].item()) and np.isfinite(fd.threshold[0].item())
    assert not fd.atypical(far * np.array([-1, 1, 1, 1]), np.array([1])).any()


def test_stretched_timing_equals_encoding_the_stretched_offsets():
    """A slower network, simulated on encoded matrices, is what the layout would have
    encoded from records whose packets came ``factor`` times as far apart, every other
    column untouched."""
    from dataclasses import replace

    from iotcls.testing.shared import sentinel_device_table
    from iotcls.trust.shift import stretched_timing

    t = sentinel_device_table("HueBridge", "Setup-A-1-STA")
    layout = MatrixLayout()
    rows = layout.encode_rows(t)
    for factor in (0.5, 4.0, 400.0):  # 400: gaps beyond the window, as the encoding has them
        want = layout.encode_rows(replace(t, offsets=t.offsets * factor))
        got = stretched_timing(rows, layout, factor)
        np.testing.assert_allclose(got, want, atol=2e-6)
    assert (got != rows).any()
