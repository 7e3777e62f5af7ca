"""Prepared check for a machine with vLLM (GPU or CPU): the plugin next to ordinary models.

    python scripts/gpu_check.py [--out DIR]

1. A plain Llama (the full budget sliced out of a random elastic checkpoint) starts and
   generates with the plugin installed, on whichever model runner vLLM picks (V2 on a GPU
   with Triton).
2. The elastic checkpoint starts on Model Runner V1, and every budget's greedy tokens equal
   the plain engine's on its sliced checkpoint (async scheduling on GPU included).
3. Think at the smallest budget, answer at the full one, both KV modes: the switch happens
   (answers differ from thinking at the small budget throughout).
Exits non-zero on any failure; prints one line per check.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _engine(path: Path, **kw):
    import torch
    from vllm import LLM

    cpu = not torch.cuda.is_available()
    extra = dict(kv_cache_memory_bytes=256 << 20) if cpu else dict(gpu_memory_utilization=0.3)
    return LLM(str(path), dtype="float32", max_model_len=512, seed=0, **extra, **kw)


def _close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def _greedy(llm, prompts, extra, think=None, n=12):
    from vllm import SamplingParams

    sp = [
        SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, extra_args=e,
                       thinking_token_budget=think)
        for e in extra
    ]  # fmt: skip
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def main() -> int:
    from vllm_elastic.checkpoint import PRESETS, build_random_checkpoint, slice_checkpoint
    from vllm_elastic.control.logits_processor import FQCN

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="gpu-check-")))
    args = parser.parse_args()
    ckpt = build_random_checkpoint(args.out / "elastic", **PRESETS["small"])
    budgets = [b["name"] for b in PRESETS["small"]["budgets"]]
    prompts = [[20 + i, 40 + 3 * i, 60 + 5 * i, 80] for i in range(4)]
    failures = []

    def check(name: str, ok: bool) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
        if not ok:
            failures.append(name)

    want = {}
    for b in budgets:
        plain = _engine(slice_checkpoint(ckpt, b, args.out / b))
        config = plain.llm_engine.vllm_config
        if b == budgets[0]:
            check(f"plain model: runner V2={config.use_v2_model_runner}, no elastic processor",
                  FQCN not in (config.model_config.logits_processors or []))  # fmt: skip
        want[b] = _greedy(plain, prompts, [None] * len(prompts))
        _close(plain)

    llm = _engine(ckpt, reasoning_parser="qwen3")
    check(
        "elastic model runs on Model Runner V1", not llm.llm_engine.vllm_config.use_v2_model_runner
    )
    for b in budgets:
        got = _greedy(llm, prompts, [{"elastic_budget": b}] * len(prompts))
        check(f"budget {b} equals its sliced checkpoint", got == want[b])
    mixed = [{"elastic_budget": budgets[i % len(budgets)]} for i in range(len(prompts))]
    got = _greedy(llm, prompts, mixed)
    check(
        "mixed budgets in one batch",
        got == [want[e["elastic_budget"]][i] for i, e in enumerate(mixed)],
    )
    start = llm.get_tokenizer().convert_tokens_to_ids("<think>")
    think = [p + [start] for p in prompts]
    small = _greedy(llm, think, [{"elastic_budget": budgets[-1]}] * len(think), think=4)
    for mode in ("reuse", "recompute"):
        policy = {"elastic_think_budget": budgets[-1], "elastic_answer_budget": budgets[0],
                  "elastic_kv_mode": mode}  # fmt: skip
        got = _greedy(llm, think, [policy] * len(think), think=4)
        check(f"{mode}: thinks at {budgets[-1]}", all(g[:5] == s[:5] for g, s in zip(got, small)))
        check(f"{mode}: answers at {budgets[0]}", any(g[5:] != s[5:] for g, s in zip(got, small)))
    _close(llm)
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
