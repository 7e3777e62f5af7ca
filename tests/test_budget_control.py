"""Elastic budget control: think at a small budget, answer at a large one, switched in
flight at the end-of-thinking marker. The end of thinking is forced by vLLM's own
``thinking_token_budget`` (random models never close thinking on their own), which also
checks that the switch composes with vLLM's standard budget control."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import (
    ENGINE_KWARGS,
    EnginePool,
    budget_names,
    count_pressure_preemptions,
    generate_greedy,
)

NAME = "llama_bias"
THINK, ANSWER = "tiny", "full"
REASONING = dict(reasoning_parser="qwen3")  # <think> ... </think>
THINK_TOKENS = (3, 6, 9)
ANSWER_TOKENS = 8


@pytest.fixture(scope="module")
def markers(checkpoint) -> tuple[int, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint(NAME))
    start, end = tok.convert_tokens_to_ids(["<think>", "</think>"])
    return start, end


@pytest.fixture(scope="module")
def think_prompts(prompts, markers) -> list[list[int]]:
    """Prompts that open a thinking phase."""
    return [p + [markers[0]] for p in prompts]


def run(llm: Any, prompts, extra, think_tokens, max_tokens) -> list[list[int]]:
    outs = generate_greedy(llm, prompts, extra, think_tokens, max_tokens)
    return [list(o.token_ids) for o in outs]


def cases(think_prompts) -> list[tuple[list[int], int]]:
    return [(p, THINK_TOKENS[i % len(THINK_TOKENS)]) for i, p in enumerate(think_prompts)]


@pytest.fixture(scope="module")
def hand_reference(sliced, think_prompts, markers, engines: EnginePool):
    """Built by hand from stock vLLM: the sliced small checkpoint thinks (capped by
    thinking_token_budget), then the sliced large checkpoint continues from prompt + trace.
    Also the large checkpoint's own 24 tokens per prompt under the same thinking cap (the
    expectation for a request that runs at the answer budget throughout)."""
    todo = cases(think_prompts)
    small = engines.get(("stock-think", THINK), sliced(NAME, THINK), **REASONING)
    traces = run(small, [p for p, _ in todo], [None] * len(todo), [t for _, t in todo], 64)
    traces = [tr[: t + 1] for tr, (_, t) in zip(traces, todo)]
    for tr in traces:
        assert tr[-1] == markers[1], "thinking_token_budget did not force </think>"
    large = engines.get(("stock-answer", ANSWER), sliced(NAME, ANSWER), **REASONING)
    conts = run(
        large,
        [p + tr for (p, _), tr in zip(todo, traces)],
        [None] * len(todo),
        [None] * len(todo),
        ANSWER_TOKENS,
    )
    fulls = run(large, [p for p, _ in todo], [None] * len(todo), [t for _, t in todo], 24)
    engines.close()
    return traces, conts, fulls


@pytest.fixture(scope="module")
def switch_llm(checkpoint, engines: EnginePool):
    def get(**overrides: Any) -> Any:
        key = ("switch", tuple(sorted(overrides.items())))
        return engines.get(key, checkpoint(NAME), **{**REASONING, **overrides})

    return get


POLICY = {"elastic_think_budget": THINK, "elastic_answer_budget": ANSWER}


def test_recompute_equals_small_trace_then_large_continuation(
    hand_reference, switch_llm, think_prompts
):
    traces, conts, _ = hand_reference
    todo = cases(think_prompts)
    extra = [{**POLICY, "elastic_kv_mode": "recompute"}] * len(todo)
    got = run(switch_llm(), [p for p, _ in todo], extra, [t for _, t in todo], 64)
    for i, (g, tr, co) in enumerate(zip(got, traces, conts)):
        want = tr + co
        assert g[: len(want)] == want, f"prompt {i}: recompute\n got {g}\nwant {want}"


def test_compiled_engine_switches_exactly(hand_reference, switch_llm, think_prompts):
    """With vLLM's default compilation (per-budget graphs; a row whose tokens straddle
    the switch runs the routed eager path): recompute equals the hand reference, reuse
    thinks exactly as the small model, alone and batched together, and every output
    equals the eager engine's: the think budget skips a layer, whose K/V the answer
    reads, and a compiled graph must not drop that write as dead code."""
    traces, conts, _ = hand_reference
    todo = cases(think_prompts)
    modes = ["recompute", "reuse"] * len(todo)
    batch = [todo[i // 2] for i in range(len(modes))]
    extra = [{**POLICY, "elastic_kv_mode": m} for m in modes]
    eager = run(switch_llm(), [p for p, _ in batch], extra, [t for _, t in batch], 24)
    llm = switch_llm(enforce_eager=False)
    before = llm.apply_model(lambda m: sum(m.budget_graphs.calls.values()))[0]
    got = run(llm, [p for p, _ in batch], extra, [t for _, t in batch], 24)
    assert got == eager
    for j, (g, m) in enumerate(zip(got, modes)):
        i = j // 2
        want = traces[i] + conts[i] if m == "recompute" else traces[i]
        assert g[: len(want)] == want, f"compiled {m} {i}\n got {g}\nwant {want}"
    after = llm.apply_model(lambda m: sum(m.budget_graphs.calls.values()))[0]
    assert after > before, "no step of the batch ran a per-budget graph"


def test_switch_position_and_mixed_policies_in_one_batch(hand_reference, switch_llm, think_prompts):
    """Reuse and recompute rows, single-budget rows, all interleaved: each row's thinking
    trace equals the small model's, recompute rows equal the hand reference and
    single-budget rows the large checkpoint's own output; every reuse row is identical to
    the same request run alone."""
    traces, conts, fulls = hand_reference
    todo = cases(think_prompts)
    llm = switch_llm()
    alone = [run(llm, [p], [{**POLICY, "elastic_kv_mode": "reuse"}], [t], 24)[0] for p, t in todo]
    batch, extra, thinks, kinds = [], [], [], []
    for i, (p, t) in enumerate(todo):
        for kind, e in (
            ("reuse", {**POLICY}),
            ("recompute", {**POLICY, "elastic_kv_mode": "recompute"}),
            ("full", {"elastic_budget": "full"}),
        ):
            batch.append(p)
            extra.append(e)
            thinks.append(t)
            kinds.append((kind, i))
    got = run(llm, batch, extra, thinks, 24)
    for g, (kind, i) in zip(got, kinds):
        tr = traces[i]
        if kind == "reuse":
            assert g[: len(tr)] == tr, f"reuse {i}: thinking differs from the small model"
            assert g == alone[i], f"reuse {i}: batch composition changed the output"
        elif kind == "recompute":
            want = tr + conts[i]
            assert g[: len(want)] == want, f"recompute {i} in a mixed batch"
        else:
            assert g == fulls[i], f"full {i}: differs from the sliced checkpoint's output"


def test_answer_budget_starts_at_the_marker(switch_llm, think_prompts, monkeypatch):
    """White-box: every token fed at or after the marker's position ran at the answer
    budget, every earlier token at the thinking budget."""
    from vllm_elastic.models.batch_state import ElasticBatchState

    seen: list[tuple[np.ndarray, np.ndarray]] = []
    real = ElasticBatchState.token_budgets

    def spy(self, counts, positions):
        out = real(self, counts, positions)
        seen.append((np.array(positions[: len(out)]), np.array(out)))
        return out

    monkeypatch.setattr(ElasticBatchState, "token_budgets", spy)
    prompt, t = think_prompts[2], 5
    run(switch_llm(), [prompt], [POLICY], [t], 12)
    marker_pos = len(prompt) + t  # output index t is the forced </think>
    by_pos = {}
    for pos, budgets in seen:
        by_pos.update(zip(pos.tolist(), budgets.tolist()))
    assert sorted(by_pos) == list(range(len(prompt) + 11))
    names = budget_names(NAME)
    think_idx, answer_idx = names.index(THINK), names.index(ANSWER)
    for pos, b in by_pos.items():
        assert b == (answer_idx if pos >= marker_pos else think_idx), (pos, b)


def test_recompute_prompt_that_closed_thinking_answers_from_the_start(
    switch_llm, prompts, markers, sliced, engines
):
    """recompute: a prompt containing <think> ... </think> runs at the answer budget from
    its first token (checked against stock vLLM on the large sliced checkpoint)."""
    start, end = markers
    prompt = prompts[1] + [start, 40, 41, end]
    stock = engines.get(("stock-answer-plain", ANSWER), sliced(NAME, ANSWER))
    want = run(stock, [prompt], [None], [None], 10)[0]
    got = run(switch_llm(), [prompt], [{**POLICY, "elastic_kv_mode": "recompute"}], [None], 10)
    assert got[0] == want, "recompute: prompt with a closed thinking phase"


def test_reuse_resent_transcript_is_computed_as_when_it_was_generated(
    switch_llm, think_prompts, markers
):
    """reuse: a prompt that carries a closed thinking phase (a transcript sent back, as
    in multi-turn chat) is computed by the same causal schedule as the request that
    generated it: thinking at the think budget, the marker and the answer at the answer
    budget. So continuing the transcript gives exactly the original's next tokens."""
    llm = switch_llm()
    for i, (prompt, t) in enumerate(cases(think_prompts)):
        first = run(llm, [prompt], [POLICY], [t], 20)[0]
        assert first[t] == markers[1], "thinking_token_budget did not force </think>"
        cut = t + 1 + 3  # the trace, the marker and three answer tokens
        again = run(llm, [prompt + first[:cut]], [POLICY], [None], 20 - cut)[0]
        assert again == first[cut:], f"prompt {i}: the resent transcript continued differently"


