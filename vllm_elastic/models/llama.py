"""Elastic Llama / Qwen3 for vLLM: attention + gated SiLU MLP decoder layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm

from vllm_elastic.kernels import seg_norm
from vllm_elastic.models import norm
from vllm_elastic.models.base import ElasticForCausalLM, kept_flags, layer_inputs, split_name
from vllm_elastic.models.layers.attention import ElasticAttention
from vllm_elastic.models.layers.mlp import GatedMLP
from vllm_elastic.models.nested_linear import NestedLinear
from vllm_elastic.models.routing import Segment, Stack
from vllm_elastic.spec.families.llama import head_dim


class ElasticLlamaDecoderLayer(nn.Module):
    """Pre-norm attention, then pre-norm gated MLP, for every budget's segment."""

    def __init__(self, vllm_config: VllmConfig, spec: Any, layer: int, prefix: str,
                 qk_norm: bool) -> None:  # fmt: skip
        super().__init__()
        config = vllm_config.model_config.hf_config
        hidden = spec.parent.sizes["hidden_size"]
        self.eps = config.rms_norm_eps
        self.kept = kept_flags(spec, layer)
        self.input_layernorm = RMSNorm(hidden, eps=self.eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps=self.eps)
        self.self_attn = ElasticAttention(
            vllm_config, spec, layer, f"{prefix}.self_attn",
            head_dim=head_dim(config), rope=True, qk_norm=qk_norm,
            bias=bool(getattr(config, "attention_bias", False)), eps=self.eps,
        )  # fmt: skip
        self.mlp = GatedMLP(vllm_config, spec, layer, bias=bool(getattr(config, "mlp_bias", False)))

    def forward(self, positions: torch.Tensor, segments: list[Segment], num_tokens: int) -> None:
        # a skipped layer still writes K/V, from the residual stream it passes through
        xs = layer_inputs(self.input_layernorm.weight, segments, self.kept, self.eps, True)
        outs = self.self_attn(positions, xs, segments, num_tokens)
        kept = [(s, o) for s, o in zip(segments, outs) if o is not None]
        if not kept:
            return
        xs = []
        for seg, o in kept:
            x, seg.residual = norm.add_norm(
                self.post_attention_layernorm.weight, o, seg.residual, self.eps
            )
            xs.append(x)
        segs = [s for s, _ in kept]
        for seg, y in zip(segs, self.mlp(xs, segs)):
            seg.hidden = y.contiguous()

    def stackable(self) -> bool:
        return self.self_attn.stackable()

    def forward_stacked(
        self, positions: torch.Tensor, st: Stack, segments: list[Segment], num_tokens: int
    ) -> None:
        """The layer for a stacked batch (every segment keeps it): two stacked pre-norms,
        one projection call each, no per-segment copies."""
        seg_norm.add_rms_norm(
            st.hidden, st.residual, self.input_layernorm.weight, st.rows, st.widths, self.eps
        )
        y = self.self_attn.forward_stacked(positions, st.hidden, segments, st.order, num_tokens)
        seg_norm.add_rms_norm(
            y, st.residual, self.post_attention_layernorm.weight, st.rows, st.widths, self.eps
        )
        st.hidden = self.mlp.forward_stacked(y, segments)

    def load_hf_weight(self, name: str, w: torch.Tensor) -> list[str]:
        """One HF tensor of this layer (``self_attn.q_proj.weight``, ...) into place."""
        module, proj, kind = split_name(name)
        if module == "self_attn":
            return [f"self_attn.{self.self_attn.load(proj, kind, w)}"]
        if module == "mlp":
            return [f"mlp.{self.mlp.load(proj, kind, w)}"]
        if name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            getattr(self, name.split(".")[0]).weight.data.copy_(w)
            return [name]
        raise KeyError(name)

    def pack(self, packing: str) -> dict[str, str]:
        return {**self.self_attn.pack(packing), **self.mlp.pack(packing)}

    def linears(self) -> list[NestedLinear]:
        return [*self.self_attn.linears(), *self.mlp.linears()]


class ElasticLlamaForCausalLM(ElasticForCausalLM):
    """Elastic Llama (``model_type: elastic_llama``)."""

    qk_norm = False
    hf_globals = {
        "model.embed_tokens.weight": "embed_tokens.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight",
    }

    def make_layer(self, vllm_config: VllmConfig, layer: int, prefix: str) -> nn.Module:
        return ElasticLlamaDecoderLayer(vllm_config, self.spec, layer, prefix, self.qk_norm)


class ElasticQwen3ForCausalLM(ElasticLlamaForCausalLM):
    """Elastic Qwen3 (``model_type: elastic_qwen3``), with per-head q/k RMSNorm."""

    qk_norm = True
