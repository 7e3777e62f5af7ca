"""vLLM's Mamba-2 state and kernels, for the elastic Mamba layer (``models/layers/mamba2.py``).

A ``MambaMixer2`` is built per layer for its state only: it registers as a layer, so the
hybrid KV-cache allocator sizes and binds its conv and SSM state (prefix caching's align
mode included); its weights are dropped (the elastic layer holds the one copy, in its own
head order). ``conv_ssm`` runs vLLM's Mamba-2 kernels (the non-speculative path of
``MambaMixer2.conv_ssm_forward``) for a prefix of the heads, on views of that state.

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

from vllm_elastic.kernels.graph_ops import fake_of, graph_op


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


def conv_ssm(
    mixer: Any,
    xbc: torch.Tensor,
    dt: torch.Tensor,
    out: torch.Tensor,
    params: dict[str, torch.Tensor],
    groups: int,
    token_heads: torch.Tensor | None = None,
) -> bool:
    """Conv + SSM over every token of the forward for the first ``heads`` heads of the
    elastic layer's head order (``out.shape[1]``), with vLLM's Mamba-2 kernels (the
    non-speculative path of ``MambaMixer2.conv_ssm_forward``) on views of the layer's
    state: conv channels ``[B | C | x of those heads]`` and SSM states of those heads.

    ``xbc`` ``[tokens, 2*groups*N + heads*P]``; ``dt`` ``[tokens, heads]``; ``out``
    ``[tokens, heads, P]`` is written; ``params`` hold ``conv_weight`` ``[channels, K]``,
    ``conv_bias``, ``A``, ``D``, ``dt_bias`` (already cut to these channels and heads).
    Head ``j`` reads B/C group ``j % groups``. ``token_heads``: per token, how many heads
    its state update covers (None: all of ``out``'s); a decode token that needs fewer
    updates only those (prefill tokens run at every head of ``out``). Returns False in a
    profile run.
    """
    from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first
    from vllm.model_executor.layers.mamba.ops.causal_conv1d import (
        causal_conv1d_fn,
        causal_conv1d_update,
    )
    from vllm.model_executor.layers.mamba.ops.ssd_combined import (
        mamba_chunk_scan_combined_varlen,
    )
    from vllm.model_executor.layers.mamba.ops.ssu_dispatch import selective_state_update

    md = _metadata(mixer)
    if md is None:
        return False
    heads, head_dim = out.shape[1], out.shape[2]
    channels = xbc.shape[1]
    bc = channels - heads * head_dim
    conv_cache = (
        mixer.kv_cache[0] if is_conv_state_dim_first() else mixer.kv_cache[0].transpose(-1, -2)
    )
    conv_state = conv_cache[:, :channels]
    ssm_state = mixer.kv_cache[1][:, :heads]
    weight, bias = params["conv_weight"], params["conv_bias"]
    nd, np_ = md.num_decode_tokens, md.num_prefill_tokens
    xbc_d, xbc_p = torch.split(xbc[: nd + np_], [nd, np_])
    dt_d, dt_p = torch.split(dt[: nd + np_], [nd, np_])
    out_d, out_p = torch.split(out[: nd + np_], [nd, np_])

    def split(y: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = y.shape[0]
        b, c, x = torch.split(y, [bc // 2, bc // 2, heads * head_dim], dim=-1)
        per_head = heads // groups  # head j = i * groups + g reads group g
        b = b.reshape(t, groups, -1).repeat(1, per_head, 1)
        c = c.reshape(t, groups, -1).repeat(1, per_head, 1)
        return x.reshape(t, heads, head_dim), b, c

    if md.num_prefills > 0:
        y = causal_conv1d_fn(
            xbc_p.transpose(0, 1), weight, bias, activation=mixer.activation,
            conv_states=conv_state, has_initial_state=md.has_initial_states_p,
            cache_indices=md.state_indices_tensor_p, metadata=md,
            query_start_loc=md.query_start_loc_p,
        ).transpose(0, 1)[:np_]  # fmt: skip
        x, b, c = split(y, heads)
        initial = None
        if md.has_initial_states_p is not None and md.prep_initial_states:
            initial = torch.where(
                md.has_initial_states_p[:, None, None, None],
                ssm_state[md.state_indices_tensor_p],
                0,
            )
        states = mamba_chunk_scan_combined_varlen(
            x, dt_p, params["A"], b, c, chunk_size=md.chunk_size, D=params["D"], z=None,
            dt_bias=params["dt_bias"], seq_idx=md.seq_idx_p, cu_seqlens=md.query_start_loc_p,
            cu_chunk_seqlens=md.cu_chunk_seqlen_p, last_chunk_indices=md.last_chunk_indices_p,
            initial_states=initial, return_intermediate_states=False, dt_softplus=True,
            dt_limit=(0.0, float("inf")), out=out_p, state_dtype=ssm_state.dtype,
        )  # fmt: skip
        ssm_state[md.state_indices_tensor_p] = states
    if md.num_decodes > 0:
        for rows, h in _decode_groups(md, token_heads, nd, heads):
            ch = bc + h * head_dim
            sel = functools.partial(_rows_of, rows=rows)
            indices = sel(md.state_indices_tensor_d)
            y = causal_conv1d_update(
                sel(xbc_d)[:, :ch], conv_state[:, :ch], weight[:ch], bias[:ch],
                mixer.activation, conv_state_indices=indices,
                num_accepted_tokens=md.num_accepted_tokens, query_start_loc=md.query_start_loc_d,
                max_query_len=indices.size(-1),
            )  # fmt: skip
            x, b, c = split(y, h)
            n_state = b.shape[-1]
            o = out_d if rows is None else out_d.new_empty(rows.numel(), h, head_dim)
            selective_state_update(
                ssm_state[:, :h], x, sel(dt_d)[:, :h, None].expand(-1, -1, head_dim),
                params["A"][:h, None, None].expand(-1, head_dim, n_state).to(torch.float32),
                b, c, params["D"][:h, None].expand(-1, head_dim),
                params["dt_bias"][:h, None].expand(-1, head_dim), dt_softplus=True,
                state_batch_indices=indices, dst_state_batch_indices=indices, out=o,
                num_accepted_tokens=md.num_accepted_tokens, cu_seqlens=md.query_start_loc_d,
            )  # fmt: skip
            if rows is not None:
                out_d[rows, :h] = o
    return True


@graph_op("mamba_conv_ssm", mutates_args=("out",))
def mamba_conv_ssm(
    xbc: torch.Tensor, dt: torch.Tensor, out: torch.Tensor, conv_weight: torch.Tensor,
    conv_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
    token_heads: torch.Tensor | None, layer_name: str, groups: int,
) -> None:  # fmt: skip
    """``conv_ssm`` as a graph node, for the state mixer registered as ``layer_name``."""
    from vllm.forward_context import get_forward_context

    mixer = get_forward_context().no_compile_layers[layer_name]
    params = {"conv_weight": conv_weight, "conv_bias": conv_bias, "A": A, "D": D,
              "dt_bias": dt_bias}  # fmt: skip
    conv_ssm(mixer, xbc, dt, out, params, groups, token_heads)


@fake_of("mamba_conv_ssm")
def _(xbc, dt, out, conv_weight, conv_bias, A, D, dt_bias, token_heads, layer_name,  # noqa: ANN001, N803
      groups) -> None:  # noqa: ANN001  # fmt: skip
    return None


def conv_ssm_in_graph(
    mixer: Any, xbc: torch.Tensor, dt: torch.Tensor, out: torch.Tensor,
    params: dict[str, torch.Tensor], groups: int, token_heads: torch.Tensor | None,
) -> None:  # fmt: skip
    """``conv_ssm`` inside a compiled graph (``mamba_conv_ssm``)."""
    torch.ops.vllm_elastic.mamba_conv_ssm(
        xbc, dt, out, params["conv_weight"], params["conv_bias"], params["A"], params["D"],
        params["dt_bias"], token_heads, mixer.prefix, groups,
    )  # fmt: skip


def _rows_of(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t.index_select(0, rows)


def _decode_groups(
    md: Any, token_heads: torch.Tensor | None, nd: int, heads: int
) -> list[tuple[torch.Tensor | None, int]]:
    """Decode tokens grouped by the heads they update: ``[(None, heads)]`` (all of them
    at every head) unless some need fewer and every decode request has one token (no
    speculative decoding)."""
    speculative = md.query_start_loc_d is not None or md.num_accepted_tokens is not None
    if token_heads is None or speculative:
        return [(None, heads)]
    decode = token_heads[:nd]
    found = torch.unique(decode).tolist()
    if found == [heads]:
        return [(None, heads)]
    return [(torch.nonzero(decode == h).flatten(), h) for h in found]


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
