"""With prefix caching on, every request's output is independent of what ran before it.

A cached block may be shared only when every token up to its end was computed under the
same budget schedule. Each test runs requests in an engine with prefix caching and
compares every output with the same request run *cold*: in the same engine, with a
cache salt of its own, so that it can hit nothing.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from conftest import EnginePool, count_pressure_preemptions

NAME = "llama_bias"
THINK, ANSWER = "tiny", "full"
REUSE = {"elastic_think_budget": THINK, "elastic_answer_budget": ANSWER}
RECOMPUTE = {**REUSE, "elastic_kv_mode": "recompute"}
BLOCK = 32
_cold = itertools.count()


@pytest.fixture(scope="module")
def ids(checkpoint) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint(NAME))
    names = ["<think>", "</think>", "<|user|>", "<|assistant|>"]
    return dict(zip(["start", "end", "user", "assistant"], tok.convert_tokens_to_ids(names)))


@pytest.fixture(scope="module")
def cached_llm(checkpoint, engines: EnginePool):
    def get(**overrides: Any) -> Any:
        key = ("prefix-cache", tuple(sorted(overrides.items())))
        return engines.get(
            key,
            checkpoint(NAME),
            reasoning_parser="qwen3",
            enable_prefix_caching=True,
            block_size=BLOCK,
            **overrides,
        )

    return get


def run(llm, prompt, extra, think=None, max_tokens=12, salt=None) -> tuple[list[int], int]:
    """Greedy ids of one request and how many prompt tokens it found cached."""
    from vllm import SamplingParams

    params = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
        thinking_token_budget=think, extra_args=extra,
    )  # fmt: skip
    request: dict[str, Any] = {"prompt_token_ids": prompt}
    if salt is not None:
        request["cache_salt"] = salt
    out = llm.generate([request], params, use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), out.num_cached_tokens


def cold(llm, prompt, extra, think=None, max_tokens=12) -> list[int]:
    return run(llm, prompt, extra, think, max_tokens, salt=f"cold-{next(_cold)}")[0]


def words(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(12, 200) for _ in range(n)]


@pytest.mark.parametrize("policy", [REUSE, RECOMPUTE], ids=["reuse", "recompute"])
@pytest.mark.parametrize("closed_first", [False, True])
def test_open_and_closed_thinking_prompts_never_share_wrong_blocks(
    cached_llm, ids, policy, closed_first
):
    """The issue's repro: a prompt that opens thinking and the same prompt with a closed
    thinking phase share their first blocks; in either order each equals its cold run."""
    rng = random.Random(11 + closed_first)
    opened = words(rng, 3 * BLOCK) + [ids["start"]]
    closed = opened + words(rng, 9) + [ids["end"]]
    llm = cached_llm()
    salt = f"repro-{policy.get('elastic_kv_mode', 'reuse')}-{closed_first}"
    order = [(closed, None), (opened, 5)] if closed_first else [(opened, 5), (closed, None)]
    hits = []
    for prompt, think in order:
        got, hit = run(llm, prompt, policy, think, salt=salt)
        hits.append(hit)
        assert got == cold(llm, prompt, policy, think), f"{policy} cached != cold"
    if policy is REUSE:  # the shared blocks were computed the same way: they are reused
        assert hits[1] >= 3 * BLOCK, hits


def test_multi_turn_transcript_reuses_its_blocks_exactly(cached_llm, ids):
    """Turn 2 resends turn 1's prompt, thinking and answer plus a new question: it hits
    the blocks turn 1 wrote and continues exactly as cold."""
    rng = random.Random(5)
    llm = cached_llm()
    turn1 = [ids["user"], *words(rng, 40), ids["assistant"], ids["start"]]
    out1, _ = run(llm, turn1, REUSE, think=6, max_tokens=40, salt="chat")
    assert out1[6] == ids["end"]
    turn2 = [*turn1, *out1, ids["user"], *words(rng, 20), ids["assistant"], ids["start"]]
    for policy in (REUSE, RECOMPUTE):
        got, hit = run(llm, turn2, policy, think=4, max_tokens=16, salt="chat")
        assert got == cold(llm, turn2, policy, think=4, max_tokens=16), policy
        if policy is REUSE:
            assert hit >= (len(turn1) + len(out1)) // BLOCK * BLOCK - BLOCK, hit


def test_recompute_passes_share_blocks_with_single_budget_requests(cached_llm, ids):
    """A recompute request's thinking pass is a single-budget pass at the think budget
    and its answer pass one at the answer budget: they share blocks with such requests
    and still equal their cold runs."""
    rng = random.Random(8)
    llm = cached_llm()
    prompt = words(rng, 2 * BLOCK + 5) + [ids["start"]]
    run(llm, prompt, {"elastic_budget": THINK}, salt="share")
    got, hit = run(llm, prompt, RECOMPUTE, think=5, max_tokens=14, salt="share")
    assert hit >= 2 * BLOCK, "the thinking pass did not reuse the think budget's blocks"
    assert got == cold(llm, prompt, RECOMPUTE, think=5, max_tokens=14)
    trace = got[:6]
    later, hit = run(llm, prompt + trace, {"elastic_budget": ANSWER}, salt="share")
    assert later == cold(llm, prompt + trace, {"elastic_budget": ANSWER})
    assert hit >= 2 * BLOCK, "the answer pass's blocks were not shared with the answer budget"


def test_randomized_sequence_of_mixed_requests_equals_cold(cached_llm, ids):
    """Requests of every kind over shared prefixes, run one after another and in
    batches, each equal to its cold run."""
    from vllm import SamplingParams

    rng = random.Random(21)
    llm = cached_llm()
    bases = [words(rng, BLOCK + 7 * i) for i in range(3)]
    policies = [REUSE, RECOMPUTE, {"elastic_budget": THINK}, {"elastic_budget": ANSWER}]
    jobs = []
    for _ in range(24):
        prompt = list(rng.choice(bases))
        if rng.random() < 0.7:
            prompt.append(ids["start"])
            if rng.random() < 0.5:  # a closed thinking phase, maybe a new turn
                prompt += words(rng, rng.randrange(2, 30)) + [ids["end"]]
                prompt += words(rng, rng.randrange(0, 20))
                if rng.random() < 0.5:
                    prompt.append(ids["start"])
        jobs.append((prompt, rng.choice(policies), rng.choice([None, 3, 7])))
    want = [cold(llm, p, e, t) for p, e, t in jobs]
    for (p, e, t), w in zip(jobs[:12], want):
        assert run(llm, p, e, t, salt="mix")[0] == w, (e, t)
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                       thinking_token_budget=t, extra_args=e)
        for _, e, t in jobs
    ]  # fmt: skip
    outs = llm.generate(
        [{"prompt_token_ids": p, "cache_salt": "mix"} for p, _, _ in jobs], params, use_tqdm=False
    )
    assert sum(o.num_cached_tokens for o in outs) > 0
    for k, (o, w) in enumerate(zip(outs, want)):
        assert list(o.outputs[0].token_ids) == w, f"batched request {k} ({jobs[k][1]})"


def test_preemption_with_prefix_caching_equals_cold(cached_llm, ids):
    """A KV cache too small for the batch: preempted requests resume from cached blocks
    and still equal their cold runs."""
    from vllm import SamplingParams

    rng = random.Random(3)
    base = words(rng, BLOCK + 3)
    jobs = [
        (base + words(rng, 5 + i) + [ids["start"]], [REUSE, RECOMPUTE][i % 2], 4 + i % 5)
        for i in range(12)
    ]
    want = [cold(cached_llm(), p, e, t, 60) for p, e, t in jobs]
    small = cached_llm(kv_cache_memory_bytes=10 * BLOCK * 4096, max_num_seqs=8, max_model_len=256)
    params = [
        SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True,
                       thinking_token_budget=t, extra_args=e)
        for _, e, t in jobs
    ]  # fmt: skip
    preempted = count_pressure_preemptions(small)
    outs = small.generate(
        [{"prompt_token_ids": p, "cache_salt": "pre"} for p, _, _ in jobs], params, use_tqdm=False
    )
    assert preempted["n"] >= 3, preempted
    for k, (o, w) in enumerate(zip(outs, want)):
        assert list(o.outputs[0].token_ids) == w, f"request {k} ({jobs[k][1]})"
