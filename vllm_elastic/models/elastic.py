"""Elastic Llama / Qwen3 for vLLM: one copy of the parent's weights, a budget per token.

Every forward groups the batch's tokens by budget once (``_plan``). Each group runs the
layer stack on views of the parent weights sliced to its budget (hidden channels, heads,
MLP channels, kept layers); a batch whose tokens share one budget runs with no gather.
Attention runs once per layer for the whole batch, and K/V are written at full width at
every budget (a skipped layer still writes K/V computed from the residual stream it
passes through): the answer phase can attend to thinking K/V. A mixed batch attends at
the parent's head count and discards the heads a budget drops (kept groups' extra heads
are masked after attention); a batch of one budget on vLLM's CPU backend attends over
its own heads only (``own_heads.py``). Either way a budget's kept heads see exactly the
sliced model's attention.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

from vllm_elastic.compat import cpu_attention as own_heads
from vllm_elastic.compat.forward_context import row_token_counts
from vllm_elastic.compat.logits import sliced_logits
from vllm_elastic.compat.runner import check_v1_runner
from vllm_elastic.control.batch_state import ElasticBatchState, lookup_state
from vllm_elastic.errors import ElasticStateError
from vllm_elastic.log import get_logger
from vllm_elastic.models import norm, scratch
from vllm_elastic.models.nested_linear import NestedLinear, requested_packing, resolve_packing
from vllm_elastic.spec.budgets import Budget, ElasticSpec
from vllm_elastic.spec.engine_options import engine_options
from vllm_elastic.spec.layout import (
    channels_of_rank,
    gate_up_rows,
    kv_rows_of_rank,
    q_rows_of_rank,
)

Index = slice | torch.Tensor
logger = get_logger(__name__)


def _take(t: torch.Tensor, idx: Index) -> torch.Tensor:
    return t[idx] if isinstance(idx, slice) else t.index_select(0, idx)


def _put(dst: torch.Tensor, idx: Index, src: torch.Tensor) -> None:
    dst[idx] = src


@dataclass(frozen=True)
class _LayerCut:
    """One budget's slice sizes in one layer, local to this tensor-parallel rank."""

    kept: bool
    hidden: int
    q_rows: int  # q rows of the kept KV groups (all their heads)
    kv_groups: int  # kept local KV heads
    heads_per_group: int  # kept query heads per KV group
    inter: int  # kept local MLP channels


@dataclass
class _Segment:
    """The tokens of one budget in this forward, and their residual stream."""

    budget: int
    idx: Index
    rows: int
    hidden: torch.Tensor
    residual: torch.Tensor | None = None


