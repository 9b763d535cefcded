"""Training: the split by capture file, and a small real run through ``iotcls train``."""

import json
from pathlib import Path

import numpy as np
import pytest

from iotcls.bundle import ModelBundle
from iotcls.cli import main
from iotcls.dataset import Dataset
from iotcls.testing.shared import require, sentinel_dir
from iotcls.train import Split, cut_history, fit_temperature, macro_f1, split_captures

ROOT = Path(__file__).resolve().parent.parent
DATA = sentinel_dir()  # ../shared, or $IOTCLS_SHARED
# small devices with distinct behaviour: a quick run that must still learn them apart
DEVICES = ("Aria", "D-LinkCam", "Lightify", "MAXGateway", "EdnetGateway")
FILES_PER_DEVICE = 6


def test_split_is_by_capture_stratified_and_seeded():
    caps = np.array(
        [
            f"{lab}/{i}"
            for lab, n in (("a", 10), ("b", 3), ("c", 2), ("d", 1))
            for i in range(n)
            for _ in range(4)
        ],
        dtype=object,
    )
    labels = np.array([c.split("/")[0] for c in caps], dtype=object)
    s = split_captures(caps, labels, seed=7, val=0.15, test=0.15)
    assert s == split_captures(caps, labels, seed=7, val=0.15, test=0.15)
    assert s != split_captures(caps, labels, seed=8, val=0.15, test=0.15)
    count = {
        p: {lab: sum(c.startswith(lab + "/") for c in getattr(s, p)) for lab in "abcd"}
        for p in ("train", "val", "test")
    }
    assert count["test"] == {"a": 2, "b": 1, "c": 1, "d": 0}
    assert count["val"] == {"a": 2, "b": 1, "c": 0, "d": 0}
    assert count["train"] == {"a": 6, "b": 1, "c": 1, "d": 1}
    part = s.part_of(caps)
    for c in set(caps):  # every flow of a capture lands in the same part
        assert len(set(part[caps == c])) == 1
    assert (part >= 0).all()


def test_folds_hold_out_every_capture_once():
    from iotcls.crossval import fold_splits

    caps = np.array(
        [
            f"{lab}/{i}"
            for lab, n in (("a", 10), ("b", 3), ("c", 2))
            for i in range(n)
            for _ in range(4)
        ],
        dtype=object,
    )
    labels = np.array([c.split("/")[0] for c in caps], dtype=object)
    folds = fold_splits(caps, labels, k=2, seed=7, val=0.15)
    assert folds == fold_splits(caps, labels, k=2, seed=7, val=0.15)
    assert folds != fold_splits(caps, labels, k=2, seed=8, val=0.15)
    tested = [c for s in folds for c in s.test]
    assert sorted(tested) == sorted(set(caps))  # each capture in exactly one test fold
    for s in folds:
        assert not set(s.test) & set(s.train + s.val)
        assert sorted(s.test + s.val + s.train) == sorted(set(caps))
        assert {c.split("/")[0] for c in s.test} == {"a", "b", "c"}  # stratified
        assert sum(c.startswith("a/") for c in s.val) == 2  # round(0.15 * 10)
        part = s.part_of(caps)
        for c in set(caps):
            assert len(set(part[caps == c])) == 1
    with pytest.raises(ValueError, match="at least 3 capture files; too few: {'c': 2}"):
        fold_splits(caps, labels, k=3, seed=0, val=0.15)


def test_macro_f1_and_temperature():
    y = np.array([0, 0, 1, 1, 2])
    assert macro_f1(y, y, 4) == 1.0
    assert macro_f1(y, np.array([0, 0, 1, 0, 2]), 4) == pytest.approx((0.8 + 2 / 3 + 1) / 3)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 2000)
    logits = (np.eye(3)[labels] + rng.normal(size=(2000, 3))).astype(np.float32)
    # the NLL-optimal temperature of logits z is 1; of 5 z it is 5, of z / 4 it is 1 / 4
    t = fit_temperature(logits, labels)
    assert fit_temperature(5 * logits, labels) == pytest.approx(5 * t, rel=1e-3)
    assert fit_temperature(logits / 4, labels) == pytest.approx(t / 4, rel=1e-3)
    assert 0.7 < t < 1.3


