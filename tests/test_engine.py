"""Engine behaviour around budgets: validation, prefix caching, compilation, plugin."""

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
        ({"elastic_budegt": "full"}, r"unknown request key 'elastic_budegt'; the elastic keys"),
        ({"Elastic_Budget": "full"}, r"unknown request key 'Elastic_Budget'"),
        ({"elastic_budget": "x" * 100_000}, r"unknown budget 'xxxx.*\(100002 characters\)"),
    ],
)
def test_bad_policy_raises_validation_error_and_engine_keeps_serving(
    extra, match, elastic_llm, reference, prompts
):
    want = reference(NAME, "tiny")
    llm = elastic_llm(NAME)
    with pytest.raises(VLLMValidationError, match=match) as err:
        greedy(llm, prompts[:1], [extra], 4)
    assert len(str(err.value)) < 1000
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


@pytest.mark.parametrize(
    "section,match",
    [
        ({"weight_packng": "nested"}, r"unknown key\(s\) \['weight_packng'\]; known keys"),
        ({"mlp_window": 0}, r"elastic.mlp_window: expected an int >= 1"),
        ({"mixed_graphs": "yes"}, r"elastic.mixed_graphs: expected true or false"),
        ({"mamba_decode": "fast"}, r"elastic.mamba_decode: expected one of auto, kernel, vllm"),
        ({"kv_layout": "per_budget"}, r"elastic.kv_layout: expected one of parent, per-budget"),
        ({"elastic_budget": "huge"}, r"unknown budget 'huge'"),
        ({"serve_budgets": "full"}, r"elastic.serve_budgets: expected a non-empty list"),
        ({"serve_budgets": ["full", "huge"]}, r"serve_budgets: unknown budget\(s\) \['huge'\]"),
        ({"serve_budgets": ["tiny"]}, r"\['tiny'\] must include the full budget 'full'"),
        ({"serve_budgets": ["full"], "elastic_budget": "tiny"}, r"'tiny' is not served by"),
    ],
)
def test_bad_engine_options_fail_at_startup(section, match, checkpoint, engines):
    from vllm import LLM

    engines.close()
    # vLLM's config (pydantic) wraps the plugin's ElasticConfigError in a ValueError
    with pytest.raises(ValueError, match=match):
        LLM(str(checkpoint(NAME)), dtype="float32", additional_config={"elastic": section})


def test_usage_of_every_choice_offline(elastic_llm, prompts):
    from vllm import SamplingParams

    from vllm_elastic.control.usage import elastic_usage

    llm = elastic_llm(NAME)
    params = SamplingParams(
        max_tokens=5, n=3, temperature=1.0, seed=3, ignore_eos=True,
        extra_args={"elastic_budget": "q_thin"},
    )  # fmt: skip
    out = llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)[0]
    assert len(out.outputs) == 3
    usage = elastic_usage(out)
    assert usage["tokens"] == {"q_thin": 15} and usage["choices"] == 3, usage
    assert usage["kv_mode"] is None


def test_a_missing_budget_tracker_fails_loudly(checkpoint, engines, prompts):
    """Without its budget logits processor the model cannot know any request's budget:
    it raises instead of running every request at the full budget."""
    from vllm_elastic.errors import ElasticStateError
    from vllm_elastic.models import batch_state

    llm = engines.get(("elastic-no-tracker",), checkpoint(NAME))
    llm.apply_model(lambda model: setattr(model.router, "_state", None))
    saved = dict(batch_state._STATES)
    batch_state._STATES.clear()
    try:
        with pytest.raises(Exception) as err:
            greedy(llm, prompts[:1], [{"elastic_budget": "tiny"}], 2)
        chain = [err.value, err.value.__cause__, err.value.__context__]
        assert any(isinstance(e, ElasticStateError) for e in chain) or (
            "budget logits processor is not loaded" in str(err.value)
        ), repr(err.value)
    finally:
        batch_state._STATES.update(saved)
        engines.close()


def test_serve_budgets_and_kv_layout_flags_reach_the_engine_section():
    """``vllm-elastic serve --elastic-serve-budgets tiny,full --elastic-kv-layout
    per-budget`` become the engine options; a bad layout is refused by the parser."""
    import argparse

    from vllm_elastic.cli.serve import add_policy_arguments, elastic_section

    parser = argparse.ArgumentParser()
    add_policy_arguments(parser)
    args = parser.parse_args(
        ["--elastic-serve-budgets", "tiny, full", "--elastic-kv-layout", "per-budget"]
    )
    assert elastic_section(args) == {"serve_budgets": ["tiny", "full"], "kv_layout": "per-budget"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--elastic-kv-layout", "per_budget"])
