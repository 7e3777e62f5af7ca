"""Helper run as a subprocess by test_tensor_parallel.py: greedy ids and top-5 logprobs
per step at every budget, as JSON."""

from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    model, tp, prompts_json, budgets_json, max_tokens = sys.argv[1:6]
    prompts = json.loads(prompts_json)
    llm = LLM(
        model,
        dtype="float32",
        max_model_len=512,
        kv_cache_memory_bytes=64 << 20,
        enforce_eager=True,
        tensor_parallel_size=int(tp),
    )
    result = {}
    for budget in json.loads(budgets_json):
        sp = SamplingParams(
            max_tokens=int(max_tokens), temperature=0, logprobs=5, ignore_eos=True,
            extra_args={"elastic_budget": budget},
        )  # fmt: skip
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        result[budget] = [
            [
                list(o.outputs[0].token_ids),
                [[[t, lp.logprob] for t, lp in step.items()] for step in o.outputs[0].logprobs],
            ]
            for o in outs
        ]
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
