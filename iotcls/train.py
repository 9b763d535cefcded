"""Training: a split by capture file, the training loop, early stopping and calibration.

Flows of one capture are strongly correlated (same device session, same servers, same
timing), so a split by flow would leak; the split is by capture file, stratified by label
and seeded, and it is stored in the bundle so that ``evaluate`` scores held-out files only.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .bundle import ModelBundle
from .layout import REMOTE_IP, MatrixLayout
from .model import IoTCNN, ModelConfig, count_flops, count_parameters
from .splits import SPLITS, Split, device_sessions, macro_f1, split_captures  # noqa: F401


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    epochs: int = 30
    patience: int = 8  # epochs without a better validation macro-F1
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    history_dropout: float = 0.3  # share of training matrices whose history is cut short
    early_share: float = 0.3  # share whose current flow is cut to its first packets (early)
    dhcp_dropout: float = 0.5  # share whose history loses its DHCP rows (device seen late)
    remote_shift: float = 0.5  # share whose public remote addresses are moved (another network)
    flow_loss: float = 0.5  # weight of a second loss on the current flow alone (row 0)
    class_weight_power: float = 0.5  # loss weight of a class ~ count ** -power
    max_per_capture: int = 0  # cap on matrices per capture file (0: all)
    threads: int = 0  # torch threads (0: torch's choice)
    model: dict = field(default_factory=dict)  # ModelConfig overrides
    trust: bool = True  # fit the trust state (iotcls.trust) on the validation split


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature minimising the validation negative log-likelihood (Guo et al. 2017)."""
    if len(y) == 0:
        return 1.0
    z = torch.from_numpy(logits).double()
    t = torch.from_numpy(y).long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), t)
        loss.backward()
        return loss

    opt.step(closure)
    temp = log_t.exp().item()
    return min(max(temp, 0.01), 100.0) if math.isfinite(temp) else 1.0


