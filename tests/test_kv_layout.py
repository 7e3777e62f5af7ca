"""``kv_layout: per-budget``: each attention layer's KV heads split into KV groups, each its
own vLLM KV-cache group, and a request stores only the groups of the budgets it can run
at. Exact against stock vLLM on the slices (alone, mixed, compiled), the same budget
control as the parent layout, prefix caching, the blocks a request holds, and a clear
start-up error where the layout cannot be honoured."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import ENGINE_KWARGS, assert_same_output, budget_names, generate_greedy, greedy

NAME = "llama_chain"  # KV heads 4 / 3 / 2: four KV groups of one head; mid stores 3, small 2
PER_BUDGET = {"elastic": {"kv_layout": "per-budget"}}
STORED = {"full": 4, "mid": 3, "small": 2}


def per_budget_llm(elastic_llm: Any, name: str = NAME, **overrides: Any) -> Any:
    return elastic_llm(name, enforce_eager=False, additional_config=PER_BUDGET, **overrides)


def _scheduler(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler  # in-process engine (tests)


def test_per_budget_layout_is_exact_alone_and_mixed(reference, elastic_llm, prompts):
    """Compiled (one graph per budget, attention group by group) and mixed (the routed
    eager forward): every budget equals stock vLLM on its slice."""
    budgets = budget_names(NAME)
    want = {b: reference(NAME, b) for b in budgets}
    llm = per_budget_llm(elastic_llm)
    groups = _scheduler(llm).kv_cache_config.kv_cache_groups
    assert len(groups) == 4, [type(g.kv_cache_spec).__name__ for g in groups]
    assert sorted(g.kv_cache_spec.kv_group for g in groups) == [0, 1, 2, 3]
    assert all(g.kv_cache_spec.num_kv_heads == 1 for g in groups)
    for b in budgets:
        got = greedy(llm, prompts, [{"elastic_budget": b}] * len(prompts), 12)
        for i, (g, w) in enumerate(zip(got, want[b])):
            assert_same_output(g, w, f"per-budget KV, budget {b}, prompt {i}")
    mix = [budgets[(i + j) % len(budgets)] for j in range(2) for i in range(len(prompts))]
    batch = prompts + prompts
    got = greedy(llm, batch, [{"elastic_budget": b} for b in mix], 12)
    for k, (g, b) in enumerate(zip(got, mix)):
        assert_same_output(g, want[b][k % len(prompts)], f"per-budget KV, mixed {k} ({b})")


def test_a_request_holds_blocks_only_in_its_stored_groups(elastic_llm, prompts):
    """After their prefill: a request at one budget has pool blocks in that budget's KV
    groups and the null block in the others; a reuse request (small thinks, full
    answers) holds every group full reads; the pool lost exactly those blocks."""
    llm = per_budget_llm(elastic_llm)
    engine, scheduler = llm.llm_engine, _scheduler(llm)
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    pool = scheduler.kv_cache_manager.block_pool
    from vllm import SamplingParams

    cases = {
        "full": ({"elastic_budget": "full"}, STORED["full"]),
        "mid": ({"elastic_budget": "mid"}, STORED["mid"]),
        "small": ({"elastic_budget": "small"}, STORED["small"]),
        "reuse": ({"elastic_think_budget": "small", "elastic_answer_budget": "full"}, 4),
    }
    free = pool.get_num_free_blocks()
    prompt = prompts[1]  # 11 tokens: one block per group
    for rid, (extra, _) in cases.items():
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, extra_args=extra)
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    engine.step()
    ids = {rid: [i for i in scheduler.requests if i == rid or i.startswith(f"{rid}-")]
           for rid in cases}  # fmt: skip
    assert all(len(v) == 1 for v in ids.values()), ids  # vLLM may suffix request ids
    held = {}
    for rid, (_, stored) in cases.items():
        rid = ids[rid][0]
        real = [sum(not b.is_null for b in m.req_to_blocks[rid]) for m in managers]
        nulls = [sum(b.is_null for b in m.req_to_blocks[rid]) for m in managers]
        by_group = sorted(zip((m.kv_group for m in managers), real, nulls))
        assert [r > 0 for _, r, _ in by_group] == [g < stored for g in range(4)], (rid, by_group)
        assert all(n == 0 for g, _, n in by_group if g < stored), (rid, by_group)
        assert all(n > 0 for g, _, n in by_group if g >= stored), (rid, by_group)
        held[rid] = sum(real)
    assert free - pool.get_num_free_blocks() == sum(held.values())
    while engine.has_unfinished_requests():
        engine.step()
    assert pool.get_num_free_blocks() == free


def _null_block_sums(llm: Any, zero: bool = False) -> list[float]:
    """Per KV-group attention layer: the absolute sum of its cache's block 0 (vLLM's null
    block, where a request that does not store the group has its slots); ``zero`` clears
    it first."""
    from vllm_elastic.compat.kv_groups import KVGroupAttention

    def sums(model: Any) -> list[float]:
        layers = [m for m in model.modules() if isinstance(m, KVGroupAttention)]
        if zero:
            for m in layers:
                m.kv_cache[0].zero_()
        return [float(m.kv_cache[0].abs().sum()) for m in layers]

    return llm.apply_model(sums)[0]


def test_a_group_no_request_of_the_batch_stores_is_not_written(elastic_llm, prompts):
    """Small-budget batches (small stores 2 of the 4 KV groups, its requests hold the null
    block in the others) write no K/V for groups 2 and 3: the null block stays untouched.
    A mixed batch writes them (its full-budget rows store them), so the small rows' K/V
    land in the null block there: the check sees writes."""
    llm = per_budget_llm(elastic_llm)
    layers = llm.llm_engine.model_config.hf_config.num_hidden_layers
    assert len(_null_block_sums(llm, zero=True)) == 4 * layers
    greedy(llm, prompts, [{"elastic_budget": "small"}] * len(prompts), 6)
    assert not any(_null_block_sums(llm)), _null_block_sums(llm)
    greedy(llm, prompts[:2], [{"elastic_budget": "small"}, {"elastic_budget": "full"}], 6)
    assert any(_null_block_sums(llm))


def _generate_one(llm: Any, prompt: list[int], extra: dict[str, Any]) -> Any:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, extra_args=extra)
    return llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]


def test_prefix_cache_hit_of_a_request_that_stores_fewer_groups(elastic_llm, prompts):
    """A repeated small-budget prompt hits the prefix cache (its unstored groups count as
    hits) and decodes the same tokens; a full-budget request of the same prompt does not
    share its blocks (another schedule, another salt)."""
    llm = per_budget_llm(elastic_llm, enable_prefix_caching=True)
    block = llm.llm_engine.vllm_config.cache_config.block_size
    prompt = (prompts[3] * 8)[: 2 * block + 5]  # two full blocks and a partial one
    small = {"elastic_budget": "small"}
    first = _generate_one(llm, prompt, small)
    again = _generate_one(llm, prompt, small)
    assert again.num_cached_tokens == 2 * block, (again.num_cached_tokens, block)
    assert list(again.outputs[0].token_ids) == list(first.outputs[0].token_ids)
    assert _generate_one(llm, prompt, {"elastic_budget": "full"}).num_cached_tokens == 0


def test_budget_control_matches_the_parent_layout(elastic_llm, checkpoint, engines, prompts):
    """reuse and recompute with a think budget that keeps half the KV groups and skips a
    layer: the per-budget layout (compiled) answers as the parent layout (eager)."""
    from transformers import AutoTokenizer

    name = "llama_bias"  # KV heads 4 / 2 / 4 / 2: two KV groups of two heads
    tok = AutoTokenizer.from_pretrained(checkpoint(name))
    start = tok.convert_tokens_to_ids("<think>")
    think = [p + [start] for p in prompts]
    policy = {"elastic_think_budget": "tiny", "elastic_answer_budget": "full"}
    extra = [{**policy, "elastic_kv_mode": m} for m in ("reuse", "recompute") for _ in think]
    batch, caps = think + think, [3, 6, 9, 3] * 2
    parent = elastic_llm(name, reasoning_parser="qwen3")
    want = [list(o.token_ids) for o in generate_greedy(parent, batch, extra, caps, 20)]
    llm = per_budget_llm(elastic_llm, name, reasoning_parser="qwen3")
    assert len(_scheduler(llm).kv_cache_config.kv_cache_groups) == 2
    got = [list(o.token_ids) for o in generate_greedy(llm, batch, extra, caps, 20)]
    assert got == want


def test_per_budget_layout_needs_an_attention_only_family(checkpoint, engines):
    from vllm import LLM

    engines.close()
    # vLLM's config (pydantic) wraps the plugin's ElasticConfigError in a ValueError
    with pytest.raises(ValueError, match="attention-only families"):
        LLM(str(checkpoint("hybrid_noe")), **{**ENGINE_KWARGS, "additional_config": PER_BUDGET})
