"""The model bundle: everything needed to label matrices, in one file that cannot run code.

A bundle is a plain dict of tensors, strings, numbers, lists and dicts written with
:func:`torch.save` and read back only with ``torch.load(..., weights_only=True)``, whose
unpickler refuses every global outside torch's tensor types: a crafted file cannot execute
anything when loaded. The dict holds

* ``format`` / ``format_version``: what this file is;
* ``state_dict``: the CNN's weights; ``config``: its :class:`~iotcls.model.ModelConfig`;
* ``layout``: the :class:`~iotcls.layout.MatrixLayout` it was trained on (data of any other
  layout is refused);
* ``classes``: the label of each output; ``temperature``: the calibration (logits / T);
* ``metadata``: training facts (JSON-safe: data, split capture ids, figures, date);
* ``trust``: an optional dict of tensors and plain values for the trust layer (docs/trust.md);
* ``sha256``: a hash over all of the above, so that a damaged or edited file is noticed.

A matching hash says the file is what its writer wrote, not that the writer was this program:
:meth:`ModelBundle.from_payload` validates the whole bundle once, at load (weights against the
configuration and the classes, the layout against what the sensor can build, the trust state's
structure, ranges and classes against the model's), so every caller (classify, serve, the
scorers) gets one :class:`BundleError` with a one-line message, or a bundle that works.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from .layout import LayoutError, MatrixLayout
from .model import IoTCNN, ModelConfig

FORMAT = "iotcls-model"
FORMAT_VERSION = 1
DEFAULT_MODEL = "default-model.pt"


class BundleError(ValueError):
    """A model file that cannot be used; the message names the file and the reason, on one
    line whatever the file held (a value's repr may span lines: it is folded and cut)."""

    def __init__(self, message: str):
        line = " ".join(str(message).split())
        super().__init__(line if len(line) <= 500 else line[:497] + "...")


def default_model_path() -> Path:
    """The model shipped inside the package (``iotcls/data/default-model.pt``)."""
    return Path(str(resources.files("iotcls") / "data" / DEFAULT_MODEL))


def _feed(h: hashlib._Hash, obj) -> None:
    """Hash a nested value canonically: dict keys sorted, tensors by dtype, shape and bytes."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=str):
            _feed(h, str(k))
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(("V" + json.dumps(obj, sort_keys=True)).encode())


def content_hash(payload: dict) -> str:
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "sha256"})
    return h.hexdigest()


@dataclass
class ModelBundle:
    model: IoTCNN
    layout: MatrixLayout
    classes: list[str]
    temperature: float = 1.0
    metadata: dict = field(default_factory=dict)
    trust: dict | None = None
    sha256: str = ""
    source: str = ""  # where it was loaded from, for messages

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def name(self) -> str:
        """Short identity for logs: the file's stem and the start of its content hash."""
        stem = Path(self.source).stem if self.source else "model"
        return f"{stem}@{self.sha256[:12]}" if self.sha256 else stem

    def check_layout(self, layout: MatrixLayout, what: str = "data") -> None:
        """Refuse data built with another matrix layout (one line naming the differences)."""
        try:
            self.layout.check_compatible(layout, what)
        except LayoutError as e:
            raise BundleError(f"{self.source or 'model'}: {e}") from None

    def to_payload(self) -> dict:
        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": self.model.cfg.to_dict(),
            "layout": self.layout.to_dict(),
            "classes": list(self.classes),
            "temperature": float(self.temperature),
            "metadata": json.loads(json.dumps(self.metadata)),  # JSON-safe, plain types only
            "trust": self.trust,
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
        }
        payload["sha256"] = content_hash(payload)
        return payload

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = self.to_payload()
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)
        self.sha256, self.source = payload["sha256"], str(path)
        return path

    @classmethod
    def load(cls, path: str | Path | None = None) -> ModelBundle:
        """Load and verify a bundle (the shipped default model when ``path`` is None)."""
        path = Path(path) if path is not None else default_model_path()
        if not path.is_file():
            raise BundleError(f"{path}: no such model file")
        data = path.read_bytes()
        if not zipfile.is_zipfile(io.BytesIO(data)):  # torch.save writes a zip archive
            raise BundleError(f"{path}: not a readable model file (not a torch archive)")
        try:
            with warnings.catch_warnings():  # a foreign pickle protocol: refused below anyway
                warnings.simplefilter("ignore", UserWarning)
                payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL (\S+)", str(e))
            what = f"it would call {found.group(1)}" if found else "objects other than weights"
            raise BundleError(
                f"{path}: refused: the file holds code ({what}); a model file holds weights only"
            ) from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
            raise BundleError(f"{path}: not a readable model file ({type(e).__name__})") from None
        return cls.from_payload(payload, str(path))

    @classmethod
    def from_payload(cls, payload, source: str = "model") -> ModelBundle:
        if not isinstance(payload, dict) or not _is(payload.get("format"), str, FORMAT):
            raise BundleError(f"{source}: not an iotcls model bundle")
        if not _is(payload.get("format_version"), int, FORMAT_VERSION):
            raise BundleError(
                f"{source}: bundle format version {payload.get('format_version')!r} is not "
                f"supported (this is {FORMAT_VERSION})"
            )
        missing = {
            "config",
            "layout",
            "classes",
            "temperature",
            "metadata",
            "state_dict",
            "sha256",
        } - set(payload)
        if missing:
            raise BundleError(f"{source}: bundle lacks {sorted(missing)}")
        if not isinstance(payload["sha256"], str):
            raise BundleError(f"{source}: invalid bundle: sha256 is not a string")
        try:
            intact = payload["sha256"] == content_hash(payload)
        except (TypeError, ValueError, RecursionError) as e:
            raise BundleError(
                f"{source}: invalid bundle: its content cannot be hashed ({type(e).__name__})"
            ) from None
        if not intact:
            raise BundleError(f"{source}: content hash mismatch: the file is damaged or was edited")
        try:
            layout = _layout(payload["layout"])
            cfg = ModelConfig.from_dict(payload["config"])
            classes = _classes(payload["classes"], cfg.n_classes)
            if cfg.width != layout.width or cfg.history != layout.history:
                raise ValueError("model config does not match the bundle's layout")
            temperature = float(payload["temperature"])
            if not (math.isfinite(temperature) and temperature > 0):
                raise ValueError(f"temperature {temperature!r} is not a positive number")
            metadata = _metadata(payload["metadata"])
            model = _model(cfg, payload["state_dict"])
            trust = _trust(payload.get("trust"), classes, layout)
        except (
            LayoutError,
            ValueError,
            TypeError,
            RuntimeError,
            KeyError,
            AttributeError,
            OverflowError,
            IndexError,
        ) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"{source}: invalid bundle: {msg[:300]}") from None
        model.eval()
        return cls(
            model=model,
            layout=layout,
            classes=classes,
            temperature=temperature,
            metadata=metadata,
            trust=trust,
            sha256=payload["sha256"],
            source=source,
        )


