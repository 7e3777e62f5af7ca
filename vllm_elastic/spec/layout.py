"""How the parent's weights are laid out in memory, per tensor-parallel rank.

Under tensor parallelism a column-parallel layer holds a contiguous block of output rows
per rank, so a budget's global prefix (the first ``k`` heads or channels) would sit on
rank 0 only. Instead we deal heads and channels round-robin: global KV head ``g`` goes to
rank ``g % tp`` (local index ``g // tp``), its query-head group follows it, and MLP channel
``c`` goes to rank ``c % tp``. Then a budget's global prefix of ``k`` (a multiple of
``tp``) is the local prefix ``k // tp`` on every rank, and every budget slice is a view.

Within a rank:

* ``qkv`` rows are ``[k | v | q]``; q rows are grouped by local KV head (the attention
  kernel's order: local query head ``j*G + i`` uses local KV head ``j``). K/V are computed
  at full width for every budget, so a budget's rows are a prefix: all K/V, then the
  q rows of its kept KV groups.
* ``gate_up`` rows are band-major: the layer's distinct budget MLP widths
  ``I_1 < I_2 < ...`` cut the channels into bands, and band ``[a, b)`` holds
  ``gate[a:b]`` then ``up[a:b]``. A budget's first ``I`` channels are the first ``2I``
  rows, and each band's gate and up halves are contiguous for the activation.
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


def gate_up_rows(bounds: list[int], inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of local gate and up channels ``0..inter-1`` in the band-major gate_up weight.

    ``bounds`` are the layer's distinct budget MLP widths (ascending, the last = ``inter``).
    Channel ``c`` of band ``[a, b)`` has its gate at row ``a + c`` and its up at ``b + c``.
    """
    gate = torch.empty(inter, dtype=torch.long)
    up = torch.empty(inter, dtype=torch.long)
    a = 0
    for b in bounds:
        c = torch.arange(a, b)
        gate[a:b] = a + c
        up[a:b] = b + c
        a = b
    return gate, up
