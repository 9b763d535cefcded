"""Trust rule 8, an open-set signal beside the softmax: distance in the model's own
feature space.

A flow of a type the model never learnt can still get a confident label (softmax must put
its mass somewhere; unknown devices tend to land on a few classes, such as Lightify). Its
features, the model's last hidden layer (the input of the output layer), are then far from
those of the class it was given. After Lee et al. (NeurIPS 2018): per class, the mean of
its training matrices' features; one covariance shared by all classes; a label's distance is
the Mahalanobis distance of its features to its class mean, and a label farther than the
``quantile`` of its class's correctly labelled validation matrices (training ones for a
class with fewer than ``min_refs`` of those) is untrusted as ``atypical_features``.

The trust layer asks it only of labels whose device has shown no DHCP identity yet
(:meth:`.layer.TrustLayer.assess`): once the identity is known, rule 6 admits the classes
it was seen with and refuses every label of an identity never seen, which is the stronger
evidence; before it, nothing else says "none of these".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ATYPICAL_FEATURES = "atypical_features"


def penultimate(model: torch.nn.Module, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """(n, hidden) float64: the input of ``model.out`` for each matrix (eval mode)."""
    out: list[torch.Tensor] = []
    hook = model.out.register_forward_hook(lambda m, i, o: out.append(i[0].detach()))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, len(x), chunk):
                model(torch.from_numpy(np.ascontiguousarray(x[s : s + chunk], np.float32)))
    finally:
        hook.remove()
        model.train(was_training)
    if not out:
        return np.zeros((0, model.out.in_features))
    return torch.cat(out).double().numpy()


@dataclass
class FeatureDistance:
    mean: torch.Tensor  # (C, H) per-class mean of training features
    precision: torch.Tensor  # (H, H) inverse of the shared covariance
    threshold: torch.Tensor  # (C,) the largest typical distance per class; inf: no check

    def distance(self, feats: np.ndarray, pred: np.ndarray) -> np.ndarray:
        mu = self.mean.double().numpy()[np.asarray(pred, np.int64)]
        d = np.asarray(feats, np.float64) - mu
        return np.einsum("ij,jk,ik->i", d, self.precision.double().numpy(), d)

    def atypical(self, feats: np.ndarray, pred: np.ndarray) -> np.ndarray:
        pred = np.asarray(pred, np.int64)
        return self.distance(feats, pred) > self.threshold.double().numpy()[pred]

    def to_dict(self) -> dict:
        return {
            "feat_mean": self.mean.float().contiguous(),
            "feat_precision": self.precision.float().contiguous(),
            "feat_threshold": self.threshold.float().contiguous(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> FeatureDistance | None:
        if d.get("feat_mean") is None:
            return None
        return cls(
            torch.as_tensor(d["feat_mean"]).float(),
            torch.as_tensor(d["feat_precision"]).float(),
            torch.as_tensor(d["feat_threshold"]).float(),
        )


def fit_features(
    model: torch.nn.Module,
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_va: np.ndarray,
    y_va: np.ndarray,
    n_classes: int,
    quantile: float = 0.99,
    min_refs: int = 6,
    ridge: float = 1e-3,
) -> FeatureDistance:
    """Class means and shared covariance from the training matrices, thresholds from the
    validation matrices the model labels right; a class with fewer than ``min_refs``
    training matrices is not checked (threshold inf)."""
    f_tr, y_tr = penultimate(model, x_tr), np.asarray(y_tr, np.int64)
    h = f_tr.shape[1]
    mean = np.zeros((n_classes, h))
    for c in range(n_classes):
        if (y_tr == c).any():
            mean[c] = f_tr[y_tr == c].mean(axis=0)
    centred = f_tr - mean[y_tr]
    cov = centred.T @ centred / max(len(f_tr), 1)
    cov += ridge * max(float(np.trace(cov)) / h, 1e-12) * np.eye(h)
    fd = FeatureDistance(
        torch.from_numpy(mean).float(),
        torch.from_numpy(np.linalg.inv(cov)).float(),
        torch.full((n_classes,), float("inf")),
    )
    f_va, y_va = penultimate(model, x_va), np.asarray(y_va, np.int64)
    logits = model.out(torch.from_numpy(f_va).float()).detach().numpy() if len(f_va) else None
    pred_va = logits.argmax(axis=1) if logits is not None else np.zeros(0, np.int64)
    d_va = fd.distance(f_va, pred_va) if len(f_va) else np.zeros(0)
    thr = np.full(n_classes, np.inf)
    for c in range(n_classes):
        mine = y_tr == c
        if mine.sum() < min_refs:  # no mean to measure from (fine-tuning's old types)
            continue
        ok = (pred_va == c) & (y_va == c)
        if ok.sum() >= min_refs:
            thr[c] = np.quantile(d_va[ok], quantile)
        else:  # too few right validation labels: the class's training matrices
            thr[c] = np.quantile(fd.distance(f_tr[mine], np.full(mine.sum(), c)), quantile)
    fd.threshold = torch.from_numpy(thr).float()
    return fd
