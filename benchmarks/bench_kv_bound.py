"""Memory-bound regime: a fixed KV-cache size, every budget, elastic vs its slice.

Every engine gets the same ``kv_cache_memory_bytes``, sized so the full model holds
``FULL_REQUESTS`` requests of P prompt + M output tokens, and ``max_num_seqs`` far above
that, so the KV cache, not the scheduler limit, bounds the batch. ``REQUESTS_PER_FULL``
times as many requests as the full model holds are submitted at once.

Per engine and budget, reported: KV bytes per token (KV cache bytes / the tokens vLLM
allocated for them), the number of requests the cache holds (vLLM's own capacity: KV
blocks / blocks per request), the most requests the scheduler ran at once and the
preemptions it made (observed on the warm-up run), and output tokens/s. The elastic
engine writes K/V at the parent's width for every budget by default, so a small-budget
request occupies what a full one does; the slice (stock vLLM at its default settings,
compiled) holds only its own heads. "Projected" is what a request whose budget never
changes holds if only its budget's K/V is stored (the budget's own bytes per token from
the cost model); the elastic engine with ``kv_layout: per-budget`` (a third engine,
"per-budget") stores exactly that.

    python benchmarks/bench_kv_bound.py [--quick]
"""

from __future__ import annotations

import math
from typing import Any

import common as c

from vllm_elastic.spec import kv_layout

TARGET = 0.95
FULL_REQUESTS = 16  # requests of P+M tokens the full model's KV holds (quick: 4)
REQUESTS_PER_FULL = 4  # submitted requests per request the full model holds
BLOCK = 32  # KV block size of every engine (the CPU attention needs a multiple of 32)


def workload(settings: c.Settings) -> tuple[int, int, int]:
    """(requests held by the full model, prompt tokens, output tokens)."""
    return (4, 16, 8) if settings.quick else (FULL_REQUESTS, 32, 64)


def blocked(tokens: int) -> int:
    """Tokens of KV a request of ``tokens`` tokens occupies (whole blocks)."""
    return math.ceil(tokens / BLOCK) * BLOCK


def kv_bytes(ckpt: c.Checkpoint, held: int, tokens: int) -> int:
    """A KV cache holding ``held`` full-model requests of ``tokens`` tokens, plus the
    block vLLM's block pool keeps back."""
    per_token = ckpt.budget(ckpt.budgets[0])["kv_bytes_per_token"]
    return (held * blocked(tokens) + BLOCK) * per_token


def capacity(llm: Any, tokens: int, groups: int = 1) -> dict[str, Any]:
    """vLLM's KV blocks, the bytes one token's K/V occupies, and the whole requests of
    ``tokens`` tokens the cache holds (in-process engine: its scheduler's KV config).
    ``groups``: the KV-cache groups a request holds blocks in (the per-budget layout: its
    budget's stored KV groups; else the one group)."""
    config = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
    size = llm.llm_engine.vllm_config.cache_config.block_size
    # bytes per token of each KV-cache group (its layers' pages; the per-budget layout's
    # groups overlay one allocation, each block id owned by one group)
    per_group = [
        g.kv_cache_spec.page_size_bytes * len(g.layer_names) / size for g in config.kv_cache_groups
    ]
    return {
        "kv_blocks": config.num_blocks,
        "kv_cache_groups": len(per_group),
        "block_size": size,
        "kv_bytes_per_token": round(sum(per_group[:groups]), 1),
        # less the null block the block pool keeps back
        "requests_held": (config.num_blocks - 1) // (groups * math.ceil(tokens / size)),
    }


def observe(llm: Any, requests: list) -> dict[str, int]:
    """Run ``requests`` once (the warm-up), stepping the engine: the most requests
    running at once and the preemptions made."""
    eng = llm.llm_engine
    scheduler = eng.engine_core.engine_core.scheduler  # in-process engine (benchmarks)
    ids = []
    for i, (prompt, params) in enumerate(requests):
        ids.append(f"kv-observe-{i}")
        eng.add_request(ids[-1], {"prompt_token_ids": list(prompt)}, params)
    peak, preempted = 0, {}
    while eng.has_unfinished_requests():
        eng.step()
        peak = max(peak, len(scheduler.running))
        for r in scheduler.running:
            preempted[r.request_id] = r.num_preemptions
    return {"peak_running": peak, "preemptions": sum(preempted.values())}


def measure(llm: Any, requests: list, tokens: int, repeats: int, groups: int = 1) -> dict[str, Any]:
    info = {**capacity(llm, tokens, groups), **observe(llm, requests)}
    res = c.measure(llm, requests, repeats, warmup=0)
    return {**info, **res.summary()}


