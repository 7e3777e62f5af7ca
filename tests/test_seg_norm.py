"""The stacked pre-norm of a mixed batch (``kernels/seg_norm.cpp``) against each budget's
own add-RMSNorm: rows of several budgets in one buffer, each over its own width."""

from __future__ import annotations

import pytest
import torch

from vllm_elastic.kernels import build, seg_norm

pytestmark = pytest.mark.skipif(
    build.unavailable_reason() is not None, reason="the CPU kernels do not run here"
)


@pytest.fixture(autouse=True, scope="module")
def _kernels():
    build.load()


def test_rows_of_several_budgets_in_one_call():
    torch.manual_seed(0)
    segments = [(4, 72), (0, 40), (3, 40), (5, 27), (2, 72)]  # widths: vector body + tail
    rows = sum(m for m, _ in segments)
    x, residual, weight = torch.randn(rows, 80), torch.randn(rows, 80), torch.randn(80)
    x[:, 72:] = residual[:, 72:] = float("nan")  # past every width: never read
    want_x, want_res = x.clone(), residual.clone()
    seg_norm.add_rms_norm(
        x, residual, weight, [m for m, _ in segments], [w for _, w in segments], 1e-5
    )
    start = 0
    for m, w in segments:
        mine = slice(start, start + m)
        start += m
        res = want_res[mine, :w] + want_x[mine, :w]
        normed = res * torch.rsqrt(res.pow(2).mean(-1, keepdim=True) + 1e-5) * weight[:w]
        torch.testing.assert_close(residual[mine, :w], res, rtol=0, atol=0)
        torch.testing.assert_close(x[mine, :w], normed, rtol=1e-5, atol=1e-5)
        assert torch.equal(x[mine, w:].isnan(), want_x[mine, w:].isnan())
        torch.testing.assert_close(x[mine, w:], want_x[mine, w:], equal_nan=True)
        torch.testing.assert_close(residual[mine, w:], want_res[mine, w:], equal_nan=True)


def test_bad_segments_are_refused():
    x, residual, weight = torch.zeros(4, 64), torch.zeros(4, 64), torch.ones(64)
    with pytest.raises(RuntimeError, match="wider than the tensors"):
        seg_norm.add_rms_norm(x, residual, weight, [4], [65], 1e-5)
    with pytest.raises(RuntimeError, match="rows do not add up"):
        seg_norm.add_rms_norm(x, residual, weight, [3], [64], 1e-5)
