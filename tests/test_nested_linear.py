"""NestedLinear on its own: every packing and the unassembled band output agree with
``x[:, :k] @ W[:n, :k].T`` per budget, for mixed runs in descending level order."""

from __future__ import annotations

import pytest
import torch

from vllm_elastic.kernels import nested_gemm
from vllm_elastic.models.layers.mlp import windows as _windows
from vllm_elastic.models.nested_linear import NestedLinear, onednn_available

POINTS = [(96, 48), (64, 32), (160, 80), (64, 32)]  # budget -> (n, k); budget 3 = budget 1
RUNS = [(2, 7), (0, 5), (1, 3), (3, 4)]  # descending levels: 2, 1, 0, 0


def _reference(weight, bias, x, runs):
    out, start = [], 0
    for b, m in runs:
        n, k = POINTS[b]
        out.append((x[start : start + m, :k] @ weight[:n, :k].T + bias[:n], n))
        start += m
    return out


def _linear(packing):
    if packing == "blocked" and nested_gemm.unavailable_reason():
        pytest.skip(nested_gemm.unavailable_reason())
    if packing not in ("views", "blocked") and not onednn_available():
        pytest.skip("vLLM built without oneDNN")
    torch.manual_seed(0)
    weight, bias = torch.randn(160, 80), torch.randn(160)
    nl = NestedLinear(POINTS)
    assert nl.pack(weight, bias, packing) == packing
    return nl, weight, bias, torch.randn(sum(m for _, m in RUNS), 80)


@pytest.mark.parametrize("packing", ["nested", "blocked", "per-budget", "views"])
@pytest.mark.parametrize("order", ["descending", "ascending"])
def test_each_run_gets_its_budgets_prefix(packing, order):
    nl, weight, bias, x = _linear(packing)
    runs = RUNS if order == "descending" else list(reversed(RUNS))
    y = nl(x, runs)
    start = 0
    for (want, n), (_, m) in zip(_reference(weight, bias, x, runs), runs):
        torch.testing.assert_close(y[start : start + m, :n], want, rtol=1e-5, atol=1e-4)
        start += m


@pytest.mark.parametrize("packing", ["nested", "blocked", "per-budget", "views"])
def test_narrow_is_a_larger_budgets_rows_at_a_smaller_input_width(packing):
    """``narrow(x, 2, 1)``: budget 2's 160 rows over budget 1's 32 input columns."""
    nl, weight, bias, x = _linear(packing)
    torch.testing.assert_close(
        nl.narrow(x, 2, 1), x[:, :32] @ weight[:, :32].T + bias, rtol=1e-5, atol=1e-4
    )


@pytest.fixture(params=["avx2", "avx512"])
def kernel_isa(request):
    """Run the test on one family of micro-kernels (the CPU's default restored after)."""
    if nested_gemm.unavailable_reason():
        pytest.skip(nested_gemm.unavailable_reason())
    nested_gemm.load()
    default = nested_gemm.isa()
    if request.param == "avx512" and default != "avx512":
        pytest.skip("this CPU has no AVX-512")
    nested_gemm.isa(request.param)
    yield request.param
    nested_gemm.isa(default)


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 24, 25, 250, 487])
def test_blocked_kernel_at_every_row_regime(rows, kernel_isa):
    """The nested GEMM's paths on both micro-kernel families: partial tiles (6 rows avx2,
    24 avx512), few rows (k unsliced, the next strip prefetched across the budget's gap),
    many rows (k in slices, rows in chunks of 240), an output width not a multiple of 16,
    a k not a multiple of 8 (the packing's scalar edge)."""
    torch.manual_seed(rows)
    weight, bias = torch.randn(200, 1100), torch.randn(200)
    points = [(40, 301), (200, 1100)]
    nl = NestedLinear(points)
    nl.pack(weight, bias, "blocked")
    x = torch.randn(rows, 1100)
    for budget, (n, k) in enumerate(points):
        torch.testing.assert_close(
            nl(x, [(budget, rows)])[:, :n],
            x[:, :k] @ weight[:n, :k].T + bias[:n],
            rtol=1e-5,
            atol=1e-3,
        )
    mixed = [(b, m) for b, m in [(1, rows // 3), (0, rows - rows // 3)] if m]  # one call
    y, start = nl(x, mixed), 0
    for budget, m in mixed:
        n, k = points[budget]
        torch.testing.assert_close(
            y[start : start + m, :n],
            x[start : start + m, :k] @ weight[:n, :k].T + bias[:n],
            rtol=1e-5,
            atol=1e-3,
        )
        start += m


def test_kernel_isa_choice_is_checked():
    if nested_gemm.unavailable_reason():
        pytest.skip(nested_gemm.unavailable_reason())
    nested_gemm.load()
    with pytest.raises(RuntimeError, match="'avx512', 'avx2' or ''"):
        nested_gemm.isa("sse")
    assert nested_gemm.isa() in ("avx2", "avx512")


def test_blocked_packing_refuses_what_the_kernel_cannot_run():
    from vllm_elastic.errors import ElasticConfigError

    assert "float32" in nested_gemm.unavailable_reason(torch.bfloat16)
    with pytest.raises(ElasticConfigError, match="'blocked' cannot run here"):
        NestedLinear([(16, 16)]).pack(torch.zeros(16, 16, dtype=torch.bfloat16), None, "blocked")


def test_blocks_are_the_output_unassembled():
    nl, weight, bias, x = _linear("nested")
    blocks = nl.blocks(x, RUNS)
    assert [(rows, n0, n) for rows, n0, n, _ in blocks] == [(19, 0, 64), (12, 64, 96), (7, 96, 160)]
    assembled = torch.full((x.shape[0], 160), float("nan"))
    for rows, n0, n, y in blocks:
        assembled[:rows, n0:n] = y
    start = 0
    for (want, n), (_, m) in zip(_reference(weight, bias, x, RUNS), RUNS):
        torch.testing.assert_close(assembled[start : start + m, :n], want, rtol=1e-5, atol=1e-4)
        start += m
    assert nl.blocks(x, list(reversed(RUNS))) is None  # ascending: no prefix structure


def test_windows_cover_the_runs_in_order():
    runs = [(2, 7), (0, 5), (1, 3)]
    windows = list(_windows(runs, 4))
    assert windows == [
        (0, [(2, 4)]),
        (4, [(2, 3), (0, 1)]),
        (8, [(0, 4)]),
        (12, [(1, 3)]),
    ]
    assert list(_windows(runs, 100)) == [(0, runs)]


def test_scratch_buffers_made_in_inference_mode_do_not_leak_out():
    """vLLM's forward runs under torch.inference_mode; a buffer made there may not be
    written outside it, so the two modes get separate buffers."""
    from vllm_elastic.models import scratch

    like = torch.zeros(1)
    with torch.inference_mode():
        inside = scratch.buffer("test.mode", 2, 3, like)
        inside.fill_(1.0)
    outside = scratch.buffer("test.mode", 2, 3, like)
    outside += 1.0  # would raise on an inference tensor
    assert not outside.is_inference() and inside.is_inference()
