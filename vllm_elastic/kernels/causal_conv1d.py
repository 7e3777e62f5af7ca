"""Mamba-2's causal depthwise conv over a prefill batch in one ``F.conv1d`` (CPU).

vLLM's CPU ``causal_conv1d_fn`` loops over the sequences in Python (a cat, a conv, a
state copy and host syncs each): at batch 64 on ``hybrid_bench`` that loop was ~8% of a
``small`` forward. Here every sequence is laid out after its initial conv state in one
buffer, ``[init_0 | x_0 | init_1 | x_1 | ...]``, one conv runs over it, and each token's
output and each sequence's new state are gathered back: the same taps per output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_prefill(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor,
    query_start_loc: torch.Tensor,
    cache_indices: torch.Tensor,
    has_initial_state: torch.Tensor | None,
    silu: bool,
    pad_slot_id: int,
) -> torch.Tensor:
    """Conv (+ SiLU) of the prefill tokens ``x`` ``[tokens, dim]``, sequences cut at
    ``query_start_loc``; returns ``[tokens, dim]``. Sequence ``i`` starts from
    ``conv_states[cache_indices[i]]`` ``[dim, >= K-1]`` where ``has_initial_state[i]``
    (else zeros) and leaves its last ``K-1`` inputs there; a sequence whose slot is
    ``pad_slot_id`` or that has no tokens leaves its slot alone (as vLLM's kernels do)."""
    tokens, dim = x.shape
    s = weight.shape[1] - 1
    dev = x.device
    cu = query_start_loc.to(device=dev, dtype=torch.long)
    n = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    slots = cache_indices.to(device=dev, dtype=torch.long)
    taps = torch.arange(s, device=dev)
    shift = torch.arange(n, device=dev) * s  # sequence i sits i*s columns right of its tokens
    x_cols = torch.arange(tokens, device=dev) + s
    x_cols += torch.repeat_interleave(shift, lens, output_size=tokens)
    init_cols = (cu[:-1] + shift)[:, None] + taps  # [n, s]
    last_cols = (cu[1:] + shift)[:, None] + taps  # the last s columns of each segment

    live = slots != pad_slot_id
    has_init = live & (False if has_initial_state is None else has_initial_state.to(dev))
    init = conv_states[torch.where(live, slots, 0)][..., :s].to(weight.dtype)
    init = torch.where(has_init[:, None, None], init, 0)  # garbage of unused slots too

    buf = weight.new_empty(dim, tokens + n * s)
    buf.index_copy_(1, init_cols.flatten(), init.permute(1, 0, 2).reshape(dim, n * s))
    buf.index_copy_(1, x_cols, x.t().to(weight.dtype))
    y = F.conv1d(buf[None], weight[:, None, :], bias, groups=dim)[0]
    out = y.t().index_select(0, x_cols - s)
    if silu:
        F.silu(out, inplace=True)

    keep = live & (lens > 0)
    if bool(keep.any()):
        new = buf[:, last_cols[keep].flatten()].view(dim, -1, s).permute(1, 0, 2)
        conv_states[slots[keep], :, :s] = new.to(conv_states.dtype)
    return out.to(x.dtype)
