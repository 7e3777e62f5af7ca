"""Tensor-parallel layout: every budget's global prefix is a per-rank prefix."""

from __future__ import annotations

import pytest
import torch

from vllm_elastic.spec.budgets import ElasticConfigError, ParentShape, parse_elastic_spec
from vllm_elastic.spec.layout import (
    channels_of_rank,
    kv_heads_of_rank,
    kv_rows_of_rank,
    q_rows_of_rank,
)

PARENT = ParentShape(
    sizes={
        "hidden_size": 64,
        "num_key_value_heads": 4,
        "num_attention_heads": 8,
        "intermediate_size": 96,
    },
    layer_kinds=("decoder",) * 2,
    tp_sharded=("num_key_value_heads", "intermediate_size"),
)
HEAD_DIM = 4


@pytest.mark.parametrize("tp,kv_keep", [(1, 1), (1, 3), (2, 2), (2, 4), (4, 4)])
def test_kv_prefix_is_a_per_rank_prefix(tp, kv_keep):
    local = kv_keep // tp
    kept = sorted(h for r in range(tp) for h in kv_heads_of_rank(4, tp, r)[:local])
    assert kept == list(range(kv_keep))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_q_rows_follow_their_kv_group(tp):
    hd, group = HEAD_DIM, PARENT.group_size
    for r in range(tp):
        q_rows = q_rows_of_rank(8, 4, hd, tp, r).view(-1, group, hd)
        kv_rows = kv_rows_of_rank(4, hd, tp, r).view(-1, hd)
        for j, kv_head_rows in enumerate(kv_rows):
            g = int(kv_head_rows[0]) // hd
            heads = (q_rows[j, :, 0] // hd).tolist()
            assert heads == [g * group + i for i in range(group)]


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_mlp_channel_prefix_is_a_per_rank_prefix(tp):
    total = 96
    for keep in range(tp, total + 1, tp):
        kept = torch.cat([channels_of_rank(total, tp, r)[: keep // tp] for r in range(tp)])
        assert sorted(kept.tolist()) == list(range(keep))


def test_budgets_that_do_not_split_over_tp_are_rejected_with_the_field():
    spec = parse_elastic_spec(
        {"budgets": [{"name": "full"}, {"name": "odd", "num_key_value_heads": 3,
                                          "num_attention_heads": 6}]},
        PARENT,
    )  # fmt: skip
    spec.check_tensor_parallel(1)
    message = r"'odd'.num_key_value_heads: 3 is not a multiple of tensor_parallel_size=2"
    with pytest.raises(ElasticConfigError, match=message):
        spec.check_tensor_parallel(2)


def test_serving_some_budgets_keeps_their_order_and_refuses_the_rest():
    """``serve_budgets``: the engine's section lists only the served budgets (checkpoint
    order), remembers the others, drops a default it does not serve; applying it twice
    changes nothing (vLLM may run the config hook more than once)."""
    from vllm_elastic.spec.budgets import served_section

    section = {
        "budgets": [{"name": "full"}, {"name": "mid", "hidden_size": 48},
                    {"name": "low", "hidden_size": 32}],
        "default_budget": "mid",
    }  # fmt: skip
    once = served_section(section, ["low", "full"], PARENT)
    spec = parse_elastic_spec(once, PARENT)
    assert spec.names == ["full", "low"] and spec.not_served == ("mid",)
    assert spec.default_budget == "full"
    assert [b.index for b in spec.budgets] == [0, 1]
    assert served_section(once, ["low", "full"], PARENT) == once
    assert parse_elastic_spec(section, PARENT).default_budget == "mid"  # input untouched
