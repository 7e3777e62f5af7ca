"""Logits of hidden states narrower than the lm_head (a budget's first channels).

``LogitsProcessor.forward`` with the lm_head's first ``width`` columns: the same head
dtype, tensor-parallel gather (vLLM's private ``_gather_logits``), vocabulary cut,
soft cap and scale. Only for an unquantized lm_head.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vllm_elastic.errors import ElasticStateError


def sliced_logits(
    processor: Any, lm_head: Any, hidden: torch.Tensor, width: int
) -> torch.Tensor | None:
    """Logits of ``hidden[:, :width]`` against ``lm_head.weight[:, :width]``."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    if not isinstance(lm_head.quant_method, UnquantizedEmbeddingMethod):
        raise ElasticStateError(
            "elastic budgets narrower than the parent need an unquantized lm_head"
        )
    dtype = processor.head_dtype or hidden.dtype
    logits = F.linear(hidden[:, :width].to(dtype), lm_head.weight[:, :width].to(dtype))
    if lm_head.tp_size > 1:
        logits = processor._gather_logits(logits)
        if logits is None:
            return None
    logits = logits[..., : processor.org_vocab_size]
    if processor.soft_cap is not None:
        logits = torch.tanh(logits / processor.soft_cap) * processor.soft_cap
    if processor.scale != 1.0:
        logits = logits * processor.scale
    return logits
