"""Offline batch under several elastic policies, in one engine.

    python examples/offline_batch.py [--model models/elastic-demo]

Policies: full model throughout; small throughout; small thinks -> full answers (reuse);
the same with thinking capped by vLLM's own ``thinking_token_budget`` (which forces
``</think>``, switching the request). Prints tokens per budget and time per policy.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from vllm_elastic.cli.demo import ensure_model
from vllm_elastic.control.usage import elastic_usage, merge_usages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/elastic-demo"))
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--think-cap", type=int, default=32)
    args = parser.parse_args()

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    model = ensure_model(args.model, "small", "float32")
    llm = LLM(
        str(model),
        dtype="float32",
        max_model_len=512,
        kv_cache_memory_bytes=256 << 20,
        reasoning_parser="qwen3",  # <think> ... </think>
    )
    tok = llm.get_tokenizer()
    questions = ["why is the sky blue", "how far is the sea", "what can a good friend do"]
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
    think_answer = {"elastic_think_budget": "small", "elastic_answer_budget": "full"}
    policies = {
        "full": ({"elastic_budget": "full"}, None),
        "small": ({"elastic_budget": "small"}, None),
        "small->full": (think_answer, None),
        f"small->full, think capped at {args.think_cap}": (think_answer, args.think_cap),
    }
    print(f"{'policy':<34} {'tokens per budget':<26} {'seconds':>8}")
    for label, (extra, cap) in policies.items():
        params = SamplingParams(
            temperature=0.0,
            max_tokens=args.max_tokens,
            thinking_token_budget=cap,
            extra_args=extra,
        )
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        secs = time.perf_counter() - start
        per_budget = merge_usages([elastic_usage(o) for o in outs])["tokens"]
        spread = ", ".join(f"{name}: {n}" for name, n in per_budget.items())
        print(f"{label:<34} {spread:<26} {secs:>8.2f}")
        print(f"    e.g. {outs[0].outputs[0].text.strip()[:70]!r}")


if __name__ == "__main__":
    main()
