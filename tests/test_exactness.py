"""The acceptance test: every budget of the elastic engine equals stock vLLM on the
checkpoint sliced to that budget (greedy ids exactly, top logprobs within tolerance),
alone and mixed in one batch, with chunked prefill and requests finishing at different
steps."""

from __future__ import annotations

import pytest
from conftest import CHECKPOINTS, assert_same_output, budget_names, greedy

CASES = [(name, b) for name in CHECKPOINTS for b in budget_names(name)]


@pytest.mark.parametrize("name,budget", CASES)
def test_each_budget_alone_matches_sliced_checkpoint(name, budget, reference, elastic_llm, prompts):
    want = reference(name, budget)
    llm = elastic_llm(name)
    got = greedy(llm, prompts, [{"elastic_budget": budget}] * len(prompts), 12)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_same_output(g, w, f"{name}/{budget} prompt {i}")


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_all_budgets_mixed_in_one_batch(name, reference, elastic_llm, prompts):
    """Interleaved budgets and prompt lengths; different max_tokens so rows finish at
    different steps and the persistent batch condenses (rows move)."""
    budgets = budget_names(name)
    refs = {b: reference(name, b) for b in budgets}
    llm = elastic_llm(name)
    batch, extra, max_tokens, want = [], [], [], []
    for rep in range(2):
        for i, prompt in enumerate(prompts):
            for j, b in enumerate(budgets):
                m = 4 + (3 * i + 5 * j + 7 * rep) % 9
                batch.append(prompt)
                extra.append({"elastic_budget": b})
                max_tokens.append(m)
                ids, lps = refs[b][i]
                want.append((ids[:m], lps[:m]))
    got = greedy(llm, batch, extra, max_tokens)
    for k, (g, w) in enumerate(zip(got, want)):
        assert_same_output(g, w, f"{name} mixed request {k} ({extra[k]['elastic_budget']})")


def test_default_budget_comes_from_checkpoint(reference, elastic_llm, prompts):
    """qwen3_tied declares default_budget=half: a request without keys runs at half."""
    want = reference("qwen3_tied", "half")
    got = greedy(elastic_llm("qwen3_tied"), prompts, [None] * len(prompts), 12)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_same_output(g, w, f"default budget prompt {i}")


def test_transformers_on_the_sliced_checkpoint_agrees(sliced, elastic_llm, prompts):
    """Independent of vLLM's model code: HF transformers on the sliced checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    name, budget = "llama_bias", "tiny"
    model = AutoModelForCausalLM.from_pretrained(sliced(name, budget), dtype=torch.float32)
    model.eval()
    got = greedy(elastic_llm(name), prompts, [{"elastic_budget": budget}] * len(prompts), 12)
    for prompt, (ids, _) in zip(prompts, got):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12
            )
        assert out[0, len(prompt) :].tolist() == ids
