"""The lightweight CNN that labels a flow-sequence matrix (see :mod:`iotcls.layout`).

One matrix is ``history + 1`` rows (the current flow, then the device's previous flows) of the
same columns. The network reads it in two stages, as the paper describes:

1. **Intra-flow**, along each row. Every payload byte is a symbol, not a magnitude, so it is
   looked up in a small byte embedding. Each packet slot becomes one vector (its timing, size,
   direction and embedded payload bytes), and a 1D convolution runs across the packet slots,
   so the order of packets within the flow counts. Max and mean pooling over the slots, plus
   a small embedding of the flow metadata (its remote address octets and port bytes looked up
   as symbols too), give one vector per flow. In the paper's ``stream``
   layout a strided 1D convolution over the embedded byte stream replaces the per-packet bytes.
2. **Inter-flow**, across the rows: a 1D convolution over the row vectors (the device's recent
   flows in time order), then pooling that keeps the current flow's vector apart from the
   mean and max over the whole sequence.

Rows that are entirely zero (no such flow: short history) are masked out everywhere, so a
matrix of one row gives exactly what the same matrix with its history rows zeroed gives: the
per-flow strategy runs the model on ``matrices[:, :1]`` at a sixth of the cost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layout import META_COLUMNS, PORTS, REMOTE_IP, MatrixLayout

N_META = len(META_COLUMNS)
PACKET_SYMBOLS = 257  # packet mode: 0 = no byte, b + 1 for byte b
STREAM_SYMBOLS = 265  # stream mode: round(v * 255) + 9 covers -8 .. 255
STREAM_OFFSET = 9


@dataclass
class ModelConfig:
    n_classes: int
    history: int = 5
    packets: int = 10
    payload_mode: str = "packet"
    payload_bytes: int = 16
    stream_bytes: int = 1000
    byte_dim: int = 8  # embedding of one payload byte
    packet_dim: int = 64  # one packet slot
    meta_dim: int = 32  # the flow's metadata
    row_dim: int = 96  # one flow (row)
    hidden: int = 96  # classifier head
    stream_channels: int = 32  # stream mode convolution
    meta_symbols: bool = True  # remote IP octets and port bytes also as embedded symbols
    dropout: float = 0.1

    @classmethod
    def from_layout(cls, layout: MatrixLayout, n_classes: int, **kw) -> ModelConfig:
        return cls(
            n_classes=n_classes,
            history=layout.history,
            packets=layout.packets,
            payload_mode=layout.payload_mode,
            payload_bytes=layout.payload_bytes,
            stream_bytes=layout.stream_bytes,
            **kw,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model config: unknown keys {sorted(unknown)}")
        return cls(**d)

    @property
    def width(self) -> int:
        if self.payload_mode == "packet":
            pay = self.packets * self.payload_bytes
        elif self.payload_mode == "stream":
            pay = self.stream_bytes
        else:
            pay = 0
        return N_META + 3 * self.packets + pay


META_SYMBOLS = 8  # four remote IP octets, remote port and device port as two bytes each


def meta_symbols(meta: torch.Tensor) -> torch.Tensor:
    """(N, 13) scaled metadata -> (N, 8) byte symbols of the remote IP and the two ports.

    A server address or a port is a name, not a quantity: 443 is not "near" 444. The scaled
    values stay as inputs too; the symbols let the network recognise exact servers and
    services (zeroed private addresses become the symbols 0.0.0.0).
    """
    octets = torch.round(meta[:, REMOTE_IP] * 255.0)
    ports = torch.round(meta[:, PORTS] * 65535.0)
    hi = torch.div(ports, 256, rounding_mode="floor")
    return torch.cat([octets, hi, ports - hi * 256], dim=1).long().clamp_(0, 255)


class FlowEncoder(nn.Module):
    """Intra-flow stage: one row of the matrix -> one vector."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.packets
        self.packet_in = nn.Linear(3, cfg.packet_dim)  # timing, size, direction
        if cfg.payload_mode == "packet" and cfg.payload_bytes > 0:
            self.byte_emb = nn.Embedding(PACKET_SYMBOLS, cfg.byte_dim)
            per_packet = cfg.payload_bytes * cfg.byte_dim
            self.payload_in = nn.Linear(per_packet, cfg.packet_dim, bias=False)
        self.packet_conv = nn.Conv1d(cfg.packet_dim, cfg.packet_dim, 3, padding=1)
        self.meta_in = nn.Linear(N_META, cfg.meta_dim)
        if cfg.meta_symbols:
            self.meta_emb = nn.Embedding(256, cfg.byte_dim)
            self.meta_sym_in = nn.Linear(META_SYMBOLS * cfg.byte_dim, cfg.meta_dim, bias=False)
        row_in = cfg.meta_dim + 2 * cfg.packet_dim
        if cfg.payload_mode == "stream" and cfg.stream_bytes > 0:
            c = cfg.stream_channels
            self.stream_emb = nn.Embedding(STREAM_SYMBOLS, cfg.byte_dim)
            self.stream_conv1 = nn.Conv1d(cfg.byte_dim, c, 8, stride=4)
            self.stream_conv2 = nn.Conv1d(c, c, 3, stride=2)
            row_in += 2 * c
        self.row_out = nn.Linear(row_in, cfg.row_dim)
        self._p = p

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        # rows: (N, W) -> (N, row_dim)
        return self.combine(rows, self.packet_features(rows))

    def packet_features(self, rows: torch.Tensor) -> torch.Tensor:
        """What a row's packets and payload say: nine tenths of the work, and independent of
        ``rel_time`` (the one column that changes as a flow moves down a device's history),
        so a scorer may compute it once per flow (:mod:`iotcls.rowcache`)."""
        cfg, p, n = self.cfg, self._p, rows.shape[0]
        per = rows[:, N_META : N_META + 3 * p].view(n, 3, p).transpose(1, 2)  # (N, P, 3)
        pay = rows[:, N_META + 3 * p :]
        h = self.packet_in(per)  # (N, P, D)
        if cfg.payload_mode == "packet" and cfg.payload_bytes > 0:
            ids = torch.round(pay * 256.0).long().clamp_(0, PACKET_SYMBOLS - 1)
            h = h + self.payload_in(self.byte_emb(ids.view(n, p, cfg.payload_bytes)).view(n, p, -1))
        h = F.gelu(h).transpose(1, 2)  # (N, D, P)
        h = h + F.gelu(self.packet_conv(h))
        parts = [h.amax(dim=2), h.mean(dim=2)]
        if cfg.payload_mode == "stream" and cfg.stream_bytes > 0:
            ids = (torch.round(pay * 255.0).long() + STREAM_OFFSET).clamp_(0, STREAM_SYMBOLS - 1)
            s = self.stream_emb(ids).transpose(1, 2)  # (N, E, L)
            s = F.gelu(self.stream_conv2(F.gelu(self.stream_conv1(s))))
            parts += [s.amax(dim=2), s.mean(dim=2)]
        return torch.cat(parts, dim=1)

    def combine(self, rows: torch.Tensor, packet_features: torch.Tensor) -> torch.Tensor:
        """The row vector from the metadata and the row's :meth:`packet_features`."""
        meta = rows[:, :N_META]
        m = self.meta_in(meta)
        if self.cfg.meta_symbols:
            m = m + self.meta_sym_in(self.meta_emb(meta_symbols(meta)).view(rows.shape[0], -1))
        return F.gelu(self.row_out(torch.cat([F.gelu(m), packet_features], dim=1)))


