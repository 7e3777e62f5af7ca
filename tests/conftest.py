"""Shared fixtures: tiny random elastic checkpoints, their sliced references, engines.

vLLM runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the ~20 s import is paid
once per session and every later engine starts in a few seconds. Engines are shared per
checkpoint; one engine serves every budget.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from vllm_elastic.checkpoint import build_random_checkpoint, slice_checkpoint  # noqa: E402

# Each checkpoint exercises different odd shapes; see the budget comments.
CHECKPOINTS: dict[str, dict[str, Any]] = {
    "llama_bias": dict(
        family="llama",
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,  # GQA, 4 groups of 2
        head_dim=32,
        intermediate_size=256,
        attention_bias=True,
        mlp_bias=True,
        seed=1,
        budgets=[
            {"name": "full"},
            # half the KV groups, all their query heads: a plain prefix
            {"name": "kv_half", "num_key_value_heads": 2, "num_attention_heads": 4},
            # every KV group kept, one query head of two per group (masked heads)
            {"name": "q_thin", "num_attention_heads": 4, "hidden_size": 96},
            # hidden slicing + per-layer MLP + skipped layer
            {
                "name": "tiny",
                "hidden_size": 64,
                "num_key_value_heads": 2,
                "num_attention_heads": 2,
                "intermediate_size": [128, 64, 192, 96],
                "layers": [0, 2, 3],
            },
        ],
    ),
    "qwen3_tied": dict(
        family="qwen3",
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=256,
        tie_word_embeddings=True,
        seed=2,
        default_budget="half",
        budgets=[
            {"name": "full"},
            {"name": "half", "hidden_size": 64, "intermediate_size": 128},
            {"name": "deep", "layers": [1, 3], "num_key_value_heads": 1, "num_attention_heads": 2},
        ],
    ),
    # a nested chain (every size shrinks together), like real elastic checkpoints: every
    # projection is stored as nested shells (weight_packing auto = nested on CPU)
    "llama_chain": dict(
        family="llama",
        hidden_size=128,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        intermediate_size=256,
        seed=3,
        budgets=[
            {"name": "full"},
            {
                "name": "mid",
                "hidden_size": 96,
                "num_key_value_heads": 3,
                "num_attention_heads": 6,
                "intermediate_size": 192,
            },
            {
                "name": "small",
                "hidden_size": 64,
                "num_key_value_heads": 2,
                "num_attention_heads": 4,
                "intermediate_size": [128, 64, 160],
            },
        ],
    ),
}

# NemotronH (Star Elastic's family). "hybrid": every layer kind, odd sizes, budgets that
# cut every axis (per-layer expert widths, Mamba heads within 3 groups, experts, layers);
# its reference is transformers. "hybrid_noe": no MoE layer, so stock vLLM runs its slices.
_HYBRID_COMMON: dict[str, Any] = dict(
    family="nemotron_h",
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    mamba_head_dim=16,
    ssm_state_size=16,
    conv_kernel=4,
    chunk_size=16,
)
CHECKPOINTS["hybrid"] = dict(
    _HYBRID_COMMON,
    hybrid_override_pattern="ME*M-E",
    hidden_size=96,
    intermediate_size=160,
    mamba_num_heads=12,
    n_groups=3,
    n_routed_experts=6,
    num_experts_per_tok=2,
    moe_intermediate_size=40,
    moe_shared_expert_intermediate_size=56,
    routed_scaling_factor=2.5,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    seed=4,
    budgets=[
        {"name": "full"},
        {
            "name": "mid",
            "hidden_size": 72,
            "mamba_num_heads": 9,
            "n_routed_experts": 4,
            "moe_intermediate_size": [None, 32, None, None, None, 20],
            "moe_shared_expert_intermediate_size": 40,
            "intermediate_size": 120,
        },
        {
            "name": "small",
            "hidden_size": 48,
            "num_key_value_heads": 1,
            "num_attention_heads": 2,
            "mamba_num_heads": 6,
            "n_routed_experts": 3,
            "moe_intermediate_size": 24,
            "moe_shared_expert_intermediate_size": 24,
            "intermediate_size": 64,
            "layers": [0, 1, 2, 4, 5],  # skips a Mamba layer (it still writes its state)
        },
        # one query head of two per KV group, a third of the Mamba heads, no MoE cut
        {"name": "thin", "num_attention_heads": 2, "mamba_num_heads": 3},
    ],
)
CHECKPOINTS["hybrid_noe"] = dict(
    _HYBRID_COMMON,
    hybrid_override_pattern="M*M-M",
    hidden_size=128,
    intermediate_size=192,
    mamba_num_heads=8,
    n_groups=2,
    seed=5,
    budgets=[
        {"name": "full"},
        {"name": "mid", "hidden_size": 96, "mamba_num_heads": 6, "intermediate_size": 144},
        {
            "name": "small",
            "hidden_size": 64,
            "num_key_value_heads": 1,
            "num_attention_heads": 2,
            "mamba_num_heads": 4,
            "intermediate_size": 96,
            "layers": [0, 1, 3, 4],  # skips a Mamba layer (it still writes its state)
        },
    ],
)
# families whose slices stock vLLM's CPU build runs (NemotronH MoE layers it cannot)
STOCK_RUNS = [name for name in CHECKPOINTS if name != "hybrid"]

ENGINE_KWARGS: dict[str, Any] = dict(
    dtype="float32",
    max_model_len=512,
    kv_cache_memory_bytes=64 << 20,
    enforce_eager=True,
    max_num_seqs=32,
    # small token budget per step: long prompts are chunked and share steps with decodes
    max_num_batched_tokens=64,
    enable_prefix_caching=False,
)

PROMPT_LENGTHS = (3, 11, 40, 97)


def budget_names(name: str) -> list[str]:
    return [b["name"] for b in CHECKPOINTS[name]["budgets"]]


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def checkpoint(ckpt_root: Path):
    """``checkpoint(name)`` -> path of the built elastic checkpoint (built once)."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_random_checkpoint(ckpt_root / name, **CHECKPOINTS[name])
        return built[name]

    return get


