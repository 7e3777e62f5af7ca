"""vLLM pieces of the per-budget KV layout (``spec/kv_layout.py``), on vLLM's public
KV-cache spec registry (``vllm.v1.kv_cache_spec_registry``).

* ``KVGroupSpec``: a full-attention spec for one KV group of a layer. Specs of different
  groups never merge, so vLLM's hybrid allocator makes one KV-cache group per KV group
  (the path it takes for sliding-window + full attention models): pages of the group's
  width, a block table per group, block ids from one shared pool.
* ``KVGroupManager``: vLLM's full-attention manager, except that a request whose stored
  budgets do not reach its group gets vLLM's null block there (no pool block, no prefix
  cache entry, a full "hit" on lookup), so it holds only the K/V its budgets read.
  Writes of those tokens to that group land in the null block, which nothing reads.
* ``KVGroupAttention``: vLLM's ``Attention`` declaring a ``KVGroupSpec``.

The managers learn a request's stored groups from the scheduler (``bind_scheduler``),
which answers from the request's resolved schedule; prefix-cache lookups, which vLLM
makes per spec without the request, see it through a context variable set around
``KVCacheManager.get_computed_blocks``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from vllm.model_executor.layers.attention import Attention
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

# stored KV groups of the request whose prefix-cache hit is being looked up
_LOOKUP_GROUPS: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "vllm_elastic_kv_lookup_groups", default=None
)


@dataclass(frozen=True, kw_only=True)
class KVGroupSpec(FullAttentionSpec):
    """Full attention over KV group ``kv_group`` of a layer's heads."""

    kv_group: int = 0

    @classmethod
    def merge(cls, specs: list[Any]) -> Any:
        group = specs[0].kv_group
        if not all(isinstance(s, KVGroupSpec) and s.kv_group == group for s in specs):
            raise AssertionError("KV groups of elastic attention layers do not merge")
        return replace(super().merge(specs), kv_group=group)

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, Any]) -> bool:
        return all(
            isinstance(s, KVGroupSpec) and s.kv_group == self.kv_group
            for s in kv_cache_specs.values()
        )


class KVGroupManager(FullAttentionManager):
    """Full attention, with null blocks for requests that do not store this KV group."""

    # request id -> number of KV groups it stores (set by the scheduler)
    stored_groups: Callable[[str], int] | None = None

    def __init__(self, kv_cache_spec: KVGroupSpec, **kwargs: Any) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.kv_group = kv_cache_spec.kv_group
        self._skips: dict[str, bool] = {}  # per request, fixed while it holds blocks

    def _skipped(self, request_id: str) -> bool:
        skip = self._skips.get(request_id)
        if skip is None:
            stored = self.stored_groups(request_id) if self.stored_groups else None
            skip = self._skips[request_id] = stored is not None and self.kv_group >= stored
        return skip

    def _pad(self, request_id: str, num_tokens: int) -> list[Any]:
        blocks = self.req_to_blocks[request_id]
        new = [self._null_block] * max(0, cdiv(num_tokens, self.block_size) - len(blocks))
        blocks.extend(new)
        self.num_cached_block[request_id] = len(blocks)
        return new

    def get_num_blocks_to_allocate(self, request_id: str, *args: Any, **kwargs: Any) -> int:
        if self._skipped(request_id):
            return 0
        return super().get_num_blocks_to_allocate(request_id, *args, **kwargs)

    def add_local_computed_blocks(
        self, request_id: str, new_computed_blocks: Sequence[Any], *args: Any, **kwargs: Any
    ) -> None:
        if self._skipped(request_id):
            self._pad(request_id, len(new_computed_blocks) * self.block_size)
            return
        super().add_local_computed_blocks(request_id, new_computed_blocks, *args, **kwargs)

    def allocate_external_computed_blocks(
        self, request_id: str, num_local: int, num_external: int, *args: Any, **kwargs: Any
    ) -> None:
        if self._skipped(request_id):
            self._pad(request_id, num_local + num_external)
            return
        super().allocate_external_computed_blocks(
            request_id, num_local, num_external, *args, **kwargs
        )

    def allocate_new_blocks(self, request_id: str, num_tokens: int, *args: Any) -> list[Any]:
        if self._skipped(request_id):
            return self._pad(request_id, num_tokens)
        return super().allocate_new_blocks(request_id, num_tokens, *args)

    def cache_blocks(self, request: Any, num_tokens: int, *args: Any, **kwargs: Any) -> None:
        if self._skipped(request.request_id):
            return
        super().cache_blocks(request, num_tokens, *args, **kwargs)

    def pop_blocks_for_free(self, request_id: str) -> list[Any]:
        self._skips.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes: Any,
        max_length: int,
        kv_cache_group_ids: list[int],
        block_pool: Any,
        kv_cache_spec: Any,
        drop_eagle_block: bool,
        alignment_tokens: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[tuple[list[Any], ...], int]:
        stored = _LOOKUP_GROUPS.get()
        if stored is not None and kv_cache_spec.kv_group >= stored:
            # not stored: any prefix the other groups hit is a hit here (null blocks)
            length = max_length - max_length % alignment_tokens
            blocks = cdiv(length, kv_cache_spec.block_size)
            return tuple([block_pool.null_block] * blocks for _ in kv_cache_group_ids), length
        return super().find_longest_cache_hit(
            block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec,
            drop_eagle_block, alignment_tokens, *args, **kwargs,
        )  # fmt: skip


def register() -> None:
    """Register the spec and its manager with vLLM (after vLLM's built-in specs, which
    the registry only adds while it is empty)."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(KVGroupSpec, KVGroupManager, uniform_type_base_spec=KVGroupSpec)


register()


class KVGroupAttention(Attention):
    """vLLM's attention layer for one KV group of an elastic attention layer."""

    def __init__(self, *args: Any, kv_group: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kv_group = kv_group

    def get_kv_cache_spec(self, vllm_config: Any) -> Any:
        spec = super().get_kv_cache_spec(vllm_config)
        if type(spec) is not FullAttentionSpec:
            raise NotImplementedError(
                f"elastic.kv_layout per-budget: unsupported KV cache spec {type(spec).__name__}"
            )
        fields = {f: getattr(spec, f) for f in spec.__dataclass_fields__}
        return KVGroupSpec(**fields, kv_group=self.kv_group)


def bind_scheduler(scheduler: Any, stored_groups: Callable[[Any], int | None]) -> None:
    """Give the scheduler's KV-group managers ``stored_groups(request)`` (None: all), and
    make its prefix-cache lookups see the looked-up request's stored groups."""
    kv_manager = scheduler.kv_cache_manager
    managers = getattr(kv_manager.coordinator, "single_type_managers", ())
    ours = [m for m in managers if isinstance(m, KVGroupManager)]
    if not ours:
        return

    def by_id(request_id: str) -> int | None:
        request = scheduler.requests.get(request_id)
        return None if request is None else stored_groups(request)

    for manager in ours:
        manager.stored_groups = by_id
    lookup = kv_manager.get_computed_blocks

    def get_computed_blocks(request: Any) -> Any:
        token = _LOOKUP_GROUPS.set(stored_groups(request))
        try:
            return lookup(request)
        finally:
            _LOOKUP_GROUPS.reset(token)

    kv_manager.get_computed_blocks = get_computed_blocks
