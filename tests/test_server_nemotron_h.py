"""Star Elastic's flow end to end: a plain NemotronH checkpoint (Mamba-2, attention, MLP
and MoE layers) annotated with a budget list by ``vllm-elastic annotate`` (no weights
copied), served by ``vllm-elastic serve`` at vLLM's defaults (compiled) with prefix
caching in Mamba ``align`` mode, driven over HTTP. References are transformers'
``NemotronHForCausalLM`` on each budget's sliced checkpoint."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import CHECKPOINTS, REF_MAX_TOKENS, budget_names, hf_greedy
from serving import metric, request_body, served

pytestmark = pytest.mark.server

NAME = "hybrid"
SERVED = "star-elastic-tiny"
THINK, ANSWER = "small", "full"


@pytest.fixture(scope="module")
def annotated(sliced, tmp_path_factory) -> Path:
    """The full budget sliced out as a plain NemotronH folder, annotated by the CLI."""
    root = tmp_path_factory.mktemp("annotate")
    (root / "budgets.json").write_text(json.dumps(CHECKPOINTS[NAME]["budgets"]))
    out = root / "elastic"
    subprocess.run(
        [sys.executable, "-m", "vllm_elastic.cli", "annotate", str(sliced(NAME, "full")),
         "--budgets", str(root / "budgets.json"), "-o", str(out)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def server(annotated, tmp_path_factory) -> Any:
    args = [
        "--served-model-name", SERVED, "--dtype", "float32", "--max-model-len", "512",
        "--kv-cache-memory-bytes", str(64 << 20), "--max-num-seqs", "16",
        "--enable-prefix-caching", "--mamba-cache-mode", "align", "--block-size", "32",
        "--reasoning-parser", "qwen3",
        "--elastic-think-budget", THINK, "--elastic-answer-budget", ANSWER,
    ]  # fmt: skip
    with served(annotated, args, tmp_path_factory.mktemp("server") / "server.log") as base:
        yield base


async def _complete_all(base: str, jobs: list[tuple[list[int], dict[str, Any], int]]) -> list:
    """Every job ``(prompt ids, extra body, max tokens)`` at once: one mixed batch."""
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)

    async def one(prompt: list[int], body: dict[str, Any], max_tokens: int) -> Any:
        return await client.completions.create(
            model=SERVED, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=body
        )

    return await asyncio.gather(*(one(*job) for job in jobs))


def test_every_budget_in_one_batch_equals_transformers_on_its_slice(server, hf_reference, prompts):
    """Every budget, concurrent requests batched together: greedy tokens equal the sliced
    checkpoint's in transformers; usage counts them at that budget."""
    names = budget_names(NAME)
    jobs, want = [], []
    for i, prompt in enumerate(prompts):
        for b in names:
            jobs.append((prompt, request_body({"elastic_budget": b}), REF_MAX_TOKENS))
            want.append((b, i, hf_reference(NAME, b)[i][0]))
    outs = asyncio.run(_complete_all(server, jobs))
    for (b, i, ids), r in zip(want, outs):
        assert r.choices[0].model_extra["token_ids"] == ids, f"budget {b}, prompt {i}"
        assert r.usage.model_extra["elastic"]["tokens"] == {b: REF_MAX_TOKENS}


def test_small_thinks_full_answers_over_http(server, sliced, annotated, prompts):
    """The server's default policy (no vllm_xargs): ``recompute`` equals the hand-built
    reference (the small slice thinks, ``</think>``, the full slice continues); ``reuse``
    thinks like the small slice; usage counts each phase at its budget."""
    from transformers import AutoTokenizer

    start, end = AutoTokenizer.from_pretrained(annotated).convert_tokens_to_ids(
        ["<think>", "</think>"]
    )
    think, answer = 5, 7
    todo = [p + [start] for p in prompts[:2]]
    traces = [hf_greedy(sliced(NAME, THINK), [p], think)[0][0] + [end] for p in todo]
    conts = [hf_greedy(sliced(NAME, ANSWER), [p + t], answer)[0][0] for p, t in zip(todo, traces)]
    jobs = [(p, request_body(x, think), think + 1 + answer)
            for p in todo for x in ({"elastic_kv_mode": "recompute"}, None)]  # fmt: skip
    outs = asyncio.run(_complete_all(server, jobs))
    for k, r in enumerate(outs):
        trace, cont = traces[k // 2], conts[k // 2]
        ids = r.choices[0].model_extra["token_ids"]
        usage = r.usage.model_extra["elastic"]
        assert usage["tokens"] == {THINK: think + 1, ANSWER: answer}, usage
        assert ids[: len(trace)] == trace, f"request {k}: thinking is not the small slice's"
        if k % 2 == 0:
            assert ids == trace + cont, f"request {k}: recompute"
            assert usage["kv_mode"] == "recompute"
        else:
            assert usage["kv_mode"] == "reuse"


def test_prefix_cache_hits_keep_outputs(server):
    """Long shared prefixes at several budgets: sent cold (a fresh ``cache_salt`` each) and
    again warm (one salt): the warm run reuses cached blocks (Mamba states at block
    boundaries) and every output equals its cold run."""
    rng = random.Random(3)
    base = [rng.randrange(12, 200) for _ in range(100)]
    policies = [{"elastic_budget": b} for b in budget_names(NAME)] + [None]
    jobs = [(base + [rng.randrange(12, 200) for _ in range(1 + k)], policies[k % len(policies)])
            for k in range(6)]  # fmt: skip

    def run(salt: Any) -> list[list[int]]:
        outs = asyncio.run(_complete_all(server, [
            (p, request_body(x, cache_salt=salt(k)), 8) for k, (p, x) in enumerate(jobs)
        ]))  # fmt: skip
        return [r.choices[0].model_extra["token_ids"] for r in outs]

    cold = run(lambda k: f"cold-{k}")
    run(lambda k: "warm")  # fills the cache under one salt
    before = metric(server, "vllm:prefix_cache_hits_total", engine="0", model_name=SERVED)
    warm = run(lambda k: "warm")
    assert metric(server, "vllm:prefix_cache_hits_total", engine="0", model_name=SERVED) > before, (
        "no cached block was reused"
    )
    assert warm == cold
