"""Elastic Mamba-2 (NemotronH's ``M`` layers).

A budget keeps ``h`` heads in each of the parent's ``G`` groups (the first ``h`` of each
group) and its hidden channels. The layer stores its heads *rank-major* (head ``i`` of
every group, then head ``i + 1``: new head ``j = i*G + g`` is parent head ``g*Hg + i``),
so every budget's heads are a prefix; head ``j`` reads B/C group ``j % G``.

* ``in_proj`` rows are ``[B | C | (x_j, dt_j, z_j) for each head j]``: a prefix of rows is
  B, C and the first heads, so one nested projection serves every budget.
* Each token writes the conv and SSM state of the heads of its request's *state budget*
  (the larger of a ``reuse`` request's two budgets, else its own): a small budget's
  thinking tokens write the state the answer budget reads after the in-flight switch
  (the Mamba analogue of full-width K/V), while a request that never switches pays only
  for its own heads. Heads are independent, so a budget's heads get exactly the sliced
  model's state and output. A token also computes the state heads of its state budget in
  a layer its budget skips.
* Per budget, the gated RMSNorm runs per group over the kept heads' channels
  (``y * silu(z)`` normalised over the ``h * head_dim`` channels of each group, as the
  sliced model does), then ``out_proj`` over the kept channels (a column prefix).

The conv + scan (``compat/mamba.py``): prefill tokens run vLLM's kernels once per forward
at the forward's widest state (tokens that need fewer heads give zeros to the rest, whose
state nobody of theirs reads); decode tokens run our fused CPU kernel, each at its own
state heads (``elastic.mamba_decode``; elsewhere vLLM's kernels, per group of state
heads).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from vllm.platforms import current_platform

from vllm_elastic.compat import mamba
from vllm_elastic.compat.compile import is_compiling
from vllm_elastic.kernels import mamba_decode, mamba_norm
from vllm_elastic.models import scratch
from vllm_elastic.models.layers.common import pack_linears
from vllm_elastic.models.nested_linear import NestedLinear
from vllm_elastic.models.routing import Segment, put, runs, stack, stacked_index, take
from vllm_elastic.spec.budgets import ElasticSpec
from vllm_elastic.spec.engine_options import engine_options
from vllm_elastic.spec.state import covering_table


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
        self.bc = 2 * config.n_groups * config.ssm_state_size  # B and C channels
        self.stride = 2 * self.head_dim + 1  # a head's in_proj rows: x, dt, z
        self.eps = config.layer_norm_epsilon
        hidden = p.sizes["hidden_size"]
        rows = self.rows(self.heads)
        self.in_weight = nn.Parameter(torch.empty(rows, hidden), requires_grad=False)
        self.out_weight = nn.Parameter(torch.empty(hidden, self.inner), requires_grad=False)
        self.in_bias = self.out_bias = None
        if config.use_bias:
            self.in_bias = nn.Parameter(torch.empty(rows))
            self.out_bias = nn.Parameter(torch.empty(hidden))
        conv = self.bc + self.inner
        self.conv_weight = nn.Parameter(torch.empty(conv, config.conv_kernel), requires_grad=False)
        self.conv_bias = nn.Parameter(torch.zeros(conv), requires_grad=False)
        self.A = nn.Parameter(torch.empty(self.heads, dtype=torch.float32), requires_grad=False)
        self.D = nn.Parameter(torch.empty(self.heads), requires_grad=False)
        self.dt_bias = nn.Parameter(torch.empty(self.heads), requires_grad=False)
        self.norm_weight = nn.Parameter(torch.empty(self.inner), requires_grad=False)
        self.mixer = mamba.state_mixer(config, vllm_config, prefix)
        # every token writes every head's state (engine option): the reference of the
        # per-request state budgets
        options = engine_options(vllm_config)
        self.full_state = options.full_state
        # decode steps in our fused CPU kernel (else vLLM's kernels)
        self.fused_decode = mamba_decode.resolve(
            options.mamba_decode,
            current_platform.is_cpu(),
            (vllm_config.model_config.dtype, *mamba.state_dtypes(vllm_config)),
        )
        self.full_index = spec.full.index
        self.hiddens = [b.hidden_size for b in spec.budgets]
        self.kept = [b.keeps_layer(layer) for b in spec.budgets]
        self.budget_heads = [b.size("mamba_num_heads") for b in spec.budgets]
        self.in_proj = NestedLinear(
            [(self.rows(n), h) for n, h in zip(self.budget_heads, self.hiddens)]
        )
        self.covering = covering_table(spec)
        self.out_proj = NestedLinear(
            [
                (h, n * self.head_dim) if kept else None
                for h, n, kept in zip(self.hiddens, self.budget_heads, self.kept)
            ]
        )

    def rows(self, heads: int) -> int:
        """in_proj rows of the first ``heads`` heads (B and C included)."""
        return self.bc + heads * self.stride

    # ----------------------------------------------------------------- weights
    def parent_heads(self) -> torch.Tensor:
        """Parent head index of each of the layer's (rank-major) heads."""
        i, g = torch.arange(self.per_group), torch.arange(self.groups)
        return (g[None, :] * self.per_group + i[:, None]).reshape(-1)

    def _channels(self, heads: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return (offset + heads[:, None] * self.head_dim + torch.arange(self.head_dim)).reshape(-1)

    def _in_proj_rows(self) -> torch.Tensor:
        """Parent in_proj row (``[z | x | B | C | dt]``) of each of the layer's rows."""
        heads, inner = self.parent_heads(), self.inner
        per_head = torch.cat(
            [
                self._channels(heads, inner).view(self.heads, self.head_dim),  # x
                (2 * inner + self.bc + heads)[:, None],  # dt
                self._channels(heads).view(self.heads, self.head_dim),  # z
            ],
            dim=1,
        )
        return torch.cat([torch.arange(2 * inner, 2 * inner + self.bc), per_head.reshape(-1)])

    def _conv_channels(self) -> torch.Tensor:
        """Parent conv1d channel (``[x | B | C]``) of each of the layer's (``[B | C | x]``)."""
        x = self._channels(self.parent_heads())
        return torch.cat([torch.arange(self.inner, self.inner + self.bc), x])

    def load(self, name: str, w: torch.Tensor) -> str:
        """One HF tensor of ``mixer.*`` (``in_proj.weight``, ``A_log``, ...) into place."""
        heads, channels = self.parent_heads(), self._channels(self.parent_heads())
        if name == "A_log":
            self.A.data.copy_(-torch.exp(w.float()[heads]))
            return "A"
        rows = {
            "in_proj.weight": ("in_weight", lambda t: t[self._in_proj_rows()]),
            "in_proj.bias": ("in_bias", lambda t: t[self._in_proj_rows()]),
            "conv1d.weight": (
                "conv_weight",
                lambda t: t.reshape(t.shape[0], -1)[self._conv_channels()],
            ),
            "conv1d.bias": ("conv_bias", lambda t: t[self._conv_channels()]),
            "D": ("D", lambda t: t[heads]),
            "dt_bias": ("dt_bias", lambda t: t[heads]),
            "norm.weight": ("norm_weight", lambda t: t[channels]),
            "out_proj.weight": ("out_weight", lambda t: t[:, channels]),
            "out_proj.bias": ("out_bias", lambda t: t),
        }
        if name not in rows:
            raise KeyError(name)
        param, pick = rows[name]
        getattr(self, param).data.copy_(pick(w))
        return param

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
    def state_budget(self, budget: int, states: tuple[int, ...]) -> int:
        """The smallest budget whose in_proj level covers ``budget``'s tokens writing the
        heads of every one of ``states``, at ``budget``'s hidden width (a table lookup:
        traceable). It covers itself: ``state_budget(b, (state_budget(b, s),))`` is
        ``state_budget(b, s)``."""
        if self.full_state:
            return self.full_index
        best = self.covering[budget][budget]
        for state in states:
            cover = self.covering[budget][state]
            if self.budget_heads[cover] > self.budget_heads[best]:
                best = cover
        return best

    def forward(
        self,
        positions: torch.Tensor,
        xs: list[torch.Tensor],
        segments: list[Segment],
        num_tokens: int,
    ) -> list[torch.Tensor | None]:
        """Every segment's state update (``xs``: normed inputs, also of segments that skip
        the layer); returns out_proj's output per kept segment, None for a skipped one."""
        states = [self.state_budget(s.budget, s.states) for s in segments]
        heads = max(self.budget_heads[b] for b in states)
        parts, joint = self._project(xs, segments, states)
        # a mixed decode step on our kernel runs its tokens in segment order (each reads
        # and writes only its own state slot): no gather into forward order and back
        stacked = (
            joint is not None
            and len(segments) > 1
            and self.fused_decode
            and not is_compiling()
            and mamba.plain_decode_only(self.mixer, num_tokens)
        )
        proj = joint if stacked else self._forward_order(parts, segments, heads, num_tokens)
        y = scratch.buffer("mamba.y", num_tokens, heads * self.head_dim, proj, overwritten=True)
        y = y.view(num_tokens, heads, self.head_dim)
        channels = self.bc + heads * self.head_dim
        params = {
            "conv_weight": self.conv_weight[:channels],
            "conv_bias": self.conv_bias[:channels],
            "A": self.A[:heads],
            "D": self.D[:heads],
            "dt_bias": self.dt_bias[:heads],
        }
        token_heads = self._token_heads(segments, states, proj, stacked)
        if is_compiling():
            mamba.conv_ssm_in_graph(
                self.mixer, proj, y, params, self.groups, token_heads, self.fused_decode
            )
        else:
            order = stacked_index(segments, num_tokens) if stacked else None
            mamba.conv_ssm(self.mixer, proj, y, params, self.groups, token_heads,
                           self.fused_decode, order)  # fmt: skip
        kept = [s for s in segments if self.kept[s.budget]]
        if not kept:
            return [None] * len(segments)
        gated = self._gated(y, proj, segments, kept, num_tokens, stacked)
        out = self.out_proj(gated, runs(kept))
        parts = iter(out.split([s.rows for s in kept]))
        return [
            next(parts)[:, : self.hiddens[s.budget]] if self.kept[s.budget] else None
            for s in segments
        ]

    def _forward_order(
        self, parts: list[torch.Tensor], segments: list[Segment], heads: int, num_tokens: int
    ) -> torch.Tensor:
        """The segments' in_proj rows in forward token order, ``heads`` heads wide."""
        width = self.rows(heads)
        if len(segments) == 1 and parts[0].shape[1] == width:
            return parts[0]
        # a reused buffer: a fresh one this size (a mixed prefill's) page-faults
        ordered = scratch.buffer("mamba.in_proj", num_tokens, width, parts[0])
        narrow = any(part.shape[1] < width for part in parts)
        if narrow and (is_compiling() or mamba.has_prefill(self.mixer)):
            # prefill tokens of fewer state heads feed zeros to the others (decode tokens
            # read their own heads only)
            ordered.zero_()
        for seg, part in zip(segments, parts):
            put(ordered[:, : part.shape[1]], seg.idx, part)
        return ordered

    def _token_heads(
        self, segments: list[Segment], states: list[int], like: torch.Tensor, stacked: bool
    ) -> torch.Tensor | None:
        """Heads each token's state update covers (its state budget's), in forward token
        order (``stacked``: in segment order); None when every token's are the same."""
        heads = [self.budget_heads[b] for b in states]
        if len(set(heads)) < 2:
            return None
        out = torch.empty(like.shape[0], dtype=torch.int32, device=like.device)
        start = 0
        for seg, h in zip(segments, heads):
            put(out, slice(start, start + seg.rows) if stacked else seg.idx, h)
            start += seg.rows
        return out

    def _project(
        self, xs: list[torch.Tensor], segments: list[Segment], states: list[int]
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Each segment's in_proj rows of its state budget's heads at its own width: one
        nested call for the segments whose state is their own budget's, ``narrow`` calls
        for the others (a reuse request's thinking writes its answer budget's heads).
        Also that one call's output (every segment's rows stacked in order) when it
        serves every segment, else None."""
        own = [i for i, (seg, b) in enumerate(zip(segments, states)) if seg.budget == b]
        parts: list[torch.Tensor | None] = [None] * len(segments)
        joint = None
        if own:
            y = self.in_proj(stack([xs[i] for i in own]), runs([segments[i] for i in own]))
            joint = y if len(own) == len(segments) else None
            start = 0
            for i in own:
                n = self.rows(self.budget_heads[segments[i].budget])
                parts[i] = y[start : start + segments[i].rows, :n]
                start += segments[i].rows
        for i, (seg, b) in enumerate(zip(segments, states)):
            if parts[i] is None:
                parts[i] = self.in_proj.narrow(xs[i], b, seg.budget)
        return parts, joint

    def _gated(
        self, y: torch.Tensor, proj: torch.Tensor, segments: list[Segment],
        kept: list[Segment], num_tokens: int, stacked: bool,
    ) -> torch.Tensor:  # fmt: skip
        """The kept segments' gated norms, their rows stacked in segment order (``y`` and
        ``proj`` hold the forward's tokens in forward order, or ``stacked`` in segment
        order): one kernel call for all of them with our CPU kernels (outside a compiled
        graph, which fuses the torch ops itself), else per segment."""
        if self.fused_decode and not is_compiling():
            if not stacked:
                rows = stacked_index(kept, num_tokens)
            elif len(kept) == len(segments):
                rows = None
            else:  # the kept segments' rows of the stacked order
                starts = np.cumsum([0] + [s.rows for s in segments])
                mine = [i for i, s in enumerate(segments) if self.kept[s.budget]]
                rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in mine])
            heads = [self.budget_heads[s.budget] for s in kept]
            total = sum(s.rows for s in kept)
            out = scratch.buffer("mamba.gated", total, max(heads) * self.head_dim, y,
                                 overwritten=True)  # fmt: skip
            return mamba_norm.gated_norm(
                out, y, proj, self.norm_weight, rows, [s.rows for s in kept], heads,
                self.bc, self.groups, self.eps,
            )  # fmt: skip
        per_head = proj[:, self.bc :].view(num_tokens, y.shape[1], self.stride)
        z = per_head[:, :, self.head_dim + 1 :]
        return stack([self._gated_norm(take(y, s.idx), take(z, s.idx), s.budget) for s in kept])

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor, budget: int) -> torch.Tensor:
        """``norm(y * silu(z))`` per group over the budget's heads (rank-major: head
        ``i*G + g`` is in group ``g``), flattened in the layer's head order."""
        n, t = self.budget_heads[budget], y.shape[0]
        shape = (t, n // self.groups, self.groups, self.head_dim)
        x = y[:, :n].reshape(shape) * F.silu(z[:, :n].reshape(shape).to(torch.float32))
        variance = x.pow(2).mean(dim=(1, 3), keepdim=True)
        x = (x * torch.rsqrt(variance + self.eps)).to(y.dtype)
        return x.reshape(t, -1) * self.norm_weight[: n * self.head_dim]
