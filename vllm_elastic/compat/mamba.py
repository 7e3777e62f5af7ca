"""vLLM's Mamba-2 state and kernels, for the elastic Mamba layer (``models/layers/mamba2.py``).

A ``MambaMixer2`` is built per layer for its state only: it registers as a layer, so the
hybrid KV-cache allocator sizes and binds its conv and SSM state (prefix caching's align
mode included); its weights are dropped (the elastic layer holds the one copy, in its own
head order). ``conv_ssm`` runs the conv and scan for a prefix of the heads on views of
that state: vLLM's Mamba-2 kernels (the non-speculative path of
``MambaMixer2.conv_ssm_forward``) for prefills, and for decode tokens our fused kernel
(``kernels/mamba_decode.py``) on CPU, else vLLM's.

On CPU the mixer's prefill-checkpoint KV spec is replaced by the plain Mamba spec: vLLM
0.32's CPU chunk scan cannot export an intermediate state, so with prefix caching a
prompt longer than two blocks fails in ``conv_ssm_forward`` (IndexError); without
checkpoint blocks the scheduler splits prefills at block boundaries instead.

Also: the hybrid-model classmethods (state shapes, dtypes, copy functions) of vLLM's
``NemotronHForCausalLM``, which read the same config fields.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from vllm_elastic.kernels.graph_ops import fake_of, graph_op
from vllm_elastic.models import scratch


def _mixer_cls() -> type:
    from vllm.model_executor.layers.mamba.abstract import MambaBase
    from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2
    from vllm.platforms import current_platform

    class ElasticStateMixer(MambaMixer2):
        """``MambaMixer2`` kept for its state and kernels only."""

        def get_kv_cache_spec(self, vllm_config: Any) -> Any:
            if current_platform.is_cpu():
                return MambaBase.get_kv_cache_spec(self, vllm_config)
            return super().get_kv_cache_spec(vllm_config)

    return ElasticStateMixer


_MIXER: list[type] = []


def state_mixer(config: Any, vllm_config: Any, prefix: str) -> Any:
    """A registered Mamba-2 mixer for the parent's heads, without its projections."""
    if not _MIXER:
        _MIXER.append(_mixer_cls())
    mixer = _MIXER[0](
        hidden_size=config.hidden_size,
        ssm_state_size=config.ssm_state_size,
        conv_kernel_size=config.conv_kernel,
        intermediate_size=config.mamba_num_heads * config.mamba_head_dim,
        use_conv_bias=config.use_conv_bias,
        use_bias=config.use_bias,
        n_groups=config.n_groups,
        num_heads=config.mamba_num_heads,
        head_dim=config.mamba_head_dim,
        rms_norm_eps=config.layer_norm_epsilon,
        activation=config.mamba_hidden_act,
        model_config=vllm_config.model_config,
        cache_config=vllm_config.cache_config,
        quant_config=None,
        prefix=prefix,
    )
    # the elastic layer owns every weight (in its own head order): keep the state only
    for name in ("in_proj", "out_proj", "norm", "conv1d", "A", "D", "dt_bias", "conv_weights"):
        delattr(mixer, name)
    return mixer


def _metadata(mixer: Any) -> Any:
    from vllm.forward_context import get_forward_context

    meta = get_forward_context().attn_metadata
    return meta.get(mixer.prefix) if isinstance(meta, dict) else None


def has_prefill(mixer: Any) -> bool:
    """Whether this forward runs prefill tokens through ``mixer``'s layer (True in a
    profile run: no metadata)."""
    md = _metadata(mixer)
    return md is None or md.num_prefills > 0


def plain_decode_only(mixer: Any, num_tokens: int) -> bool:
    """Whether this forward's ``num_tokens`` tokens are all decode tokens of ``mixer``'s
    layer, one per request (no padding, no speculative decoding)."""
    md = _metadata(mixer)
    return (
        md is not None
        and md.num_prefills == 0
        and md.num_decode_tokens == num_tokens
        and md.query_start_loc_d is None
        and md.num_accepted_tokens is None
    )


def state_dtypes(vllm_config: Any) -> tuple[Any, ...]:
    """Dtypes of a NemotronH layer's Mamba state (conv, SSM) in this engine."""
    from vllm.model_executor.models.nemotron_h import NemotronHForCausalLM

    return NemotronHForCausalLM.get_mamba_state_dtype_from_config(vllm_config)