def test_preemption_and_resume_keep_outputs(hand_reference, switch_llm, think_prompts):
    """A KV cache too small for the batch forces preemptions; resumed rows re-prefill
    their context at the right budgets, so outputs equal the unpreempted run, and
    recompute rows the hand reference."""
    traces, conts, _ = hand_reference
    todo = cases(think_prompts) * 3
    extra = [
        {**POLICY, "elastic_kv_mode": "recompute" if i % 2 else "reuse"} for i in range(len(todo))
    ]
    prompts_, thinks = [p for p, _ in todo], [t for _, t in todo]
    want = run(switch_llm(), prompts_, extra, thinks, 40)

    llm = switch_llm(kv_cache_memory_bytes=544 * 4096, max_num_seqs=12, block_size=32)
    count = count_pressure_preemptions(llm)
    got = run(llm, prompts_, extra, thinks, 40)
    assert count["n"] >= 3, f"the small KV cache forced {count} preemptions"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"request {i} ({extra[i]['elastic_kv_mode']}) changed after preemption"
        if extra[i]["elastic_kv_mode"] == "recompute":
            k = i % len(think_prompts)
            want_hand = traces[k] + conts[k]
            assert g[: len(want_hand)] == want_hand, f"request {i}: recompute after preemption"


def test_prefix_caching_with_switching_schedules(switch_llm, think_prompts):
    """Same prompt under several schedules with prefix caching on: every output equals
    the uncached engine's (no K/V crosses schedules)."""
    prompt, t = think_prompts[3], 4
    schedules = [
        {**POLICY},
        {**POLICY, "elastic_kv_mode": "recompute"},
        {"elastic_budget": THINK},
        {"elastic_budget": ANSWER},
    ]
    want = [run(switch_llm(), [prompt], [s], [t], 16)[0] for s in schedules]
    cached = switch_llm(enable_prefix_caching=True, block_size=32)
    for _ in range(2):
        for s, w in zip(schedules, want):
            assert run(cached, [prompt], [s], [t], 16)[0] == w, f"cached {s}"


