"""``iotcls explain PCAP --devices MAC`` on the sample capture (tests/conftest.py), with a tiny model
trained here on that capture's own flows (the project's training code path)."""

import json

import numpy as np
import pytest
import torch

from iotcls.capture import CaptureSpec
from iotcls.cli import main
from iotcls.dataset import capture_matrices
from iotcls.layout import MatrixLayout


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, sample):
    from iotcls.train import TrainConfig, train

    torch.set_num_threads(1)
    layout = MatrixLayout()
    cm = capture_matrices(CaptureSpec(sample.pcap, "sample", dict(sample.devices)), layout)
    labels = cm.labels[cm.order].astype(object)
    # four pseudo-captures per device (by time) so that the split by capture has material
    dev = cm.table.device_mac[cm.order]
    caps = np.empty(len(labels), object)
    for m in np.unique(dev):
        idx = np.flatnonzero(dev == m)
        caps[idx] = [f"{m}/{i * 4 // len(idx)}" for i in range(len(idx))]
    small = dict(byte_dim=4, packet_dim=16, meta_dim=8, row_dim=16, hidden=16)
    cfg = TrainConfig(epochs=3, batch_size=32, val_fraction=0.25, test_fraction=0.25, model=small)
    bundle = train(cm.matrices, labels, caps, layout, cfg, progress=False, log=lambda m: None)
    assert bundle.trust is not None
    return str(bundle.save(tmp_path_factory.mktemp("m") / "tiny.pt"))


def test_text_and_png(model_path, tmp_path, capsys, sample):
    aria = sample.mac_of("Aria")
    png = tmp_path / "aria.png"
    assert (
        main(
            [
                "explain",
                str(sample.pcap),
                "--devices",
                aria.upper(),
                "--model",
                model_path,
                "-o",
                str(png),
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert lines[0].startswith(f"device {aria}: 5 labels by tiny@")
    assert lines[1].split()[:6] == ["t+s", "remote", "proto", "label", "conf", "trust"]
    assert lines[1].split()[6:] == [
        "meta",
        "timing",
        "sizes",
        "direction",
        "payload",
        "history",
        "reason",
    ]
    assert len(lines) == 2 + 5 + 2  # header, five flows, two summary lines
    assert lines[2].split()[1:3] == ["255.255.255.255:67", "udp"]  # the DHCP discover first
    assert lines[-1].startswith("trusted: ")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {png}" in out.err


def test_json_values_are_exact_shapley_values(model_path, capsys, sample):
    from iotcls.bundle import ModelBundle

    assert (
        main(
            [
                "explain",
                str(sample.pcap),
                "--devices",
                sample.mac_of("HueBridge"),
                "--model",
                model_path,
                "--json",
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) > 50 and all(r["label"] for r in rows)
    assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)
    # efficiency: the values add up to log p(label | flow) - log p(label | empty matrix)
    b = ModelBundle.load(model_path)
    for r in rows[:20]:
        total = sum(r["shapley"].values())
        assert total == pytest.approx(np.log(r["confidence"]) - r["base"], abs=2e-3)
    from iotcls.trust.decision import REASONS

    assert {r["reason"] for r in rows} <= set(REASONS)
    assert all((r["reason"] == "-") == r["trusted"] for r in rows)
    assert set(r["label"] for r in rows) <= set(b.classes)


def test_errors_are_one_line(model_path, tmp_path, capsys, sample):
    aria = sample.mac_of("Aria")
    cases = [
        (["--devices", "02:00:00:00:00:99", "--model", model_path], "no flows of device"),
        (["--devices", "not-a-mac", "--model", model_path], "not a MAC address"),
        (["--devices", aria, "--model", str(tmp_path / "none.pt")], "no such model file"),
    ]
    for extra, msg in cases:
        assert main(["explain", str(sample.pcap), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("iotcls explain: error: ") and msg in err[0]
    assert main(["explain", str(tmp_path / "x.pcap"), "--devices", aria]) == 2
    assert "no such capture file" in capsys.readouterr().err
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"not a capture at all")
    assert main(["explain", str(bad), "--devices", aria, "--model", model_path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]


def test_the_old_spelling_still_works_with_a_notice(model_path, capsys, sample):
    """--device MAC (explain) is now --devices, as for every other command; the old spelling
    is accepted and says so."""
    assert (
        main(
            [
                "explain",
                str(sample.pcap),
                "--device",
                sample.mac_of("Aria"),
                "--model",
                model_path,
                "--json",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "iotcls: --device is now --devices (the old spelling will go)" in err
