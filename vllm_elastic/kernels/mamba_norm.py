"""Call the elastic Mamba-2 layer's fused gated RMSNorm (``mamba_norm.cpp``; built by
``kernels/build.py``).

One call normalises the rows of every budget of a forward: each output row gathers its
token's scan output and gate (``z``, read in place from the in_proj output), computes
``y * silu(z)``, normalises it per group over its budget's heads and scales it by the
norm weight, so a mixed batch needs no per-budget gather, stack or chain of elementwise
ops. Runs where the Mamba decode kernel runs (x86-64 CPU, fp32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gated_norm(
    out: torch.Tensor, y: torch.Tensor, proj: torch.Tensor, weight: torch.Tensor,
    rows: torch.Tensor | None, seg_rows: Sequence[int], seg_heads: Sequence[int],
    bc: int, groups: int, eps: float,
) -> torch.Tensor:  # fmt: skip
    """Fill and return ``out`` ``[R, >= max(heads) * P]``: row ``r`` of segment ``s``
    (``seg_rows`` rows of ``seg_heads`` heads each, in order) is the gated norm of token
    ``rows[r]`` (``r`` when None) over its first ``seg_heads[s]`` heads. ``y`` is the
    scan output ``[T, H, P]``, ``proj`` the in_proj rows ``[T, >= bc + H*(2P+1)]``."""
    torch.ops.vllm_elastic.mamba_gated_norm(
        out, y, proj, weight, rows, list(seg_rows), list(seg_heads), bc, groups, eps
    )
    return out