def test_engine_default_policy(checkpoint, engines, switch_llm, think_prompts):
    """An engine-wide default policy applies to requests that give no keys; a request
    key still overrides it."""
    prompt, t = think_prompts[0], 4
    base = switch_llm()
    want_switch = run(base, [prompt], [POLICY], [t], 12)[0]
    want_full = run(base, [prompt], [{"elastic_budget": "full"}], [t], 12)[0]
    llm = engines.get(
        ("default-policy",),
        checkpoint(NAME),
        **REASONING,
        additional_config={"elastic": {**POLICY}},
    )
    assert run(llm, [prompt], [None], [t], 12)[0] == want_switch
    assert run(llm, [prompt], [{"elastic_budget": "full"}], [t], 12)[0] == want_full


def test_bad_default_policy_fails_at_startup(checkpoint, engines):
    engines.close()
    with pytest.raises(Exception, match="unknown budget 'huge'"):
        engines.get(
            ("bad-default",),
            checkpoint(NAME),
            additional_config={"elastic": {"elastic_budget": "huge"}},
        )
    engines.close()


assert ENGINE_KWARGS["max_num_batched_tokens"] < 97  # chunked prefill is exercised


def test_rows_refilled_after_a_recompute_keep_their_own_thinking_state(
    switch_llm, prompts, markers, reference
):
    """Regression (vLLM 0.32 ThinkingBudgetStateHolder, fixed in vllm_fixes.py): when a
    recompute request's slot is refilled by condense(), the row moved there must not
    inherit its thinking budget (it used to get </think> forced into its output)."""
    llm = switch_llm()
    start = markers[0]
    batch = [prompts[0], prompts[3], prompts[1] + [start], prompts[3]]
    extra = [
        {"elastic_budget": "full"},
        {"elastic_budget": THINK},
        {**POLICY, "elastic_kv_mode": "recompute"},
        {"elastic_budget": "q_thin"},
    ]
    thinks = [None, None, 6, None]
    alone = run(llm, batch[3:], extra[3:], thinks[3:], 8)[0]
    together = run(llm, batch, extra, thinks, 8)[3]
    assert markers[1] not in together
    assert together == alone
    assert alone == reference(NAME, "q_thin")[3][0][: len(alone)], "q_thin vs stock vLLM"


