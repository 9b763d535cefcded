"""Model bundles: round trip, content hash, refusal of code, corrupt and mismatched files."""

import pickle

import numpy as np
import pytest
import torch

from iotcls.bundle import BundleError, ModelBundle, content_hash, default_model_path
from iotcls.layout import MatrixLayout
from tiny_model import tiny_bundle

LAYOUT = MatrixLayout(history=2, packets=4, payload_bytes=4)


def small_bundle(**kw) -> ModelBundle:
    return tiny_bundle(
        LAYOUT, ["a", "b", "c"], seed=1, temperature=1.7,
        metadata={"split": {"test": ["x.pcap"]}, "seed": 0}, **kw,
    )  # fmt: skip


class Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch boom-was-run",))


def test_round_trip(tmp_path):
    b = small_bundle(trust={"centroids": torch.ones(3, 2), "groups": ["meta", "payload"]})
    path = b.save(tmp_path / "m.pt")
    loaded = ModelBundle.load(path)
    assert loaded.classes == ["a", "b", "c"] and loaded.temperature == 1.7
    assert loaded.layout == LAYOUT
    assert loaded.metadata == {"split": {"test": ["x.pcap"]}, "seed": 0}
    assert torch.equal(loaded.trust["centroids"], torch.ones(3, 2))
    assert loaded.sha256 == b.sha256 and len(loaded.sha256) == 64
    assert loaded.name == f"m@{b.sha256[:12]}"
    x = torch.rand(4, *LAYOUT.shape)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), b.model(x))
    # plain torch.load with weights_only=True reads it: no code involved
    raw = torch.load(path, weights_only=True)
    assert raw["sha256"] == content_hash(raw)


def test_hash_covers_weights_and_metadata(tmp_path):
    b = small_bundle()
    payload = b.to_payload()
    h = payload["sha256"]
    payload["metadata"]["seed"] = 1
    assert content_hash(payload) != h
    payload = b.to_payload()
    payload["state_dict"]["flow.meta_in.weight"][0, 0] += 1e-3
    assert content_hash(payload) != h
    # an edited file is refused
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(BundleError, match="content hash mismatch"):
        ModelBundle.load(tmp_path / "edited.pt")


def test_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = small_bundle().to_payload()
    payload["metadata"] = Boom()
    with open(tmp_path / "evil.pt", "wb") as f:
        torch.save(payload, f)
    refused = r"refused: the file holds code \(it would call posix.system\)"
    with pytest.raises(BundleError, match=refused):
        ModelBundle.load(tmp_path / "evil.pt")
    assert not (tmp_path / "boom-was-run").exists()
    # a raw pickle (not torch's zip format) with code is refused as well
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(BundleError, match="not a torch archive"):
        ModelBundle.load(tmp_path / "evil.pkl")
    assert not (tmp_path / "boom-was-run").exists()


def test_corrupt_and_missing_files(tmp_path):
    path = small_bundle().save(tmp_path / "m.pt")
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="not a readable model file"):
        ModelBundle.load(tmp_path / "trunc.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(BundleError, match="junk.pt"):
        ModelBundle.load(tmp_path / "junk.pt")
    with pytest.raises(BundleError, match="no such model file"):
        ModelBundle.load(tmp_path / "absent.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(BundleError, match="not an iotcls model bundle"):
        ModelBundle.load(tmp_path / "other.pt")


def test_inconsistent_payload_is_refused(tmp_path):
    payload = small_bundle().to_payload()
    payload["classes"] = ["a", "b"]
    payload["sha256"] = content_hash(payload)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(BundleError, match="2 class names for 3 outputs"):
        ModelBundle.load(tmp_path / "bad.pt")


def test_layout_mismatch_is_one_clear_error():
    b = small_bundle()
    b.check_layout(LAYOUT)
    with pytest.raises(BundleError, match="layout mismatch.*payload_bytes"):
        b.check_layout(MatrixLayout(history=2, packets=4, payload_bytes=8), "dataset d.npz")


def test_default_model_ships_and_loads():
    b = ModelBundle.load()
    assert b.source == str(default_model_path())
    assert default_model_path().stat().st_size < 5_000_000
    assert len(b.classes) == 27
    assert np.isfinite(b.temperature)
