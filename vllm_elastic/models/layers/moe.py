"""Elastic NemotronH MoE (``E`` layers): sigmoid router, relu2 routed experts, shared expert.

A budget keeps the first ``E_b`` routed experts, the first channels of every expert and of
the shared expert, and its hidden channels. Routing runs over the kept experts only,
exactly as the budget's sliced model routes: sigmoid scores of the kept experts, the
correction bias added for selection only, grouped top-k over the sliced model's
``n_group`` groups, weights from the unbiased scores, normalised (``norm_topk_prob``) and
scaled by ``routed_scaling_factor``; plus the shared expert.

The experts run as a torch-native loop (gather each expert's tokens, two GEMMs at the
budget's widths, weighted scatter-add), one custom op (``vllm_elastic::routed_experts``)
so a compiled forward keeps it whole. vLLM's fused MoE cannot serve this layer: its CPU
build rejects non-gated experts, and on GPU its kernels take one expert width, not a
per-budget prefix; so every platform takes this path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vllm_elastic.kernels.graph_ops import fake_of, graph_op
from vllm_elastic.models.layers.mlp import Relu2MLP, relu2_
from vllm_elastic.models.nested_linear import NestedLinear
from vllm_elastic.models.routing import Segment
from vllm_elastic.spec.budgets import ElasticSpec


def route(
    x: torch.Tensor,
    gate: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    normalize: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(expert ids, weights)`` per token: NemotronH's router over ``gate``'s experts."""
    scores = torch.sigmoid(x.to(torch.float32) @ gate.to(torch.float32).T)
    choice = scores + bias
    if n_group > 1:
        t, e = choice.shape
        grouped = choice.view(t, n_group, e // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores).scatter_(
            1, group_scores.topk(topk_group, dim=-1).indices, 1.0
        )
        mask = keep.unsqueeze(-1).expand_as(grouped).reshape(t, e)
        choice = choice.masked_fill(mask == 0, float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * scale


class ElasticMoE(nn.Module):
    """Routed experts + shared expert of one layer for every budget at once."""

    def __init__(self, vllm_config: Any, spec: ElasticSpec, layer: int) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        p = spec.parent
        self.layer = layer
        hidden = p.sizes["hidden_size"]
        self.n_experts = p.sizes["n_routed_experts"]
        width = p.sizes["moe_intermediate_size"]
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.normalize = bool(config.norm_topk_prob)
        self.scale = float(config.routed_scaling_factor)
        self.gate_weight = nn.Parameter(torch.empty(self.n_experts, hidden), requires_grad=False)
        self.gate_bias = nn.Parameter(
            torch.zeros(self.n_experts, dtype=torch.float32), requires_grad=False
        )
        self.up = nn.Parameter(torch.empty(self.n_experts, width, hidden), requires_grad=False)
        self.down = nn.Parameter(torch.empty(self.n_experts, hidden, width), requires_grad=False)
        self.shared = Relu2MLP(
            vllm_config, spec, layer, field="moe_shared_expert_intermediate_size"
        )
        self.sizes = [
            (b.hidden_size, b.size("n_routed_experts"), b.size("moe_intermediate_size", layer))
            for b in spec.budgets
        ]

    def load(self, name: str, w: torch.Tensor) -> str:
        """One HF tensor of ``mixer.*`` into place (experts one by one)."""
        if name == "gate.weight":
            self.gate_weight.data.copy_(w)
            return "gate_weight"
        if name == "gate.e_score_correction_bias":
            self.gate_bias.data.copy_(w.to(torch.float32))
            return "gate_bias"
        if name.startswith("shared_experts."):
            proj, kind = name.removeprefix("shared_experts.").rsplit(".", 1)
            return f"shared.{self.shared.load(proj, kind, w)}"
        if name.startswith("experts."):
            expert, proj = name.removeprefix("experts.").split(".", 1)
            target = {"up_proj.weight": self.up, "down_proj.weight": self.down}[proj]
            target.data[int(expert)].copy_(w)
            return "up" if target is self.up else "down"
        raise KeyError(name)

    def pack(self, packing: str) -> dict[str, str]:
        return {f"shared_{k}": v for k, v in self.shared.pack(packing).items()}

    def linears(self) -> list[NestedLinear]:
        return self.shared.linears()

    def forward(self, xs: list[torch.Tensor], segments: list[Segment]) -> list[torch.Tensor]:
        shared = self.shared(xs, segments)
        return [
            s + self._routed(x, seg.budget).to(x.dtype) for x, seg, s in zip(xs, segments, shared)
        ]

    def _routed(self, x: torch.Tensor, budget: int) -> torch.Tensor:
        """The routed experts' sum for tokens of one budget (fp32, like the reference)."""
        h, n_experts, width = self.sizes[budget]
        return torch.ops.vllm_elastic.routed_experts(
            x, self.gate_weight, self.gate_bias, self.up, self.down, h, n_experts, width,
            self.top_k, self.n_group, self.topk_group, self.normalize, self.scale,
        )  # fmt: skip


@graph_op("routed_experts")
def routed_experts(
    x: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor, up: torch.Tensor,
    down: torch.Tensor, hidden: int, n_experts: int, width: int, top_k: int, n_group: int,
    topk_group: int, normalize: bool, scale: float,
) -> torch.Tensor:  # fmt: skip
    """Route ``x`` (``[tokens, hidden]``) over the first ``n_experts`` experts and sum
    their ``width``-channel relu2 outputs, weighted (fp32). One graph node: which tokens
    each expert gets is data-dependent."""
    ids, weights = route(
        x, gate[:n_experts, :hidden], bias[:n_experts], top_k, n_group, topk_group,
        normalize, scale,
    )  # fmt: skip
    out = torch.zeros(x.shape[0], hidden, dtype=torch.float32, device=x.device)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    tokens = order // top_k
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        sel = order[start : start + count]
        rows = tokens[start : start + count]
        start += count
        a = relu2_(x[rows] @ up[expert, :width, :hidden].T)
        y = a @ down[expert, :hidden, :width].T
        out.index_add_(0, rows, y.to(torch.float32) * weights.reshape(-1)[sel, None])
    return out


@fake_of("routed_experts")
def _(x, gate, bias, up, down, hidden, n_experts, width, top_k, n_group, topk_group,
      normalize, scale) -> torch.Tensor:  # noqa: ANN001  # fmt: skip
    return x.new_empty(x.shape[0], hidden, dtype=torch.float32)
