"""Slicing one budget out of an elastic checkpoint as a standalone plain checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from vllm_elastic.checkpoint.io import (
    LazyTensors,
    copy_side_files,
    load_elastic_config,
    save_tensors,
)
from vllm_elastic.errors import ElasticConfigError
from vllm_elastic.spec.budgets import Budget

# keys of an elastic config that a plain one must not carry
_ELASTIC_ONLY = ("elastic", "model_type", "architectures", "transformers_version")


def slice_state_dict(
    state: Mapping[str, torch.Tensor], config: Any, budget: Budget
) -> dict[str, torch.Tensor]:
    """The tensors of ``budget`` as a standalone model, by the family's slice rules.

    Kept layers are renumbered ``0..n-1``. A standalone config has one size per axis, so
    per-layer sizes (MLP, expert widths) are zero-padded to the widest kept layer: padded
    rows and columns contribute ``act(0) * 0 = 0`` and outputs are identical.
    """
    spec = config.elastic_spec
    out = {}
    for dst, src, tensor, ctx in config.family.slices.entries(config, spec.parent, budget):
        if src not in state:
            raise ElasticConfigError(f"checkpoint: missing tensor {src!r}")
        out[dst] = tensor.take(state[src], ctx, padded=True).contiguous().clone()
    return out


def plain_config(config: Any, budget: Budget) -> PreTrainedConfig:
    """The stock config of ``budget`` (``LlamaConfig``, ``NemotronHConfig``, ...)."""
    family = config.family
    fields = config.to_dict()
    for key in _ELASTIC_ONLY:
        fields.pop(key, None)
    fields.update(family.plain_fields(config, budget), architectures=[family.plain_arch])
    try:
        return CONFIG_MAPPING[family.plain_model_type](**fields)
    # e.g. LlamaConfig: hidden_size % num_attention_heads != 0 (transformers raises
    # huggingface_hub's StrictDataclassClassValidationError, not a ValueError)
    except (ValueError, TypeError, StrictDataclassError) as err:
        raise ElasticConfigError(
            f"budget {budget.name!r}: transformers rejects its standalone {family.plain_arch} "
            f"config ({err}); stock transformers and vLLM could not load the sliced "
            "checkpoint. The elastic engine serves this budget as it is."
        ) from err


def slice_checkpoint(ckpt_dir: str | Path, budget_name: str, out_dir: str | Path) -> Path:
    """Write budget ``budget_name`` of an elastic checkpoint as a standalone plain model
    that stock transformers and stock vLLM load unchanged (tokenizer files copied).

    Raises UnknownBudgetError (an ElasticConfigError and KeyError) for an unknown budget,
    before anything is written.
    """
    ckpt, out = Path(ckpt_dir), Path(out_dir)
    config = load_elastic_config(ckpt)
    budget = config.elastic_spec.get(budget_name)
    plain = plain_config(config, budget)  # raises before anything is written
    tensors = slice_state_dict(LazyTensors(ckpt), config, budget)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, out)
    plain.save_pretrained(out)
    copy_side_files(ckpt, out)
    return out
