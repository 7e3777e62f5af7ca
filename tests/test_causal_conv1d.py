"""The one-call prefill conv (``kernels/causal_conv1d.py``) against vLLM's CPU
``causal_conv1d_fn``, which loops over sequences: outputs and the conv state each
sequence leaves, with and without initial states, empty sequences and padded slots."""

from __future__ import annotations

import itertools

import pytest
import torch

from vllm_elastic.kernels.causal_conv1d import causal_conv1d_prefill

PAD = -1


@pytest.mark.parametrize(
    "lens, dim, kernel",
    [([5, 1, 17, 3], 24, 4), ([1], 8, 4), ([40, 0, 7], 33, 3), ([2] * 64, 160, 4)],
)
def test_one_call_equals_vllms_loop_over_sequences(lens, dim, kernel):
    from vllm.model_executor.layers.mamba.ops.cpu.causal_conv1d import causal_conv1d_fn_cpu

    gen = torch.Generator().manual_seed(len(lens) * dim)
    n, tokens = len(lens), sum(lens)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    x = torch.randn(tokens, dim, generator=gen)
    weight, bias = torch.randn(dim, kernel, generator=gen), torch.randn(dim, generator=gen)
    slots = torch.randperm(n + 3, generator=gen)[:n].int()
    if n > 2:
        slots[1] = PAD
    has_initial = torch.arange(n) % 2 == 0
    states = torch.randn(n + 3, dim, kernel - 1, generator=gen)
    want_states, got_states = states.clone(), states.clone()

    want = causal_conv1d_fn_cpu(
        x.t(), weight, bias, want_states, cu, slots, has_initial, "silu", pad_slot_id=PAD
    ).t()
    got = causal_conv1d_prefill(x, weight, bias, got_states, cu, slots, has_initial, True, PAD)

    live = torch.repeat_interleave(slots != PAD, torch.tensor(lens))  # vLLM leaves pads unset
    torch.testing.assert_close(got[live], want[live], rtol=1e-6, atol=1e-6)
    assert torch.equal(got_states, want_states)  # written slots, and the others untouched
