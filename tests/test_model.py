"""The CNN: parameter and FLOP budgets, shapes, masking of absent rows, every layout preset."""

import numpy as np
import pytest
import torch

from iotcls.layout import MatrixLayout
from iotcls.model import IoTCNN, ModelConfig, count_flops, count_parameters

PRESETS = ["default", "paper", "no-payload"]


def model_for(layout: MatrixLayout, n_classes: int = 27) -> IoTCNN:
    torch.manual_seed(0)
    return IoTCNN(ModelConfig.from_layout(layout, n_classes)).eval()


@pytest.mark.parametrize("preset", PRESETS)
def test_budget_and_shape(preset):
    layout = MatrixLayout.preset(preset)
    m = model_for(layout)
    assert count_parameters(m) <= 250_000
    flops = count_flops(m)
    assert 0 < flops <= 15_000_000  # the paper's 1000-byte stream is the costliest preset
    assert count_flops(m, rows=1) < flops / 4  # per flow: one row of six
    x = torch.rand(7, *layout.shape)
    assert m(x).shape == (7, 27)


def test_default_layout_is_a_few_mflops():
    m = model_for(MatrixLayout())
    assert count_flops(m) <= 7_000_000
    assert count_parameters(m) <= 150_000


def test_one_row_equals_zeroed_history():
    """The per-flow strategy feeds one row; it must equal the matrix with history zeroed."""
    layout = MatrixLayout()
    m = model_for(layout)
    x = torch.rand(5, *layout.shape)
    zeroed = x.clone()
    zeroed[:, 1:] = 0
    with torch.inference_mode():
        a, b, full = m(x[:, :1]), m(zeroed), m(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, full)


def test_absent_history_rows_do_not_matter_by_position():
    """Short history is zero rows at the end; the label must not depend on their count."""
    layout = MatrixLayout()
    m = model_for(layout)
    x = torch.rand(3, *layout.shape)
    x[:, 3:] = 0
    with torch.inference_mode():
        torch.testing.assert_close(m(x), m(x[:, :3]), rtol=1e-5, atol=1e-5)


def test_rejects_wrong_width_and_too_many_rows():
    layout = MatrixLayout()
    m = model_for(layout)
    with pytest.raises(ValueError, match="columns"):
        m(torch.zeros(1, layout.rows, layout.width + 1))
    with pytest.raises(ValueError, match="rows"):
        m(torch.zeros(1, layout.rows + 1, layout.width))


def test_payload_bytes_are_symbols():
    """Two payloads that differ in one byte value give different outputs (embedding lookup)."""
    layout = MatrixLayout(history=0, packets=2, payload_bytes=4)
    m = model_for(layout, 3)
    x = np.zeros((2, 1, layout.width), np.float32)
    pay = layout.group_slices()["payload"]
    x[:, 0, :13] = 0.3
    x[0, 0, pay.start] = (0x16 + 1) / 256
    x[1, 0, pay.start] = (0x17 + 1) / 256
    with torch.inference_mode():
        out = m(torch.from_numpy(x))
    assert not torch.allclose(out[0], out[1])
