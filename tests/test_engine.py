"""Engine behaviour around budgets: validation, prefix caching, eager forcing, plugin."""

from __future__ import annotations

import pytest
from conftest import assert_same_output, greedy
from vllm.exceptions import VLLMValidationError

NAME = "llama_bias"


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"elastic_budget": "huge"}, r"unknown budget 'huge'.*\['full', 'kv_half'"),
        ({"elastic_budget": 3}, r"elastic_budget: expected a budget name"),
        (
            {"elastic_budget": "full", "elastic_think_budget": "tiny"},
            r"cannot be combined",
        ),
        ({"elastic_think_budget": "nope"}, r"elastic_think_budget: unknown budget 'nope'"),
        ({"elastic_kv_mode": "copy"}, r"elastic_kv_mode: expected one of"),
    ],
)
def test_bad_policy_raises_validation_error_and_engine_keeps_serving(
    extra, match, elastic_llm, reference, prompts
):
    want = reference(NAME, "tiny")
    llm = elastic_llm(NAME)
    with pytest.raises(VLLMValidationError, match=match):
        greedy(llm, prompts[:1], [extra], 4)
    # the engine is unharmed: the next (valid) request is still exact
    got = greedy(llm, prompts[:1], [{"elastic_budget": "tiny"}], 12)
    assert_same_output(got[0], want[0], "after a rejected request")


def test_bad_request_in_a_batch_rejects_before_anything_runs(elastic_llm, prompts):
    llm = elastic_llm(NAME)
    with pytest.raises(VLLMValidationError):
        greedy(llm, prompts[:2], [{"elastic_budget": "full"}, {"elastic_budget": "x"}], 4)
    assert not llm.llm_engine.has_unfinished_requests()


def _long_prompt() -> list[int]:
    return [12 + (i * 37) % 180 for i in range(150)]


def test_prefix_cache_never_crosses_budgets(elastic_llm):
    """Same prompt under two budgets with prefix caching on: each budget reuses only its
    own blocks (the policy is in cache_salt), and outputs equal the uncached engine's."""
    prompt = _long_prompt()
    schedules = [{"elastic_budget": b} for b in ("full", "tiny", "full", "tiny")]
    plain = elastic_llm(NAME)
    want = {s["elastic_budget"]: greedy(plain, [prompt], [s], 8)[0] for s in schedules[:2]}

    from vllm import SamplingParams

    cached = elastic_llm(NAME, enable_prefix_caching=True, block_size=32)
    hits = []
    for s in schedules:
        out = cached.generate(
            [{"prompt_token_ids": prompt}],
            SamplingParams(max_tokens=8, temperature=0, logprobs=5, extra_args=s),
            use_tqdm=False,
        )[0]
        hits.append(out.num_cached_tokens)
        got = (
            list(out.outputs[0].token_ids),
            [{t: lp.logprob for t, lp in st.items()} for st in out.outputs[0].logprobs],
        )
        assert_same_output(got, want[s["elastic_budget"]], f"cached {s}")
    assert hits[0] == 0 and hits[1] == 0, f"a budget reused another budget's blocks: {hits}"
    assert hits[2] > 0 and hits[3] > 0, f"prefix caching did not hit within a budget: {hits}"


def test_compile_request_is_forced_to_eager(elastic_llm, reference, prompts):
    llm = elastic_llm(NAME, enforce_eager=False)
    assert llm.llm_engine.vllm_config.model_config.enforce_eager is True
    got = greedy(llm, prompts, [{"elastic_budget": "q_thin"}] * len(prompts), 12)
    for i, (g, w) in enumerate(zip(got, reference(NAME, "q_thin"))):
        assert_same_output(g, w, f"enforce_eager=False prompt {i}")


def test_register_is_idempotent_and_blocks_transformers_fallback(elastic_llm):
    from vllm import ModelRegistry

    from vllm_elastic.plugin import register

    register()
    register()
    assert "ElasticLlamaForCausalLM" in ModelRegistry.get_supported_archs()
    llm = elastic_llm(NAME)
    config = llm.llm_engine.vllm_config.model_config
    assert config.model_impl == "vllm"  # a process without the plugin fails, never falls back
    assert config.architecture == "ElasticLlamaForCausalLM"
