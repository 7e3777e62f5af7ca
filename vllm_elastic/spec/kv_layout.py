"""Where K/V is stored: at the parent's width, or per budget (engine option ``kv_layout``).

``parent`` (default): every token writes K/V for every KV head into one page per block,
whatever its request's budget, so any budget can attend to it after a switch.

``per-budget``: each attention layer's KV heads (per tensor-parallel rank) are split into
*KV groups* of ``group_width`` heads, the largest width every budget's KV heads are a
multiple of. Each KV group is its own vLLM KV-cache group, with its own pages and block
table, and a request stores only the first ``stored_groups`` of them: those of the
widest budget its blocks serve. The others get vLLM's null block, so a request that
never switches holds the sliced model's K/V bytes per token.
"""

from __future__ import annotations

import math

from vllm_elastic.spec.budgets import Budget, ElasticSpec

KV_LAYOUTS = ("parent", "per-budget")


def group_width(spec: ElasticSpec, tp_size: int = 1) -> int:
    """KV heads per KV group on one rank: the gcd of every budget's KV heads per rank."""
    return math.gcd(*(b.num_key_value_heads // tp_size for b in spec.budgets))


def num_groups(spec: ElasticSpec, tp_size: int = 1) -> int:
    """KV groups per attention layer on one rank (the parent's KV heads / width)."""
    return spec.parent.sizes["num_key_value_heads"] // tp_size // group_width(spec, tp_size)


def stored_groups(spec: ElasticSpec, budget: Budget, tp_size: int = 1) -> int:
    """KV groups a request stores when the widest budget its blocks serve is ``budget``."""
    return budget.num_key_value_heads // tp_size // group_width(spec, tp_size)
