"""Elastic grouped-query attention (Llama / Qwen3 with RoPE, NemotronH without).

One copy of the parent's q/k/v/o weights. Every token writes K/V for every KV head, at
every budget and also in a layer its budget skips (K/V computed from the residual stream
it passes through), so a larger budget can attend to them after an in-flight switch.
A budget keeps its KV groups' query heads. On vLLM's CPU backend a batch attends over
the KV groups of its widest budget that keeps the layer (``compat/cpu_attention.py``): a
batch of one budget over its own heads only; elsewhere at the parent's head count. A
mixed batch discards the heads a budget drops (kept groups' extra heads are zeroed after
attention). Either way a budget's kept heads see exactly the sliced model's attention.

With ``kv_layout: per-budget`` (``spec/kv_layout.py``) the layer holds one vLLM attention
per KV group, each its own KV-cache group: the groups the batch reads are attended one
by one (GQA groups are independent); the others' K/V are written where a request of
the batch stores them (a request that does not has its slots in vLLM's null block).

Weight layout per tensor-parallel rank (``spec/layout.py``): ``qkv`` rows are
``[k | v | q]``, q grouped by local KV head, so every budget's rows are a prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.rotary_embedding import get_rope

from vllm_elastic.compat import cpu_attention, cpu_kernels
from vllm_elastic.compat.compile import is_compiling
from vllm_elastic.compat.kv_groups import KVGroupAttention
from vllm_elastic.models import scratch
from vllm_elastic.models.layers.common import pack_linears, row_parallel_out, tp_rank_and_size
from vllm_elastic.models.nested_linear import NestedLinear
from vllm_elastic.models.routing import Segment, put, runs, stack, take, widen
from vllm_elastic.spec import kv_layout
from vllm_elastic.spec.budgets import Budget, ElasticSpec
from vllm_elastic.spec.engine_options import engine_options
from vllm_elastic.spec.layout import kv_rows_of_rank, q_rows_of_rank


@dataclass(frozen=True)
class _Cut:
    """One budget's attention sizes in one layer, local to this rank."""

    kept: bool
    hidden: int
    q_rows: int  # q rows of the kept KV groups (all their heads)
    kv_groups: int  # kept local KV heads
    heads_per_group: int  # kept query heads per KV group