def cut_history(x: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    """Zero the history beyond a random length for ``share`` of the matrices.

    A device's first flows come with little or no history, and the per-flow strategy reads
    the current flow alone; training on such matrices too keeps both accurate.
    """
    if share <= 0 or x.shape[1] < 2:
        return x
    b, r = x.shape[:2]
    cut = torch.rand(b, generator=gen) < share
    keep = torch.randint(1, r, (b,), generator=gen)  # rows kept: 1 .. r-1
    keep = torch.where(cut, keep, torch.full_like(keep, r))
    mask = torch.arange(r)[None, :] < keep[:, None]
    return x * mask[:, :, None].to(x.dtype)


def cut_packets(
    x: torch.Tensor, share: float, layout: MatrixLayout, gen: torch.Generator
) -> torch.Tensor:
    """For ``share`` of the matrices, the current flow (row 0) as it stood after a random
    number of its recorded packets (1 .. all): the later packet slots empty, the totals those
    of the packets kept.

    Live sensors publish such early records (:func:`iotcls.schema.early_record`) a moment
    into a window, so that a device is labelled within seconds; trained on them too, the
    model labels them as well as their evidence allows. Layouts with a payload stream keep
    their matrices as they are (the stream has no per-packet slots to cut).
    """
    if share <= 0 or layout.payload_mode == "stream":
        return x
    g, p = layout.group_slices(), layout.packets
    row = x[:, 0]
    present = row[:, g["directions"]] != 0
    n = present.sum(dim=1)
    cut = (torch.rand(len(x), generator=gen) < share) & (n > 0)
    if not bool(cut.any()):
        return x
    k = (torch.rand(len(x), generator=gen) * n).floor().long() + 1  # 1 .. n
    k = torch.where(cut, k, torch.full_like(k, p))
    keep = (torch.arange(p)[None, :] < k[:, None]).to(x.dtype)
    x = x.clone()
    row = x[:, 0]
    for name in ("timing", "sizes", "directions"):
        row[:, g[name]] *= keep
    if layout.payload_mode == "packet" and layout.payload_bytes:
        b = layout.payload_bytes
        pay = row[:, g["payload"]].reshape(len(x), p, b) * keep[:, :, None]
        row[:, g["payload"]] = pay.reshape(len(x), p * b)
    nbytes = (row[:, g["sizes"]] * 1500.0).sum(dim=1)
    row[:, 11] = torch.where(cut, torch.log1p(nbytes) / math.log1p(1e7), row[:, 11])
    row[:, 12] = torch.where(cut, torch.log1p(k.to(x.dtype)) / math.log1p(1e5), row[:, 12])
    return x


def drop_dhcp_rows(
    x: torch.Tensor, dhcp: torch.Tensor, share: float, gen: torch.Generator
) -> torch.Tensor:
    """For ``share`` of the matrices, their history as it is without the device's DHCP
    flows: DHCP rows (``dhcp``, (b, rows) bool) removed, the older rows moved up in their
    place and the freed rows left empty. A device that joined before the sensor started
    shows no DHCP exchange; trained on such histories too, the model does not hinge on it.
    The current flow (row 0) is kept as it is."""
    if share <= 0 or x.shape[1] < 2 or not bool(dhcp[:, 1:].any()):
        return x  # (no random draw: data without DHCP trains as before)
    b, r = dhcp.shape
    cut = (torch.rand(b, generator=gen) < share) & dhcp[:, 1:].any(dim=1)
    if not bool(cut.any()):
        return x
    drop = dhcp & cut[:, None]
    drop[:, 0] = False
    key = drop.to(torch.int64) * r + torch.arange(r)[None, :]  # kept rows first, in order
    order = key.argsort(dim=1)
    x = torch.gather(x, 1, order[:, :, None].expand(-1, -1, x.shape[2]))
    kept = (~drop).sum(dim=1)
    mask = torch.arange(r)[None, :] < kept[:, None]
    return x * mask[:, :, None].to(x.dtype)


def move_remotes(x: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    """For ``share`` of the matrices, every public remote address moved by one random offset
    per octet, the same for all rows of a matrix: equal addresses stay equal and a server's
    neighbours stay its neighbours, but the addresses themselves are new.

    The servers a type talks to are not where they were in the lab: cloud and CDN addresses
    differ between networks and move over the years. Trained on moved addresses too, the
    model takes an address as a hint, not as the type's name. Private remotes (all octets
    zero) and empty rows stay as they are."""
    if share <= 0:
        return x
    move = torch.rand(len(x), generator=gen) < share
    if not bool(move.any()):
        return x
    octets = x[:, :, REMOTE_IP]
    offset = torch.randint(1, 256, (len(x), 1, octets.shape[2]), generator=gen).to(x.dtype)
    moved = torch.remainder(torch.round(octets * 255.0) + offset, 256.0) / 255.0
    public = (octets != 0).any(dim=2, keepdim=True) & move[:, None, None]
    x = x.clone()
    x[:, :, REMOTE_IP] = torch.where(public, moved, octets)
    return x


def _logits(model: IoTCNN, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[s : s + batch])).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.n_classes), np.float32)


def ambiguous_identities(
    bundle: ModelBundle,
    x_va: np.ndarray,
    y_names: np.ndarray,
    captures: np.ndarray,
    devices: np.ndarray,
    times: np.ndarray,
) -> list[str]:
    """Rule 6's shared identities that the bundle's model, refined as ``classify`` refines
    it, gets wrong on the validation split."""
    from .predict import Predictor
    from .trust.decision import TrustConfig
    from .trust.dhcp_identity import fit_ambiguous

    p = Predictor(bundle, explain=False)
    ids = p.device_identities(x_va, device_sessions(captures, devices), times)
    if ids is None:
        return []
    pred = p.predict(x_va, ids).label
    return fit_ambiguous(
        bundle.trust["dhcp_identities"], ids, pred, y_names, TrustConfig().dhcp_min_accuracy
    )


def needed_identities(
    bundle: ModelBundle,
    x_va: np.ndarray,
    y_names: np.ndarray,
    captures: np.ndarray,
    devices: np.ndarray,
    times: np.ndarray,
) -> list[str]:
    """Rule 7's classes (:func:`iotcls.trust.dhcp_identity.fit_needed`): the bundle's gate on
    the validation split with its DHCP records removed, as a sensor that started after the
    devices joined sees them."""
    from .predict import Predictor
    from .trust.decision import TrustConfig
    from .trust.dhcp_identity import fit_needed
    from .trust.shift import remove_dhcp

    sessions = device_sessions(captures, devices)
    keep, mats = remove_dhcp(x_va, sessions, times, bundle.layout)
    p = Predictor(bundle)
    pred = p.predict(mats)
    s, t = sessions[keep], np.asarray(times)[keep]
    p.check_devices(pred, s, t, None, p.device_names(mats, s, t))  # rules 5 and 9 first
    names = np.asarray(bundle.classes, object)[pred.index]
    return fit_needed(
        bundle.trust["dhcp_identities"],
        bundle.trust.get("dhcp_ambiguous", []),
        names,
        np.asarray(y_names, object)[keep],
        pred.trusted,
        pred.confidence,
        TrustConfig().dhcp_needed_max_error,
    )


