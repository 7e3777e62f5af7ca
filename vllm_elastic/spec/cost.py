"""What a budget costs per token, from its family's slice declaration.

* ``parameters`` / ``active_parameters``: of the budget's standalone model (active: the
  routed experts one token runs, ``num_experts_per_tok`` of the kept ones);
* ``matmul_flops_per_token``: 2 x the active parameters that take part in matmuls (all
  but the input embedding table; the lm_head counts); attention-score and scan FLOPs
  are not included;
* ``kv_bytes_per_token``: K and V of the kept attention layers, as the standalone model
  stores them;
* ``state_bytes_per_request``: the Mamba conv + SSM state of the kept Mamba layers;
* ``reuse_state_write_flops``: what a ``reuse`` request's thinking token spends beyond
  the standalone thinking model to write the answer budget's Mamba state.
"""

from __future__ import annotations

from typing import Any

from vllm_elastic.spec.budgets import Budget
from vllm_elastic.spec.slicing import Ctx
from vllm_elastic.spec.state import cover

ATTENTION_KINDS = ("decoder", "*")


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def budget_cost(config: Any, budget: Budget, itemsize: int = 4) -> dict[str, int]:
    spec = config.elastic_spec
    parent, slices = spec.parent, config.family.slices
    kinds = [parent.layer_kinds[i] for i in budget.layers]
    active = slices.num_active_parameters(config, parent, budget)
    embed = 0 if config.family.tied(config) else config.vocab_size * budget.hidden_size
    attention_layers = sum(k in ATTENTION_KINDS for k in kinds)
    kv = 2 * attention_layers * budget.num_key_value_heads * _head_dim(config) * itemsize
    state = 0
    if "M" in kinds:
        heads = budget.size("mamba_num_heads")
        conv_dim = heads * config.mamba_head_dim + 2 * config.n_groups * config.ssm_state_size
        per_layer = conv_dim * (config.conv_kernel - 1) * itemsize
        per_layer += heads * config.mamba_head_dim * config.ssm_state_size * 4  # fp32 state
        state = per_layer * kinds.count("M")
    return {
        "parameters": slices.num_parameters(config, parent, budget),
        "active_parameters": active,
        "matmul_flops_per_token": 2 * (active - embed),
        "kv_bytes_per_token": kv,
        "state_bytes_per_request": state,
    }


def reuse_state_write_flops(config: Any, think: Budget, answer: Budget) -> int:
    """Matmul FLOPs per thinking token of a ``reuse`` request (think at ``think``, answer
    at ``answer``) beyond the standalone ``think`` model. In every Mamba layer its in_proj
    runs the rows of the covering budget (``spec/state.py``) at ``think``'s hidden width;
    the standalone model runs ``think``'s own rows in the layers it keeps and none in those
    it skips (the elastic layer writes state there too, for a larger budget to read).
    Rows are the family's declared in_proj slice. 0 without Mamba layers."""
    spec = config.elastic_spec
    parent = spec.parent
    if "M" not in parent.layer_kinds:
        return 0
    in_proj = next(
        t
        for t in config.family.slices.layer_tensors("M", config)
        if t.name == "mixer.in_proj.weight"
    )
    wide = spec.budgets[cover(spec, think.index, answer.index)]
    extra = 0
    for layer, kind in enumerate(parent.layer_kinds):
        if kind == "M":
            rows = in_proj.shape(Ctx(wide, parent, config, layer))[0]
            if think.keeps_layer(layer):
                rows -= in_proj.shape(Ctx(think, parent, config, layer))[0]
            extra += rows * think.hidden_size
    return 2 * extra
