"""Elastic NemotronH for vLLM: Mamba-2, attention, MLP and MoE layers by the config's
``hybrid_override_pattern``, the way vLLM's ``NemotronHModel`` builds them."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.interfaces import (
    HasInnerState,
    IsHybrid,
    SupportsMambaPrefixCaching,
)

from vllm_elastic.compat.mamba import hybrid_classmethods
from vllm_elastic.models.base import ElasticForCausalLM, kept_flags, layer_inputs
from vllm_elastic.models.budget_graphs import GraphKey
from vllm_elastic.models.layers.attention import ElasticAttention
from vllm_elastic.models.layers.mamba2 import ElasticMamba2
from vllm_elastic.models.layers.mlp import Relu2MLP
from vllm_elastic.models.layers.moe import ElasticMoE
from vllm_elastic.models.nested_linear import NestedLinear
from vllm_elastic.models.routing import Segment

# layers whose mixer writes state a larger budget reads (K/V, Mamba state): they run for
# segments whose budget skips them too
WRITES_STATE = ("M", "*")
_HYBRID = hybrid_classmethods()


class ElasticNemotronHLayer(nn.Module):
    """``hidden + mixer(norm(hidden))`` with the layer kind's elastic mixer."""

    def __init__(self, vllm_config: VllmConfig, spec: Any, layer: int, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.kind = spec.parent.layer_kinds[layer]
        self.eps = config.layer_norm_epsilon
        self.kept = kept_flags(spec, layer)
        self.norm = RMSNorm(spec.parent.sizes["hidden_size"], eps=self.eps)
        if self.kind == "M":
            self.mixer = ElasticMamba2(vllm_config, spec, layer, f"{prefix}.mixer")
        elif self.kind == "*":
            self.mixer = ElasticAttention(
                vllm_config, spec, layer, f"{prefix}.mixer", head_dim=config.head_dim,
                rope=False, qk_norm=False, bias=False, eps=self.eps,
            )  # fmt: skip
        elif self.kind == "-":
            self.mixer = Relu2MLP(vllm_config, spec, layer, bias=bool(config.mlp_bias))
        else:
            self.mixer = ElasticMoE(vllm_config, spec, layer)

    def forward(self, positions: torch.Tensor, segments: list[Segment], num_tokens: int) -> None:
        state = self.kind in WRITES_STATE
        xs = layer_inputs(self.norm.weight, segments, self.kept, self.eps, state)
        if state:
            outs = self.mixer(positions, xs, segments, num_tokens)
        else:
            kept = [s for s in segments if self.kept[s.budget]]
            if not kept:
                return
            done = iter(self.mixer([x for x in xs if x is not None], kept))
            outs = [next(done) if self.kept[s.budget] else None for s in segments]
        for seg, out in zip(segments, outs):
            if out is not None:
                seg.hidden = out.contiguous()

    def load_hf_weight(self, name: str, w: torch.Tensor) -> list[str]:
        if name == "norm.weight":
            self.norm.weight.data.copy_(w)
            return [name]
        sub = name.removeprefix("mixer.")
        if self.kind in ("M", "E"):
            return [f"mixer.{self.mixer.load(sub, w)}"]
        proj, kind = sub.rsplit(".", 1)
        return [f"mixer.{self.mixer.load(proj, kind, w)}"]

    def pack(self, packing: str) -> dict[str, str]:
        return self.mixer.pack(packing)

    def linears(self) -> list[NestedLinear]:
        return self.mixer.linears()


class ElasticNemotronHForCausalLM(
    ElasticForCausalLM, HasInnerState, IsHybrid, SupportsMambaPrefixCaching
):
    """Elastic NemotronH (``model_type: elastic_nemotron_h``)."""

    hf_globals = {
        "backbone.embeddings.weight": "embed_tokens.weight",
        "backbone.norm_f.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    norm_eps_field = "layer_norm_epsilon"
    # the hybrid KV-cache allocator's questions, answered as for vLLM's NemotronH
    get_mamba_state_shape_from_config = _HYBRID["get_mamba_state_shape_from_config"]
    get_mamba_state_dtype_from_config = _HYBRID["get_mamba_state_dtype_from_config"]
    get_mamba_state_copy_func = _HYBRID["get_mamba_state_copy_func"]

    def make_layer(self, vllm_config: VllmConfig, layer: int, prefix: str) -> nn.Module:
        return ElasticNemotronHLayer(vllm_config, self.spec, layer, prefix)

    @functools.cached_property
    def _mamba(self) -> ElasticMamba2 | None:
        """A Mamba mixer (every one holds the same state-budget table), None without."""
        return next((layer.mixer for layer in self.layers if layer.kind == "M"), None)

    def graph_keys(self) -> list[GraphKey]:
        """Per budget, one graph per Mamba state budget its tokens can write: its own,
        and each larger budget a ``reuse`` request can answer at (thinking tokens write
        the answer budget's heads). Per mix of budgets, two: every segment writing its
        own state, and every segment writing the parent's (a mixed batch in which some
        request writes more than its own: a bound on the graphs, see ``graph_key``)."""
        mamba = self._mamba
        if mamba is None:
            return super().graph_keys()
        n, full = len(self.spec.budgets), self.spec.full.index
        keys = {((b, mamba.state_budget(b, (s,))),): None for b in range(n) for s in range(n)}
        for mix in self.budget_mixes():
            if len(mix) > 1:
                for state in (None, full):
                    keys[tuple((b, mamba.state_budget(b, (b if state is None else state,)))
                               for b in mix)] = None  # fmt: skip
        return list(keys)

    def graph_key(self, segments: list[Segment]) -> GraphKey:
        """One segment: its budget and the state budget its tokens write. Several: their
        own state budgets if that is what every segment writes, else the parent's for
        every segment (tokens then also write heads no request of theirs reads, which
        changes no output, as ``full_state`` shows)."""
        mamba = self._mamba
        if mamba is None:
            return super().graph_key(segments)
        key = tuple((s.budget, mamba.state_budget(s.budget, s.states)) for s in segments)
        if len(key) == 1 or all(st == mamba.state_budget(b, (b,)) for b, st in key):
            return key
        full = self.spec.full.index
        return tuple((b, mamba.state_budget(b, (full,))) for b, _ in key)
