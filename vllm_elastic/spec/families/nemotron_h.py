"""Elastic NemotronH (Star Elastic / Nemotron Elastic): Mamba-2, attention, MLP and MoE.

Layer kinds follow ``hybrid_override_pattern``: ``M`` Mamba-2, ``*`` attention (no
RoPE), ``-`` relu2 MLP, ``E`` MoE (sigmoid router with ``e_score_correction_bias``,
relu2 routed experts and one shared expert). Axes: hidden channels; attention KV and
query heads; Mamba heads (the same number kept in each of the parent's ``n_groups``
groups, a prefix within each group; B and C are per group and never sliced); MLP
channels; routed experts (the first ones; routing among them only), expert channels and
shared-expert channels; layers.
"""

from __future__ import annotations

from typing import Any

from transformers import NemotronHConfig

from vllm_elastic.errors import ElasticConfigError
from vllm_elastic.spec.budgets import Budget, ParentShape
from vllm_elastic.spec.families import ElasticConfigMixin, Family, register_family
from vllm_elastic.spec.slicing import Cat, Keep, SliceSpec, TensorSpec, Units

KINDS = ("M", "*", "-", "E")


class ElasticNemotronHConfig(ElasticConfigMixin, NemotronHConfig):
    """A NemotronH config with named nested budgets (``model_type: elastic_nemotron_h``)."""

    model_type = "elastic_nemotron_h"
    family_name = "nemotron_h"

    def __init__(self, elastic: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._set_elastic(elastic)


def pattern(config: Any) -> str:
    return config.hybrid_override_pattern


def parent_shape(config: Any) -> ParentShape:
    if getattr(config, "moe_latent_size", None):
        raise ElasticConfigError(
            "moe_latent_size: latent MoE projections are not supported by elastic NemotronH"
        )
    kinds = tuple(pattern(config))
    for field in ("intermediate_size", "moe_intermediate_size"):
        if not isinstance(getattr(config, field), int):
            raise ElasticConfigError(f"{field}: the parent must have one int")
    if config.mamba_num_heads % config.n_groups:
        raise ElasticConfigError(
            f"mamba_num_heads: the parent's {config.mamba_num_heads} heads do not split into "
            f"n_groups={config.n_groups} groups"
        )
    top_k, routing_groups = config.num_experts_per_tok, config.n_group
    low = max(top_k, 2 * routing_groups)
    return ParentShape(
        sizes={
            "hidden_size": config.hidden_size,
            "num_key_value_heads": config.num_key_value_heads,
            "num_attention_heads": config.num_attention_heads,
            "intermediate_size": config.intermediate_size,
            "mamba_num_heads": config.mamba_num_heads,
            "n_routed_experts": config.n_routed_experts,
            "moe_intermediate_size": config.moe_intermediate_size,
            "moe_shared_expert_intermediate_size": config.moe_shared_expert_intermediate_size,
        },
        layer_kinds=kinds,
        groups={"n_groups": config.n_groups},
        constraints={
            "n_routed_experts": (
                low,
                routing_groups,
                f"routed experts must be at least {low} (num_experts_per_tok={top_k}, two per "
                f"routing group) and a multiple of n_group={routing_groups}",
            )
        },
        tp_sharded=None,  # one rank (the elastic Mamba/MoE layers are not sharded)
    )


def vocab(c: Any) -> int:
    return c.vocab_size


def mamba_head_dim(c: Any) -> int:
    return c.mamba_head_dim


def bc(c: Any) -> int:
    return c.n_groups * c.ssm_state_size


H = Units("hidden_size")
Q = Units("num_attention_heads", lambda c: c.head_dim)
KV = Units("num_key_value_heads", lambda c: c.head_dim)
HEAD_CH = Units("mamba_num_heads", mamba_head_dim)  # a kept head's channels
HEADS = Units("mamba_num_heads")
IN_PROJ = Cat((HEAD_CH, HEAD_CH, Keep(bc), Keep(bc), HEADS))  # z, x, B, C, dt
CONV = Cat((HEAD_CH, Keep(bc), Keep(bc)))  # x, B, C
MLP = Units("intermediate_size")
EXPERTS = Units("n_routed_experts")
EXPERT_MLP = Units("moe_intermediate_size")
SHARED_MLP = Units("moe_shared_expert_intermediate_size")


def _use_bias(c: Any) -> bool:
    return bool(getattr(c, "use_bias", False))


def _conv_bias(c: Any) -> bool:
    return bool(getattr(c, "use_conv_bias", True))


def _mlp_bias(c: Any) -> bool:
    return bool(getattr(c, "mlp_bias", False))


NORM = TensorSpec("norm.weight", (H,))
LAYERS = {
    "M": (
        NORM,
        TensorSpec("mixer.in_proj.weight", (IN_PROJ, H)),
        TensorSpec("mixer.in_proj.bias", (IN_PROJ,), _use_bias),
        TensorSpec("mixer.conv1d.weight", (CONV, Keep(1), Keep(lambda c: c.conv_kernel))),
        TensorSpec("mixer.conv1d.bias", (CONV,), _conv_bias),
        TensorSpec("mixer.A_log", (HEADS,)),
        TensorSpec("mixer.D", (HEADS,)),
        TensorSpec("mixer.dt_bias", (HEADS,)),
        TensorSpec("mixer.norm.weight", (HEAD_CH,)),
        TensorSpec("mixer.out_proj.weight", (H, HEAD_CH)),
        TensorSpec("mixer.out_proj.bias", (H,), _use_bias),
    ),
    "*": (
        NORM,
        TensorSpec("mixer.q_proj.weight", (Q, H)),
        TensorSpec("mixer.k_proj.weight", (KV, H)),
        TensorSpec("mixer.v_proj.weight", (KV, H)),
        TensorSpec("mixer.o_proj.weight", (H, Q)),
    ),
    "-": (
        NORM,
        TensorSpec("mixer.up_proj.weight", (MLP, H)),
        TensorSpec("mixer.down_proj.weight", (H, MLP)),
        TensorSpec("mixer.up_proj.bias", (MLP,), _mlp_bias),
        TensorSpec("mixer.down_proj.bias", (H,), _mlp_bias),
    ),
    "E": (
        NORM,
        TensorSpec("mixer.gate.weight", (EXPERTS, H)),
        TensorSpec("mixer.gate.e_score_correction_bias", (EXPERTS,)),
        TensorSpec("mixer.experts.{e}.up_proj.weight", (EXPERT_MLP, H)),
        TensorSpec("mixer.experts.{e}.down_proj.weight", (H, EXPERT_MLP)),
        TensorSpec("mixer.shared_experts.up_proj.weight", (SHARED_MLP, H)),
        TensorSpec("mixer.shared_experts.down_proj.weight", (H, SHARED_MLP)),
    ),
}

SLICES = SliceSpec(
    layer_prefix="backbone.layers.{i}.",
    globals=(
        TensorSpec("backbone.embeddings.weight", (Keep(vocab), H)),
        TensorSpec("backbone.norm_f.weight", (H,)),
        TensorSpec("lm_head.weight", (Keep(vocab), H)),
    ),
    layers=LAYERS,
    experts_axis="n_routed_experts",
    active_experts=lambda c: c.num_experts_per_tok,
)


def _widest(config: Any, budget: Budget, field: str, kind: str) -> int:
    sizes = [
        budget.size(field, i) for i in budget.layers if config.hybrid_override_pattern[i] == kind
    ]
    return max(sizes, default=getattr(config, field))


def plain_fields(config: Any, budget: Budget) -> dict[str, Any]:
    kinds = [pattern(config)[i] for i in budget.layers]
    return {
        "hidden_size": budget.hidden_size,
        "num_attention_heads": budget.num_attention_heads,
        "num_key_value_heads": budget.num_key_value_heads,
        "head_dim": config.head_dim,
        "intermediate_size": _widest(config, budget, "intermediate_size", "-"),
        "mamba_num_heads": budget.size("mamba_num_heads"),
        "n_routed_experts": budget.size("n_routed_experts"),
        "moe_intermediate_size": _widest(config, budget, "moe_intermediate_size", "E"),
        "moe_shared_expert_intermediate_size": _widest(
            config, budget, "moe_shared_expert_intermediate_size", "E"
        ),
        "hybrid_override_pattern": "".join(kinds),
        "layers_block_type": None,
    }


def _a_log(shape: tuple[int, ...], gen: Any) -> Any:
    import torch

    return torch.log(1 + 15 * torch.rand(shape, generator=gen))


def _dt_bias(shape: tuple[int, ...], gen: Any) -> Any:
    import math

    import torch

    # softplus^-1 of a time step in [0.01, 0.1] (Mamba's initialisation)
    dt = torch.exp(
        torch.rand(shape, generator=gen) * (math.log(0.1) - math.log(0.01)) + math.log(0.01)
    )
    return dt + torch.log(-torch.expm1(-dt))


def _small(shape: tuple[int, ...], gen: Any) -> Any:
    import torch

    return 0.1 * torch.randn(shape, generator=gen)


def _conv(shape: tuple[int, ...], gen: Any) -> Any:
    import torch

    return torch.randn(shape, generator=gen) / shape[-1] ** 0.5


NEMOTRON_H = register_family(
    Family(
        name="nemotron_h",
        model_type="elastic_nemotron_h",
        config_cls=ElasticNemotronHConfig,
        elastic_arch="ElasticNemotronHForCausalLM",
        plain_arch="NemotronHForCausalLM",
        plain_model_type="nemotron_h",
        parent_shape=parent_shape,
        slices=SLICES,
        plain_fields=plain_fields,
        # vLLM does not clamp dt; transformers clamps it to time_step_min in prefills
        config_defaults={"time_step_min": 0.0, "tie_word_embeddings": False},
        init={
            "mixer.A_log": _a_log,
            "mixer.dt_bias": _dt_bias,
            "mixer.D": lambda shape, gen: 1.0 + _small(shape, gen),
            "mixer.conv1d.weight": _conv,
            "mixer.gate.e_score_correction_bias": _small,
        },
        embedding="backbone.embeddings.weight",
        model_module="vllm_elastic.models.nemotron_h",
    )
)