class IoTCNN(nn.Module):
    """Matrices ``(B, R, W)`` with ``R <= history + 1`` -> class logits ``(B, n_classes)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.flow = FlowEncoder(cfg)
        self.seq_conv = nn.Conv1d(cfg.row_dim, cfg.row_dim, 3, padding=1)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(3 * cfg.row_dim, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, r, w = x.shape
        if w != self.cfg.width or r > self.cfg.history + 1:
            raise ValueError(
                f"model expects matrices of at most {self.cfg.history + 1} rows x "
                f"{self.cfg.width} columns, got {r} x {w}"
            )
        mask = (x != 0).any(dim=2).unsqueeze(1).to(x.dtype)  # (B, 1, R): which rows hold a flow
        return self.sequence_head(self.flow(x.reshape(b * r, w)).view(b, r, -1), mask)

    # trust (docs/trust.md): the inter-flow stage on its own, so that exact Shapley values
    # (iotcls.trust.shapley) encode each masked variant of a row once, not once per coalition.
    def sequence_head(self, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Inter-flow stage: row vectors ``(B, R, row_dim)`` and row presence ``(B, 1, R)``
        -> logits."""
        h = rows.transpose(1, 2) * mask  # (B, D, R)
        h = (h + F.gelu(self.seq_conv(h))) * mask
        present = mask.sum(dim=2).clamp_min(1.0)
        mean = h.sum(dim=2) / present
        peak = torch.where(mask > 0, h, torch.full_like(h, -1e4)).amax(dim=2)
        peak = torch.where(peak <= -1e4, torch.zeros_like(peak), peak)
        z = torch.cat([h[:, :, 0], mean, peak], dim=1)
        return self.out(self.drop(F.gelu(self.head(self.drop(z)))))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: IoTCNN, rows: int | None = None) -> int:
    """Floating-point operations (multiply and add counted apart) for one matrix.

    Measured with :class:`torch.utils.flop_counter.FlopCounterMode`, which counts the matrix
    multiplications and convolutions (all but a few hundred element-wise operations);
    ``rows`` = 1 gives the per-flow strategy's cost.
    """
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.cfg
    x = torch.full((1, rows or cfg.history + 1, cfg.width), 0.5)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
