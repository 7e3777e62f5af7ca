"""Deterministic random elastic checkpoints (tests, demos, benchmarks) and their presets."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from vllm_elastic.checkpoint.io import save_tensors
from vllm_elastic.checkpoint.tokenizer import (
    SPECIAL_TOKENS,
    build_tokenizer,
    special_token_ids,
    tokenizer_vocab_size,
)
from vllm_elastic.spec.axes import AXES, EXPERTS, MAMBA_HEADS
from vllm_elastic.spec.families import Family, family_named

_HYBRID_SHAPE: dict[str, Any] = {
    "family": "nemotron_h",
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 256,
    "mamba_num_heads": 8,
    "mamba_head_dim": 16,
    "n_groups": 2,
    "ssm_state_size": 16,
    "conv_kernel": 4,
    "chunk_size": 32,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "moe_shared_expert_intermediate_size": 96,
    "routed_scaling_factor": 2.5,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
}

# Shapes (and budgets) of the random checkpoints: keyword arguments of
# build_random_checkpoint (parameter fractions: ``vllm-elastic inspect``).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "family": "llama",
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "intermediate_size": 256,
        "budgets": [
            {"name": "full"},
            {
                "name": "half",
                "hidden_size": 64,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "intermediate_size": 128,
                "layers": [0, 1, 3],
            },
        ],
    },
    "small": {
        "family": "llama",
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "intermediate_size": 768,
        "budgets": [
            {"name": "full"},
            {
                "name": "medium",
                "hidden_size": 192,
                "num_attention_heads": 6,
                "num_key_value_heads": 3,
                "intermediate_size": 512,
            },
            {
                "name": "small",
                "hidden_size": 128,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "intermediate_size": [384, 256, 384, 256],
                "layers": [0, 2, 3],
            },
        ],
    },
    "bench": {
        "family": "llama",
        "hidden_size": 1024,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "intermediate_size": 4096,
        "budgets": [
            {"name": "full"},
            {
                "name": "large",
                "hidden_size": 768,
                "num_attention_heads": 12,
                "num_key_value_heads": 3,
                "intermediate_size": 4032,
            },
            {
                "name": "small",
                "hidden_size": 640,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
                "intermediate_size": 2688,
            },
        ],
    },
    # Star Elastic's shape in miniature: every NemotronH layer kind, every axis cut
    "hybrid": {
        **_HYBRID_SHAPE,
        "hybrid_override_pattern": "M*EM-E",
        "budgets": [
            {"name": "full"},
            {
                "name": "medium",
                "hidden_size": 96,
                "mamba_num_heads": 6,
                "n_routed_experts": 6,
                "moe_intermediate_size": 48,
                "moe_shared_expert_intermediate_size": 64,
                "intermediate_size": 192,
            },
            {
                "name": "small",
                "hidden_size": 64,
                "num_key_value_heads": 1,
                "num_attention_heads": 2,
                "mamba_num_heads": 4,
                "n_routed_experts": 4,
                "moe_intermediate_size": 32,
                "moe_shared_expert_intermediate_size": 48,
                "intermediate_size": 128,
                "layers": [0, 1, 2, 3, 5],
            },
        ],
    },
    # hybrid layers vLLM's CPU build runs stock (no MoE): the NemotronH benchmarks
    "hybrid_quick": {
        **_HYBRID_SHAPE,
        "hybrid_override_pattern": "M*M-",
        "budgets": [
            {"name": "full"},
            {"name": "medium", "hidden_size": 96, "mamba_num_heads": 6, "intermediate_size": 192},
            {
                "name": "small",
                "hidden_size": 64,
                "num_key_value_heads": 1,
                "num_attention_heads": 2,
                "mamba_num_heads": 4,
                "intermediate_size": 128,
            },
        ],
    },
    "hybrid_bench": {
        **_HYBRID_SHAPE,
        "hybrid_override_pattern": "M-M*M-M-",
        "hidden_size": 1024,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "intermediate_size": 3072,
        "mamba_num_heads": 32,
        "mamba_head_dim": 32,
        "n_groups": 4,
        "ssm_state_size": 64,
        "chunk_size": 128,
        "budgets": [
            {"name": "full"},
            {
                "name": "large",
                "hidden_size": 768,
                "num_attention_heads": 12,
                "num_key_value_heads": 3,
                "mamba_num_heads": 24,
                "intermediate_size": 2304,
            },
            {
                "name": "small",
                "hidden_size": 512,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
                "mamba_num_heads": 16,
                "intermediate_size": 1536,
            },
        ],
    },
}
# the width axes of a preset and its budgets: every elastic axis but the expert count, and
# the Mamba groups (heads per group stay); head and state sizes are per head
_WIDTHS = (
    *(field for field in AXES if field != EXPERTS.field),
    MAMBA_HEADS.group_field,
)


def _widened(preset: Mapping[str, Any], factor: int) -> dict[str, Any]:
    """``preset`` with every width, its budgets' too, times ``factor``: depth, head and
    state sizes and the budgets' parameter fractions stay as they are."""

    def scale(fields: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v * factor if k in _WIDTHS else v for k, v in fields.items()}

    return {**scale(preset), "budgets": [scale(b) for b in preset["budgets"]]}


