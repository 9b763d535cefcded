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
        LAYOUT,
        ["a", "b", "c"],
        seed=1,
        temperature=1.7,
        metadata={"split": {"test": ["x.pcap"]}, "seed": 0},
        **kw,
    )


class Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch boom-was-run",))


def fitted_trust(b: ModelBundle) -> dict:
    """A real trust state for ``b``, fitted on its own labels of random matrices."""
    from iotcls.predict import Predictor
    from iotcls.trust.layer import fit_state

    x = np.random.default_rng(0).random((300, *LAYOUT.shape)).astype(np.float32)
    state, _ = fit_state(
        b.model, LAYOUT, b.temperature, b.classes, x, Predictor(b).predict(x).index
    )
    return state.to_dict()


@pytest.fixture(scope="module")
def trusted_payload() -> dict:
    b = small_bundle()
    b.trust = fitted_trust(b)
    return b.to_payload()


def test_round_trip(tmp_path, trusted_payload):
    b = small_bundle()
    b.trust = trusted_payload["trust"]
    path = b.save(tmp_path / "m.pt")
    loaded = ModelBundle.load(path)
    assert loaded.classes == ["a", "b", "c"] and loaded.temperature == 1.7
    assert loaded.layout == LAYOUT
    assert loaded.metadata == {"split": {"test": ["x.pcap"]}, "seed": 0}
    assert torch.equal(loaded.trust["refs"], b.trust["refs"])
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


# -- hardening: the whole bundle is validated once, at load -----------------------------------


def resaved(tmp_path, payload: dict, name: str = "edited.pt"):
    """``payload`` with its hash recomputed, written as a bundle file: a file whose hash
    matches proves nothing about its writer."""
    payload["sha256"] = content_hash(payload)
    torch.save(payload, tmp_path / name)
    return tmp_path / name


def edited(payload: dict, *path, value=None, delete: bool = False) -> dict:
    import copy

    out = copy.deepcopy(payload)
    node = out
    for k in path[:-1]:
        node = node[k]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


@pytest.mark.parametrize(
    "path,value,message",
    [
        (
            ("trust",),
            {"version": 1, "garbage": 1},
            r"trust state: malformed \(KeyError: 'groups'\)",
        ),
        (("trust",), "not a mapping", "trust state: expected a mapping"),
        (
            ("trust", "classes"),
            ["c", "b", "a"],
            r"fitted for the classes \[c, b, a\], the model "
            r"has \[a, b, c\]",
        ),
        (
            ("trust", "groups"),
            ["meta", "timing", "sizes", "directions", "history", "payload"],
            "groups .* do not match the layout",
        ),
        (("trust", "history"), "sideways", "history 'sideways' is not one of"),
        (("trust", "k"), 0, r"k 0 is outside \[1, 1000000\]"),
        (("trust", "conf_threshold"), float("nan"), "conf_threshold nan is outside"),
        (("trust", "device_window"), 10**30, "device_window .* is outside"),
        (("trust", "scale"), torch.zeros(18), "scales must be positive"),
        (("trust", "dist_threshold"), torch.full((3,), -1.0), "distance thresholds must be"),
        (("trust", "ref_pred"), torch.zeros(2, dtype=torch.int64), "differ in length"),
        (("trust", "dhcp_identities"), {"x": 5}, "trust state: malformed"),
        (("classes",), ["a", "a", "b"], "class names must be distinct"),
        (("classes",), "abc", "classes must be a list of names"),
        (("metadata",), ["not", "a", "dict"], "metadata is not a mapping"),
        (("metadata", "confidence_threshold"), "high", "confidence_threshold 'high' is not"),
        (("state_dict", "out.bias"), torch.full((3,), float("nan")), "out.bias hold NaN"),
        (
            ("state_dict", "out.bias"),
            torch.zeros(3, dtype=torch.float64),
            r"out.bias: expected "
            r"torch.float32 \(3,\)",
        ),
        (("config", "hidden"), 1 << 40, "weights head.weight: expected"),
        (("layout", "window_s"), 1e300, "window must be positive and at most"),
        (("format_version",), torch.ones(2), "format version"),
    ],
)
def test_a_bad_section_is_one_bundle_error(tmp_path, trusted_payload, path, value, message):
    """Garbage (hash recomputed) in any section: one BundleError naming the file, at load,
    instead of a TrustError traceback in classify or a scorer restart loop in serve."""
    f = resaved(tmp_path, edited(trusted_payload, *path, value=value))
    with pytest.raises(BundleError, match=message) as e:
        ModelBundle.load(f)
    assert str(e.value).startswith(str(f)) and "\n" not in str(e.value)


