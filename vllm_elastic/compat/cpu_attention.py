"""Attention over a budget's own heads on vLLM's CPU backend (a re-implementation of
``CPUAttentionBackendImpl.forward`` on a strided view of the cache's first KV heads).

Every token writes K/V for all the parent's KV heads (a larger budget may attend to them
after an in-flight switch), but a budget that keeps ``g`` of the KV groups only reads
those: its query heads are the first ``g * G`` and its KV heads the first ``g``. vLLM's
CPU attention kernel takes the cache as strided views, so a batch whose tokens share one
budget can attend over the first ``g`` KV heads of the cache directly, with scheduler
metadata built for ``g * G`` / ``g`` heads, instead of over all the parent's heads.
Other backends, quantized caches, sinks, ALiBi and profile runs use vLLM's path.

Inside a compiled per-budget graph the same attention is the custom op
``vllm_elastic::own_heads_attention`` (opaque to the graph like vLLM's own attention op):
it looks the layer up in the forward context and decides per call, since the CPU
backend's ``isa`` is only set on the layers after the profile run that traces the graph.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

from vllm_elastic.compat.compile import is_compiling
from vllm_elastic.kernels.graph_ops import fake_of, graph_op

# what was derived from recent attention metadata (one per KV-cache group of a forward:
# scheduler metadata per (query heads, KV heads), whether its slots are all null), held
# here so that each is compared by identity, never by a reused id
_CACHE: list[tuple[Any, dict[Any, Any]]] = []
_CACHE_SIZE = 16
# layers found supported (kept: a layer's backend and cache never change once its ``isa``
# is set, the last of the checked attributes to appear)
_SUPPORTED: weakref.WeakSet[Any] = weakref.WeakSet()


def supported(attn: Any) -> bool:
    """Whether ``attend`` can serve this vLLM attention layer (CPU backend, its
    head-major ``LBHNC`` cache layout, plain cache)."""
    if attn in _SUPPORTED:
        return True
    from vllm.v1.kv_cache_interface import KVCacheLayout

    impl = attn.impl
    backend = attn.attn_backend
    ok = (
        backend.get_name() == "CPU_ATTN"
        and tuple(backend.supported_kv_cache_layouts()) == (KVCacheLayout.LBHNC,)
        and type(impl).__name__ == "CPUAttentionBackendImpl"
        and not attn.attn_backend.forward_includes_kv_cache_update
        and attn.kv_sharing_target_layer_name is None
        and impl.kv_cache_dtype == "auto"
        and impl.alibi_slopes is None
        and impl.sinks is None
        and not getattr(impl, "use_zentorch_sdpa", False)
        and hasattr(attn, "isa")
    )
    if ok:
        _SUPPORTED.add(attn)
    return ok


def _of_meta(meta: Any) -> dict[Any, Any]:
    """What this module derived from one attention metadata (one forward, one KV-cache
    group): kept for the group's other layers."""
    derived = next((d for m, d in _CACHE if m is meta), None)
    if derived is None:  # new metadata (a new forward or another KV-cache group)
        derived = {}
        _CACHE.insert(0, (meta, derived))
        del _CACHE[_CACHE_SIZE:]
    return derived