# hybrid_bench at twice and four times the width (146M, 583M): how budget control scales
# with model size
PRESETS["hybrid_bench_x2"] = _widened(PRESETS["hybrid_bench"], 2)
PRESETS["hybrid_bench_x4"] = _widened(PRESETS["hybrid_bench"], 4)
DEFAULT_PRESET = "small"


def _default_init(name: str, shape: tuple[int, ...], gen: torch.Generator, family: Family,
                  tied: bool) -> torch.Tensor:  # fmt: skip
    """A float32 tensor whose scale keeps a random model's activations O(1).

    Matrices ~ N(0, 1/fan_in), so every projection (and the lm_head) preserves the
    activation scale; norm weights ~ 1 + N(0, 0.1); biases ~ N(0, 0.1). Embeddings
    ~ N(0, 1), or N(0, 1/hidden) when tied to the lm_head: otherwise the residual stream
    is dominated by the input token's own embedding and greedy decoding just repeats the
    last prompt token. Logits then spread about +-1, so greedy output depends on the prompt.
    """
    for suffix, draw in family.init.items():
        if name.endswith(suffix):
            return draw(shape, gen).to(torch.float32)
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name == family.embedding:
        return noise / math.sqrt(shape[1]) if tied else noise
    if "norm" in name:
        return 1.0 + 0.1 * noise
    if name.endswith(".bias"):
        return 0.1 * noise
    return noise / math.sqrt(math.prod(shape[1:]))


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype: {dtype!r} is not a floating-point torch dtype")
    return resolved


def build_config(family: str, budgets: Sequence[Mapping[str, Any]], default_budget: str | None,
                 dtype: torch.dtype, fields: Mapping[str, Any]) -> Any:  # fmt: skip
    """The elastic config of a random checkpoint (validates the budgets)."""
    fam = family_named(family)
    elastic: dict[str, Any] = {"budgets": copy.deepcopy([dict(b) for b in budgets])}
    if default_budget is not None:
        elastic["default_budget"] = default_budget
    special = special_token_ids()
    kwargs = {
        "max_position_embeddings": 2048,
        **fam.config_defaults,
        **fields,
        "architectures": [fam.elastic_arch],
        "elastic": elastic,
        "vocab_size": tokenizer_vocab_size(),
        "bos_token_id": special["bos"],
        "eos_token_id": special["eos"],
        "pad_token_id": special["pad"],
        "dtype": str(dtype).removeprefix("torch."),
    }
    return fam.config_cls(**kwargs)


def build_random_checkpoint(
    out_dir: str | Path,
    *,
    family: str = "llama",
    budgets: Sequence[Mapping[str, Any]],
    default_budget: str | None = None,
    dtype: str = "float32",
    seed: int = 0,
    **fields: Any,
) -> Path:
    """Write a deterministic random elastic checkpoint (config, weights, tokenizer).

    ``fields`` are the parent config's (``hidden_size``, ``num_hidden_layers``, ...,
    ``hybrid_override_pattern`` for NemotronH). The same arguments always give
    byte-identical ``model.safetensors``. Raises ElasticConfigError (naming the field)
    when the budgets do not fit the parent, before anything is written.
    """
    out = Path(out_dir)
    torch_dtype = _resolve_dtype(dtype)
    config = build_config(family, budgets, default_budget, torch_dtype, fields)
    fam = config.family
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    special = special_token_ids()
    if len(tokenizer) != config.vocab_size or tokenizer.eos_token_id != special["eos"]:
        raise RuntimeError(f"tokenizer written to {out} does not match tokenizer_vocab_size()")
    spec = config.elastic_spec
    tied = fam.tied(config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: _default_init(name, shape, gen, fam, tied).to(torch_dtype)
        for name, shape in fam.slices.shapes(config, spec.parent, spec.full).items()
    }
    # Shrink the special tokens' output rows (ids 0..8): their logits are then ~0 while
    # the words' spread about +-1, so a random model's greedy decoding never emits
    # </s>, <think>, ...: generations run to max_tokens.
    tensors[fam.embedding if tied else fam.lm_head][: len(SPECIAL_TOKENS)] *= 0.01
    save_tensors(tensors, out)
    config.save_pretrained(out)
    return out
