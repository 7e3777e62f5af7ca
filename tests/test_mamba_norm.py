"""The fused gated RMSNorm of an elastic Mamba-2 layer (``kernels/mamba_norm.cpp``) against
the sliced model's norm written out per group: rows of several budgets, gathered in any
order, each normalised over its own budget's heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vllm_elastic.kernels import build, mamba_norm

pytestmark = pytest.mark.skipif(
    build.unavailable_reason() is not None, reason="the CPU kernels do not run here"
)


@pytest.fixture(autouse=True, scope="module")
def _kernels():
    build.load()


G, P, N_STATE = 3, 16, 8
BC = 2 * G * N_STATE


def _reference(y, z, weight, heads, eps):
    """One token: heads ``j = i*G + g`` (rank-major) of group ``g`` normalised together."""
    v = y[:heads] * F.silu(z[:heads])
    out = torch.empty(heads, P)
    for g in range(G):
        mine = torch.arange(g, heads, G)
        rms = torch.sqrt(v[mine].double().pow(2).mean() + eps).float()
        out[mine] = v[mine] / rms
    return out.reshape(-1) * weight[: heads * P]


def test_rows_of_several_budgets_in_any_order():
    torch.manual_seed(0)
    tokens, heads = 11, 12
    proj = torch.randn(tokens, BC + heads * (2 * P + 1))
    y = torch.randn(tokens, heads, P)
    z = proj[:, BC:].view(tokens, heads, 2 * P + 1)[:, :, P + 1 :]
    weight = torch.randn(heads * P)
    rows = torch.tensor([4, 0, 9, 2, 7, 1, 10, 3])  # three segments: 3, 4 and 1 rows
    seg_rows, seg_heads = [3, 4, 1], [12, 6, 9]
    out = torch.full((8, heads * P), float("nan"))
    mamba_norm.gated_norm(out, y, proj, weight, rows, seg_rows, seg_heads, BC, G, 1e-5)
    r = 0
    for n, h in zip(seg_rows, seg_heads):
        for _ in range(n):
            t = int(rows[r])
            want = _reference(y[t], z[t], weight, h, 1e-5)
            torch.testing.assert_close(out[r, : h * P], want, rtol=1e-5, atol=1e-5)
            assert out[r, h * P :].isnan().all(), "columns past the row's heads were written"
            r += 1


def test_bad_calls_are_refused():
    proj, y, weight = torch.randn(4, BC + 6 * (2 * P + 1)), torch.randn(4, 6, P), torch.randn(6 * P)
    out = torch.empty(4, 6 * P)
    with pytest.raises(RuntimeError, match="bad head count"):  # not a multiple of G
        mamba_norm.gated_norm(out, y, proj, weight, None, [4], [4], BC, G, 1e-5)
    with pytest.raises(RuntimeError, match="out of range"):
        rows = torch.tensor([0, 1, 2, 4])
        mamba_norm.gated_norm(out, y, proj, weight, rows, [4], [6], BC, G, 1e-5)
    with pytest.raises(RuntimeError, match="do not add up"):
        mamba_norm.gated_norm(out, y, proj, weight, None, [3], [6], BC, G, 1e-5)
