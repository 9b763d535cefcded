"""Scoring speed of the CNN on this CPU, and of an ET-BERT-sized transformer on the same input.

Prints: batched matrices/s (target >= 5,000), single-matrix latency p50/p99 through the
Predictor (target p99 <= 10 ms), FLOPs and parameters, then a BERT-base-shaped transformer
(12 layers, hidden 768, 12 heads, feed-forward 3072, random weights) reading the matrix's
payload bytes as tokens, capped at BERT's 512 positions (ET-BERT's input length too), and the
speed ratio. Run: ``python benchmarks/bench_scoring.py [--model M] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn as nn

import iotcls  # noqa: F401  first: it sets OMP_WAIT_POLICY before torch loads
from iotcls.bundle import BundleError, ModelBundle
from iotcls.layout import MatrixLayout
from iotcls.model import IoTCNN, ModelConfig, count_flops, count_parameters
from iotcls.predict import Predictor

BERT_TOKENS = 512


def realistic_matrices(layout: MatrixLayout, n: int, seed: int = 0) -> np.ndarray:
    """Random matrices with the value ranges of real ones (bytes as (b + 1) / 256)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, *layout.shape), dtype=np.float32)
    g = layout.group_slices()
    x[:, :, g["directions"]] = rng.choice([-1.0, 1.0], size=(n, layout.rows, layout.packets))
    if layout.payload_mode == "packet":
        w = g["payload"].stop - g["payload"].start
        x[:, :, g["payload"]] = (rng.integers(0, 256, (n, layout.rows, w)) + 1) / 256.0
    return x


class BertSized(nn.Module):
    """BERT-base shape over byte tokens: 12 x (768 hidden, 12 heads, 3072 feed-forward)."""

    def __init__(self, n_classes: int, tokens: int = BERT_TOKENS):
        super().__init__()
        self.tok = nn.Embedding(259, 768)
        self.pos = nn.Embedding(tokens, 768)
        layer = nn.TransformerEncoderLayer(
            768, 12, 3072, dropout=0.0, activation="gelu", batch_first=True, norm_first=False
        )
        self.encoder = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
        self.head = nn.Linear(768, n_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))[None]
        return self.head(self.encoder(h)[:, 0])


def bert_flops(tokens: int, layers: int = 12, d: int = 768, ff: int = 3072) -> int:
    """Multiply-adds x 2 of the encoder: projections, attention scores and mix, feed-forward.

    Analytic because torch's fused inference path for the encoder escapes FlopCounterMode.
    """
    qkv_out = 2 * tokens * d * 4 * d
    attention = 2 * 2 * tokens * tokens * d
    feed_forward = 2 * 2 * tokens * d * ff
    return layers * (qkv_out + attention + feed_forward)


