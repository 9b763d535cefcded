"""Fine-tuning a model bundle on a site's data: ``iotcls train STORE --labels devices.csv
--from default-model -o site.pt``.

The network starts from the bundle's weights, its classifier head grown by one output per new
label (each new row started at the mean feature of that label's records, scaled as the old
rows are: "weight imprinting"), and learns for a few epochs at a low rate from

* the labelled records: those of devices the operator labelled in the inventory
  (:mod:`iotcls.device_inventory`), and any labelled capture sets mixed in;
* every record, labelled or not, through **distillation**: on records not labelled with a new
  class, the fine-tuned model's probabilities are pulled towards the bundle's own (computed
  on the same augmented matrices), with nothing on the new classes. That keeps the known types
  as the bundle knew them on the traffic this site actually has, without the original
  captures, and teaches the new classes what they are not.

Then calibration (on validation sessions) and the trust state are fitted again (the classes
changed, so every explanation profile did). Trust references are the validation records and
the records of unlabelled devices whose label the service trusted, counted with that label
(the bundle trusted it; the new model is judged on agreeing with it; it never learnt those
labels, only the bundle's probabilities), and the labelled training records for classes that
lack references otherwise. A known class the data never shows has no references and its labels come out
untrusted (``unverified_class``): mix the original capture set in to keep it trusted. The DHCP
identity map (rule 6) keeps the bundle's identities and adds those of the labelled devices.

Sessions (:func:`iotcls.store.sessions`) are split as capture files are, but a label with
fewer than four sessions keeps them all for training: three labelled sessions are the case
this is for. The bundle's metadata names what it was fine-tuned from and on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .bundle import ModelBundle
from .dataset import Dataset
from .model import IoTCNN, ModelConfig, count_flops, count_parameters
from .splits import Split, macro_f1
from .train import ambiguous_identities, cut_history, cut_packets, fit_temperature
from .trust.dhcp_identity import fit_identities
from .trust.dns_names import fit_names
from .trust.layer import fit_state


@dataclass
class FinetuneConfig:
    seed: int = 0
    epochs: int = 6
    lr: float = 5e-4
    weight_decay: float = 1e-4
    batch_size: int = 256
    distill: float = 1.0  # weight of the distillation loss
    val_fraction: float = 0.15  # of each label's sessions, where it has at least four
    history_dropout: float = 0.3
    early_share: float = 0.3
    flow_loss: float = 0.5
    class_weight_power: float = 0.5
    max_rows: int = 60_000  # training rows per epoch at most (a seeded sample): bounds the time
    threads: int = 0
    trust: bool = True


def grow(base: ModelBundle, classes: list[str], x_new: dict[int, np.ndarray]) -> IoTCNN:
    """The bundle's network with ``len(classes)`` outputs (the bundle's first, in order);
    new output ``c`` starts at the mean penultimate feature of ``x_new[c]``, scaled to the
    old rows' mean norm, with the old rows' mean bias."""
    old = base.model
    n_old = len(base.classes)
    cfg = ModelConfig.from_dict({**old.cfg.to_dict(), "n_classes": len(classes)})
    model = IoTCNN(cfg)
    state = {k: v.clone() for k, v in old.state_dict().items()}
    w, b = model.out.weight.detach().clone(), model.out.bias.detach().clone()
    w[:n_old], b[:n_old] = state["out.weight"], state["out.bias"]
    norm = state["out.weight"].norm(dim=1).mean()
    for c, x in x_new.items():
        feats = penultimate(old, x)
        if len(feats):
            m = feats.mean(0)
            w[c] = m / m.norm().clamp_min(1e-6) * norm
        b[c] = state["out.bias"].mean()
    state["out.weight"], state["out.bias"] = w, b
    model.load_state_dict(state)
    return model


def penultimate(model: IoTCNN, x: np.ndarray, batch: int = 2048) -> torch.Tensor:
    """What the output layer reads, per matrix."""
    got: list[torch.Tensor] = []
    hook = model.out.register_forward_hook(lambda m, inp, out: got.append(inp[0].detach()))
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, len(x), batch):
                model(torch.from_numpy(np.ascontiguousarray(x[s : s + batch])))
    finally:
        hook.remove()
    return torch.cat(got) if got else torch.zeros(0, model.cfg.hidden)


def logits_of(model: IoTCNN, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    model.eval()
    out = [np.zeros((0, model.cfg.n_classes), np.float32)]
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            out.append(model(torch.from_numpy(np.ascontiguousarray(x[s : s + batch]))).numpy())
    return np.concatenate(out)


def session_split(captures: np.ndarray, labels: np.ndarray, seed: int, val: float) -> Split:
    """Per label ("" too: unlabelled sessions), its sessions shuffled and dealt into train
    and validation; labels with fewer than four sessions keep them all for training. No
    test part: evaluate the result on data it did not see."""
    by: dict[str, set[str]] = {}
    for c, lab in zip(captures.tolist(), labels.tolist()):
        by.setdefault(str(lab), set()).add(str(c))
    rng = np.random.default_rng(seed)
    tr: list[str] = []
    va: list[str] = []
    taken: set[str] = set()
    for lab in sorted(by, key=lambda k: (k == "", k)):  # labelled sessions first
        files = sorted(by[lab] - taken)
        taken |= set(files)
        rng.shuffle(files)
        n_val = max(1, round(val * len(files))) if len(files) >= 4 else 0
        va += files[:n_val]
        tr += files[n_val:]
    return Split(sorted(tr), sorted(va), [])


class _Trainer:
    """The fine-tuning loop: labelled cross-entropy plus distillation from the bundle."""

    def __init__(
        self, base: ModelBundle, model: IoTCNN, y: np.ndarray, n_new_from: int, cfg: FinetuneConfig
    ):
        self.base, self.model, self.cfg = base, model, cfg
        self.n_old = n_new_from
        self.gen = torch.Generator().manual_seed(cfg.seed)
        counts = np.bincount(y[y >= 0], minlength=model.cfg.n_classes).astype(np.float64)
        w = np.where(counts > 0, np.maximum(counts, 1) ** -cfg.class_weight_power, 0.0)
        lab = y[y >= 0]
        self.weight = torch.tensor(w / (w[lab].mean() if len(lab) else 1.0), dtype=torch.float32)

    def step_loss(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """One batch's loss; ``yb`` -1 for unlabelled rows."""
        cfg, model = self.cfg, self.model
        xb = cut_packets(
            cut_history(xb, cfg.history_dropout, self.gen),
            cfg.early_share,
            self.base.layout,
            self.gen,
        )
        logits = model(xb)
        loss = logits.new_zeros(())
        lab = yb >= 0
        if bool(lab.any()):
            loss = loss + F.cross_entropy(logits[lab], yb[lab], weight=self.weight)
            if cfg.flow_loss > 0:
                flow = model(xb[lab][:, :1])
                loss = loss + cfg.flow_loss * F.cross_entropy(flow, yb[lab], weight=self.weight)
        keep = ~(yb >= self.n_old)  # the bundle knows nothing of the new classes' records
        if cfg.distill > 0 and bool(keep.any()):
            with torch.no_grad():
                teacher = F.softmax(self.base.model(xb[keep]) / self.base.temperature, dim=1)
            logp = F.log_softmax(logits[keep], dim=1)[:, : self.n_old]
            loss = loss + cfg.distill * -(teacher * logp).sum(1).mean()
        return loss

    def fit(self, x: np.ndarray, y: np.ndarray, log: Callable[[str], None]) -> list[dict]:
        cfg, model = self.cfg, self.model
        self.base.model.eval()
        rng = np.random.default_rng(cfg.seed)
        steps = max(1, math.ceil(min(len(x), cfg.max_rows) / cfg.batch_size))
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, pct_start=0.1, total_steps=cfg.epochs * steps
        )
        history = []
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            idx = rng.permutation(len(x))[: cfg.max_rows]
            total = 0.0
            for s in range(steps):
                b = np.sort(idx[s * cfg.batch_size : (s + 1) * cfg.batch_size])
                if not len(b):
                    continue
                loss = self.step_loss(
                    torch.from_numpy(np.ascontiguousarray(x[b])), torch.from_numpy(y[b])
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(b)
            history.append({"epoch": epoch, "train_loss": round(total / max(len(idx), 1), 5)})
            log(f"epoch {epoch:2d}: train loss {total / max(len(idx), 1):.4f}")
        model.eval()
        return history


def finetune(
    base: ModelBundle,
    ds: Dataset,
    served: np.ndarray,
    cfg: FinetuneConfig | None = None,
    metadata: dict | None = None,
    log: Callable[[str], None] = print,
) -> ModelBundle:
    """A bundle fine-tuned from *base* on *ds* (labels "" for unlabelled rows, which are
    distilled); ``served``: per row, the label the service gave it when trusted, else ""
    (the pseudo-labels of the trust refit)."""
    t0 = time.time()
    cfg = cfg or FinetuneConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    base.check_layout(ds.layout, "the fine-tuning data")
    labels = np.asarray(ds.labels, object)
    new = sorted(set(labels.tolist()) - set(base.classes) - {""})
    classes = [*base.classes, *new]
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index.get(lab, -1) for lab in labels.tolist()], np.int64)
    split = session_split(ds.captures.astype(object), labels, cfg.seed, cfg.val_fraction)
    part = split.part_of(ds.captures.astype(object))
    tr, va = np.flatnonzero(part == 0), np.flatnonzero(part == 1)
    log(
        f"fine-tuning {base.name} ({len(base.classes)} classes) into {len(classes)} classes "
        f"(new: {', '.join(new) or 'none'}): {len(tr)} / {len(va)} training / validation "
        f"records, {int((y[tr] >= 0).sum())} / {int((y[va] >= 0).sum())} labelled, "
        f"{len(split.train)} / {len(split.val)} sessions"
    )
    x_new = {index[c]: ds.matrices[tr[y[tr] == index[c]]] for c in new}
    model = grow(base, classes, x_new)
    history = _Trainer(base, model, y, len(base.classes), cfg).fit(ds.matrices[tr], y[tr], log)
    # calibration and trust: the labelled validation rows, then those the service trusted
    pseudo = np.array([index.get(str(s), -1) for s in served], np.int64)
    yv = np.where(y >= 0, y, pseudo)
    vj = va[yv[va] >= 0]
    lv = logits_of(model, ds.matrices[vj])
    temperature = fit_temperature(lv, yv[vj]) if len(vj) else base.temperature
    val_f1 = macro_f1(yv[vj], lv.argmax(1), len(classes)) if len(vj) else float("nan")
    meta = dict(metadata or {})
    meta.update(
        {
            "finetuned_from": {"name": base.name, "sha256": base.sha256, "source": base.source},
            "classes_added": new,
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "finetune_config": asdict(cfg),
            "split": _joined_split(base, split),
            "matrices": {
                "train": int(len(tr)),
                "val": int(len(va)),
                "test": 0,
                "labelled": int((y >= 0).sum()),
                "pseudo_labelled_val": int(len(vj)),
            },
            "history": history,
            "val_macro_f1": round(val_f1, 5) if val_f1 == val_f1 else None,
            "parameters": count_parameters(model),
            "flops": {"sequence": count_flops(model), "flow": count_flops(model, rows=1)},
        }
    )
    log(f"validation macro-F1 {val_f1:.4f} on {len(vj)} records; temperature {temperature:.3f}")
    bundle = ModelBundle(
        model=model, layout=base.layout, classes=classes, temperature=temperature, metadata=meta
    )
    if cfg.trust and base.trust is not None:
        _refit_trust(bundle, base, ds, y, yv, tr, vj, meta, log)
        _extend_identities(bundle, base, ds, y)
    meta["train_seconds"] = round(time.time() - t0, 1)
    return bundle