def _only_null_slots(meta: Any, slots: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether every token's slot lies in vLLM's null block (block 0: the block a request
    gets in a KV group it does not store, ``kv_layout: per-budget``; -1 pads): then the
    batch stores nothing in this group and its K/V need not be written."""
    derived = _of_meta(meta)
    null = derived.get("null_only")
    if null is None:  # threshold: one kernel block, at most vLLM's block (conservative)
        null = derived["null_only"] = bool(slots.numel() == 0 or slots.max() < kv_cache.size(2))
    return null


def _scheduler_metadata(
    meta: Any, attn: Any, heads: int, kv_heads: int, dtype: torch.dtype
) -> torch.Tensor:
    import vllm.envs as envs
    from vllm import _custom_ops as ops

    by_heads = _of_meta(meta)
    md = by_heads.get((heads, kv_heads))
    if md is None:
        md = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=meta.seq_lens.shape[0],
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=attn.impl.head_size,
            seq_lens=meta.seq_lens,
            dtype=dtype,
            query_start_loc=meta.query_start_loc,
            causal=meta.causal,
            sliding_window_size=attn.impl.sliding_window,
            isa=attn.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=meta.dynamic_causal,
            kv_cache_dtype=attn.impl.kv_cache_dtype,
        )
        by_heads[(heads, kv_heads)] = md
    return md


def _own_kv_views(
    layer: Any, kv_cache: torch.Tensor, n_kv: int, kv_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value caches' first ``kv_groups`` heads, as strided views of the
    layer's head-major cache; made once per cache tensor and kept on the layer (so they
    go with it)."""
    cached = getattr(layer, "_elastic_own_kv", None)
    if cached is None or cached[0] is not kv_cache:
        cached = (kv_cache, {})
        layer._elastic_own_kv = cached
    pair = cached[1].get(kv_groups)
    if pair is None:
        blocks, _, block_size, _ = kv_cache.size()
        key, value = kv_cache.view(blocks, n_kv, block_size * 2, -1).chunk(2, dim=2)
        pair = cached[1][kv_groups] = (key[:, :kv_groups], value[:, :kv_groups])
    return pair


def _update_cache(
    impl: Any, layer: Any, kv_cache: torch.Tensor, slots: torch.Tensor | None,
    k: torch.Tensor, v: torch.Tensor,
) -> None:  # fmt: skip
    """Write ``k`` / ``v`` (every KV head of the layer) at ``slots``: what vLLM's
    ``unified_kv_cache_update`` does, without its lookups."""
    if slots is not None:
        n_kv, hd = impl.num_kv_heads, impl.head_size
        impl.do_kv_cache_update(layer, k.view(-1, n_kv, hd), v.view(-1, n_kv, hd), kv_cache, slots)


def attend(
    attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_groups: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:  # fmt: skip
    """Attention of the budget's own heads for tokens that keep ``kv_groups`` KV groups.

    ``q`` holds those groups' query heads (``kv_groups * G * head_dim`` columns), ``k`` /
    ``v`` every KV head: all of them are written to the cache, the first ``kv_groups`` are
    read. Returns ``[tokens, kv_groups * G * head_dim]`` (``out`` when given, contiguous),
    or None when vLLM's path must run (no attention metadata, e.g. a profile run). Call
    only when ``supported(attn)``.
    """
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.attention.attention import get_attention_context

    meta, layer, kv_cache, slots = get_attention_context(attn.layer_name)
    if meta is None or getattr(meta, "encoder_cache", None) is not None:
        return None
    impl = attn.impl
    hd, n_kv = impl.head_size, impl.num_kv_heads
    heads = q.shape[1] // hd
    _update_cache(impl, layer, kv_cache, slots, k, v)
    n = meta.num_actual_tokens
    key_cache, value_cache = _own_kv_views(layer, kv_cache, n_kv, kv_groups)
    if out is None:
        out = q.new_empty(q.shape[0], heads * hd)
    ops.cpu_attention_with_kv_cache(
        query=q[:n].reshape(n, heads, hd),
        key_cache=key_cache,
        value_cache=value_cache,
        output=out[:n].view(n, heads, hd),
        query_start_loc=meta.query_start_loc,
        seq_lens=meta.seq_lens,
        scale=impl.scale,
        causal=meta.causal,
        alibi_slopes=None,
        sliding_window=impl.sliding_window,
        block_table=meta.block_table,
        softcap=impl.logits_soft_cap,
        scheduler_metadata=_scheduler_metadata(meta, layer, heads, kv_groups, q.dtype),
        s_aux=None,
        dynamic_causal=meta.dynamic_causal,
        k_scale=layer._k_scale_float,
        v_scale=layer._v_scale_float,
        kv_cache_dtype=impl.kv_cache_dtype,
    )
    return out


@graph_op("own_heads_attention", mutates_args=("out",), writes_cache=True)
def own_heads_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    layer_name: str, kv_groups: int,
) -> None:  # fmt: skip
    """``out`` = attention of ``q``'s heads (the first ``kv_groups`` groups') for the
    vLLM attention layer ``layer_name``: ``attend`` where it serves the layer, else
    vLLM's path over every head (``q`` zero-padded, the extra heads' output dropped)."""
    from vllm.forward_context import get_forward_context

    attn = get_forward_context().no_compile_layers[layer_name]
    if supported(attn) and attend(attn, q, k, v, kv_groups, out) is not None:
        return
    wide = F.pad(q, (0, attn.num_heads * attn.head_size - q.shape[1]))
    out.copy_(attn(wide, k, v)[:, : out.shape[1]])


@fake_of("own_heads_attention")
def _(q, k, v, out, layer_name, kv_groups) -> None:  # noqa: ANN001
    return None


def attend_in_graph(
    attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_groups: int
) -> torch.Tensor:
    """``attend`` as a graph node (``own_heads_attention``); ``[tokens, q columns]``."""
    out = q.new_empty(q.shape[0], q.shape[1])
    torch.ops.vllm_elastic.own_heads_attention(q, k, v, out, attn.layer_name, kv_groups)
    return out


def attend_heads(
    attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_groups: int
) -> torch.Tensor | None:
    """Attention of ``q``'s heads (the first ``kv_groups`` KV groups') over ``attn``'s
    cache, writing all of ``k`` / ``v``: in a compiled graph the ``own_heads_attention``
    node, else ``attend`` where it serves the layer; None where the caller must run vLLM's
    path (``attn`` itself, at its head counts)."""
    if is_compiling():
        return attend_in_graph(attn, q, k, v, kv_groups)
    return attend(attn, q, k, v, kv_groups) if supported(attn) else None


def _write(attn: Any, k: torch.Tensor, v: torch.Tensor) -> None:
    from vllm.model_executor.layers.attention.attention import get_attention_context

    if supported(attn):
        meta, layer, kv_cache, slots = get_attention_context(attn.layer_name)
        if meta is not None and slots is not None and not _only_null_slots(meta, slots, kv_cache):
            _update_cache(attn.impl, layer, kv_cache, slots, k, v)
        return
    attn(k.new_zeros(k.shape[0], attn.num_heads * attn.head_size), k, v)


@graph_op("write_kv", writes_cache=True)
def write_kv_op(k: torch.Tensor, v: torch.Tensor, layer_name: str) -> None:
    """Write ``k`` / ``v`` into the cache of the vLLM attention layer ``layer_name``."""
    from vllm.forward_context import get_forward_context

    _write(get_forward_context().no_compile_layers[layer_name], k, v)


@fake_of("write_kv")
def _(k, v, layer_name) -> None:  # noqa: ANN001
    return None


def write_kv(attn: Any, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write K/V into ``attn``'s cache without attending: a layer no token of the batch
    runs (its budgets skip it), or a KV group none reads (``kv_layout: per-budget``),
    still writes K/V for a larger budget to read. In a compiled graph, a side-effecting
    op (vLLM's attention, whose output nothing reads there, would be dropped as dead
    code)."""
    if is_compiling():
        torch.ops.vllm_elastic.write_kv(k, v, attn.layer_name)
    else:
        _write(attn, k, v)