def cap_per_capture(captures: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Indices keeping at most ``limit`` entries per capture (a seeded random subset)."""
    idx = np.arange(len(captures))
    if limit <= 0:
        return idx
    keep = []
    for c in np.unique(captures):
        members = idx[captures == c]
        if len(members) > limit:
            members = np.sort(rng.choice(members, limit, replace=False))
        keep.append(members)
    return np.sort(np.concatenate(keep)) if keep else idx


@dataclass
class TrainData:
    """The training and validation parts of the data, as the loop needs them."""

    classes: list[str]
    labels: np.ndarray  # (n,) object: every matrix's class name
    y: np.ndarray  # (n,) class index
    split: Split
    part: np.ndarray  # (n,) 0 train, 1 validation, 2 test
    tr: np.ndarray  # indices of the training matrices (after max_per_capture)
    va: np.ndarray  # indices of the validation matrices
    x_tr: torch.Tensor
    y_tr: torch.Tensor
    dhcp_tr: torch.Tensor  # (n_tr, rows) bool: which rows are DHCP flows
    x_va: np.ndarray
    y_va: np.ndarray
    weight: torch.Tensor  # loss weight per class


@dataclass
class FitResult:
    """The training loop's outcome: the best epoch's weights and the loop's history."""

    model: IoTCNN
    best_epoch: int
    val_macro_f1: float
    history: list[dict]


def prepare_data(
    matrices: np.ndarray,
    labels: np.ndarray,
    captures: np.ndarray,
    cfg: TrainConfig,
    classes: list[str] | None,
    split: Split | None,
    log=print,
) -> TrainData:
    """Class indices, the split by capture file and the tensors of its training part."""
    from .trust.shift import dhcp_rows

    labels = np.asarray(labels, dtype=object)
    captures = np.asarray(captures, dtype=object)
    classes = sorted(set(labels.tolist()) if classes is None else classes)
    if len(classes) < 2:
        raise ValueError(f"training needs at least two labels, found {len(classes)}")
    y = np.searchsorted(np.array(classes, dtype=object), labels).astype(np.int64)
    if split is None:
        split = split_captures(captures, labels, cfg.seed, cfg.val_fraction, cfg.test_fraction)
    part = split.part_of(captures)
    rng = np.random.default_rng(cfg.seed)
    tr = np.flatnonzero(part == 0)
    tr = tr[cap_per_capture(captures[tr], cfg.max_per_capture, rng)]
    va = np.flatnonzero(part == 1)
    log(
        f"split by capture file (seed {cfg.seed}): {len(split.train)} train, {len(split.val)} "
        f"validation, {len(split.test)} test files; {len(tr)} / {len(va)} / "
        f"{int((part == 2).sum())} matrices"
    )
    counts = np.bincount(y[tr], minlength=len(classes)).astype(np.float64)
    w = np.where(counts > 0, np.maximum(counts, 1) ** -cfg.class_weight_power, 0.0)
    w = w / (w[y[tr]].mean() if len(tr) else 1.0)
    x_tr = np.ascontiguousarray(matrices[tr])
    return TrainData(
        classes,
        labels,
        y,
        split,
        part,
        tr,
        va,
        torch.from_numpy(x_tr),
        torch.from_numpy(y[tr]),
        torch.from_numpy(dhcp_rows(x_tr)),
        np.ascontiguousarray(matrices[va]),
        y[va],
        torch.tensor(w, dtype=torch.float32),
    )


def _augment(
    xb: torch.Tensor,
    dhcp: torch.Tensor,
    cfg: TrainConfig,
    layout: MatrixLayout,
    gen: torch.Generator,
) -> torch.Tensor:
    """A batch as live sensors also see it: DHCP rows missing, history cut, early records,
    servers elsewhere."""
    xb = drop_dhcp_rows(xb, dhcp, cfg.dhcp_dropout, gen)
    xb = move_remotes(xb, cfg.remote_shift, gen)
    xb = cut_history(xb, cfg.history_dropout, gen)
    return cut_packets(xb, cfg.early_share, layout, gen)


def train_epoch(
    model: IoTCNN,
    data: TrainData,
    cfg: TrainConfig,
    layout: MatrixLayout,
    opt,
    sched,
    gen: torch.Generator,
    desc: str,
    progress: bool,
) -> float:
    """One pass over the training part; returns the mean training loss."""
    model.train()
    steps = max(1, math.ceil(len(data.tr) / cfg.batch_size))
    perm = torch.randperm(len(data.tr), generator=gen)
    total, seen = 0.0, 0
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, unit="batch")
    for step in bar:
        idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        xb = _augment(data.x_tr[idx], data.dhcp_tr[idx], cfg, layout, gen)
        yb = data.y_tr[idx]
        loss = F.cross_entropy(model(xb), yb, weight=data.weight)
        if cfg.flow_loss > 0:  # the per-flow strategy's input: one row, a sixth the cost
            loss = loss + cfg.flow_loss * F.cross_entropy(model(xb[:, :1]), yb, weight=data.weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(idx)
        seen += len(idx)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{total / max(seen, 1):.4f}")
    bar.close()
    return total / max(seen, 1)


def fit(
    data: TrainData, layout: MatrixLayout, cfg: TrainConfig, progress: bool = True, log=print
) -> FitResult:
    """The training loop with early stopping on validation macro-F1 (best epoch kept)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = IoTCNN(ModelConfig.from_layout(layout, len(data.classes), **cfg.model))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(data.tr) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    best, best_state, best_epoch, history = (-1.0, -math.inf), None, 0, []
    for epoch in range(1, cfg.epochs + 1):
        train_loss = train_epoch(
            model, data, cfg, layout, opt, sched, gen, f"epoch {epoch}/{cfg.epochs}", progress
        )
        if len(data.va):
            lv = _logits(model, data.x_va)
            val_loss = float(F.cross_entropy(torch.from_numpy(lv), torch.from_numpy(data.y_va)))
            val_f1 = macro_f1(data.y_va, lv.argmax(1), len(data.classes))
        else:  # no validation files: keep the last epoch
            val_loss, val_f1 = -train_loss, 0.0
        history.append(
            {
                "epoch": epoch,
                "train_loss": round(train_loss, 5),
                "val_loss": round(val_loss, 5),
                "val_macro_f1": round(val_f1, 5),
            }
        )
        log(
            f"epoch {epoch:2d}: train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
            f"val macro-F1 {val_f1:.4f}"
        )
        if (val_f1, -val_loss) > best:
            best, best_epoch = (val_f1, -val_loss), epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= cfg.patience:
            log(f"early stop: no better validation macro-F1 since epoch {best_epoch}")
            break
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(model, best_epoch, best[0], history)


def fit_trust(
    model: IoTCNN,
    layout: MatrixLayout,
    temperature: float,
    data: TrainData,
    matrices: np.ndarray,
    meta: dict,
    log=print,
) -> dict:
    """The trust state (docs/trust.md), fitted on the validation split (data the model did
    not learn from, so its mistakes there are like the ones it will make); records its
    figures in ``meta["trust"]``."""
    from .trust.dhcp_identity import fit_identities
    from .trust.dns_names import fit_names
    from .trust.layer import fit_state

    state, meta["trust"] = fit_state(
        model,
        layout,
        temperature,
        data.classes,
        data.x_va,
        data.y_va,
        fallback=(matrices[data.tr], data.y[data.tr]),
    )
    known = np.flatnonzero((data.part == 0) | (data.part == 1))  # rule 6: classes' identities
    state.dhcp_identities = fit_identities(
        layout.dhcp_identities(matrices[known, 0]), data.labels[known]
    )
    meta["trust"]["dhcp_identities"] = len(state.dhcp_identities)
    # rule 9: the names each class's devices used in DNS and mDNS
    state.dns_names = fit_names(layout.dns_names(matrices[known, 0]), data.labels[known])
    meta["trust"]["dns_names"] = sum(len(v) for v in state.dns_names.values())
    log(
        f"trust state: {meta['trust']['references']} reference explanations from "
        f"{meta['trust']['labels']} validation labels ({meta['trust']['seconds']:.1f}s)"
    )
    return state.to_dict()


def train_metadata(
    metadata: dict | None, cfg: TrainConfig, data: TrainData, res: FitResult, t0: float
) -> dict:
    meta = dict(metadata or {})
    meta.update(
        {
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "train_seconds": round(time.time() - t0, 1),
            "train_config": asdict(cfg),
            "split": data.split.to_dict(),
            "matrices": {
                "train": int(len(data.tr)),
                "val": int(len(data.va)),
                "test": int((data.part == 2).sum()),
            },
            "best_epoch": res.best_epoch,
            "val_macro_f1": round(res.val_macro_f1, 5),
            "history": res.history,
            "parameters": count_parameters(res.model),
            "flops": {"sequence": count_flops(res.model), "flow": count_flops(res.model, rows=1)},
        }
    )
    return meta


def train(
    matrices: np.ndarray,
    labels: np.ndarray,
    captures: np.ndarray,
    layout: MatrixLayout,
    cfg: TrainConfig = TrainConfig(),
    classes: list[str] | None = None,
    metadata: dict | None = None,
    progress: bool = True,
    log=print,
    devices: np.ndarray | None = None,
    times: np.ndarray | None = None,
    split: Split | None = None,
) -> ModelBundle:
    """Train a CNN on labelled matrices; ``labels`` are class names, ``captures`` capture ids.
    ``devices`` and ``times`` (each matrix's device and window start) let the trust state
    learn which shared DHCP identities the model mixes up (rule 6; without them it doesn't).
    ``split``: the capture files of each part, instead of a seeded split of ``captures``
    (cross-validation deals its own folds, :mod:`iotcls.crossval`).

    Returns the bundle with the split, the validation figures and the temperature.
    """
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = prepare_data(matrices, labels, captures, cfg, classes, split, log)
    res = fit(data, layout, cfg, progress, log)
    va = data.va
    temperature = fit_temperature(_logits(res.model, data.x_va), data.y_va) if len(va) else 1.0
    meta = train_metadata(metadata, cfg, data, res, t0)
    log(
        f"best epoch {res.best_epoch}: val macro-F1 {res.val_macro_f1:.4f}; "
        f"temperature {temperature:.3f}"
    )
    bundle = ModelBundle(
        model=res.model,
        layout=layout,
        classes=data.classes,
        temperature=temperature,
        metadata=meta,
    )
    if cfg.trust and len(va):
        attach_trust(bundle, data, matrices, captures, devices, times, log)
    return bundle


def attach_trust(
    bundle: ModelBundle,
    data: TrainData,
    matrices: np.ndarray,
    captures: np.ndarray,
    devices: np.ndarray | None,
    times: np.ndarray | None,
    log=print,
) -> None:
    """Fit the bundle's trust state on its validation split (:func:`fit_trust`), and where
    each matrix's device and time are known, rule 6's ambiguous identities and rule 7's
    classes; the figures go to ``bundle.metadata["trust"]``."""
    meta = bundle.metadata
    bundle.trust = fit_trust(
        bundle.model, bundle.layout, bundle.temperature, data, matrices, meta, log
    )
    if devices is None or times is None:
        return
    va = data.va
    args = (
        data.x_va,
        data.labels[va],
        np.asarray(captures)[va],
        np.asarray(devices)[va],
        np.asarray(times)[va],
    )
    amb = ambiguous_identities(bundle, *args)
    bundle.trust["dhcp_ambiguous"] = meta["trust"]["dhcp_ambiguous"] = amb
    need = needed_identities(bundle, *args)
    bundle.trust["dhcp_needed"] = meta["trust"]["dhcp_needed"] = need


def refit_trust(
    bundle: ModelBundle,
    matrices: np.ndarray,
    labels: np.ndarray,
    captures: np.ndarray,
    devices: np.ndarray | None = None,
    times: np.ndarray | None = None,
    log=print,
) -> ModelBundle:
    """The bundle with its trust state fitted anew, as ``iotcls train`` fits it, on the
    data it was trained on (its own split and settings), its weights and temperature
    untouched: how a trained model gets a trust rule added after it (docs/trust.md)."""
    meta = bundle.metadata
    if "split" not in meta or "train_config" not in meta:
        raise ValueError("the model records no split or training settings to refit on")
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in meta["train_config"].items() if k in known})
    unknown = sorted(set(np.asarray(labels, object).tolist()) - set(bundle.classes))
    if unknown:
        raise ValueError(f"the data has labels the model does not know: {unknown}")
    data = prepare_data(
        matrices, labels, captures, cfg, bundle.classes, Split(**meta["split"]), log
    )
    if not len(data.va):
        raise ValueError("the model's validation captures are not in the data")
    meta["trust_refit_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    attach_trust(bundle, data, matrices, captures, devices, times, log)
    return bundle
