"""Call the elastic gated MLP's fused activation (``silu_mul.cpp``; built by
``kernels/build.py``).

One call computes ``SiLU(gate) * up`` for the rows of every budget of a forward from the
band-major gate_up output, where the torch path runs two elementwise ops per budget and
band. The eager forward (a mixed batch) uses it wherever the ``blocked`` packing runs
(the kernels are built there); a compiled graph fuses the torch ops itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def silu_mul_bands(
    act: torch.Tensor, gu: torch.Tensor, seg_rows: Sequence[int], seg_inter: Sequence[int],
    bounds: Sequence[int],
) -> torch.Tensor:  # fmt: skip
    """Fill and return ``act``: row ``r`` of segment ``s`` (``seg_rows`` rows each, in
    order) gets ``SiLU(gate) * up`` over its first ``seg_inter[s]`` channels; ``gu``'s
    rows are band-major over ``bounds`` (band ``[a, b)``: ``gate[a:b]`` then ``up[a:b]``)."""
    torch.ops.vllm_elastic.silu_mul_bands(act, gu, list(seg_rows), list(seg_inter), list(bounds))
    return act