def test_switch_is_detected_from_fed_input_ids_alone(switch_llm, think_prompts, monkeypatch):
    """Under async scheduling (vLLM's GPU default) the logits processor sees a -1
    placeholder where the last sampled token is; the model then confirms the switch from
    the input ids it is fed. With the last sampled id hidden from the processor, outputs
    must not change."""
    from vllm_elastic.control.logits_processor import ElasticBudgetLogitsProcessor

    todo = cases(think_prompts)
    extra = [{**POLICY, "elastic_kv_mode": m} for m in ("reuse", "recompute")] * 2
    prompts_ = [p for p, _ in todo]
    thinks = [t for _, t in todo]
    llm = switch_llm()
    want = run(llm, prompts_, extra, thinks, 20)
    confirmed = []
    state = llm.apply_model(lambda model: model.router._batch_state())[0]
    real_confirm = state.on_fed
    processor = real_confirm.__self__

    def last_id_hidden(self):
        for row, r in self.rows.items():
            if r.watching:
                self._scan(row, r, [*r.output[:-1], -1] if r.output else [])

    def confirm(rows, fed, positions):
        known = processor.rows
        before = {row: len(known[row].tokens) for row in rows.tolist() if row in known}
        real_confirm(rows, fed, positions)
        confirmed.extend(len(known[r].tokens) > n for r, n in before.items())

    monkeypatch.setattr(ElasticBudgetLogitsProcessor, "_scan_outputs", last_id_hidden)
    monkeypatch.setattr(state, "on_fed", confirm)
    assert run(llm, prompts_, extra, thinks, 20) == want
    assert any(confirmed), "no fed token was confirmed from the input ids"


USER_STEPS = [0]


def _counting_scheduler_cls() -> type:
    """A user scheduler (vLLM's, counting its steps), bound to this module's name
    ``CountingScheduler`` so vLLM can import it; made lazily to keep vLLM out of
    collection."""
    from vllm.v1.core.sched.scheduler import Scheduler

    class CountingScheduler(Scheduler):
        def schedule(self, *args, **kwargs):
            USER_STEPS[0] += 1
            return super().schedule(*args, **kwargs)

    globals().setdefault("CountingScheduler", CountingScheduler)
    return globals()["CountingScheduler"]


def test_recompute_composes_with_a_user_scheduler(
    hand_reference, checkpoint, engines, think_prompts
):
    """--scheduler-cls of the user's own: the recompute hook wraps it (recompute stays
    exact) and the user's scheduler runs."""
    user = _counting_scheduler_cls()
    traces, conts, _ = hand_reference
    todo = cases(think_prompts)
    llm = engines.get(
        ("user-scheduler",), checkpoint(NAME), **REASONING,
        scheduler_cls=f"{__name__}.CountingScheduler",
    )  # fmt: skip
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    assert isinstance(sched, user)
    extra = [{**POLICY, "elastic_kv_mode": "recompute"}] * len(todo)
    got = run(llm, [p for p, _ in todo], extra, [t for _, t in todo], 64)
    for i, (g, tr, co) in enumerate(zip(got, traces, conts)):
        assert g[: len(tr) + len(co)] == tr + co, f"prompt {i}: recompute over a user scheduler"
    assert USER_STEPS[0] > 0
    engines.close()