def test_cut_history_keeps_row_zero():
    import torch

    x = torch.ones(500, 6, 4)
    out = cut_history(x, 1.0, torch.Generator().manual_seed(0))
    rows = (out != 0).any(2).sum(1)
    assert (out[:, 0] == 1).all() and rows.min() == 1 and rows.max() == 5
    kept = (out != 0).any(2)
    assert (kept[:, 1:] <= kept[:, :-1]).all()  # a prefix of the history is kept
    assert torch.equal(cut_history(x, 0.0, torch.Generator()), x)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    require(DATA)
    d = tmp_path_factory.mktemp("train")
    rows = ["pcap,mac,label"]
    for dev in DEVICES:
        mac = (DATA / dev / "_iotdevice-mac.txt").read_text().strip()
        for p in sorted((DATA / dev).glob("*.pcap"))[:FILES_PER_DEVICE]:
            rows.append(f"{p},{mac},{dev}")
    m = d / "manifest.csv"
    m.write_text("\n".join(rows) + "\n")
    return m


@pytest.fixture(scope="module")
def trained(manifest):
    out = manifest.parent / "model.pt"
    assert (
        main(
            [
                "train",
                str(manifest),
                "-o",
                str(out),
                "--epochs",
                "10",
                "--batch-size",
                "32",
                "--patience",
                "10",
                "--quiet",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    return out


def test_train_writes_a_bundle_with_its_split(trained, manifest):
    b = ModelBundle.load(trained)
    assert b.classes == sorted(DEVICES)
    split = Split(**b.metadata["split"])
    assert len(split.test) == len(DEVICES) and len(split.val) == len(DEVICES)
    assert len(split.train) == len(DEVICES) * (FILES_PER_DEVICE - 2)
    assert b.metadata["data"]["captures"] == [str(manifest)]
    assert b.metadata["parameters"] <= 250_000
    assert 0 < b.temperature < 10
    assert b.metadata["val_macro_f1"] >= 0.8


def test_train_then_evaluate_json(trained, manifest, tmp_path, capsys):
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                str(manifest),
                "--model",
                str(trained),
                "--json",
                "--baseline",
                "--out",
                str(tmp_path),
                "--quiet",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["scope"] == "held-out test captures of the model's split"
    assert r["data"]["capture_files"] == len(DEVICES)
    assert r["accuracy"] == r["strategies"]["sequence"]["accuracy"]
    assert r["macro_f1"] == r["strategies"]["sequence"]["macro_f1"] >= 0.8
    for s in ("flow", "sequence", "device"):
        f = r["strategies"][s]
        assert set(f) >= {"accuracy", "macro_f1", "coverage", "cost", "selectivity"}
        assert 0 < f["selectivity"]["packets"] <= 1 and f["cost"]["flops_per_label"] > 0
        assert f["coverage"]["devices"] > 0
    assert r["strategies"]["sequence"]["coverage"]["flows"] == 1.0
    assert r["strategies"]["device"]["coverage"]["flows"] < 1.0  # waits for three votes
    assert set(r["per_class"]) == set(DEVICES)
    assert set(r["baseline"]["strategies"]) == {"flow", "device"}
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report.json").read_text())["macro_f1"] == r["macro_f1"]


def test_evaluate_folds_cross_validates(manifest, tmp_path, capsys):
    """``--folds``: each fold's model labels the captures it never saw, pooled into one
    figure over every capture."""
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                str(manifest),
                "--folds",
                "2",
                "--epochs",
                "20",
                "--json",
                "--out",
                str(tmp_path),
                "--quiet",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["folds"] == 2 and r["capture_files"] == len(DEVICES) * FILES_PER_DEVICE
    assert len(r["per_fold"]) == 2
    assert sum(f["capture_files"] for f in r["per_fold"]) == r["capture_files"]
    assert sum(f["labels"] for f in r["per_fold"]) == r["labels"]
    for name in (
        "flow",
        "sequence",
        "device",
        "sequence + DHCP identity",
        "device + DHCP identity",
        "random forest, flow",
        "random forest, device",
    ):
        s = r["pooled"][name]
        f = s["fold_macro_f1"]
        assert f["min"] <= f["mean"] <= f["max"] and f["sd"] >= 0
        assert [fold[name] for fold in r["per_fold"]] in (
            [f["min"], f["max"]],
            [f["max"], f["min"]],
        )
    assert r["pooled"]["sequence"]["macro_f1"] >= 0.8  # five types that differ
    assert set(r["per_class"]) == set(DEVICES)
    assert json.loads((tmp_path / "cross-validation.json").read_text()) == r
    assert main(["evaluate", str(tmp_path / "absent.csv"), "--folds", "1"]) == 2
    assert "--folds must be at least 2, got 1" in capsys.readouterr().err
    assert main(["evaluate", str(manifest), "--folds", "7", "--quiet"]) == 2
    assert "every label needs at least 7 capture files" in capsys.readouterr().err
    assert main(["evaluate", str(manifest), "--folds", "2", "--leave-out", "Aria"]) == 2
    assert "give one" in capsys.readouterr().err


def test_evaluate_leave_out_from_the_command_line(manifest, tmp_path, capsys):
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                str(manifest),
                "--leave-out",
                "Aria",
                "--epochs",
                "3",
                "--json",
                "--out",
                str(tmp_path),
                "--quiet",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["epochs"] == 3 and set(r["types"]) == {"Aria"}
    assert r["types"]["Aria"]["labels"] > 0 and 0 <= r["mean_untrusted_share"] <= 1
    assert json.loads((tmp_path / "leave-out.json").read_text()) == r
    assert main(["evaluate", str(manifest), "--leave-out", "Aria", "--epochs", "0"]) == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err


def test_train_on_a_dataset_file(trained, manifest, tmp_path):
    """A dataset from ``iotcls extract`` trains like its captures (the same split)."""
    ds_path = tmp_path / "d.npz"
    assert main(["extract", str(manifest), "-o", str(ds_path), "-q"]) == 0
    ds = Dataset.load(ds_path)
    split = ModelBundle.load(trained).metadata["split"]
    assert set(split["train"] + split["val"] + split["test"]) == set(ds.captures.tolist())
    out = tmp_path / "m.pt"
    assert (
        main(["train", str(ds_path), "-o", str(out), "--epochs", "1", "--quiet", "--seed", "3"])
        == 0
    )
    assert ModelBundle.load(out).metadata["split"] == split


def test_train_errors(tmp_path, capsys):
    require(DATA)
    one = tmp_path / "one.csv"
    mac = (DATA / "Aria" / "_iotdevice-mac.txt").read_text().strip()
    one.write_text(f"pcap,mac,label\n{DATA / 'Aria' / 'Setup-A-1-STA.pcap'},{mac},Aria\n")
    assert main(["train", str(one), "-o", str(tmp_path / "m.pt"), "--quiet"]) == 2
    assert "at least two labels" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "absent.npz"), "-o", str(tmp_path / "m.pt")]) == 2
    assert "absent.npz: dataset file not found" in capsys.readouterr().err