@pytest.fixture(scope="session")
def sliced(checkpoint, ckpt_root: Path):
    """``sliced(name, budget)`` -> path of the stock checkpoint sliced from it."""
    done: dict[tuple[str, str], Path] = {}

    def get(name: str, budget: str) -> Path:
        key = (name, budget)
        if key not in done:
            done[key] = slice_checkpoint(checkpoint(name), budget, ckpt_root / f"{name}-{budget}")
        return done[key]

    return get


class EnginePool:
    """Holds at most one live engine: vLLM's in-process engines share global parallel
    state, so one must be shut down before the next starts."""

    def __init__(self) -> None:
        self.key: Any = None
        self.llm: Any = None

    def get(self, key: Any, model: Path, **overrides: Any) -> Any:
        if self.key != key:
            self.close()
            from vllm import LLM

            self.llm = LLM(str(model), **{**ENGINE_KWARGS, **overrides})
            self.key = key
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            # shut down now: a later garbage collection would tear down the global
            # parallel state under the next engine
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            self.key = None
            gc.collect()


@pytest.fixture(scope="session")
def engines() -> Iterator[EnginePool]:
    pool = EnginePool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    """Token-id prompts of different lengths (deterministic, no special tokens)."""
    import random

    rng = random.Random(7)
    return [[rng.randrange(12, 200) for _ in range(n)] for n in PROMPT_LENGTHS]


REF_MAX_TOKENS = 12


@pytest.fixture(scope="session")
def reference(sliced, prompts, engines):
    """``reference(name, budget)`` -> stock vLLM greedy outputs on the sliced checkpoint
    (token ids and top logprobs per prompt, REF_MAX_TOKENS each). All budgets of a
    checkpoint are computed together, once."""
    cache: dict[tuple[str, str], list[Any]] = {}

    def get(name: str, budget: str) -> list[Any]:
        if (name, budget) not in cache:
            for b in budget_names(name):
                llm = engines.get(("stock", name, b), sliced(name, b))
                cache[(name, b)] = greedy(llm, prompts, [None] * len(prompts), REF_MAX_TOKENS)
            engines.close()
        return cache[(name, budget)]

    return get