class ElasticDecoderLayer(nn.Module):
    """A Llama/Qwen3 decoder layer whose weights are sliced per token group."""

    def __init__(
        self, vllm_config: VllmConfig, spec: ElasticSpec, layer: int, qk_norm: bool, prefix: str
    ) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.tp_size = get_tensor_model_parallel_world_size()
        self.tp_rank = get_tensor_model_parallel_rank()
        p = spec.parent
        self.layer = layer
        self.head_dim = p.head_dim
        self.group = p.group_size
        self.n_q = p.num_attention_heads // self.tp_size
        self.n_kv = p.num_key_value_heads // self.tp_size
        self.q_size = self.n_q * p.head_dim
        self.kv_size = self.n_kv * p.head_dim
        self.inter = p.intermediate_size // self.tp_size
        hidden = p.hidden_size
        attn_bias = bool(getattr(config, "attention_bias", False))
        mlp_bias = bool(getattr(config, "mlp_bias", False))

        self.qkv_weight = nn.Parameter(
            torch.empty(self.q_size + 2 * self.kv_size, hidden), requires_grad=False
        )
        self.o_weight = nn.Parameter(torch.empty(hidden, self.q_size), requires_grad=False)
        self.gate_up_weight = nn.Parameter(torch.empty(2 * self.inter, hidden), requires_grad=False)
        self.down_weight = nn.Parameter(torch.empty(hidden, self.inter), requires_grad=False)
        self.qkv_bias = self.o_bias = self.gate_up_bias = self.down_bias = None
        if attn_bias:
            self.qkv_bias = nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size))
            self.o_bias = nn.Parameter(torch.empty(hidden))
        if mlp_bias:
            self.gate_up_bias = nn.Parameter(torch.empty(2 * self.inter))
            self.down_bias = nn.Parameter(torch.empty(hidden))

        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps=eps)
        self.eps = eps
        self.q_norm = RMSNorm(p.head_dim, eps=eps) if qk_norm else None
        self.k_norm = RMSNorm(p.head_dim, eps=eps) if qk_norm else None
        self.rotary_emb = get_rope(
            p.head_dim,
            max_position=getattr(config, "max_position_embeddings", 8192),
            rope_parameters=getattr(config, "rope_parameters", None),
            is_neox_style=True,
        )
        self.attn = Attention(
            self.n_q,
            p.head_dim,
            p.head_dim**-0.5,
            num_kv_heads=self.n_kv,
            cache_config=vllm_config.cache_config,
            quant_config=None,
            prefix=f"{prefix}.self_attn.attn",
        )
        self.cuts = [self._cut(b) for b in spec.budgets]
        kept = [c if c.kept else None for c in self.cuts]
        self.inter_bounds = sorted({c.inter for c in kept if c is not None} | {self.inter})
        self.gate_rows, self.up_rows = gate_up_rows(self.inter_bounds, self.inter)
        kv2 = 2 * self.kv_size
        self.qkv = NestedLinear([(kv2 + (c.q_rows if c.kept else 0), c.hidden) for c in self.cuts])
        self.o = NestedLinear([None if c is None else (c.hidden, c.q_rows) for c in kept])
        self.gate_up = NestedLinear([None if c is None else (2 * c.inter, c.hidden) for c in kept])
        self.down = NestedLinear([None if c is None else (c.hidden, c.inter) for c in kept])
        # row-parallel (o, down) biases go after the all-reduce, not into each rank's GEMM
        self.bias_after_reduce = self.tp_size > 1
        # rows per gate_up -> activation -> down pass in long prefills (see _mlp)
        self.mlp_window = engine_options(vllm_config).mlp_window

    def _cut(self, b: Budget) -> _LayerCut:
        kv_groups = b.num_key_value_heads // self.tp_size
        return _LayerCut(
            kept=b.keeps_layer(self.layer),
            hidden=b.hidden_size,
            q_rows=kv_groups * self.group * self.head_dim,
            kv_groups=kv_groups,
            heads_per_group=b.group_size,
            inter=b.intermediate_sizes[self.layer] // self.tp_size,
        )

    # ----------------------------------------------------------------- weight loading
    def load_hf_weight(self, name: str, w: torch.Tensor) -> list[str]:
        """Copy one HF tensor (``self_attn.q_proj.weight`` etc.) into this rank's layout.

        Returns the names of the parameters it wrote.
        """
        p_heads, p_kv = self.n_q * self.tp_size, self.n_kv * self.tp_size
        hd, tp, rank = self.head_dim, self.tp_size, self.tp_rank
        q_rows = q_rows_of_rank(p_heads, p_kv, hd, tp, rank)
        kv_rows = kv_rows_of_rank(p_kv, hd, tp, rank)
        ch = channels_of_rank(self.inter * tp, tp, rank)
        qs, ks = self.q_size, self.kv_size
        kind = name.rsplit(".", 1)[-1]  # weight | bias
        module = name.rsplit(".", 1)[0]
        target = {
            "self_attn.k_proj": ("qkv", slice(0, ks), kv_rows),
            "self_attn.v_proj": ("qkv", slice(ks, 2 * ks), kv_rows),
            "self_attn.q_proj": ("qkv", slice(2 * ks, 2 * ks + qs), q_rows),
        }.get(module)
        if target is not None:
            param = getattr(self, f"{target[0]}_{kind}")
            param.data[target[1]].copy_(w[target[2]])
            return [f"{target[0]}_{kind}"]
        row_parallel = {"self_attn.o_proj": ("o", q_rows), "mlp.down_proj": ("down", ch)}
        if module in row_parallel:  # input columns per rank; the bias is whole
            short, cols = row_parallel[module]
            getattr(self, f"{short}_{kind}").data.copy_(w[:, cols] if kind == "weight" else w)
            return [f"{short}_{kind}"]
        if module in ("mlp.gate_proj", "mlp.up_proj"):
            param = getattr(self, f"gate_up_{kind}")
            rows = self.gate_rows if module == "mlp.gate_proj" else self.up_rows
            param.data.index_copy_(0, rows, w[ch].to(param.dtype))
            return [f"gate_up_{kind}"]
        params = dict(self.named_parameters())
        name = name.removeprefix("self_attn.")  # q_norm / k_norm live on the layer
        if name in params:
            default_weight_loader(params[name], w)
            return [name]
        raise KeyError(name)

    def pack_weights(self, packing: str) -> dict[str, str]:
        """Store the four projections for the forward (see ``NestedLinear``).

        Packed projections drop their plain parameter (as vLLM's CPU linears do).
        Returns the packing each projection got.
        """
        row_bias = not self.bias_after_reduce
        used = {}
        for name, bias_in_gemm in (
            ("qkv", True),
            ("o", row_bias),
            ("gate_up", True),
            ("down", row_bias),
        ):
            weight = getattr(self, f"{name}_weight")
            bias = getattr(self, f"{name}_bias") if bias_in_gemm else None
            nl: NestedLinear = getattr(self, name)
            used[name] = nl.pack(weight.data, None if bias is None else bias.data, packing)
            if used[name] != "views":
                weight.data = weight.data.new_empty(0)
        return used

    # ----------------------------------------------------------------------- forward
    def _norm(
        self, weight: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Fused add +) RMSNorm over the first ``x.shape[-1]`` channels."""
        if residual is None:
            return norm.rms_norm(x, weight, self.eps), x
        return norm.fused_add_rms_norm(x, residual, weight, self.eps)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return tensor_model_parallel_all_reduce(x) if self.tp_size > 1 else x

    def forward(self, positions: torch.Tensor, segments: list[_Segment], num_tokens: int) -> None:
        """Run the layer for every segment, updating each segment's stream in place."""
        qs, ks = self.q_size, self.kv_size
        xs = []
        for seg in segments:
            if self.cuts[seg.budget].kept:
                seg.hidden, seg.residual = self._norm(
                    self.input_layernorm.weight, seg.hidden, seg.residual
                )
                xs.append(seg.hidden)
            else:  # skipped layer: K/V only, from the stream it passes through
                stream = seg.hidden if seg.residual is None else seg.hidden + seg.residual
                xs.append(self._norm(self.input_layernorm.weight, stream, None)[0])
        qkv = self.qkv(_stack(xs), [(s.budget, s.rows) for s in segments])
        cut = self.cuts[segments[0].budget]
        own = (  # one budget that reads fewer KV heads than it writes
            len(segments) == 1
            and cut.kept
            and cut.kv_groups < self.n_kv
            and own_heads.supported(self.attn)
        )
        if len(segments) == 1:
            k, v, q = qkv[:, :ks], qkv[:, ks : 2 * ks], qkv[:, 2 * ks :]
            if q.shape[1] != qs and not own:  # a skipped layer has no q columns at all
                q = _widen(q, qs)
        else:
            q = scratch.buffer("attn.q", num_tokens, qs, qkv)
            k = qkv.new_empty(num_tokens, ks)
            v = qkv.new_empty(num_tokens, ks)
            start = 0
            for seg in segments:
                part = qkv[start : start + seg.rows]
                start += seg.rows
                _put(k, seg.idx, part[:, :ks])
                _put(v, seg.idx, part[:, ks : 2 * ks])
                rows = self.cuts[seg.budget].q_rows if self.cuts[seg.budget].kept else 0
                if rows:
                    _put(q[:, :rows], seg.idx, part[:, 2 * ks : 2 * ks + rows])

        if self.q_norm is not None:
            q = self.q_norm(q.reshape(num_tokens, -1, self.head_dim)).view(num_tokens, -1)
            k = self.k_norm(k.reshape(num_tokens, self.n_kv, self.head_dim)).view(num_tokens, ks)
        q, k = self.rotary_emb(positions, q, k)
        out = own_heads.attend(self.attn, q, k, v, cut.kv_groups) if own else None
        if out is None:
            out = self.attn(_widen(q, qs) if q.shape[1] != qs else q, k, v)

        kept = [s for s in segments if self.cuts[s.budget].kept]
        if kept:
            self._mlp_block(kept, [self._heads_of(s, out) for s in kept])

    def _heads_of(self, seg: _Segment, out: torch.Tensor) -> torch.Tensor:
        """The segment's attention output over its kept heads (dropped heads zeroed)."""
        cut = self.cuts[seg.budget]
        attn = _take(out, seg.idx)[:, : cut.q_rows]
        if cut.heads_per_group < self.group:
            attn = attn.reshape(attn.shape[0], cut.kv_groups, self.group, self.head_dim).clone()
            attn[:, :, cut.heads_per_group :] = 0
            attn = attn.view(attn.shape[0], -1)
        return attn

    def _mlp_block(self, segs: list[_Segment], attn: list[torch.Tensor]) -> None:
        """o_proj, residual + norm, MLP for the segments that keep this layer."""
        runs = [(s.budget, s.rows) for s in segs]
        o = self._row_parallel_out(self.o(_stack(attn), runs), self.o_bias, segs)
        xs = []
        for seg, part in zip(segs, o):
            x, seg.residual = self._norm(self.post_attention_layernorm.weight, part, seg.residual)
            xs.append(x)
        d = self._row_parallel_out(self._mlp(_stack(xs), runs), self.down_bias, segs)
        for seg, part in zip(segs, d):
            seg.hidden = part.contiguous()

    def _row_parallel_out(
        self, y: torch.Tensor, bias: torch.Tensor | None, segs: list[_Segment]
    ) -> list[torch.Tensor]:
        """All-reduce a row-parallel output (o, down), split it per segment at the
        segment's hidden width, and add the bias when it was not in the GEMM."""
        parts = []
        for seg, part in zip(segs, self._reduce(y).split([s.rows for s in segs])):
            h = self.cuts[seg.budget].hidden
            part = part[:, :h]
            if bias is not None and self.bias_after_reduce:
                part = part + bias[:h]
            parts.append(part)
        return parts

    def _mlp(self, x: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
        """``down(SiLU(gate) * up)`` of the stacked rows, ``mlp_window`` rows at a time.

        Windows keep the wide gate_up output in cache between its GEMMs, the activation
        and down (a long prefill otherwise streams it through memory several times).
        """
        if x.shape[0] <= self.mlp_window:
            return self._mlp_window(x, runs)
        out = None
        for start, window in _windows(runs, self.mlp_window):
            rows = sum(m for _, m in window)
            y = self._mlp_window(x[start : start + rows], window)
            if out is None:  # the first window holds the widest budget (runs descend)
                out = y.new_empty(x.shape[0], y.shape[1])
            out[start : start + rows, : y.shape[1]] = y
        return out

    def _mlp_window(self, x: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
        blocks = self.gate_up.blocks(x, runs)
        if blocks is not None:
            act = scratch.buffer("mlp.act", x.shape[0], blocks[-1][2] // 2, x)
            for rows, n0, n, y in blocks:  # band [n0/2, n/2) of the channels: gate | up
                _silu_mul(y, act[:rows, n0 // 2 : n // 2])
            return self.down(act, runs)
        gu = None
        if self.gate_up.fills_out:
            gu = scratch.buffer("mlp.gate_up", x.shape[0], self.gate_up.out_width(runs), x)
        return self.down(self._activation(self.gate_up(x, runs, gu), runs), runs)

    def _activation(self, gu: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
        """SiLU(gate) * up, band by band of the band-major gate_up output."""
        inters = [self.cuts[b].inter for b, _ in runs]
        act = scratch.buffer("mlp.act", gu.shape[0], max(inters), gu)
        if len(runs) == 1 and inters[0] == self.inter_bounds[0]:
            n = self.inter_bounds[0]
            return _silu_mul(gu[:, : 2 * n], act)
        start = 0
        for (_, m), inter in zip(runs, inters):
            rows = slice(start, start + m)
            start += m
            a = 0
            for b in self.inter_bounds:
                if b > inter:
                    break
                _silu_mul(gu[rows, a + a : b + b], act[rows, a:b])
                a = b
        return act


def _silu_mul(gate_up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = SiLU(gate) * up`` of one band ``[gate | up]``; SiLU runs in place on it."""
    half = gate_up.shape[1] // 2
    return torch.mul(F.silu(gate_up[:, :half], inplace=True), gate_up[:, half:], out=out)


def _windows(runs: list[tuple[int, int]], size: int) -> Iterable[tuple[int, list[tuple[int, int]]]]:
    """Consecutive row windows of at most ``size`` rows: ``(first row, runs inside)``."""
    start, window, filled = 0, [], 0
    for budget, m in runs:
        while m:
            take = min(m, size - filled)
            window.append((budget, take))
            filled += take
            m -= take
            if filled == size:
                yield start, window
                start, window, filled = start + size, [], 0
    if window:
        yield start, window


def _stack(xs: list[torch.Tensor]) -> torch.Tensor:
    """Rows of every tensor, one after another, in a buffer as wide as the widest."""
    if len(xs) == 1:
        return xs[0]
    out = xs[0].new_empty(sum(x.shape[0] for x in xs), max(x.shape[1] for x in xs))
    start = 0
    for x in xs:
        out[start : start + x.shape[0], : x.shape[1]] = x
        start += x.shape[0]
    return out


def _widen(q: torch.Tensor, width: int) -> torch.Tensor:
    """``q`` in the first columns of a ``width``-wide buffer (the parent's query heads).

    The other columns hold finite leftovers: they are the query heads of KV groups the
    budget drops, whose attention outputs are never read.
    """
    out = scratch.buffer("attn.q", q.shape[0], width, q)
    out[:, : q.shape[1]] = q
    return out


def _budget_size(b: Budget) -> tuple[int, ...]:
    """Sort key: larger budgets (wider, more channels/heads/layers) sort later."""
    return (
        b.hidden_size,
        sum(b.intermediate_sizes),
        b.num_key_value_heads,
        b.num_attention_heads,
        len(b.layers),
    )


class ElasticForCausalLM(nn.Module):
    """Base class of the elastic causal LMs; subclasses pick the attention flavour."""

    qk_norm = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.vllm_config = vllm_config
        self.spec: ElasticSpec = config.elastic_spec
        check_v1_runner(vllm_config)  # this process may see other settings than the frontend
        tp = get_tensor_model_parallel_world_size()
        self.spec.check_tensor_parallel(tp)
        if get_pp_group().world_size > 1:
            raise NotImplementedError("elastic models do not support pipeline parallelism")
        hidden = self.spec.parent.hidden_size
        self.hidden_size = hidden
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden)
        self.layers = nn.ModuleList(
            ElasticDecoderLayer(vllm_config, self.spec, i, self.qk_norm, prefix=f"model.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.eps = config.rms_norm_eps
        self.lm_head = ParallelLMHead(config.vocab_size, hidden, prefix="lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.embed_tokens)
        self.logits_processor = LogitsProcessor(
            config.vocab_size, scale=getattr(config, "logit_scale", 1.0)
        )
        self.widths = np.array([b.hidden_size for b in self.spec.budgets])
        self.size_order = sorted(
            range(len(self.spec.budgets)),
            key=lambda i: _budget_size(self.spec.budgets[i]),
            reverse=True,
        )
        self.weight_packing: dict[str, str] = {}
        self.full_index = self.spec.full.index
        self._state: ElasticBatchState | None = None
        self._logit_budgets: np.ndarray | None = None

    # ------------------------------------------------------------------ batch plan
    def _batch_state(self) -> ElasticBatchState | None:
        if self._state is None:
            self._state = lookup_state(self.vllm_config)
        return self._state

    def _token_budgets(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, num_tokens: int
    ) -> np.ndarray:
        """Budget index per token; records the logits rows' budgets for compute_logits."""
        self._logit_budgets = None
        counts = row_token_counts()
        if counts is None:  # profile / dummy runs
            return np.full(num_tokens, self.full_index)
        state = self._batch_state()
        if state is None:
            raise ElasticStateError(
                "the elastic budget logits processor is not loaded in this engine, so no "
                "request's budget is known (vllm-elastic attaches it from the elastic "
                "architecture's config hook)"
            )
        qsl = np.concatenate([[0], np.cumsum(counts)])
        pos = positions.cpu().numpy()
        pending = np.flatnonzero(state.pending[: len(counts)] & (counts > 0))
        if pending.size and input_ids is not None and state.on_fed is not None:
            last = qsl[1:][pending] - 1
            index = torch.from_numpy(last).to(input_ids.device)
            state.on_fed(pending, input_ids[index].cpu().numpy(), pos[last])
        tb = state.token_budgets(counts, pos)
        if len(tb) < num_tokens:  # padding tokens (no request) run at the full budget
            tb = np.concatenate([tb, np.full(num_tokens - len(tb), self.full_index)])
        self._logit_budgets = tb[qsl[1:] - 1] if len(counts) else None
        return tb

    def _segments_of(self, tb: np.ndarray, device: torch.device) -> list[tuple[int, Index]]:
        """(budget, token index) per budget present, largest budget first.

        Largest first makes each nested projection's shells apply to a prefix of the
        stacked rows (see ``NestedLinear``).
        """
        first = int(tb[0])
        if (tb == first).all():
            return [(first, slice(0, len(tb)))]
        out: list[tuple[int, Index]] = []
        for b in sorted(np.unique(tb).tolist(), key=self.size_order.index):
            pos = np.flatnonzero(tb == b)
            if pos[-1] - pos[0] + 1 == len(pos):
                out.append((int(b), slice(int(pos[0]), int(pos[-1]) + 1)))
            else:
                out.append((int(b), torch.from_numpy(pos).to(device)))
        return out

    # --------------------------------------------------------------------- forward
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        num_tokens = embeds.shape[0]
        tb = self._token_budgets(input_ids, positions, num_tokens)
        segments = []
        for budget, idx in self._segments_of(tb, embeds.device):
            h = int(self.widths[budget])
            x = _take(embeds, idx)[:, :h].contiguous()
            segments.append(_Segment(budget, idx, x.shape[0], x))
        for layer in self.layers:
            layer(positions, segments, num_tokens)
        if len(segments) == 1 and int(self.widths[segments[0].budget]) == self.hidden_size:
            return self._final_norm(segments[0])
        out = embeds.new_zeros(num_tokens, self.hidden_size)
        for seg in segments:
            _put(out[:, : seg.hidden.shape[1]], seg.idx, self._final_norm(seg))
        return out

    def _final_norm(self, seg: _Segment) -> torch.Tensor:
        if seg.residual is None:
            return norm.rms_norm(seg.hidden, self.norm.weight, self.eps)
        return norm.fused_add_rms_norm(seg.hidden, seg.residual, self.norm.weight, self.eps)[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Logits per row at the row's budget width (hidden channels past it are zero)."""
        rb = self._logit_budgets
        if rb is None or len(rb) != hidden_states.shape[0]:
            return self.logits_processor(self.lm_head, hidden_states)
        widths = self.widths[rb]
        if (widths == self.hidden_size).all():
            return self.logits_processor(self.lm_head, hidden_states)
        if (widths == widths[0]).all():
            return self._sliced_logits(hidden_states, int(widths[0]))
        logits = None
        for w in np.unique(widths):
            rows = torch.from_numpy(np.flatnonzero(widths == w)).to(hidden_states.device)
            part = self._sliced_logits(hidden_states.index_select(0, rows), int(w))
            if part is None:
                return None
            if logits is None:
                logits = part.new_empty(hidden_states.shape[0], part.shape[1])
            logits[rows] = part
        return logits

    def _sliced_logits(self, hidden: torch.Tensor, width: int) -> torch.Tensor | None:
        return sliced_logits(self.logits_processor, self.lm_head, hidden, width)

    # ---------------------------------------------------------------- weight loading
    def process_weights_after_loading(self) -> None:
        """Pack every layer's projections (``additional_config["elastic"]["weight_packing"]``)."""
        requested = requested_packing(self.vllm_config)
        packing = resolve_packing(requested, self.layers[0].qkv_weight.device)
        used: dict[str, str] = {}
        for layer in self.layers:
            for name, how in layer.pack_weights(packing).items():
                used[name] = how if used.get(name, how) == how else "mixed"
        self.weight_packing = {"requested": requested, **used}
        logger.info("vllm-elastic weight packing: %s", self.weight_packing)

    def packed_weight_bytes(self) -> int:
        """Bytes of the oneDNN-packed projection blocks (beside the parameters)."""
        return sum(
            nl.packed_bytes()
            for layer in self.layers
            for nl in (layer.qkv, layer.o, layer.gate_up, layer.down)
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, w in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name.startswith("model.layers."):
                rest = name[len("model.layers.") :]
                layer_s, sub = rest.split(".", 1)
                layer = int(layer_s)
                for pname in self.layers[layer].load_hf_weight(sub, w):
                    loaded.add(f"layers.{layer}.{pname}")
                continue
            local = name[len("model.") :] if name.startswith("model.") else name
            if local not in params:
                raise KeyError(f"unexpected weight {name!r} in the elastic checkpoint")
            param = params[local]
            getattr(param, "weight_loader", default_weight_loader)(param, w)
            loaded.add(local)
        return loaded


class ElasticLlamaForCausalLM(ElasticForCausalLM):
    """Elastic Llama (``model_type: elastic_llama``)."""

    qk_norm = False


class ElasticQwen3ForCausalLM(ElasticForCausalLM):
    """Elastic Qwen3 (``model_type: elastic_qwen3``), with per-head q/k RMSNorm."""

    qk_norm = True