def test_refit_trust_keeps_the_weights_and_adds_rule_8(trained, manifest, tmp_path, capsys):
    """``--refit-trust``: the bundle's weights, temperature and split stay; its trust state
    is fitted anew on its own validation split, as training fits it (rule 8 included); data
    that does not hold the bundle's validation captures is refused in one line."""
    import torch

    out = tmp_path / "refit.pt"
    assert main(["train", str(manifest), "--refit-trust", str(trained), "-o", str(out)]) == 0
    assert "weights with a trust state refitted on" in capsys.readouterr().out
    a, b = ModelBundle.load(trained), ModelBundle.load(out)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)
    assert b.temperature == a.temperature and b.metadata["split"] == a.metadata["split"]
    assert "trust_refit_at" in b.metadata and b.metadata["trust"]["labels"] > 0
    assert torch.isfinite(b.trust["feat_threshold"]).any()  # rule 8 fitted
    np.testing.assert_allclose(b.trust["scale"].float(), a.trust["scale"].float(), rtol=1e-4)
    rows = manifest.read_text().splitlines()
    val = set(a.metadata["split"]["val"])
    other = tmp_path / "train-only.csv"  # the same devices, without the validation files
    other.write_text(
        "\n".join(r for r in rows if not any(v.split("/")[-1] in r for v in val)) + "\n"
    )
    assert main(["train", str(other), "--refit-trust", str(trained), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("iotcls train: error: ") and err.endswith(
        "model.pt: cannot refit its trust state: the model's validation captures are not in "
        "the data"
    ), err