class ElasticAttention(nn.Module):
    """q/k/v/o of one layer for every budget at once."""

    def __init__(
        self,
        vllm_config: Any,
        spec: ElasticSpec,
        layer: int,
        prefix: str,
        *,
        head_dim: int,
        rope: bool,
        qk_norm: bool,
        bias: bool,
        eps: float,
    ) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.tp_rank, self.tp_size = tp_rank_and_size()
        p = spec.parent
        self.layer = layer
        self.head_dim = head_dim
        self.group = p.group_size
        self.n_q = p.sizes["num_attention_heads"] // self.tp_size
        self.n_kv = p.sizes["num_key_value_heads"] // self.tp_size
        self.q_size = self.n_q * head_dim
        self.kv_size = self.n_kv * head_dim
        hidden = p.sizes["hidden_size"]
        self.qkv_weight = nn.Parameter(
            torch.empty(self.q_size + 2 * self.kv_size, hidden), requires_grad=False
        )
        self.o_weight = nn.Parameter(torch.empty(hidden, self.q_size), requires_grad=False)
        self.qkv_bias = self.o_bias = None
        if bias:
            self.qkv_bias = nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size))
            self.o_bias = nn.Parameter(torch.empty(hidden))
        self.q_norm = RMSNorm(head_dim, eps=eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=eps) if qk_norm else None
        self.rotary_emb = (
            get_rope(
                head_dim,
                max_position=getattr(config, "max_position_embeddings", 8192),
                rope_parameters=getattr(config, "rope_parameters", None),
                is_neox_style=True,
            )
            if rope
            else None
        )
        self.attn = self.group_attns = None
        self.kv_width = self.n_kv
        if engine_options(vllm_config).kv_layout == "per-budget":
            self.kv_width = kv_layout.group_width(spec, self.tp_size)
            self.group_attns = nn.ModuleList(
                KVGroupAttention(
                    self.kv_width * self.group,
                    head_dim,
                    head_dim**-0.5,
                    num_kv_heads=self.kv_width,
                    cache_config=vllm_config.cache_config,
                    quant_config=None,
                    prefix=f"{prefix}.attn_kv_{_letters(g)}",  # vLLM: one integer per name
                    kv_group=g,
                )
                for g in range(kv_layout.num_groups(spec, self.tp_size))
            )
        else:
            self.attn = Attention(
                self.n_q,
                head_dim,
                head_dim**-0.5,
                num_kv_heads=self.n_kv,
                cache_config=vllm_config.cache_config,
                quant_config=None,
                prefix=f"{prefix}.attn",
            )
        self.cuts = [self._cut(b, p) for b in spec.budgets]
        kept = [c if c.kept else None for c in self.cuts]
        kv2 = 2 * self.kv_size
        self.qkv = NestedLinear([(kv2 + (c.q_rows if c.kept else 0), c.hidden) for c in self.cuts])
        self.o = NestedLinear([None if c is None else (c.hidden, c.q_rows) for c in kept])

    def _cut(self, b: Budget, parent: Any) -> _Cut:
        kv_groups = b.num_key_value_heads // self.tp_size
        return _Cut(
            kept=b.keeps_layer(self.layer),
            hidden=b.hidden_size,
            q_rows=kv_groups * self.group * self.head_dim,
            kv_groups=kv_groups,
            heads_per_group=b.group_size,
        )

    # ----------------------------------------------------------------- weights
    def load(self, proj: str, kind: str, w: torch.Tensor) -> str:
        """Copy one HF tensor (``q_proj``/``k_proj``/``v_proj``/``o_proj`` weight or bias,
        ``q_norm``/``k_norm``) into this rank's layout; returns the parameter's name."""
        p_heads, p_kv = self.n_q * self.tp_size, self.n_kv * self.tp_size
        hd, tp, rank = self.head_dim, self.tp_size, self.tp_rank
        qs, ks = self.q_size, self.kv_size
        if proj in ("q_norm", "k_norm"):
            getattr(self, proj).weight.data.copy_(w)
            return f"{proj}.weight"
        q_rows = q_rows_of_rank(p_heads, p_kv, hd, tp, rank)
        if proj == "o_proj":  # input columns per rank; the bias is whole
            getattr(self, f"o_{kind}").data.copy_(w[:, q_rows] if kind == "weight" else w)
            return f"o_{kind}"
        rows = {
            "k_proj": (slice(0, ks), kv_rows_of_rank(p_kv, hd, tp, rank)),
            "v_proj": (slice(ks, 2 * ks), kv_rows_of_rank(p_kv, hd, tp, rank)),
            "q_proj": (slice(2 * ks, 2 * ks + qs), q_rows),
        }[proj]
        getattr(self, f"qkv_{kind}").data[rows[0]].copy_(w[rows[1]])
        return f"qkv_{kind}"

    def pack(self, packing: str) -> dict[str, str]:
        """Store qkv and o for the forward (``NestedLinear``); packed projections drop
        their plain parameter. A row-parallel bias is added after the all-reduce."""
        o_bias = self.o_bias if self.tp_size == 1 else None
        return pack_linears(
            {
                "qkv": (self.qkv, self.qkv_weight, self.qkv_bias),
                "o": (self.o, self.o_weight, o_bias),
            },
            packing,
        )

    def linears(self) -> list[NestedLinear]:
        return [self.qkv, self.o]

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        positions: torch.Tensor,
        xs: list[torch.Tensor],
        segments: list[Segment],
        num_tokens: int,
    ) -> list[torch.Tensor | None]:
        """Attention of every segment (``xs``: their normed inputs); returns o_proj's
        output per segment that keeps the layer, None for one that skips it."""
        qs, ks = self.q_size, self.kv_size
        qkv = self.qkv(stack(xs), runs(segments))
        # the KV groups the batch reads: a budget's own, or in a mixed batch the widest
        # kept one's; fewer than it writes -> attend over those only (in a graph: decided
        # by the custom op at run time)
        read = [self.cuts[s.budget].kv_groups for s in segments if self.cuts[s.budget].kept]
        groups = max(read, default=self.n_kv)
        if self.group_attns is not None:  # per-budget layout: attends group by group
            own = bool(read)  # (a skipped layer's q is widened for the q norm)
        else:
            own = groups < self.n_kv and (is_compiling() or cpu_attention.supported(self.attn))
        if len(segments) == 1:
            k, v, q = qkv[:, :ks], qkv[:, ks : 2 * ks], qkv[:, 2 * ks :]
            if q.shape[1] != qs and not own:  # a skipped layer has no q columns at all
                q = widen(q, qs)
        else:
            q = scratch.buffer("attn.q", num_tokens, qs, qkv)
            k = qkv.new_empty(num_tokens, ks)
            v = qkv.new_empty(num_tokens, ks)
            start = 0
            for seg in segments:
                part = qkv[start : start + seg.rows]
                start += seg.rows
                put(k, seg.idx, part[:, :ks])
                put(v, seg.idx, part[:, ks : 2 * ks])
                rows = self.cuts[seg.budget].q_rows if self.cuts[seg.budget].kept else 0
                if rows:
                    put(q[:, :rows], seg.idx, part[:, 2 * ks : 2 * ks + rows])
        q, k = self._norm_and_rope(positions, q, k, num_tokens)
        if not read:  # every segment skips the layer: K/V only, for a larger budget
            if self.group_attns is not None:
                self._attend_groups(q, k, v, 0)
            else:
                cpu_attention.write_kv(self.attn, k, v)
            return [None] * len(segments)
        if self.group_attns is not None:
            out = self._attend_groups(q, k, v, groups)
        else:
            out = self._attend(q, k, v, groups)
        kept = [s for s in segments if self.cuts[s.budget].kept]
        if not kept:
            return [None] * len(segments)
        heads = [self._heads_of(s, out) for s in kept]
        o = iter(
            row_parallel_out(
                self.o(stack(heads), runs(kept)),
                self.o_bias,
                kept,
                [self.cuts[s.budget].hidden for s in kept],
                self.tp_size,
            )
        )
        return [next(o) if self.cuts[s.budget].kept else None for s in segments]

    def stackable(self) -> bool:
        """Whether ``forward_stacked`` serves this layer (the default KV layout)."""
        return self.group_attns is None

    def forward_stacked(
        self, positions: torch.Tensor, x: torch.Tensor, segments: list[Segment],
        order: torch.Tensor | None, num_tokens: int,
    ) -> torch.Tensor:  # fmt: skip
        """Attention of a stacked batch (``Stack``: every segment keeps the layer, one
        rank, eager): ``x`` its normed inputs, ``order`` the forward token of each stacked
        row. One gather into forward order for attention and one back, where the routed
        forward scatters q, k and v and gathers the heads per segment; returns o_proj's
        output ``[rows, widest]``."""
        ks, r = self.kv_size, runs(segments)
        qkv = self.qkv(x, r, scratch.buffer("stack.qkv", x.shape[0], self.qkv.out_width(r), x))
        if order is not None:
            fwd = scratch.buffer("stack.qkv_fwd", num_tokens, qkv.shape[1], qkv)
            qkv = fwd.index_copy_(0, order, qkv)
        # a smaller budget's rows hold finite leftovers past its q columns: heads that
        # are attended and then dropped
        groups = max(self.cuts[s.budget].kv_groups for s in segments)
        q = qkv[:, 2 * ks : 2 * ks + groups * self.group * self.head_dim]
        k, v = qkv[:, :ks], qkv[:, ks : 2 * ks]
        q, k = self._norm_and_rope(positions, q, k, num_tokens)
        out = self._attend(q, k, v, groups)
        heads = out if order is None else out.index_select(0, order)
        start = 0
        for seg in segments:  # kept groups' dropped heads: zero
            cut = self.cuts[seg.budget]
            if cut.heads_per_group < self.group:
                part = heads[start : start + seg.rows, : cut.q_rows]
                part = part.view(seg.rows, cut.kv_groups, self.group, self.head_dim)
                part[:, :, cut.heads_per_group :] = 0
            start += seg.rows
        return self.o(heads, r)

    def _norm_and_rope(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head q/k RMSNorm (Qwen3), then RoPE: outside a graph on CPU vLLM's fused
        kernel in place (``cpu_kernels.rotary_``), else the layer's own dispatch."""
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(num_tokens, -1, self.head_dim)).view(num_tokens, -1)
            k = self.k_norm(k.reshape(num_tokens, self.n_kv, self.head_dim)).view(
                num_tokens, self.kv_size
            )
        if self.rotary_emb is not None and (
            is_compiling() or not cpu_kernels.rotary_(self.rotary_emb, positions, q, k)
        ):
            q, k = self.rotary_emb(positions, q, k)
        return q, k

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int
    ) -> torch.Tensor:
        """Default layout: attention of the batch's first ``groups`` KV groups (their own
        heads where ``attend_heads`` serves the layer), else vLLM's path at the parent's
        head count (``q`` widened; the extra heads' output is dropped by the caller)."""
        out = None
        if groups < self.n_kv:
            q_read = q[:, : groups * self.group * self.head_dim]
            out = cpu_attention.attend_heads(self.attn, q_read, k, v, groups)
        if out is None:
            out = self.attn(widen(q, self.q_size) if q.shape[1] != self.q_size else q, k, v)
        return out

    def _attend_groups(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, read_heads: int
    ) -> torch.Tensor | None:
        """Per-budget layout: write every KV group's K/V, attend the first groups up to
        ``read_heads`` KV heads; their output (None if the batch reads none)."""
        w, hd = self.kv_width, self.head_dim
        qw, kw = w * self.group * hd, w * hd
        outs = []
        for g, attn in enumerate(self.group_attns):
            kg, vg = k[:, g * kw : (g + 1) * kw], v[:, g * kw : (g + 1) * kw]
            if g * w < read_heads:
                qg = q[:, g * qw : (g + 1) * qw]
                out = cpu_attention.attend_heads(attn, qg, kg, vg, w)
                outs.append(attn(qg, kg, vg) if out is None else out)
            else:
                cpu_attention.write_kv(attn, kg, vg)
        if not outs:
            return None
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _heads_of(self, seg: Segment, out: torch.Tensor) -> torch.Tensor:
        """The segment's attention output over its kept heads (dropped heads zeroed)."""
        cut = self.cuts[seg.budget]
        attn = take(out, seg.idx)[:, : cut.q_rows]
        if cut.heads_per_group < self.group:
            attn = attn.reshape(attn.shape[0], cut.kv_groups, self.group, self.head_dim).clone()
            attn[:, :, cut.heads_per_group :] = 0
            attn = attn.view(attn.shape[0], -1)
        return attn


def _letters(n: int) -> str:
    """``n`` as letters (a, b, ..., z, ba, ...): vLLM reads a layer's index as the one
    integer in its name."""
    out = ""
    while True:
        out = chr(ord("a") + n % 26) + out
        n //= 26
        if not n:
            return out
