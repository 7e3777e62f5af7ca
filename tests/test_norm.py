"""The elastic RMSNorm helpers agree with vLLM's IR ops (native PyTorch on CPU), both
on widths the fused CPU kernel takes (multiples of 8) and on widths it does not."""

from __future__ import annotations

import pytest
import torch
from vllm import ir

from vllm_elastic.models import norm


def _native(op):
    return getattr(ir.ops, op).impls["native"].impl_fn


@pytest.mark.parametrize("width", [20, 64, 640])
def test_rms_norm_of_a_prefix_of_the_weight(width):
    torch.manual_seed(width)
    x, weight = torch.randn(5, width), torch.randn(2 * width)
    want = _native("rms_norm")(x, weight[:width], 1e-6)
    torch.testing.assert_close(norm.rms_norm(x, weight, 1e-6), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [20, 64, 640])
def test_fused_add_rms_norm_returns_the_new_residual(width):
    torch.manual_seed(width)
    x, residual, weight = torch.randn(5, width), torch.randn(5, width), torch.randn(2 * width)
    want = _native("fused_add_rms_norm")(x.clone(), residual.clone(), weight[:width], 1e-6)
    got = norm.fused_add_rms_norm(x.clone(), residual.clone(), weight, 1e-6)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], x + residual)


def test_strided_input_is_normed_like_a_contiguous_one():
    torch.manual_seed(0)
    wide, residual, weight = torch.randn(5, 96), torch.randn(5, 64), torch.randn(96)
    x = wide[:, :64]  # a budget's columns of a wider buffer
    got = norm.fused_add_rms_norm(x, residual.clone(), weight, 1e-6)
    want = _native("fused_add_rms_norm")(x.contiguous(), residual, weight[:64], 1e-6)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
