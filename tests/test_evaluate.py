"""Strategies and evaluation figures on hand-made predictions: exact expected values."""

import numpy as np
import pytest

from iotcls.baseline import FEATURES, flow_features
from iotcls.evaluate import (
    EvalData,
    class_report,
    coverage,
    hardest_pairs,
    running_max_by_group,
    select_for_evaluation,
    selectivity,
)
from iotcls.flowtable import FlowTable
from iotcls.layout import MatrixLayout
from iotcls.schema import FlowRecord
from iotcls.strategies import VoteConfig, device_vote, strategy_input
from iotcls.train import Split


def probs_of(rows):
    return np.array(rows, dtype=np.float64)


def test_device_vote_sums_probabilities_over_a_window():
    # one device, five sequences in time order (given shuffled)
    p = probs_of([[0.9, 0.1], [0.4, 0.6], [0.45, 0.55], [0.3, 0.7], [0.8, 0.2]])
    times = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    perm = np.array([3, 0, 4, 1, 2])
    v = device_vote(p[perm], np.zeros(5, int), times[perm], VoteConfig(window=3, min_votes=2))
    inv = np.argsort(perm)
    idx, conf, n = v.index[inv], v.confidence[inv], v.n_votes[inv]
    assert n.tolist() == [1, 2, 3, 3, 3]
    # t0: one vote, below min_votes; t1: 1.3 vs 0.7; t2: 1.75 vs 1.25;
    # t3 (window t1..t3): 1.15 vs 1.85; t4 (t2..t4): 1.55 vs 1.45
    assert idx.tolist() == [-1, 0, 0, 1, 0]
    assert conf[1] == pytest.approx(1.3 / 2) and conf[3] == pytest.approx(1.85 / 3)
    assert conf[4] == pytest.approx(1.55 / 3)
    assert v.emitted[inv].tolist() == [False, True, True, True, True]


def test_device_vote_keeps_devices_apart():
    p = probs_of([[0.9, 0.1], [0.2, 0.8], [0.9, 0.1], [0.2, 0.8]])
    v = device_vote(
        p,
        np.array([0, 1, 0, 1]),
        np.array([0.0, 0.0, 1.0, 1.0]),
        VoteConfig(window=10, min_votes=1),
    )
    assert v.index.tolist() == [0, 1, 0, 1] and v.n_votes.tolist() == [1, 1, 2, 2]


def test_strategy_input():
    m = np.ones((4, 6, 10), np.float32)
    assert strategy_input(m, "flow").shape == (4, 1, 10)
    assert strategy_input(m, "sequence") is m and strategy_input(m, "device") is m
    with pytest.raises(ValueError, match="unknown strategy"):
        strategy_input(m, "packet")


def eval_data(n_dev=2, per=3):
    n = n_dev * per
    return EvalData(
        matrices=np.zeros((n, 1, 1), np.float32),
        labels=np.array(["a"] * n, object),
        devices=np.array([f"d{i // per}" for i in range(n)], object),
        captures=np.array(["c"] * n, object),
        start=np.arange(n, dtype=float) * 10,
        last=np.arange(n, dtype=float) * 10 + 5,
        device_first_seen=np.array([0.0 if i < per else 28.0 for i in range(n)]),
        total_packets=np.full(n, 40),
        total_bytes=np.full(n, 10_000),
        inspected_packets=np.full(n, 10),
        inspected_bytes=np.full(n, 1_000),
    )


def test_coverage_and_selectivity():
    d = eval_data()  # d0: flows at 0, 10, 20 (complete at +5); d1: 30, 40, 50, first seen 28
    everything = np.ones(6, bool)
    c = coverage(d, everything, d.last)
    assert c == {
        "devices": 1.0,
        "flows": 1.0,
        "first_label_s_median": 6.0,
        "first_label_s_mean": 6.0,
    }  # d0: 5 - 0, d1: 35 - 28
    some = np.array([False, False, True, False, False, False])
    c = coverage(d, some, d.last)
    assert c["devices"] == 0.5 and c["flows"] == round(1 / 6, 4)
    assert c["first_label_s_median"] == 25.0
    assert selectivity(d) == {"packets": 0.25, "bytes": 0.1}


def test_running_max_by_group():
    v = running_max_by_group(
        np.array([5.0, 1.0, 9.0, 2.0, 3.0]),
        np.array([0, 0, 1, 0, 1]),
        np.array([0.0, 1.0, 0.0, 2.0, 1.0]),
    )
    assert v.tolist() == [5.0, 5.0, 9.0, 5.0, 9.0]


def test_class_report_and_hardest_pairs():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    p = np.array([0, 0, 1, 0, 1, 2, 2, 0])
    r = class_report(y, p, ["a", "b", "c", "d"])
    assert r["accuracy"] == round(5 / 8, 4)
    assert r["per_class"]["a"] == {
        "precision": 0.5,
        "recall": round(2 / 3, 4),
        "f1": round(4 / 7, 4),
        "support": 3,
    }
    assert "d" not in r["per_class"]  # neither true nor predicted
    pairs = hardest_pairs(r["confusion"], ["a", "b", "c", "d"])
    assert pairs[0] == {"pair": ["a", "b"], "errors": 2, "a_as_b": 1, "b_as_a": 1, "rate": 0.4}
    assert pairs[1]["pair"] == ["a", "c"] and pairs[1]["errors"] == 1
    assert len(pairs) == 2


def test_select_for_evaluation():
    caps = np.array(["x", "y", "z", "w"], object)
    split = Split(train=["x"], val=["y"], test=["z"])
    sel, why = select_for_evaluation(caps, split, use_all=False)
    assert sel.tolist() == [False, False, True, False] and "held-out" in why
    sel, why = select_for_evaluation(np.array(["w", "v"], object), split, use_all=False)
    assert sel.all() and "none was used in training" in why
    assert select_for_evaluation(caps, split, use_all=True)[0].all()


def test_baseline_features_exact():
    lay = MatrixLayout(history=1, packets=4, payload_bytes=2)
    r = FlowRecord(
        device_mac="aa:bb:cc:dd:ee:01",
        device_ip="192.168.1.20",
        device_port=50000,
        remote_ip="93.184.216.34",
        remote_port=443,
        proto=6,
        start=100.0,
        last=100.5,
        total_bytes=1500,
        total_packets=3,
        offsets=[0.0, 0.001, 0.5],
        sizes=[60, 1400, 40],
        directions=[1, 0, 1],
        payloads=[b"", b"", b""],
    )
    mats, _ = lay.matrices(FlowTable.from_records([r], 4, 2))
    f = dict(zip(FEATURES, flow_features(mats, lay)[0]))
    assert (f["tcp"], f["udp"], f["n"], f["n_up"], f["n_down"]) == (1, 0, 3, 2, 1)
    assert f["size_mean"] == pytest.approx(500, rel=1e-4)
    assert (f["size_min"], f["size_max"]) == (pytest.approx(40), pytest.approx(1400))
    assert f["bytes_up"] == pytest.approx(100) and f["bytes_down"] == pytest.approx(1400)
    assert f["t_last"] == pytest.approx(500, rel=1e-3)  # ms
    assert f["gap_max"] == pytest.approx(499, rel=1e-3)
    assert f["rport"] == pytest.approx(443 / 65535)
