"""Elastic Llama and Qwen3: attention + gated SiLU MLP decoder layers.

Axes: hidden channels, KV heads, query heads (within each kept KV group), MLP channels
(one value or one per layer), layers. Qwen3 adds per-head q/k RMSNorms (not sliced).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from transformers import LlamaConfig, Qwen3Config

from vllm_elastic.spec.budgets import Budget, ParentShape
from vllm_elastic.spec.families import ElasticConfigMixin, Family, register_family
from vllm_elastic.spec.slicing import Keep, SliceSpec, TensorSpec, Units

LAYER_KIND = "decoder"


class ElasticLlamaConfig(ElasticConfigMixin, LlamaConfig):
    """A Llama config with named nested budgets (``model_type: elastic_llama``)."""

    model_type = "elastic_llama"
    family_name = "llama"

    def __init__(self, elastic: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._set_elastic(elastic)


class ElasticQwen3Config(ElasticConfigMixin, Qwen3Config):
    """A Qwen3 config with named nested budgets (``model_type: elastic_qwen3``)."""

    model_type = "elastic_qwen3"
    family_name = "qwen3"

    def __init__(self, elastic: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._set_elastic(elastic)


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def vocab(config: Any) -> int:
    return config.vocab_size


def parent_shape(config: Any) -> ParentShape:
    from vllm_elastic.errors import ElasticConfigError

    if not isinstance(config.intermediate_size, int):
        raise ElasticConfigError(
            f"intermediate_size: the parent must have one int, got {config.intermediate_size!r}"
        )
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if config.num_attention_heads % kv:
        raise ElasticConfigError(
            f"num_attention_heads: the parent's {config.num_attention_heads} query heads are "
            f"not a multiple of its {kv} KV heads"
        )
    sizes = {
        "hidden_size": config.hidden_size,
        "num_key_value_heads": kv,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
    }
    return ParentShape(
        sizes=sizes,
        layer_kinds=(LAYER_KIND,) * config.num_hidden_layers,
        tp_sharded=("num_key_value_heads", "intermediate_size"),
    )


H = Units("hidden_size")
Q = Units("num_attention_heads", head_dim)
KV = Units("num_key_value_heads", head_dim)
MLP = Units("intermediate_size")


def _attention_bias(c: Any) -> bool:
    return bool(getattr(c, "attention_bias", False))


def _mlp_bias(c: Any) -> bool:
    return bool(getattr(c, "mlp_bias", False))


def _qk_norm(c: Any) -> bool:
    return c.model_type.endswith("qwen3")


LAYER_TENSORS = (
    TensorSpec("self_attn.q_proj.weight", (Q, H)),
    TensorSpec("self_attn.k_proj.weight", (KV, H)),
    TensorSpec("self_attn.v_proj.weight", (KV, H)),
    TensorSpec("self_attn.o_proj.weight", (H, Q)),
    TensorSpec("self_attn.q_proj.bias", (Q,), _attention_bias),
    TensorSpec("self_attn.k_proj.bias", (KV,), _attention_bias),
    TensorSpec("self_attn.v_proj.bias", (KV,), _attention_bias),
    TensorSpec("self_attn.o_proj.bias", (H,), _attention_bias),
    TensorSpec("self_attn.q_norm.weight", (Keep(head_dim),), _qk_norm),
    TensorSpec("self_attn.k_norm.weight", (Keep(head_dim),), _qk_norm),
    TensorSpec("mlp.gate_proj.weight", (MLP, H)),
    TensorSpec("mlp.up_proj.weight", (MLP, H)),
    TensorSpec("mlp.down_proj.weight", (H, MLP)),
    TensorSpec("mlp.gate_proj.bias", (MLP,), _mlp_bias),
    TensorSpec("mlp.up_proj.bias", (MLP,), _mlp_bias),
    TensorSpec("mlp.down_proj.bias", (H,), _mlp_bias),
    TensorSpec("input_layernorm.weight", (H,)),
    TensorSpec("post_attention_layernorm.weight", (H,)),
)

SLICES = SliceSpec(
    layer_prefix="model.layers.{i}.",
    globals=(
        TensorSpec("model.embed_tokens.weight", (Keep(vocab), H)),
        TensorSpec("model.norm.weight", (H,)),
        TensorSpec("lm_head.weight", (Keep(vocab), H), lambda c: not c.tie_word_embeddings),
    ),
    layers={LAYER_KIND: LAYER_TENSORS},
)


def plain_fields(config: Any, budget: Budget) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "hidden_size": budget.hidden_size,
        "num_attention_heads": budget.num_attention_heads,
        "num_key_value_heads": budget.num_key_value_heads,
        "head_dim": head_dim(config),
        # one size per config: the widest kept layer (narrower ones are zero-padded)
        "intermediate_size": max(budget.size("intermediate_size", i) for i in budget.layers),
        "num_hidden_layers": len(budget.layers),
    }
    if getattr(config, "layer_types", None) is not None:
        fields["layer_types"] = [config.layer_types[i] for i in budget.layers]
    return fields


LLAMA = register_family(
    Family(
        name="llama",
        model_type="elastic_llama",
        config_cls=ElasticLlamaConfig,
        elastic_arch="ElasticLlamaForCausalLM",
        plain_arch="LlamaForCausalLM",
        plain_model_type="llama",
        parent_shape=parent_shape,
        slices=SLICES,
        plain_fields=plain_fields,
        model_module="vllm_elastic.models.llama",
    )
)
QWEN3 = register_family(
    replace(
        LLAMA,
        name="qwen3",
        model_type="elastic_qwen3",
        config_cls=ElasticQwen3Config,
        elastic_arch="ElasticQwen3ForCausalLM",
        plain_arch="Qwen3ForCausalLM",
        plain_model_type="qwen3",
    )
)
