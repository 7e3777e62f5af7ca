"""Call the stacked pre-norm (``seg_norm.cpp``; built by ``kernels/build.py``).

One call runs the fused add-RMSNorm of every budget of a mixed batch whose rows are
stacked in one buffer (``models/routing.py``'s ``Stack``), each over its own width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, seg_rows: Sequence[int],
    seg_width: Sequence[int], eps: float,
) -> None:  # fmt: skip
    """In place, for the rows of segment ``s`` (``seg_rows`` rows each, in order) over
    their first ``seg_width[s]`` columns: ``residual += x``; ``x = rms_norm(residual) *
    weight``."""
    torch.ops.vllm_elastic.segments_add_rms_norm(
        x, residual, weight, list(seg_rows), list(seg_width), eps
    )
