"""A tiny real CNN bundle for tests that need a model but not a trained one."""

import torch

from iotcls.bundle import ModelBundle
from iotcls.layout import MatrixLayout
from iotcls.model import IoTCNN, ModelConfig


def tiny_bundle(layout: MatrixLayout, classes: list[str], seed: int, **kw) -> ModelBundle:
    """Seeded, so a test gets the same weights every run."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_layout(
        layout, len(classes), packet_dim=8, meta_dim=8, row_dim=8, hidden=8
    )
    return ModelBundle(model=IoTCNN(cfg).eval(), layout=layout, classes=classes, **kw)