def payload_tokens(x: np.ndarray, layout: MatrixLayout, tokens: int) -> torch.Tensor:
    """The matrices' payload bytes as token ids (0 = none), first ``tokens`` of them."""
    pay = x[:, :, layout.group_slices()["payload"]].reshape(len(x), -1)
    ids = np.rint(pay * 256).astype(np.int64)[:, :tokens]
    if ids.shape[1] < tokens:
        ids = np.pad(ids, ((0, 0), (0, tokens - ids.shape[1])))
    return torch.from_numpy(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model bundle (default: the shipped model)")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    args = ap.parse_args()
    try:
        bundle = ModelBundle.load(args.model)
        source = bundle.name
    except BundleError as e:
        print(f"({e}; timing a fresh model of the default layout)")
        layout = MatrixLayout()
        bundle = ModelBundle(
            IoTCNN(ModelConfig.from_layout(layout, 27)).eval(), layout, [f"c{i}" for i in range(27)]
        )
        source = "fresh model, default layout"
    layout, threads = bundle.layout, torch.get_num_threads()
    reps = 3 if args.quick else 10
    x = realistic_matrices(layout, args.batch)

    def batched_rate(p: Predictor) -> float:
        p.predict(x)
        rates = []
        for _ in range(reps):
            t = time.perf_counter()
            p.predict(x)
            rates.append(len(x) / (time.perf_counter() - t))
        return statistics.median(rates)

    # The plain label (what the scorer computes for every record) apart from the full trust
    # decision with Shapley values (what it computes for labels that are logged).
    plain_pred = Predictor(bundle, explain=False)
    plain = batched_rate(plain_pred)
    pred = Predictor(bundle)
    batched = batched_rate(pred)

    def latency(p: Predictor) -> tuple[float, float]:
        lat = []
        for i in range(200 if args.quick else 2000):
            t = time.perf_counter()
            p.predict(x[i % len(x) : i % len(x) + 1])
            lat.append((time.perf_counter() - t) * 1000)
        lat.sort()
        return lat[len(lat) // 2], lat[int(len(lat) * 0.99) - 1]

    plain_p50, plain_p99 = latency(plain_pred)
    p50, p99 = latency(pred)
    flops, params = count_flops(bundle.model), count_parameters(bundle.model)
    print(f"CNN ({source}; layout {layout.rows}x{layout.width}, {threads} torch threads)")
    print(f"  parameters {params:,}  FLOPs/matrix {flops / 1e6:.2f} M")
    print(
        f"  batched ({args.batch} per call), plain labels: {plain:,.0f} matrices/s  "
        "(target >= 5,000)"
    )
    print(f"  batched, with Shapley values and trust decision: {batched:,.0f} matrices/s")
    print(
        f"  single matrix, plain label: p50 {plain_p50:.2f} ms  p99 {plain_p99:.2f} ms  "
        "(target <= 10 ms)"
    )
    print(
        f"  single matrix, with Shapley values and trust decision: p50 {p50:.2f} ms  "
        f"p99 {p99:.2f} ms"
    )

    torch.manual_seed(0)
    bert = BertSized(len(bundle.classes)).eval()
    bparams = sum(p.numel() for p in bert.parameters())
    ids = payload_tokens(x[:4], layout, BERT_TOKENS)
    with torch.inference_mode():
        bert(ids[:1])
        times = []
        for _ in range(1 if args.quick else 3):
            t = time.perf_counter()
            bert(ids)
            times.append(time.perf_counter() - t)
        bert_batched = len(ids) / min(times)
        t = time.perf_counter()
        bert(ids[:1])
        bert_single_ms = (time.perf_counter() - t) * 1000
    bflops = bert_flops(BERT_TOKENS)
    print(f"ET-BERT-sized transformer (BERT-base shape, {BERT_TOKENS} byte tokens, random weights)")
    print(f"  parameters {bparams / 1e6:.1f} M  FLOPs/matrix {bflops / 1e9:.1f} G")
    print(f"  batched: {bert_batched:.2f} matrices/s  single: {bert_single_ms:.0f} ms")
    print(
        f"ratio: the CNN scores {plain / bert_batched:,.0f}x as many matrices/s batched, "
        f"{bert_single_ms / plain_p50:,.0f}x faster single (p50), with "
        f"{bflops / flops:,.0f}x fewer FLOPs and {bparams / params:,.0f}x fewer "
        "parameters"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "cnn_matrices_per_s": round(plain),
                    "cnn_explained_per_s": round(batched),
                    "cnn_plain_p50_ms": round(plain_p50, 3),
                    "cnn_plain_p99_ms": round(plain_p99, 3),
                    "cnn_p50_ms": round(p50, 3),
                    "cnn_p99_ms": round(p99, 3),
                    "cnn_flops": flops,
                    "cnn_params": params,
                    "bert_matrices_per_s": round(bert_batched, 3),
                    "bert_single_ms": round(bert_single_ms, 1),
                    "bert_flops": bflops,
                    "bert_params": bparams,
                    "ratio": round(plain / bert_batched, 1),
                    "threads": threads,
                }
            )
        )


if __name__ == "__main__":
    main()