def greedy(llm: Any, prompts: list[list[int]], extra: list[Any], max_tokens) -> list[Any]:
    """Greedy outputs as (token ids, [{token: logprob}] per step) per prompt."""
    from vllm import SamplingParams

    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompts)
    params = [
        SamplingParams(max_tokens=m, temperature=0.0, logprobs=5, ignore_eos=True, extra_args=e)
        for e, m in zip(extra, max_tokens)
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [
        (
            list(o.outputs[0].token_ids),
            [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs],
        )
        for o in outs
    ]


def generate_greedy(
    llm: Any, prompts: list[list[int]], extra: list[Any], think: list[Any], max_tokens: int
) -> list[Any]:
    """Greedy ``CompletionOutput`` per prompt with ``extra_args`` and vLLM's
    ``thinking_token_budget`` per request (``None``: no cap)."""
    from vllm import SamplingParams

    params = [
        SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
            thinking_token_budget=t,
            extra_args=e,
        )
        for e, t in zip(extra, think)
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def hf_greedy(path: Path, prompts: list[list[int]], max_tokens: int) -> list[Any]:
    """transformers' greedy outputs on a (sliced, plain) checkpoint, in ``greedy``'s form
    (ids and the top-5 logprobs of every step)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    out = []
    for prompt in prompts:
        with torch.no_grad():
            g = model.generate(
                torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                do_sample=False, output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        steps = []
        for logits in g.logits:
            lp = torch.log_softmax(logits[0].float(), -1)
            top = lp.topk(5)
            steps.append(dict(zip(top.indices.tolist(), top.values.tolist())))
        out.append((g.sequences[0, len(prompt) :].tolist(), steps))
    return out


@pytest.fixture(scope="session")
def hf_reference(sliced, prompts):
    """``hf_reference(name, budget)`` -> transformers' greedy outputs on the sliced
    checkpoint (REF_MAX_TOKENS per prompt): the reference where stock vLLM cannot run."""
    cache: dict[tuple[str, str], list[Any]] = {}

    def get(name: str, budget: str) -> list[Any]:
        if (name, budget) not in cache:
            cache[(name, budget)] = hf_greedy(sliced(name, budget), prompts, REF_MAX_TOKENS)
        return cache[(name, budget)]

    return get


LOGPROB_ATOL = 1e-4  # fp32; observed differences are ~3e-6


def assert_same_output(got: Any, want: Any, what: str) -> None:
    """Identical greedy ids; top-logprobs of every step within LOGPROB_ATOL."""
    ids, lps = got
    ref_ids, ref_lps = want
    assert ids == ref_ids, f"{what}: token ids differ\n got {ids}\nwant {ref_ids}"
    for step, (a, b) in enumerate(zip(lps, ref_lps)):
        for tok in set(a) & set(b):
            assert abs(a[tok] - b[tok]) <= LOGPROB_ATOL, (
                f"{what}: step {step} token {tok} logprob {a[tok]} vs {b[tok]}"
            )


@pytest.fixture(scope="session")
def elastic_llm(checkpoint, engines):
    """``elastic_llm(name, **overrides)`` -> the (shared) elastic engine for a checkpoint."""

    def get(name: str, **overrides: Any) -> Any:
        key = ("elastic", name, tuple(sorted(overrides.items())))
        return engines.get(key, checkpoint(name), **overrides)

    return get


def count_pressure_preemptions(llm: Any) -> dict[str, int]:
    """Count the scheduler's preemptions for lack of KV blocks from now on (not the
    recompute hook's re-prefills, which drop their stale output)."""
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    count = {"n": 0}
    real = sched._preempt_request

    def counting(request: Any, timestamp: float, drop_stale_output: bool = False) -> None:
        count["n"] += not drop_stale_output
        return real(request, timestamp, drop_stale_output)

    sched._preempt_request = counting
    return count