def run(ckpt: c.Checkpoint, settings: c.Settings) -> dict[str, Any]:
    held, p, m = workload(settings)
    tokens = p + m
    engine_kw = {
        "kv_cache_memory_bytes": kv_bytes(ckpt, held, tokens),
        "max_num_seqs": 4 * REQUESTS_PER_FULL * held,
        "max_model_len": tokens,
        "block_size": BLOCK,
    }
    prompts = c.make_prompts(REQUESTS_PER_FULL * held, p, ckpt.info["vocab_size"])

    def requests(budget: str | None) -> list:
        return c.requests_for(prompts, c.sampling(m, c.budget_args(budget)))

    out: dict[str, Any] = {"workload": {"held_full": held, "prompt": p, "output": m,
                                        "requests": len(prompts), **engine_kw}}  # fmt: skip
    out["engines"], out["elastic"], out["stock"], out["per_budget"] = {}, {}, {}, {}
    c.log(f"elastic engine {ckpt.path}")
    with c.engine(ckpt.path, **engine_kw) as llm:
        out["engines"]["elastic"] = c.engine_info(llm)
        for b in ckpt.budgets:
            c.log(f"  elastic {b}")
            out["elastic"][b] = measure(llm, requests(b), tokens, settings.repeats)
    c.log(f"elastic engine, kv_layout per-budget {ckpt.path}")
    per_budget = {"elastic": {"kv_layout": "per-budget"}}
    with c.engine(ckpt.path, **engine_kw, additional_config=per_budget) as llm:
        out["engines"]["per_budget"] = c.engine_info(llm)
        spec = llm.llm_engine.vllm_config.model_config.hf_config.elastic_spec
        for b in ckpt.budgets:
            c.log(f"  per-budget {b}")
            groups = kv_layout.stored_groups(spec, spec.get(b))  # the engine's own rule
            out["per_budget"][b] = measure(llm, requests(b), tokens, settings.repeats, groups)
    for b in ckpt.budgets:
        c.log(f"stock engine (default): {ckpt.sliced[b]}")
        with c.engine(ckpt.sliced[b], **engine_kw) as llm:
            out["engines"][f"stock_{b}"] = c.engine_info(llm)
            out["stock"][b] = measure(llm, requests(None), tokens, settings.repeats)
    return out


def rows(ckpt: c.Checkpoint, res: dict[str, Any]) -> list[dict[str, Any]]:
    kv = res["workload"]["kv_cache_memory_bytes"]
    tokens = res["workload"]["prompt"] + res["workload"]["output"]
    per_request = blocked(tokens)
    out = []
    for b in ckpt.budgets:
        e, s, pb = res["elastic"][b], res["stock"][b], res["per_budget"][b]
        own = ckpt.budget(b)["kv_bytes_per_token"]
        out.append({
            "budget": b,
            "elastic": e,
            "stock": s,
            "per_budget": pb,
            "capacity_ratio": round(e["requests_held"] / s["requests_held"], 3),
            "throughput_ratio": round(e["tokens_per_s"] / s["tokens_per_s"], 3),
            "per_budget_capacity_ratio": round(pb["requests_held"] / s["requests_held"], 3),
            "per_budget_throughput_ratio": round(pb["tokens_per_s"] / s["tokens_per_s"], 3),
            "projected_bytes_per_token": own,
            "projected_requests_held": (kv // (own * BLOCK) - 1) // (per_request // BLOCK),
        })  # fmt: skip
    return out


def table(rs: list[dict[str, Any]]) -> str:
    return c.md_table(
        [
            "budget", "KV B/token elastic", "per-budget", "slice", "projected",
            "requests held elastic", "per-budget", "slice", "projected",
            "peak running elastic", "per-budget", "slice", "preemptions elastic",
            "per-budget", "slice", "tok/s elastic", "per-budget", "slice",
            "tok/s ratio elastic", f">= {TARGET}", "per-budget", f">= {TARGET}",
        ],
        [
            (
                r["budget"], r["elastic"]["kv_bytes_per_token"],
                r["per_budget"]["kv_bytes_per_token"], r["stock"]["kv_bytes_per_token"],
                r["projected_bytes_per_token"], r["elastic"]["requests_held"],
                r["per_budget"]["requests_held"], r["stock"]["requests_held"],
                r["projected_requests_held"],
                r["elastic"]["peak_running"], r["per_budget"]["peak_running"],
                r["stock"]["peak_running"], r["elastic"]["preemptions"],
                r["per_budget"]["preemptions"], r["stock"]["preemptions"],
                r["elastic"]["tokens_per_s"], r["per_budget"]["tokens_per_s"],
                r["stock"]["tokens_per_s"],
                r["throughput_ratio"], c.verdict(r["throughput_ratio"], TARGET),
                r["per_budget_throughput_ratio"],
                c.verdict(r["per_budget_throughput_ratio"], TARGET),
            )
            for r in rs
        ],
    )  # fmt: skip


def main() -> None:
    settings, _ = c.parse_settings(__doc__.splitlines()[0])
    ckpt = c.prepare_checkpoint(settings)
    res = run(ckpt, settings)
    rs = rows(ckpt, res)
    md = table(rs)
    print(md)
    w = res["workload"]
    intro = (
        f"KV cache {w['kv_cache_memory_bytes'] / 2**20:.2f} MiB for every engine (the full "
        f"model holds {w['held_full']} requests of {w['prompt']}+{w['output']} tokens); "
        f"{w['requests']} requests submitted at once, max_num_seqs {w['max_num_seqs']}. "
        "Slice = stock vLLM at its default settings (compiled) on the budget's sliced "
        "checkpoint. Elastic = the default K/V layout (every budget writes the parent's "
        "KV heads); per-budget = the same engine with kv_layout per-budget (a request "
        "stores the KV groups of its budgets). Projected = a non-switching request "
        "holding only its budget's K/V (cost model)."
    )
    names = [r["budget"] for r in rs]
    plot = c.bar_plot(
        settings.out_dir / "kv_bound.png",
        names,
        {
            "elastic tok/s": [r["elastic"]["tokens_per_s"] for r in rs],
            "per-budget KV tok/s": [r["per_budget"]["tokens_per_s"] for r in rs],
            "slice tok/s": [r["stock"]["tokens_per_s"] for r in rs],
        },
        "output tokens/s",
        "Fixed KV cache: throughput per budget",
    )
    c.write_results(
        settings,
        ckpt,
        "kv_bound",
        "Memory-bound regime: fixed KV-cache size, elastic vs the slice",
        {**res, "rows": rs},
        [intro, md],
        [plot],
    )


if __name__ == "__main__":
    main()
