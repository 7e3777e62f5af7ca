"""``vllm-elastic demo``: the main job on the embedded default model.

Builds the deterministic random elastic checkpoint (preset ``small`` unless told
otherwise), then, in one vLLM engine holding one copy of its weights:

1. runs a batch at every budget and one batch mixing all budgets;
2. runs elastic budget control: the thinking phase at a small budget, the answer at the
   full one, switched at ``</think>`` (forced after ``--think-tokens`` tokens by vLLM's
   own ``thinking_token_budget``, since a random model never closes thinking itself).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from vllm_elastic.checkpoint import DEFAULT_PRESET, PRESETS, build_random_checkpoint

DEFAULT_MODEL_DIR = Path("models") / "elastic-demo"


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--think-tokens", type=int, default=24)
    p.add_argument("--dtype", default="float32")


def ensure_model(model_dir: Path, preset: str, dtype: str) -> Path:
    """Build the deterministic demo checkpoint unless it is already there."""
    if not (model_dir / "config.json").exists():
        build_random_checkpoint(model_dir, **PRESETS[preset], dtype=dtype)
        print(f"built the {preset!r} elastic checkpoint in {model_dir}")
    return model_dir


def _prompts(tokenizer: Any, n: int, chat: bool) -> list[str]:
    words = [w for w in tokenizer.get_vocab() if w.isalpha()]
    words.sort()
    texts = [
        " ".join(words[(7 * i + 3 * k) % len(words)] for k in range(4 + i % 5)) for i in range(n)
    ]
    if not chat:
        return texts
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
        )
        for t in texts
    ]


def _timed(llm: Any, prompts: list[str], params: list[Any]) -> tuple[list[Any], float]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return outs, time.perf_counter() - start


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns an exit code."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from vllm_elastic.checkpoint import budget_report, load_elastic_config
    from vllm_elastic.cli.report_format import format_report
    from vllm_elastic.control.usage import elastic_usage, merge_usages

    model = ensure_model(args.model_dir, args.preset, args.dtype)
    print(format_report(budget_report(model)))
    llm = LLM(
        str(model),
        dtype=args.dtype,
        max_model_len=512,
        kv_cache_memory_bytes=256 << 20,
        enforce_eager=True,
        reasoning_parser="qwen3",
    )
    tokenizer = llm.get_tokenizer()
    names = [row["name"] for row in budget_report(model)]
    plain = _prompts(tokenizer, args.num_prompts, chat=False)

    def params(extra: dict[str, Any], think: int | None = None) -> SamplingParams:
        return SamplingParams(
            temperature=0.0,
            max_tokens=args.max_tokens,
            ignore_eos=True,
            extra_args=extra,
            thinking_token_budget=think,
        )

    _timed(llm, plain[:2], [params({})] * 2)  # warm-up
    print("\n== one engine, every budget ==")
    print(f"{'batch':<22} {'requests':>8} {'tokens':>7} {'seconds':>8} {'tok/s':>8}  sample")
    rows = [(name, [{"elastic_budget": name}] * len(plain)) for name in names]
    rows.append(
        (
            "mixed (all budgets)",
            [{"elastic_budget": names[i % len(names)]} for i in range(len(plain))],
        )
    )
    for label, extras in rows:
        outs, secs = _timed(llm, plain, [params(e) for e in extras])
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        sample = outs[0].outputs[0].text.strip()[:40]
        print(
            f"{label:<22} {len(outs):>8} {tokens:>7} {secs:>8.2f} {tokens / secs:>8.1f}  {sample!r}"
        )

    chat = _prompts(tokenizer, args.num_prompts, chat=True)
    spec = load_elastic_config(model).elastic_spec
    small, full = spec.smallest.name, spec.full.name
    policies = [
        (f"{full} throughout", {"elastic_budget": full}),
        (f"{small} throughout", {"elastic_budget": small}),
        (f"{small}->{full} reuse", {"elastic_think_budget": small, "elastic_answer_budget": full}),
        (
            f"{small}->{full} recompute",
            {
                "elastic_think_budget": small,
                "elastic_answer_budget": full,
                "elastic_kv_mode": "recompute",
            },
        ),
    ]
    print(f"\n== elastic budget control (thinking capped at {args.think_tokens} tokens) ==")
    print(f"{'policy':<26} {'tokens per budget':<28} {'seconds':>8}")
    for label, extra in policies:
        outs, secs = _timed(llm, chat, [params(extra, args.think_tokens)] * len(chat))
        per_budget = merge_usages([elastic_usage(o) for o in outs])["tokens"]
        spread = ", ".join(f"{k}: {v}" for k, v in per_budget.items())
        print(f"{label:<26} {spread:<28} {secs:>8.2f}")
    return 0
