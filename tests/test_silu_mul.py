"""The fused activation of an elastic gated MLP (``kernels/silu_mul.cpp``) against
``SiLU(gate) * up`` of each budget's sliced MLP: rows of several budgets in one call, each
over its own channels of the band-major gate_up output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vllm_elastic.kernels import build, silu_mul
from vllm_elastic.spec.layout import gate_up_rows

pytestmark = pytest.mark.skipif(
    build.unavailable_reason() is not None, reason="the CPU kernels do not run here"
)

BOUNDS = [20, 45, 64]  # band widths 20, 25, 19: vector bodies and scalar tails


@pytest.fixture(autouse=True, scope="module")
def _kernels():
    build.load()


def test_rows_of_several_budgets_in_one_call():
    torch.manual_seed(0)
    segments = [(5, 64), (0, 45), (3, 20), (4, 45), (1, 64)]
    rows = sum(m for m, _ in segments)
    gate, up = torch.randn(rows, 64) * 4, torch.randn(rows, 64)
    gate_rows, up_rows = gate_up_rows(BOUNDS, 64)
    gu = torch.empty(rows, 128)
    gu[:, gate_rows], gu[:, up_rows] = gate, up  # the layout the MLP loads its weights in
    act = torch.full((rows, 64), float("nan"))
    silu_mul.silu_mul_bands(act, gu, [m for m, _ in segments], [i for _, i in segments], BOUNDS)
    start = 0
    for m, inter in segments:
        mine = slice(start, start + m)
        start += m
        want = F.silu(gate[mine, :inter]) * up[mine, :inter]
        torch.testing.assert_close(act[mine, :inter], want, rtol=1e-6, atol=1e-6)
        assert act[mine, inter:].isnan().all()  # columns past a budget's channels untouched


def test_bad_segments_are_refused():
    gu, act = torch.zeros(4, 128), torch.zeros(4, 64)
    with pytest.raises(RuntimeError, match="no band bound"):
        silu_mul.silu_mul_bands(act, gu, [4], [30], BOUNDS)
    with pytest.raises(RuntimeError, match="rows do not add up"):
        silu_mul.silu_mul_bands(act, gu, [3], [64], BOUNDS)