def _extend_identities(bundle: ModelBundle, base: ModelBundle, ds: Dataset, y: np.ndarray) -> None:
    """Rule 6's map: the bundle's identities, and those the labelled records show (only
    labels someone gave: an identity learnt from the model's own trusted labels would let
    an unknown device that fooled it once pass rule 6 for ever); then the shared identities
    the bundle refused, and those the grown model mixes up on the labelled records. Rule 9's
    names grow the same way, from the labelled records only."""
    assert bundle.trust is not None
    rows = np.flatnonzero(y >= 0)
    names = np.array(bundle.classes, object)[y[rows]]
    ids = {k: list(v) for k, v in base.trust.get("dhcp_identities", {}).items()}
    for ident, cls in fit_identities(
        bundle.layout.dhcp_identities(ds.matrices[rows, 0]), names
    ).items():
        ids[ident] = sorted(set(ids.get(ident, [])) | set(cls))
    bundle.trust["dhcp_identities"] = ids
    names_of = {k: list(v) for k, v in base.trust.get("dns_names", {}).items()}
    if names_of:  # rule 9's map (a base fitted before it has none: the rule stays off)
        used = fit_names(bundle.layout.dns_names(ds.matrices[rows, 0]), names)
        for cls, more in used.items():
            names_of[cls] = sorted(set(names_of.get(cls, [])) | set(more))
        bundle.trust["dns_names"] = names_of
    amb = set(base.trust.get("dhcp_ambiguous", []))
    if len(rows):
        amb |= set(
            ambiguous_identities(
                bundle,
                ds.matrices[rows],
                names,
                ds.captures[rows],
                ds.devices[rows],
                ds.timestamps[rows],
            )
        )
    amb = sorted(amb)
    bundle.trust["dhcp_ambiguous"] = amb
    if base.trust.get("dhcp_needed"):  # rule 7's classes, as the bundle fitted them
        bundle.trust["dhcp_needed"] = list(base.trust["dhcp_needed"])
    bundle.metadata["trust"].update(dhcp_identities=len(ids), dhcp_ambiguous=amb)


