"""The acceptance test: every budget of the elastic engine equals an independent engine on
the checkpoint sliced to that budget (greedy ids exactly, top logprobs within tolerance),
alone and mixed in one batch, with chunked prefill and requests finishing at different
steps. The independent engine is stock vLLM where its CPU build runs the slice, and
transformers for NemotronH with MoE layers."""

from __future__ import annotations

import pytest
from conftest import CHECKPOINTS, STOCK_RUNS, assert_same_output, budget_names, greedy

CASES = [(name, b) for name in CHECKPOINTS for b in budget_names(name)]


@pytest.fixture(scope="module")
def oracle(reference, hf_reference):
    def get(name: str, budget: str):
        return (reference if name in STOCK_RUNS else hf_reference)(name, budget)

    return get


@pytest.mark.parametrize("name,budget", CASES)
def test_each_budget_alone_matches_sliced_checkpoint(name, budget, oracle, elastic_llm, prompts):
    want = oracle(name, budget)
    llm = elastic_llm(name)
    got = greedy(llm, prompts, [{"elastic_budget": budget}] * len(prompts), 12)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_same_output(g, w, f"{name}/{budget} prompt {i}")


def _every_layer(name: str) -> list[str]:
    """The budgets of ``name`` that run every layer."""
    return [b["name"] for b in CHECKPOINTS[name]["budgets"] if "layers" not in b]


MIXES = {
    "all": budget_names,
    "below-full": lambda name: budget_names(name)[1:],
    # no budget skips a layer: a Llama / Qwen3 batch runs stacked (run_stacked)
    "every-layer": _every_layer,
}


@pytest.mark.parametrize(
    "name,mix",
    [
        (name, mix)
        for name in CHECKPOINTS
        for mix in MIXES
        if mix != "every-layer" or _every_layer(name) != budget_names(name)
    ],
)
def test_budgets_mixed_in_one_batch(name, mix, oracle, elastic_llm, prompts):
    """Interleaved budgets and prompt lengths; different max_tokens so rows finish at
    different steps and the persistent batch condenses (rows move). Every budget, every
    one but the full one (attention then reads the widest one's KV groups, fewer than
    every token writes), and, where some budget skips layers, those that do not."""
    budgets = MIXES[mix](name)
    refs = {b: oracle(name, b) for b in budgets}
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


@pytest.mark.parametrize(
    "name,packing",
    [("llama_bias", None), ("hybrid", None), ("llama_chain", "nested"),
     ("llama_chain", "per-budget")],
)  # fmt: skip
def test_compiled_engine_is_exact_alone_and_mixed(name, packing, oracle, elastic_llm, prompts):
    """vLLM's default compilation (no enforce_eager, Inductor): one graph per budget,
    traced at start-up (NemotronH's Mamba conv/scan and routed experts inside as custom
    ops); every budget alone runs its own graph and all mixed in one batch (the routed
    eager forward, by default) equal the oracle. With the default weight packing and the
    two others whose GEMMs differ (nested shells; one packed copy per budget)."""
    budgets = budget_names(name)
    want = {b: oracle(name, b) for b in budgets}  # before: the pool holds one engine
    options = {"additional_config": {"elastic": {"weight_packing": packing}}} if packing else {}
    llm = elastic_llm(name, enforce_eager=False, **options)
    if packing:
        used = llm.apply_model(lambda model: model.weight_packing)[0]
        assert used["requested"] == used["down"] == packing
    assert llm.llm_engine.vllm_config.model_config.enforce_eager is False
    traced = llm.apply_model(lambda m: sorted(m.budget_graphs.compile_s))[0]
    extra = set(traced) - set(budgets)  # NemotronH: "<budget>><larger budget>" state graphs
    assert set(budgets) <= set(traced), f"a budget's own graph was not traced: {traced}"
    assert all(k.split(">") in [[a, b] for a in budgets for b in budgets] for k in extra)
    assert bool(extra) == (name == "hybrid"), f"state-budget graphs: {sorted(extra)}"
    for b in budgets:
        got = greedy(llm, prompts, [{"elastic_budget": b}] * len(prompts), 12)
        for i, (g, w) in enumerate(zip(got, want[b])):
            assert_same_output(g, w, f"compiled {name} ({packing}), budget {b}, prompt {i}")
    calls = llm.apply_model(lambda m: dict(m.budget_graphs.calls))[0]
    own = [((i, i),) for i in range(len(budgets))]
    assert sorted(calls) == own, f"a budget ran eager or another graph alone: {calls}"
    mix = [budgets[i % len(budgets)] for i in range(len(prompts))]
    got = greedy(llm, prompts, [{"elastic_budget": b} for b in mix], 12)
    for i, (g, b) in enumerate(zip(got, mix)):
        assert_same_output(g, want[b][i], f"compiled {name} ({packing}), mixed, {b} prompt {i}")


