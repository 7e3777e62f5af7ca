"""Helpers every elastic layer kind shares: tensor-parallel reduce, per-segment outputs."""

from __future__ import annotations

from typing import Any

import torch
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)

from vllm_elastic.models.routing import Segment


def tp_rank_and_size() -> tuple[int, int]:
    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def row_parallel_out(
    y: torch.Tensor,
    bias: torch.Tensor | None,
    segments: list[Segment],
    widths: list[int],
    tp_size: int,
) -> list[torch.Tensor]:
    """All-reduce a row-parallel output (o, down), split it per segment at the segment's
    hidden width, and add the bias after the reduce when it was not in the GEMM."""
    if tp_size > 1:
        y = tensor_model_parallel_all_reduce(y)
    parts = []
    for part, h in zip(y.split([s.rows for s in segments]), widths):
        part = part[:, :h]
        if bias is not None and tp_size > 1:
            part = part + bias[:h]
        parts.append(part)
    return parts


def pack_linears(
    linears: dict[str, tuple[Any, torch.nn.Parameter, torch.nn.Parameter | None]], packing: str
) -> dict[str, str]:
    """Store each ``name: (NestedLinear, weight, bias)`` for the forward; a packed
    projection drops its plain parameter (as vLLM's CPU linears do). Returns the packing
    each got."""
    used = {}
    for name, (nl, weight, bias) in linears.items():
        used[name] = nl.pack(weight.data, None if bias is None else bias.data, packing)
        if used[name] != "views":
            weight.data = weight.data.new_empty(0)
    return used
