"""Elastic Mamba-2 (NemotronH's ``M`` layers).

A budget keeps ``h`` heads in each of the parent's ``G`` groups (the first ``h`` of each
group) and its hidden channels. Per token:

* ``in_proj`` runs at the token's hidden width and produces the parent's rows
  ``[z | x | B | C | dt]`` for every head. vLLM's conv + SSM then runs once over every
  token for every head (``compat/mamba.py``): every budget writes the conv and SSM state
  of every head, also in a layer it skips, so a larger budget finds a valid state after an
  in-flight think -> answer switch (the Mamba analogue of full-width K/V). Heads are
  independent, so a budget's own heads get exactly the sliced model's state and output.
* per budget, the gated RMSNorm runs per group over the kept heads' channels
  (``y * silu(z)`` normalised over the ``h * head_dim`` channels of each group, as the
  sliced model's norm does), then ``out_proj`` over the kept channels.

``out_proj`` columns are stored band-major (band ``c`` = the heads each group gains at the
``c``-th budget size), so every budget's columns are a prefix for the nested packing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vllm_elastic.compat import mamba
from vllm_elastic.models.layers.common import pack_linears
from vllm_elastic.models.nested_linear import NestedLinear
from vllm_elastic.models.routing import Segment, put, runs, stack, take
from vllm_elastic.spec.budgets import ElasticSpec


class ElasticMamba2(nn.Module):
    """One Mamba-2 mixer for every budget at once."""

    def __init__(self, vllm_config: Any, spec: ElasticSpec, layer: int, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        p = spec.parent
        self.layer = layer
        self.groups = config.n_groups
        self.heads = config.mamba_num_heads
        self.per_group = self.heads // self.groups
        self.head_dim = config.mamba_head_dim
        self.inner = self.heads * self.head_dim
        self.eps = config.layer_norm_epsilon
        hidden = p.sizes["hidden_size"]
        rows = 2 * self.inner + 2 * config.n_groups * config.ssm_state_size + self.heads
        self.in_weight = nn.Parameter(torch.empty(rows, hidden), requires_grad=False)
        self.out_weight = nn.Parameter(torch.empty(hidden, self.inner), requires_grad=False)
        self.in_bias = self.out_bias = None
        if config.use_bias:
            self.in_bias = nn.Parameter(torch.empty(rows))
            self.out_bias = nn.Parameter(torch.empty(hidden))
        self.norm_weight = nn.Parameter(torch.empty(self.inner), requires_grad=False)
        self.mixer = mamba.state_mixer(config, vllm_config, prefix)
        self.hiddens = [b.hidden_size for b in spec.budgets]
        self.kept = [b.keeps_layer(layer) for b in spec.budgets]
        self.kept_per_group = [b.size("mamba_num_heads") // self.groups for b in spec.budgets]
        # bands of heads per group: the distinct kept counts, ascending
        self.bands = sorted(set(self.kept_per_group) | {self.per_group})
        self.in_proj = NestedLinear([(rows, h) for h in self.hiddens])
        self.out_proj = NestedLinear(
            [
                (h, self.groups * n * self.head_dim) if kept else None
                for h, n, kept in zip(self.hiddens, self.kept_per_group, self.kept)
            ]
        )

    # ----------------------------------------------------------------- weights
    def band_major_channels(self) -> torch.Tensor:
        """Parent channel of each band-major position (``out_proj`` columns)."""
        order, start = [], 0
        for end in self.bands:
            for g in range(self.groups):
                for i in range(start, end):
                    head = g * self.per_group + i
                    order.extend(range(head * self.head_dim, (head + 1) * self.head_dim))
            start = end
        return torch.tensor(order, dtype=torch.long)

    def load(self, name: str, w: torch.Tensor) -> str:
        """One HF tensor of ``mixer.*`` (``in_proj.weight``, ``A_log``, ...) into place."""
        state = mamba.load_state_params(self.mixer, name, w)
        if state is not None:
            return f"mixer.{state}"
        if name == "out_proj.weight":
            self.out_weight.data.copy_(w[:, self.band_major_channels()])
            return "out_weight"
        target = {
            "in_proj.weight": self.in_weight,
            "in_proj.bias": self.in_bias,
            "out_proj.bias": self.out_bias,
            "norm.weight": self.norm_weight,
        }.get(name)
        if target is None:
            raise KeyError(name)
        target.data.copy_(w)
        return {"in_proj.weight": "in_weight", "in_proj.bias": "in_bias",
                "out_proj.bias": "out_bias", "norm.weight": "norm_weight"}[name]  # fmt: skip

    def pack(self, packing: str) -> dict[str, str]:
        return pack_linears(
            {
                "in_proj": (self.in_proj, self.in_weight, self.in_bias),
                "out_proj": (self.out_proj, self.out_weight, self.out_bias),
            },
            packing,
        )

    def linears(self) -> list[NestedLinear]:
        return [self.in_proj, self.out_proj]

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        positions: torch.Tensor,
        xs: list[torch.Tensor],
        segments: list[Segment],
        num_tokens: int,
    ) -> list[torch.Tensor | None]:
        """Every segment's state update (``xs``: normed inputs, also of segments that skip
        the layer); returns out_proj's output per kept segment, None for a skipped one."""
        proj = self.in_proj(stack(xs), runs(segments))
        if len(segments) > 1:  # back to the forward's token order, as the kernels need it
            ordered = proj.new_empty(num_tokens, proj.shape[1])
            start = 0
            for seg in segments:
                put(ordered, seg.idx, proj[start : start + seg.rows])
                start += seg.rows
            proj = ordered
        y = proj.new_empty(num_tokens, self.inner)
        mamba.conv_ssm(self.mixer, proj, y)
        kept = [s for s in segments if self.kept[s.budget]]
        if not kept:
            return [None] * len(segments)
        gated = [self._gated_norm(take(y, s.idx), take(proj, s.idx), s.budget) for s in kept]
        out = self.out_proj(stack(gated), runs(kept))
        parts = iter(out.split([s.rows for s in kept]))
        return [
            next(parts)[:, : self.hiddens[s.budget]] if self.kept[s.budget] else None
            for s in segments
        ]

    def _gated_norm(self, y: torch.Tensor, proj: torch.Tensor, budget: int) -> torch.Tensor:
        """``norm(y * silu(z))`` per group over the budget's kept heads, band-major."""
        n, t = self.kept_per_group[budget], y.shape[0]
        shape = (t, self.groups, self.per_group, self.head_dim)
        y = y.view(shape)[:, :, :n]
        z = proj[:, : self.inner].reshape(shape)[:, :, :n]
        w = self.norm_weight.view(self.groups, self.per_group, self.head_dim)[:, :n]
        x = y * F.silu(z.to(torch.float32))
        variance = x.pow(2).mean(dim=(2, 3), keepdim=True)
        x = (x * torch.rsqrt(variance + self.eps)).to(y.dtype) * w
        if n == self.bands[0]:  # one band: group-major is band-major
            return x.reshape(t, -1)
        bands, start = [], 0
        for end in self.bands:
            if end > n:
                break
            bands.append(x[:, :, start:end].reshape(t, -1))
            start = end
        return torch.cat(bands, dim=1)