def test_a_config_asking_for_huge_layers_allocates_nothing(tmp_path, trusted_payload):
    """The CNN is built on the meta device and compared with the weights first: a config of
    10**12-wide layers is refused without trying to allocate them."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    f = resaved(tmp_path, edited(trusted_payload, "config", "row_dim", value=10**6))
    with pytest.raises(BundleError, match="weights .*: expected"):
        ModelBundle.load(f)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


@pytest.mark.parametrize("command", ["classify", "explain"])
def test_commands_exit_2_with_one_line_for_a_bad_trust_section(
    tmp_path, trusted_payload, capsys, command
):
    """The issue's case: classify (and every other command that loads a model) answers a
    garbage or mismatched trust section with one line and exit status 2."""
    from iotcls import pcapgen as g
    from iotcls.cli import main

    udp = g.ipv4("10.0.0.1", "8.8.8.8", 17, g.udp(1, 53, b"q"))
    pcap = g.write_pcap(
        tmp_path / "x.pcap", [(1.0, g.ether("02:00:00:00:00:01", "02:00:00:00:00:02", udp))]
    )
    for bad in (
        {"version": 1, "garbage": 1},
        edited(trusted_payload["trust"], "classes", value=["c", "b", "a"]),
    ):
        f = resaved(tmp_path, edited(trusted_payload, "trust", value=bad))
        which = (
            ["--devices", "02:00:00:00:00:01", "-o", str(tmp_path / "out")]
            if command == "classify"
            else ["--devices", "02:00:00:00:00:01"]
        )
        rc = main([command, str(pcap), "--model", str(f)] + which)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
        assert err[0].startswith(f"iotcls {command}: error: {f}: invalid bundle: trust state:")


def test_serve_refuses_a_bad_bundle_before_starting_scorers(tmp_path, trusted_payload):
    """serve loads the bundle once (bridge.serving.Service) through ModelBundle.load: trust
    classes that differ from the model's stop it there, instead of every scorer failing at
    start and being restarted forever."""
    from iotcls.scorer.service import load_bundle

    bad = edited(trusted_payload["trust"], "classes", value=["c", "b", "a"])
    f = resaved(tmp_path, edited(trusted_payload, "trust", value=bad))
    with pytest.raises(BundleError, match="fitted for the classes"):
        load_bundle(str(f))


_GARBAGE = (
    None,
    -1,
    0,
    2**70,
    1e300,
    float("nan"),
    float("inf"),
    "x",
    "",
    [],
    {},
    [1, "a"],
    {"k": 1},
    torch.zeros(0),
    torch.ones(3),
    torch.full((2, 2), float("nan")),
    torch.zeros(5, dtype=torch.int64),
    True,
    (1, 2),
)


def _leaves(o, pre=()):
    yield pre
    if isinstance(o, dict):
        for k in o:
            yield from _leaves(o[k], pre + (k,))
    elif isinstance(o, list) and len(o) < 40:
        for i, v in enumerate(o):
            yield from _leaves(v, pre + (i,))


def test_fuzz_bundle_sections(trusted_payload):
    """Seeded: 400 payloads with one or two values anywhere replaced by garbage or deleted,
    the hash recomputed. Each either loads and then predicts (with its trust layer), or is a
    one-line BundleError; nothing else escapes."""
    import copy
    import random

    from iotcls.predict import Predictor

    rng = random.Random(7)
    where = [p for p in _leaves(trusted_payload) if p and p[0] != "sha256"]
    x = np.random.default_rng(1).random((8, *LAYOUT.shape)).astype(np.float32)
    worked = refused = 0
    for _ in range(400):
        pl = copy.deepcopy(trusted_payload)
        for _ in range(rng.randint(1, 2)):
            p = rng.choice(where)
            node = pl
            try:
                for k in p[:-1]:
                    node = node[k]
                if rng.random() < 0.15 and isinstance(node, dict):
                    del node[p[-1]]
                else:
                    node[p[-1]] = copy.deepcopy(rng.choice(_GARBAGE))
            except (KeyError, IndexError, TypeError):
                pass  # an earlier edit removed the path
        pl["sha256"] = content_hash(pl)
        try:
            b = ModelBundle.from_payload(pl, "f.pt")
        except BundleError as e:
            assert "\n" not in str(e) and str(e).startswith("f.pt: ")
            refused += 1
            continue
        Predictor(b).predict(x)
        worked += 1
    assert refused > 300 and worked > 5