# --------------------------------------------------------------------------------------------
# validation at load: each raises ValueError (or TypeError) with what is wrong


def _is(value, kind: type, expected) -> bool:
    """``value == expected`` for a value of ``kind`` only: a tensor or a list in a header
    field must be "not this", not an ambiguous comparison."""
    return isinstance(value, kind) and not isinstance(value, bool) and value == expected


def _layout(d) -> MatrixLayout:
    """The layout, which the sensor must be able to build records for (its window)."""
    from .flows import check_window

    if not isinstance(d, dict):
        raise ValueError("layout is not a mapping")
    layout = MatrixLayout.from_dict(d)
    check_window(layout.window_s)
    return layout


def _classes(names, n_outputs: int) -> list[str]:
    if not isinstance(names, (list, tuple)) or not all(isinstance(c, str) for c in names):
        raise ValueError("classes must be a list of names")
    if len(names) != n_outputs:
        raise ValueError(f"{len(names)} class names for {n_outputs} outputs")
    if len(set(names)) != len(names) or "" in names:
        raise ValueError("class names must be distinct and not empty")
    return list(names)


def _metadata(d) -> dict:
    """The metadata, with the one entry that steers labelling (the confidence threshold)
    checked: every other entry only describes the training."""
    if not isinstance(d, dict):
        raise ValueError("metadata is not a mapping")
    thr = d.get("confidence_threshold")
    if thr is not None and (
        isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 <= thr <= 1
    ):
        raise ValueError(f"metadata: confidence_threshold {thr!r} is not a number in [0, 1]")
    return dict(d)


def _model(cfg: ModelConfig, state) -> IoTCNN:
    """The CNN with the file's weights. Built on the meta device first and compared with the
    weights' names, shapes and dtypes, so that a configuration asking for huge layers costs
    nothing; weights that hold NaN or infinity would label everything at random."""
    if not isinstance(state, dict):
        raise ValueError("state_dict is not a mapping")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zero-sized layers: refused below
        model = IoTCNN(cfg)
    want = model.state_dict()
    if set(state) != set(want):
        odd = sorted(set(state) ^ set(want), key=str)[:3]
        raise ValueError(f"weights do not match the model config (e.g. {', '.join(map(str, odd))})")
    for k, w in want.items():
        v = state[k]
        if not isinstance(v, torch.Tensor) or v.shape != w.shape or v.dtype != w.dtype:
            raise ValueError(f"weights {k}: expected {w.dtype} {tuple(w.shape)}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"weights {k} hold NaN or infinity")
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    return model


def _trust(d, classes: list[str], layout: MatrixLayout) -> dict | None:
    """The trust section, parsed once to prove it usable with this model: its structure and
    ranges (:meth:`TrustState.from_dict`), its classes equal to the model's and its groups
    to the layout's Shapley players. Kept as the dict it is, which the callers parse."""
    from .trust.decision import TrustState
    from .trust.shapley import feature_groups

    if d is None:
        return None
    state = TrustState.from_dict(d)  # TrustError is a ValueError
    state.check_for(classes, feature_groups(layout, state.history)[0])
    return d
