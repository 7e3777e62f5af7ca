"""Elastic NemotronH beyond one-budget exactness (``test_exactness.py`` covers each budget
alone and mixed against transformers and stock vLLM): think -> answer switching in both
KV modes, prefix caching (vLLM's Mamba ``align`` mode) cold vs warm, preemption.

The end of thinking is forced by vLLM's ``thinking_token_budget``; the hand-built
reference is transformers: the small sliced model thinks, ``</think>`` is appended, the
large sliced model continues from prompt + trace.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from conftest import EnginePool, count_pressure_preemptions, generate_greedy, hf_greedy

NAME = "hybrid"
THINK, ANSWER = "small", "full"
POLICY = {"elastic_think_budget": THINK, "elastic_answer_budget": ANSWER}
REASONING = dict(reasoning_parser="qwen3")
THINK_TOKENS = (3, 6, 9)
ANSWER_TOKENS = 8


@pytest.fixture(scope="module")
def ids(checkpoint) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint(NAME))
    start, end = tok.convert_tokens_to_ids(["<think>", "</think>"])
    return {"start": start, "end": end}


@pytest.fixture(scope="module")
def todo(prompts, ids) -> list[tuple[list[int], int]]:
    return [(p + [ids["start"]], THINK_TOKENS[i % 3]) for i, p in enumerate(prompts)]


def run(llm: Any, prompts, extra, think, max_tokens) -> list[list[int]]:
    return [list(o.token_ids) for o in generate_greedy(llm, prompts, extra, think, max_tokens)]


@pytest.fixture(scope="module")
def hand_reference(sliced, todo, ids):
    traces = [hf_greedy(sliced(NAME, THINK), [p], t)[0][0] + [ids["end"]] for p, t in todo]
    conts = [
        hf_greedy(sliced(NAME, ANSWER), [p + tr], ANSWER_TOKENS)[0][0]
        for (p, _), tr in zip(todo, traces)
    ]
    return traces, conts


@pytest.fixture(scope="module")
def switch_llm(checkpoint, engines: EnginePool):
    def get(**overrides: Any) -> Any:
        key = ("hybrid-switch", tuple(sorted(overrides.items())))
        return engines.get(key, checkpoint(NAME), **{**REASONING, **overrides})

    return get


def test_recompute_equals_small_trace_then_large_continuation(hand_reference, switch_llm, todo):
    traces, conts = hand_reference
    extra = [{**POLICY, "elastic_kv_mode": "recompute"}] * len(todo)
    got = run(switch_llm(), [p for p, _ in todo], extra, [t for _, t in todo], 40)
    for i, (g, tr, co) in enumerate(zip(got, traces, conts)):
        want = tr + co
        assert g[: len(want)] == want, f"prompt {i}: recompute\n got {g}\nwant {want}"


def test_reuse_thinks_small_then_answers_large(hand_reference, switch_llm, todo):
    """reuse: the trace is the small model's; the answer (the large model reading the
    small model's K/V and Mamba state) is not the small model's answer."""
    traces, _ = hand_reference
    llm = switch_llm()
    prompts_, thinks = [p for p, _ in todo], [t for _, t in todo]
    got = run(llm, prompts_, [POLICY] * len(todo), thinks, 20)
    small = run(llm, prompts_, [{"elastic_budget": THINK}] * len(todo), thinks, 20)
    for i, (g, tr) in enumerate(zip(got, traces)):
        assert g[: len(tr)] == tr, f"prompt {i}: reuse thinking differs from the small model"
    assert any(g[len(tr) :] != s[len(tr) :] for g, s, tr in zip(got, small, traces))


def test_compiled_engine_switches_like_eager(hand_reference, switch_llm, todo):
    """With vLLM's default compilation (one graph per budget and Mamba state budget: a
    reuse request's thinking tokens run the small budget's graph that writes the answer
    budget's heads): recompute equals the hand reference, every output of a batch of
    both modes equals the eager engine's, reuse included, and thinking steps ran that
    graph."""
    traces, conts = hand_reference
    modes = ["recompute", "reuse"] * len(todo)
    batch = [todo[i // 2] for i in range(len(modes))]
    extra = [{**POLICY, "elastic_kv_mode": m} for m in modes]
    prompts_, thinks = [p for p, _ in batch], [t for _, t in batch]
    eager = run(switch_llm(), prompts_, extra, thinks, 24)
    llm = switch_llm(enforce_eager=False)
    traced = llm.apply_model(lambda m: sorted(m.budget_graphs.compile_s))[0]
    assert f"{THINK}>{ANSWER}" in traced, traced
    before = llm.apply_model(lambda m: dict(m.budget_graphs.calls))[0]
    got = run(llm, prompts_, extra, thinks, 24)
    assert got == eager
    for j, (g, m) in enumerate(zip(got, modes)):
        if m == "recompute":
            want = traces[j // 2] + conts[j // 2]
            assert g[: len(want)] == want, f"compiled recompute {j // 2}"
    after = llm.apply_model(lambda m: dict(m.budget_graphs.calls))[0]
    ran = {k for k, n in after.items() if n > before.get(k, 0)}
    assert any(b != s for k in ran for b, s in k), f"no thinking ran a state-budget graph: {ran}"


def test_reuse_state_budgets_equal_every_head_written(switch_llm, todo):
    """Each request writes the Mamba state of its state budget only (reuse: the answer
    budget's heads, also while thinking; one budget: its own). Outputs equal an engine in
    which every token writes every head (``full_state``), for every policy, alone and
    mixed in one batch; the answer budget here is not the full one."""
    prompts_, thinks = [p for p, _ in todo], [t for _, t in todo]
    policies = [
        {"elastic_think_budget": THINK, "elastic_answer_budget": "mid"},
        {"elastic_think_budget": "thin", "elastic_answer_budget": "mid"},
        {"elastic_budget": THINK},
        {**POLICY, "elastic_kv_mode": "recompute"},
    ]
    batch = [policies[i % len(policies)] for i in range(len(todo))]
    want = run(switch_llm(additional_config={"elastic": {"full_state": True}}), prompts_,
               batch, thinks, 16)  # fmt: skip
    llm = switch_llm()
    assert run(llm, prompts_, batch, thinks, 16) == want
    for i in range(len(todo)):
        assert run(llm, [prompts_[i]], [batch[i]], [thinks[i]], 16)[0] == want[i], i


def _words(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(12, 200) for _ in range(n)]


def test_prefix_caching_align_mode_equals_cold(switch_llm, ids):
    """Mixed policies over shared long prefixes with prefix caching (Mamba states cached at
    block boundaries): every output equals its cold run, and blocks are reused."""
    from vllm import SamplingParams

    rng = random.Random(9)
    llm = switch_llm(enable_prefix_caching=True, block_size=32)
    bases = [_words(rng, 70 + 29 * i) for i in range(2)]
    policies = [POLICY, {**POLICY, "elastic_kv_mode": "recompute"}, {"elastic_budget": THINK},
                {"elastic_budget": ANSWER}, {"elastic_budget": "thin"}]  # fmt: skip
    jobs = []
    for k in range(14):
        prompt = list(bases[k % 2]) + [ids["start"]]
        if k % 3 == 2:  # a resent transcript with closed thinking
            prompt += _words(rng, 9) + [ids["end"]] + _words(rng, 5)
        jobs.append((prompt, policies[k % len(policies)], [None, 4][k % 2]))

    def params(e, t):
        return SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                              thinking_token_budget=t, extra_args=e)  # fmt: skip

    def one(prompt, e, t, salt):
        out = llm.generate([{"prompt_token_ids": prompt, "cache_salt": salt}], params(e, t),
                           use_tqdm=False)[0]  # fmt: skip
        return list(out.outputs[0].token_ids), out.num_cached_tokens

    cold = [one(p, e, t, f"cold-{k}")[0] for k, (p, e, t) in enumerate(jobs)]
    hits = 0
    for k, (p, e, t) in enumerate(jobs):
        got, hit = one(p, e, t, "warm")
        hits += hit
        assert got == cold[k], f"request {k} ({e}) cached != cold"
    assert hits > 0, "no block was reused"


def test_preemption_keeps_outputs(hand_reference, switch_llm, todo):
    """Preempted and resumed rows equal the unpreempted run; recompute rows also equal the
    hand-built transformers reference."""
    traces, conts = hand_reference
    jobs = todo * 3
    extra = [
        {**POLICY, "elastic_kv_mode": "recompute" if i % 2 else "reuse"} for i in range(len(jobs))
    ]
    prompts_, thinks = [p for p, _ in jobs], [t for _, t in jobs]
    # outputs long enough to cross a 128-token block: running requests must grow
    want = run(switch_llm(), prompts_, extra, thinks, 160)
    small = switch_llm(kv_cache_memory_bytes=10 * 65536, max_num_seqs=8)
    count = count_pressure_preemptions(small)
    got = run(small, prompts_, extra, thinks, 160)
    assert count["n"] >= 3, f"the small cache forced {count} preemptions"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"request {i} changed after preemption"
        if extra[i]["elastic_kv_mode"] == "recompute":
            want_hand = traces[i % len(todo)] + conts[i % len(todo)]
            assert g[: len(want_hand)] == want_hand, f"request {i}: recompute after preemption"


def test_annotated_plain_checkpoint_serves_every_budget_exactly(
    sliced, engines, hf_reference, ckpt_root, prompts
):
    """``annotate``: the plain parent (the full budget sliced out) plus the budget list
    serves every budget, mixed in one batch, as transformers runs that budget's sliced
    checkpoint, without copying weights."""
    from conftest import CHECKPOINTS, REF_MAX_TOKENS, assert_same_output, budget_names, greedy

    from vllm_elastic.checkpoint import annotate

    names = budget_names(NAME)
    budgets = [names[i % len(names)] for i in range(len(prompts))]
    out = annotate(sliced(NAME, "full"), {"budgets": CHECKPOINTS[NAME]["budgets"]},
                   ckpt_root / "hybrid-annotated")  # fmt: skip
    extra = [{"elastic_budget": b} for b in budgets]
    got = greedy(engines.get(("annotated",), out), prompts, extra, REF_MAX_TOKENS)
    for i, (g, b) in enumerate(zip(got, budgets)):
        assert_same_output(g, hf_reference(NAME, b)[i], f"annotated {b} prompt {i}")