def test_mamba_decode_paths_are_exact_mixed(oracle, elastic_llm, prompts):
    """NemotronH decode steps run our fused CPU kernel by default where it builds
    (``mamba_decode: auto``) and vLLM's kernels with ``mamba_decode: vllm`` (the path a
    GPU takes): both equal the oracle with every budget mixed in one batch (tokens of
    several state widths in one decode step)."""
    from vllm_elastic.kernels import build

    name, budgets = "hybrid", budget_names("hybrid")
    want = {b: oracle(name, b) for b in budgets}
    mix = [budgets[i % len(budgets)] for i in range(2 * len(prompts))]
    batch = [prompts[i % len(prompts)] for i in range(len(mix))]
    for option, fused in (("auto", build.unavailable_reason() is None), ("vllm", False)):
        llm = elastic_llm(name, additional_config={"elastic": {"mamba_decode": option}})
        flags = llm.apply_model(
            lambda m: {getattr(layer.mixer, "fused_decode", None) for layer in m.layers}
        )[0]
        assert flags - {None} == {fused}, (option, flags)
        got = greedy(llm, batch, [{"elastic_budget": b} for b in mix], 12)
        for i, (g, b) in enumerate(zip(got, mix)):
            assert_same_output(g, want[b][i % len(prompts)], f"{option}: {b} request {i}")


@pytest.mark.parametrize("name,budgets", [("llama_bias", ["full", "tiny"]),
                                          ("hybrid", ["full", "small"])])  # fmt: skip
def test_mixed_graphs_compile_every_budget_mix(name, budgets, oracle, checkpoint, engines, prompts):
    """``mixed_graphs: true``: also one graph per set of budgets a batch can hold (each
    group's token count dynamic; NemotronH: own or parent Mamba state); a batch of every
    budget runs that mix's graph and equals the oracle. The engine serves two budgets of
    the checkpoint (``serve_budgets``: the full one and the one cutting most axes), so 3
    and 5 graphs compile where all four budgets would compile 15 and 30 (minutes of CI);
    a request for a budget it does not serve is refused by name."""
    from vllm.exceptions import VLLMValidationError

    want = {b: oracle(name, b) for b in budgets}
    section = {"mixed_graphs": True, "serve_budgets": budgets}
    llm = engines.get(
        ("mixed graphs", name),
        checkpoint(name),
        enforce_eager=False,
        additional_config={"elastic": section},
    )
    assert llm.apply_model(lambda m: m.spec.names)[0] == budgets
    traced = llm.apply_model(lambda m: sorted(m.budget_graphs.compile_s))[0]
    mixes = {frozenset(s.split(">")[0] for s in k.split("+")) for k in traced}
    assert len(mixes) == 2 ** len(budgets) - 1, f"a budget mix was not traced: {traced}"
    mix = [budgets[i % len(budgets)] for i in range(len(prompts))]
    got = greedy(llm, prompts, [{"elastic_budget": b} for b in mix], 12)
    for i, (g, b) in enumerate(zip(got, mix)):
        assert_same_output(g, want[b][i], f"mixed graphs {name}, {b} prompt {i}")
    calls = llm.apply_model(lambda m: dict(m.budget_graphs.calls))[0]
    assert any(len(k) == len(budgets) for k in calls), f"no mixed graph ran: {calls}"
    other = next(b for b in budget_names(name) if b not in budgets)
    with pytest.raises(VLLMValidationError, match=f"budget '{other}' is not served by this"):
        greedy(llm, prompts[:1], [{"elastic_budget": other}], 2)


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


@pytest.mark.parametrize("budget", budget_names("hybrid_noe"))
def test_transformers_agrees_with_stock_vllm_on_hybrid_slices(budget, reference, hf_reference):
    """The two references agree where both run (Mamba-2, attention and MLP layers)."""
    for i, (hf, stock) in enumerate(
        zip(hf_reference("hybrid_noe", budget), reference("hybrid_noe", budget))
    ):
        assert_same_output(hf, stock, f"hybrid_noe/{budget} prompt {i}")
