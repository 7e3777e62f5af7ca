"""End to end through vLLM's OpenAI server started by ``vllm-elastic serve`` on
127.0.0.1, driven by the ``openai`` client: budgets per request via ``vllm_xargs``, the
server default policy, reasoning split, usage per budget, ``/metrics``, HTTP 400 on bad
input, and a bounded concurrent load whose every output equals the offline run."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from conftest import generate_greedy
from serving import metric, request_body, served

pytestmark = pytest.mark.server

NAME = "llama_bias"
SERVED = "elastic"
DEFAULT_POLICY = {"elastic_think_budget": "tiny", "elastic_answer_budget": "full"}
PACKING = "per-budget"  # not the CPU default: checks the flag reaches the model
SERVED_BUDGETS = ["full", "kv_half", "tiny"]  # the checkpoint's q_thin is not served


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server") / "server.log"


@pytest.fixture(scope="module")
def server(checkpoint, server_log) -> Any:
    args = [
        "--served-model-name", SERVED,
        "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
        "--kv-cache-memory-bytes", str(64 << 20), "--max-num-seqs", "32",
        "--reasoning-parser", "qwen3",
        "--elastic-think-budget", "tiny", "--elastic-answer-budget", "full",
        "--elastic-weight-packing", PACKING,
        "--elastic-serve-budgets", ",".join(SERVED_BUDGETS),
    ]  # fmt: skip
    with served(checkpoint(NAME), args, server_log) as base:
        yield base


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none")


@pytest.fixture(scope="module")
def offline(checkpoint, engines):
    """The same checkpoint offline (in this process), with the same default policy."""

    def run(prompts: list[list[int]], extra: list[Any], think: list[Any], max_tokens: int):
        llm = engines.get(
            ("server-offline",),
            checkpoint(NAME),
            reasoning_parser="qwen3",
            additional_config={
                "elastic": {
                    **DEFAULT_POLICY,
                    "weight_packing": PACKING,
                    "serve_budgets": SERVED_BUDGETS,
                }
            },
        )
        outs = generate_greedy(llm, prompts, extra, think, max_tokens)
        return [(list(o.token_ids), o.text) for o in outs]

    return run


def test_completions_per_request_budgets_match_offline(client, offline, prompts):
    cases = [
        ({"elastic_budget": "full"}, None),
        ({"elastic_budget": "tiny"}, None),
        ({"elastic_budget": "kv_half"}, None),
        (None, None),  # server default policy: tiny -> full (no marker: thinks throughout)
    ]
    want = offline([prompts[2]] * len(cases), [c[0] for c in cases], [c[1] for c in cases], 10)
    for (extra, think), (ids, text) in zip(cases, want):
        r = client.completions.create(
            model=SERVED, prompt=prompts[2], max_tokens=10, temperature=0,
            extra_body=request_body(extra, think),
        )  # fmt: skip
        assert r.choices[0].text == text, extra
        assert r.choices[0].model_extra["token_ids"] == ids, extra
        usage = r.usage.model_extra["elastic"]
        if extra is None:  # the policy's answer budget never ran (no end marker)
            assert usage["tokens"] == {"tiny": 10, "full": 0}, usage
        else:
            assert usage["tokens"] == {extra["elastic_budget"]: 10}, usage


def test_streaming_equals_non_streaming_and_reports_usage(client, prompts):
    kwargs = dict(
        model=SERVED, prompt=prompts[1], max_tokens=12, temperature=0,
        extra_body=request_body({"elastic_budget": "kv_half"}, None),
    )  # fmt: skip
    whole = client.completions.create(**kwargs)
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    usage = chunks[-1].usage
    assert usage.completion_tokens == 12
    assert usage.model_extra["elastic"]["tokens"] == {"kv_half": 12}


def test_chat_default_policy_splits_reasoning_and_switches(client, offline, checkpoint):
    """No vllm_xargs: the server default (tiny thinks, full answers) applies; the
    reasoning parser separates the trace; usage counts tokens per budget."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint(NAME))
    messages = [{"role": "user", "content": "what is the best way home"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok.encode(text, add_special_tokens=False)
    ((ids, _),) = offline([prompt_ids], [None], [5], 14)
    r = client.chat.completions.create(
        model=SERVED, messages=messages, max_tokens=14, temperature=0,
        extra_body=request_body(None, 5),
    )  # fmt: skip
    msg = r.choices[0].message
    assert msg.model_extra["reasoning"].split() == tok.decode(ids[:5]).split()
    assert msg.content.split() == tok.decode(ids[6:]).split()
    usage = r.usage.model_extra["elastic"]
    assert usage["tokens"] == {"tiny": 6, "full": 8}, usage
    assert (usage["think_budget"], usage["answer_budget"]) == ("tiny", "full")

    stream = client.chat.completions.create(
        model=SERVED, messages=messages, max_tokens=14, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=request_body(None, 5),
    )  # fmt: skip
    reasoning, content, last = "", "", None
    for chunk in stream:
        last = chunk
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += (delta.model_extra or {}).get("reasoning") or ""
            content += delta.content or ""
    assert reasoning.split() == msg.model_extra["reasoning"].split()
    assert content.split() == msg.content.split()
    assert last.usage.model_extra["elastic"]["tokens"] == {"tiny": 6, "full": 8}


@pytest.mark.parametrize(
    "xargs,needle",
    [
        ({"elastic_budget": "huge"}, "unknown budget 'huge'"),
        # in the checkpoint, not served (--elastic-serve-budgets)
        ({"elastic_budget": "q_thin"}, "budget 'q_thin' is not served by this engine"),
        ({"elastic_budget": "full", "elastic_answer_budget": "tiny"}, "cannot be combined"),
        ({"elastic_kv_mode": "later"}, "elastic_kv_mode"),
        ({"elastic_budget": {"nested": 1}}, "vllm_xargs"),
    ],
)
def test_bad_values_get_400_and_the_server_keeps_serving(server, xargs, needle, prompts):
    body = {"model": SERVED, "prompt": prompts[0], "max_tokens": 4, "vllm_xargs": xargs}
    r = requests.post(f"{server}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert needle in r.text
    ok = requests.post(
        f"{server}/v1/completions",
        json={"model": SERVED, "prompt": prompts[0], "max_tokens": 4},
        timeout=60,
    )
    assert ok.status_code == 200, ok.text


def test_metrics_count_tokens_per_budget(server, client, prompts):
    def counter(text: str, budget: str, phase: str) -> float:
        key = f'vllm_elastic:generation_tokens_total{{budget="{budget}",phase="{phase}"}}'
        for line in text.splitlines():
            if line.startswith(key):
                return float(line.split()[-1])
        return 0.0

    before = requests.get(f"{server}/metrics", timeout=10).text
    client.completions.create(
        model=SERVED, prompt=prompts[0], max_tokens=7, temperature=0,
        extra_body=request_body({"elastic_budget": "kv_half"}, None),
    )  # fmt: skip
    after = requests.get(f"{server}/metrics", timeout=10).text
    assert counter(after, "kv_half", "answer") - counter(before, "kv_half", "answer") == 7


def test_bounded_concurrent_load_matches_offline(server, offline, prompts, checkpoint):
    """48 streaming requests from 12 concurrent clients, mixed policies: no errors, no
    lost or truncated response, every text identical to the same request offline."""
    from transformers import AutoTokenizer

    start = AutoTokenizer.from_pretrained(checkpoint(NAME)).convert_tokens_to_ids("<think>")
    policies = [
        ({"elastic_budget": "full"}, None),
        ({"elastic_budget": "tiny"}, None),
        ({**DEFAULT_POLICY}, 4),
        ({**DEFAULT_POLICY, "elastic_kv_mode": "recompute"}, 6),
        (None, 3),  # server default policy
        ({"elastic_budget": "kv_half"}, None),
    ]
    jobs = []
    for i in range(48):
        extra, think = policies[i % len(policies)]
        prompt = prompts[i % len(prompts)] + ([start] if think else [])
        jobs.append((prompt, extra, think, 8 + i % 7))
    want = {}
    for m in sorted({j[3] for j in jobs}):
        idx = [k for k, j in enumerate(jobs) if j[3] == m]
        outs = offline([jobs[k][0] for k in idx], [jobs[k][1] for k in idx],
                       [jobs[k][2] for k in idx], m)  # fmt: skip
        want.update({k: o[1] for k, o in zip(idx, outs)})

    async def one(aclient: openai.AsyncOpenAI, k: int) -> tuple[int, str, str | None]:
        prompt, extra, think, m = jobs[k]
        stream = await aclient.completions.create(
            model=SERVED, prompt=prompt, max_tokens=m, temperature=0, stream=True,
            extra_body=request_body(extra, think),
        )  # fmt: skip
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
        return k, text, finish

    async def main() -> list[tuple[int, str, str | None]]:
        aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
        sem = asyncio.Semaphore(12)

        async def bounded(k: int):
            async with sem:
                return await asyncio.wait_for(one(aclient, k), timeout=120)

        return await asyncio.gather(*(bounded(k) for k in range(len(jobs))))

    results = asyncio.run(main())
    assert len(results) == len(jobs)
    bad = [(k, jobs[k][1], text, want[k]) for k, text, _ in results if text != want[k]]
    assert not bad, f"{len(bad)} outputs differ from offline: {bad}"
    for k, _, finish in results:
        assert finish == "length", f"request {k} ended with {finish}"


def test_weight_packing_flag_reaches_the_model(server, server_log):
    text = server_log.read_text()
    assert f"'requested': '{PACKING}'" in text
    assert f"'down': '{PACKING}'" in text


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
@pytest.mark.parametrize(
    "xargs,needle",
    [
        ({"elastic_budegt": "full"}, "unknown request key 'elastic_budegt'"),
        ({"elastic_budget ": "full"}, "unknown request key 'elastic_budget '"),
        ({"elastic_budget": "x" * 100_000}, "(100002 characters)"),
    ],
)
def test_bad_policy_is_400_before_any_stream_with_a_short_message(
    server, prompts, endpoint, stream, xargs, needle
):
    """A misspelt elastic key or a bad budget is HTTP 400 on every endpoint, streamed or
    not, and the message quotes a huge value only in part."""
    body: dict[str, Any] = {"model": SERVED, "max_tokens": 4, "stream": stream, "vllm_xargs": xargs}
    if endpoint == "completions":
        body["prompt"] = prompts[0]
    else:
        body["messages"] = [{"role": "user", "content": "hello"}]
    r = requests.post(f"{server}/v1/{endpoint}", json=body, timeout=60)
    assert r.status_code == 400, r.text[:500]
    assert needle in r.text
    assert "elastic_budget, elastic_think_budget" in r.text or "unknown budget" in r.text
    assert len(r.text) < 2000


def test_usage_counts_every_choice(server, client, prompts):
    """n=2: usage.elastic and the metrics count both choices."""
    labels = dict(think_budget="kv_half", answer_budget="kv_half", kv_mode="none")
    requests_before = metric(server, "vllm_elastic:requests_total", **labels)
    tokens_before = metric(
        server, "vllm_elastic:generation_tokens_total", budget="kv_half", phase="answer"
    )
    r = client.completions.create(
        model=SERVED, prompt=prompts[1], max_tokens=6, n=2, temperature=0.8, seed=1,
        extra_body=request_body({"elastic_budget": "kv_half"}, None),
    )  # fmt: skip
    assert len(r.choices) == 2 and r.usage.completion_tokens == 12
    usage = r.usage.model_extra["elastic"]
    assert usage["tokens"] == {"kv_half": 12} and usage["choices"] == 2, usage
    assert usage["kv_mode"] is None  # one budget: no KV mode applies
    assert metric(server, "vllm_elastic:requests_total", **labels) == requests_before + 1
    tokens_after = metric(
        server, "vllm_elastic:generation_tokens_total", budget="kv_half", phase="answer"
    )
    assert tokens_after == tokens_before + 12


def test_responses_endpoint_reports_usage(server):
    body = {
        "model": SERVED, "input": "what is the best way home", "max_output_tokens": 6,
        "temperature": 0, "vllm_xargs": {"elastic_budget": "tiny"},
    }  # fmt: skip
    r = requests.post(f"{server}/v1/responses", json=body, timeout=60)
    assert r.status_code == 200, r.text[:500]
    usage = r.json()["usage"]
    assert usage["elastic"]["tokens"] == {"tiny": usage["output_tokens"]}, usage
    bad = requests.post(
        f"{server}/v1/responses", json={**body, "vllm_xargs": {"elastic_bud": "tiny"}}, timeout=60
    )
    assert bad.status_code == 400 and "unknown request key" in bad.text


def test_slowly_read_stream_gets_the_final_usage(server, prompts):
    """A consumer that reads a stream slowly gets vLLM's merged outputs; the usage in
    the final chunk still counts every token."""
    body = {
        "model": SERVED, "prompt": prompts[2], "max_tokens": 24, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
        "vllm_xargs": {"elastic_budget": "tiny"},
    }  # fmt: skip
    last = None
    with requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=120) as r:
        for i, line in enumerate(r.iter_lines()):
            if i == 1:
                time.sleep(3)  # the engine finishes meanwhile; outputs pile up
            if line.startswith(b"data: {"):
                last = line
    import json

    usage = json.loads(last[len(b"data: ") :])["usage"]
    assert usage["completion_tokens"] == 24
    assert usage["elastic"]["tokens"] == {"tiny": 24}, usage


def test_aborted_requests_are_not_counted_as_finished(server, prompts):
    labels = dict(think_budget="kv_half", answer_budget="full", kv_mode="recompute")
    before = metric(server, "vllm_elastic:requests_total", **labels)
    body = {
        "model": SERVED, "prompt": prompts[3], "max_tokens": 400, "temperature": 0,
        "stream": True, "ignore_eos": True,
        "vllm_xargs": {"elastic_think_budget": "kv_half", "elastic_answer_budget": "full",
                       "elastic_kv_mode": "recompute"},
    }  # fmt: skip
    with requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=60) as r:
        next(r.iter_lines())  # one chunk, then the client goes away
    deadline = time.time() + 60
    while time.time() < deadline:  # aborted, or (a bug) run to its end
        text = requests.get(f"{server}/metrics", timeout=10).text
        running = [ln for ln in text.splitlines() if ln.startswith("vllm:num_requests_running")]
        if running and all(float(ln.split()[-1]) == 0 for ln in running):
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the aborted request was still running after 60 s")
    ok = requests.post(
        f"{server}/v1/completions",
        json={"model": SERVED, "prompt": prompts[0], "max_tokens": 2},
        timeout=60,
    )
    assert ok.status_code == 200
    assert metric(server, "vllm_elastic:requests_total", **labels) == before
    # the same policy run to its end is counted, once: the series is exported
    done = requests.post(
        f"{server}/v1/completions", json={**body, "max_tokens": 2, "stream": False}, timeout=60
    )
    assert done.status_code == 200, done.text
    assert metric(server, "vllm_elastic:requests_total", **labels) == before + 1