def conv_ssm(
    mixer: Any,
    proj: torch.Tensor,
    out: torch.Tensor,
    params: dict[str, torch.Tensor],
    groups: int,
    token_heads: torch.Tensor | None = None,
    fused_decode: bool = False,
    decode_rows: torch.Tensor | None = None,
) -> bool:
    """Conv + SSM over every token of the forward for the first ``heads`` heads of the
    elastic layer's head order (``out.shape[1]``) on views of the layer's state: conv
    channels ``[B | C | x of those heads]`` and SSM states of those heads. Prefill tokens
    run vLLM's Mamba-2 kernels (the non-speculative path of
    ``MambaMixer2.conv_ssm_forward``); decode tokens run our fused kernel
    (``fused_decode``, ``kernels/mamba_decode.py``) or vLLM's.

    ``proj`` ``[tokens, >= 2*groups*N + heads*(2P+1)]``: in_proj rows
    ``[B | C | (x_j, dt_j, z_j) per head]``; ``out`` ``[tokens, heads, P]`` is written;
    ``params`` hold ``conv_weight`` ``[channels, K]``, ``conv_bias``, ``A``, ``D``,
    ``dt_bias`` (already cut to these channels and heads). Head ``j`` reads B/C group
    ``j % groups``. ``token_heads``: per token, how many heads its state update covers
    (None: all of ``out``'s); a decode token that needs fewer updates only those (prefill
    tokens run at every head of ``out``). ``decode_rows`` (decode-only forwards, our
    kernel): ``proj`` and ``out`` hold the tokens in another order, row ``r`` being the
    forward's token ``decode_rows[r]``. Returns False in a profile run.
    """
    from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first

    md = _metadata(mixer)
    if md is None:
        return False
    heads = out.shape[1]
    channels = params["conv_weight"].shape[0]
    conv_cache = (
        mixer.kv_cache[0] if is_conv_state_dim_first() else mixer.kv_cache[0].transpose(-1, -2)
    )
    nd, np_ = md.num_decode_tokens, md.num_prefill_tokens
    if md.num_prefills > 0:
        _prefill(mixer, md, proj[nd : nd + np_], out[nd : nd + np_], params, groups,
                 conv_cache[:, :channels], mixer.kv_cache[1][:, :heads])  # fmt: skip
    if md.num_decodes > 0:
        speculative = md.query_start_loc_d is not None or md.num_accepted_tokens is not None
        decode_heads = None if token_heads is None else token_heads[:nd]
        if fused_decode and not speculative:
            from vllm.v1.attention.backends.utils import NULL_BLOCK_ID

            from vllm_elastic.kernels.mamba_decode import decode_step

            state_idx = md.state_indices_tensor_d
            if decode_rows is not None:
                state_idx = state_idx.index_select(0, decode_rows)
            decode_step(out[:nd], conv_cache, mixer.kv_cache[1], proj[:nd], params,
                        state_idx, decode_heads, groups, NULL_BLOCK_ID)  # fmt: skip
        else:
            if decode_rows is not None:
                raise ValueError("conv_ssm: decode_rows needs the fused decode kernel")
            _decode(mixer, md, proj[:nd], out[:nd], params, groups, conv_cache,
                    None if speculative else decode_heads)  # fmt: skip
    return True


