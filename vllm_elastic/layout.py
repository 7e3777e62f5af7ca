"""How the parent's weights are laid out in memory, per tensor-parallel rank.

Under tensor parallelism a column-parallel layer holds a contiguous block of output rows
per rank, so a budget's global prefix (the first ``k`` heads or channels) would sit on
rank 0 only. Instead we deal heads and channels round-robin: global KV head ``g`` goes to
rank ``g % tp`` (local index ``g // tp``), its query-head group follows it, and MLP channel
``c`` goes to rank ``c % tp``. Then a budget's global prefix of ``k`` (a multiple of
``tp``) is the local prefix ``k // tp`` on every rank, and every budget slice is a view.

Within a rank:

* ``qkv`` rows are ``[q | k | v]``; q rows are grouped by local KV head (the attention
  kernel's order: local query head ``j*G + i`` uses local KV head ``j``).
* ``gate_up`` rows interleave gate and up per channel (``2c`` = gate, ``2c+1`` = up), so a
  budget's first ``I`` channels are the first ``2I`` rows: one GEMM per budget.
"""

from __future__ import annotations

import torch


def kv_heads_of_rank(total_kv_heads: int, tp_size: int, tp_rank: int) -> list[int]:
    """Global KV-head indices held by ``tp_rank``, in local order."""
    return list(range(tp_rank, total_kv_heads, tp_size))


def channels_of_rank(total: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Global MLP-channel indices held by ``tp_rank``, in local order."""
    return torch.arange(tp_rank, total, tp_size)


def q_rows_of_rank(
    total_q_heads: int, total_kv_heads: int, head_dim: int, tp_size: int, tp_rank: int
) -> torch.Tensor:
    """Global q_proj rows held by ``tp_rank``: its KV heads' query groups, in local order."""
    group = total_q_heads // total_kv_heads
    heads = [
        g * group + i
        for g in kv_heads_of_rank(total_kv_heads, tp_size, tp_rank)
        for i in range(group)
    ]
    return _head_rows(heads, head_dim)


def kv_rows_of_rank(total_kv_heads: int, head_dim: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Global k_proj/v_proj rows held by ``tp_rank``, in local order."""
    return _head_rows(kv_heads_of_rank(total_kv_heads, tp_size, tp_rank), head_dim)


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    base = torch.tensor(heads, dtype=torch.long).unsqueeze(1) * head_dim
    return (base + torch.arange(head_dim)).reshape(-1)
