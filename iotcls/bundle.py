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
* ``trust``: an optional dict of tensors and plain values for the trust layer (issue 4);
* ``sha256``: a hash over all of the above, so that a damaged or edited file is noticed.
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
    """A model file that cannot be used; the message names the file and the reason."""


def default_model_path() -> Path:
    """The model shipped inside the package (``iotcls/data/default-model.pt``)."""
    return Path(str(resources.files("iotcls") / "data" / DEFAULT_MODEL))


def _feed(h: "hashlib._Hash", obj) -> None:
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
    def load(cls, path: str | Path | None = None) -> "ModelBundle":
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
            raise BundleError(f"{path}: refused: the file holds code ({what}); a model file "
                              "holds weights only") from None  # fmt: skip
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
            raise BundleError(f"{path}: not a readable model file ({type(e).__name__})") from None
        return cls.from_payload(payload, str(path))

    @classmethod
    def from_payload(cls, payload, source: str = "model") -> "ModelBundle":
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise BundleError(f"{source}: not an iotcls model bundle")
        if payload.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{source}: bundle format version {payload.get('format_version')!r} is not "
                f"supported (this is {FORMAT_VERSION})"
            )
        missing = {"config", "layout", "classes", "temperature", "metadata", "state_dict",
                   "sha256"} - set(payload)  # fmt: skip
        if missing:
            raise BundleError(f"{source}: bundle lacks {sorted(missing)}")
        if payload["sha256"] != content_hash(payload):
            raise BundleError(f"{source}: content hash mismatch: the file is damaged or was edited")
        try:
            layout = MatrixLayout.from_dict(payload["layout"])
            cfg = ModelConfig.from_dict(payload["config"])
            classes = [str(c) for c in payload["classes"]]
            if len(classes) != cfg.n_classes:
                raise ValueError(f"{len(classes)} class names for {cfg.n_classes} outputs")
            if cfg.width != layout.width or cfg.history != layout.history:
                raise ValueError("model config does not match the bundle's layout")
            temperature = float(payload["temperature"])
            if not (math.isfinite(temperature) and temperature > 0):
                raise ValueError(f"temperature {temperature!r} is not a positive number")
            model = IoTCNN(cfg)
            model.load_state_dict(payload["state_dict"], strict=True)
        except (LayoutError, ValueError, TypeError, RuntimeError, KeyError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"{source}: invalid bundle: {msg}") from None
        model.eval()
        return cls(
            model=model,
            layout=layout,
            classes=classes,
            temperature=temperature,
            metadata=dict(payload["metadata"]),
            trust=payload.get("trust"),
            sha256=payload["sha256"],
            source=source,
        )