def _xbc_dt(
    proj: torch.Tensor, heads: int, head_dim: int, bc: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv input ``[B | C | x of the heads]`` and ``dt`` ``[tokens, heads]`` of in_proj rows."""
    t = proj.shape[0]
    per_head = proj[:, bc : bc + heads * (2 * head_dim + 1)].view(t, heads, 2 * head_dim + 1)
    xbc = scratch.buffer("mamba.xbc", t, bc + heads * head_dim, proj, overwritten=True)
    xbc[:, :bc] = proj[:, :bc]
    xbc[:, bc:].view(t, heads, head_dim).copy_(per_head[:, :, :head_dim])
    return xbc, per_head[:, :, head_dim].contiguous()


def _split(
    y: torch.Tensor, heads: int, head_dim: int, groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Conv output -> x ``[t, heads, P]`` and B, C repeated per head (head ``j = i*G + g``
    reads group ``g``), as vLLM's kernels take them (in reused buffers on CPU)."""
    t, bc = y.shape[0], y.shape[1] - heads * head_dim
    b, c, x = torch.split(y, [bc // 2, bc // 2, heads * head_dim], dim=-1)
    n = bc // 2 // groups

    def per_head(g: torch.Tensor, name: str) -> torch.Tensor:
        out = scratch.buffer(name, t, heads * n, g, overwritten=True)
        out.view(t, heads // groups, groups, n).copy_(g.view(t, 1, groups, n).expand(
            t, heads // groups, groups, n))  # fmt: skip
        return out.view(t, heads, n)

    xs = scratch.buffer("mamba.x", t, heads * head_dim, x, overwritten=True)
    xs.copy_(x)  # contiguous for the kernels, in a reused buffer
    return xs.view(t, heads, head_dim), per_head(b, "mamba.B"), per_head(c, "mamba.C")


def _chunk_scan(
    x: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor, out: torch.Tensor,
    params: dict[str, torch.Tensor], md: Any, initial: torch.Tensor | None,
    state_dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """Prefill scan: the final state of each sequence. vLLM's ``mamba_chunk_scan_combined_varlen``;
    on CPU its body (``_mamba_chunk_scan_combined_fwd_cpu``) with the state buffer reused
    across layers (a fresh one page-faults on every layer of a long prefill)."""
    if x.device.type != "cpu":
        from vllm.model_executor.layers.mamba.ops.ssd_combined import (
            mamba_chunk_scan_combined_varlen,
        )

        return mamba_chunk_scan_combined_varlen(
            x, dt, params["A"], b, c, chunk_size=md.chunk_size, D=params["D"], z=None,
            dt_bias=params["dt_bias"], seq_idx=md.seq_idx_p, cu_seqlens=md.query_start_loc_p,
            cu_chunk_seqlens=md.cu_chunk_seqlen_p, last_chunk_indices=md.last_chunk_indices_p,
            initial_states=initial, return_intermediate_states=False, dt_softplus=True,
            dt_limit=(0.0, float("inf")), out=out, state_dtype=state_dtype,
        )  # fmt: skip
    import vllm._custom_ops as ops

    cu = md.query_start_loc_p
    batch, (_, heads, head_dim), n = cu.numel() - 1, x.shape, b.shape[-1]
    dt = F.softplus(dt.float() + params["dt_bias"].float())
    states = scratch.buffer("mamba.states", batch, heads * head_dim * n, dt, overwritten=True)
    states = states.view(batch, heads, head_dim, n)
    if initial is None:
        states.zero_()
    else:
        states.copy_(initial)
    ops.mamba_chunk_scan_fwd_cpu(
        out, states, x, dt, params["A"], b, c, params["D"].float().contiguous(), None,
        cu.to(torch.int32),
    )  # fmt: skip
    return states.to(state_dtype)


def _prefill(
    mixer: Any, md: Any, proj: torch.Tensor, out: torch.Tensor,
    params: dict[str, torch.Tensor], groups: int, conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
) -> None:  # fmt: skip
    """Prefill tokens at every head of ``out``: the conv in one call on CPU
    (``kernels/causal_conv1d.py``; vLLM's CPU kernel loops over sequences), vLLM's conv
    elsewhere, then the chunk scan."""
    heads, head_dim = out.shape[1], out.shape[2]
    bc = params["conv_weight"].shape[0] - heads * head_dim
    xbc, dt = _xbc_dt(proj, heads, head_dim, bc)
    if proj.device.type == "cpu":
        from vllm.v1.attention.backends.utils import PAD_SLOT_ID

        from vllm_elastic.kernels.causal_conv1d import causal_conv1d_prefill

        y = causal_conv1d_prefill(
            xbc, params["conv_weight"], params["conv_bias"], conv_state,
            md.query_start_loc_p, md.state_indices_tensor_p, md.has_initial_states_p,
            mixer.activation in ("silu", "swish"), PAD_SLOT_ID,
        )  # fmt: skip
    else:
        from vllm.model_executor.layers.mamba.ops.causal_conv1d import causal_conv1d_fn

        y = causal_conv1d_fn(
            xbc.transpose(0, 1), params["conv_weight"], params["conv_bias"],
            activation=mixer.activation, conv_states=conv_state,
            has_initial_state=md.has_initial_states_p, cache_indices=md.state_indices_tensor_p,
            metadata=md, query_start_loc=md.query_start_loc_p,
        ).transpose(0, 1)[: proj.shape[0]]  # fmt: skip
    x, b, c = _split(y, heads, head_dim, groups)
    initial = None
    if md.has_initial_states_p is not None and md.prep_initial_states:
        initial = torch.where(
            md.has_initial_states_p[:, None, None, None],
            ssm_state[md.state_indices_tensor_p],
            0,
        )
    states = _chunk_scan(x, dt, b, c, out, params, md, initial, ssm_state.dtype)
    ssm_state[md.state_indices_tensor_p] = states


def _decode(
    mixer: Any, md: Any, proj: torch.Tensor, out: torch.Tensor,
    params: dict[str, torch.Tensor], groups: int, conv_cache: torch.Tensor,
    token_heads: torch.Tensor | None,
) -> None:  # fmt: skip
    """Decode tokens with vLLM's conv-update and state-update kernels, per group of
    tokens that update the same heads."""
    from vllm.model_executor.layers.mamba.ops.causal_conv1d import causal_conv1d_update
    from vllm.model_executor.layers.mamba.ops.ssu_dispatch import selective_state_update

    heads, head_dim = out.shape[1], out.shape[2]
    bc = params["conv_weight"].shape[0] - heads * head_dim
    xbc, dt = _xbc_dt(proj, heads, head_dim, bc)
    weight, bias = params["conv_weight"], params["conv_bias"]
    for rows, h in _decode_groups(token_heads, heads):
        ch = bc + h * head_dim
        sel = functools.partial(_rows_of, rows=rows)
        indices = sel(md.state_indices_tensor_d)
        y = causal_conv1d_update(
            sel(xbc)[:, :ch], conv_cache[:, :ch], weight[:ch], bias[:ch],
            mixer.activation, conv_state_indices=indices,
            num_accepted_tokens=md.num_accepted_tokens, query_start_loc=md.query_start_loc_d,
            max_query_len=indices.size(-1),
        )  # fmt: skip
        x, b, c = _split(y, h, head_dim, groups)
        n_state = b.shape[-1]
        o = out if rows is None else out.new_empty(rows.numel(), h, head_dim)
        selective_state_update(
            mixer.kv_cache[1][:, :h], x, sel(dt)[:, :h, None].expand(-1, -1, head_dim),
            params["A"][:h, None, None].expand(-1, head_dim, n_state).to(torch.float32),
            b, c, params["D"][:h, None].expand(-1, head_dim),
            params["dt_bias"][:h, None].expand(-1, head_dim), dt_softplus=True,
            state_batch_indices=indices, dst_state_batch_indices=indices, out=o,
            num_accepted_tokens=md.num_accepted_tokens, cu_seqlens=md.query_start_loc_d,
        )  # fmt: skip
        if rows is not None:
            out[rows, :h] = o


@graph_op("mamba_state_update", mutates_args=("out",), writes_cache=True)
def mamba_state_update(
    proj: torch.Tensor, out: torch.Tensor, conv_weight: torch.Tensor,
    conv_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
    token_heads: torch.Tensor | None, layer_name: str, groups: int, fused_decode: bool,
) -> None:  # fmt: skip
    """``conv_ssm`` as a graph node, for the state mixer registered as ``layer_name``.
    Side-effecting (it writes the conv and SSM state): a layer the batch's budgets skip
    writes state whose ``out`` nothing reads. (Named ``mamba_conv_ssm`` before that mark:
    the new name keeps inductor's on-disk caches from serving graphs without the node.)"""
    from vllm.forward_context import get_forward_context

    mixer = get_forward_context().no_compile_layers[layer_name]
    params = {"conv_weight": conv_weight, "conv_bias": conv_bias, "A": A, "D": D,
              "dt_bias": dt_bias}  # fmt: skip
    conv_ssm(mixer, proj, out, params, groups, token_heads, fused_decode)


@fake_of("mamba_state_update")
def _(proj, out, conv_weight, conv_bias, A, D, dt_bias, token_heads, layer_name,  # noqa: ANN001, N803
      groups, fused_decode) -> None:  # noqa: ANN001  # fmt: skip
    return None


def conv_ssm_in_graph(
    mixer: Any, proj: torch.Tensor, out: torch.Tensor, params: dict[str, torch.Tensor],
    groups: int, token_heads: torch.Tensor | None, fused_decode: bool,
) -> None:  # fmt: skip
    """``conv_ssm`` inside a compiled graph (``mamba_state_update``)."""
    torch.ops.vllm_elastic.mamba_state_update(
        proj, out, params["conv_weight"], params["conv_bias"], params["A"], params["D"],
        params["dt_bias"], token_heads, mixer.prefix, groups, fused_decode,
    )  # fmt: skip


def _rows_of(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t.index_select(0, rows)


def _decode_groups(
    token_heads: torch.Tensor | None, heads: int
) -> list[tuple[torch.Tensor | None, int]]:
    """Decode tokens grouped by the heads they update: ``[(None, heads)]`` (all of them
    at every head) unless some need fewer (``token_heads``: None under speculative
    decoding, where every token runs at every head)."""
    if token_heads is None:
        return [(None, heads)]
    found = torch.unique(token_heads).tolist()
    if found == [heads]:
        return [(None, heads)]
    return [(torch.nonzero(token_heads == h).flatten(), h) for h in found]


def hybrid_classmethods() -> dict[str, Any]:
    """``get_mamba_state_{shape,dtype}_from_config`` and ``get_mamba_state_copy_func`` of
    vLLM's NemotronH, as classmethods for another class."""
    from vllm.model_executor.models.nemotron_h import NemotronHForCausalLM

    names = (
        "get_mamba_state_shape_from_config",
        "get_mamba_state_dtype_from_config",
        "get_mamba_state_copy_func",
    )
    return {n: classmethod(NemotronHForCausalLM.__dict__[n].__func__) for n in names}