def _joined_split(base: ModelBundle, split: Split) -> dict:
    """The bundle's split with the new sessions added: evaluate then keeps scoring the
    bundle's held-out captures only, when given its training set again."""
    old = base.metadata.get("split") or {}
    return {
        k: sorted(set(old.get(k, [])) | set(getattr(split, k))) for k in ("train", "val", "test")
    }


def _refit_trust(
    bundle: ModelBundle,
    base: ModelBundle,
    ds: Dataset,
    y: np.ndarray,
    yv: np.ndarray,
    tr: np.ndarray,
    vj: np.ndarray,
    meta: dict,
    log: Callable[[str], None],
) -> None:
    """The trust state for the grown model (see the module docstring). References: the
    validation rows, and the training rows the service trusted (the model never learnt
    their labels, only the bundle's probabilities on them); the training rows someone
    labelled, which it did learn, only for classes with too few references otherwise."""
    pseudo = tr[(y[tr] < 0) & (yv[tr] >= 0)]
    refs = np.concatenate([vj, pseudo])
    tj = tr[y[tr] >= 0]
    state, facts = fit_state(
        bundle.model,
        bundle.layout,
        bundle.temperature,
        bundle.classes,
        ds.matrices[refs],
        yv[refs],
        fitted_on="fine-tuning sessions",
        fallback=(ds.matrices[tj], yv[tj]),
    )
    state.dhcp_identities = dict(base.trust.get("dhcp_identities", {}))
    state.dns_names = dict(base.trust.get("dns_names", {}))
    bundle.trust = state.to_dict()
    meta["trust"] = facts
    missing = facts["classes_without_profile"]
    log(
        f"trust state: {facts['references']} references from {facts['labels']} validation "
        f"labels; classes without references (their labels stay untrusted): "
        f"{', '.join(missing) or 'none'}"
    )
