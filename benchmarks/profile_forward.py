"""Where the time goes: torch.profiler on the elastic vs stock engines, plus a GEMM check.

1. Profiles one timed batch (after a warm-up) of the budgets workload on the elastic
   engine and on the stock engine of the same budget, for the full and the smallest
   budget, and lists the top operators by self CPU time.
2. Times the decoder's projections alone at the budget's shapes, three ways: ``F.linear``
   on a contiguous weight, ``F.linear`` on a slice of the parent's weight (what the
   elastic model runs) and vLLM's CPU GEMM (oneDNN, prepacked weight: what stock layers
   run), for a decode-sized and a prefill-sized batch.

    python benchmarks/profile_forward.py [--quick] [--budgets full small]
"""

from __future__ import annotations

import time
from typing import Any

import common as c

TOP = 15


def profile_run(llm: Any, reqs: list[c.Request]) -> tuple[float, list[dict[str, Any]]]:
    """Wall time and top operators (by self CPU time) of one profiled batch."""
    from torch.profiler import ProfilerActivity, profile

    c.run_batch(llm, reqs, quiet=False)  # warm-up
    c.wait_for_quiet()  # outside the profiled region (as is run_batch's calibration GEMM)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = c.run_batch(llm, reqs, quiet=False).wall_s
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = [
        {
            "op": e.key,
            "self_cpu_ms": round(e.self_cpu_time_total / 1000, 1),
            "share": round(e.self_cpu_time_total / total, 4),
            "calls": e.count,
        }
        for e in events[:TOP]
    ]
    return wall, top


def profile_engines(ckpt: c.Checkpoint, budgets: list[str], work: c.Workload) -> dict:
    prompts = work.prompts(ckpt)
    out: dict[str, Any] = {}
    with c.engine(ckpt.path) as llm:
        for b in budgets:
            c.log(f"  profiling elastic {b}")
            params = c.sampling(work.max_tokens, c.budget_args(b))
            out[f"elastic {b}"] = profile_run(llm, c.requests_for(prompts, params))
    for b in budgets:
        with c.engine(ckpt.sliced[b]) as llm:
            c.log(f"  profiling stock {b}")
            params = c.sampling(work.max_tokens)
            out[f"stock {b}"] = profile_run(llm, c.requests_for(prompts, params))
    return out


def projection_shapes(ckpt: c.Checkpoint, budget: str) -> dict[str, tuple[int, int, int, int]]:
    """name -> (N, K) of the budget and (N, K) of the parent matrix it is sliced from."""
    info, b = ckpt.info, ckpt.budget(budget)
    hd, h, ph = info["head_dim"], b["hidden_size"], info["hidden_size"]
    q, kv = b["num_attention_heads"] * hd, b["num_key_value_heads"] * hd
    pq, pkv = info["num_attention_heads"] * hd, info["num_key_value_heads"] * hd
    inter, pinter = _max_inter(b["intermediate_size"]), info["intermediate_size"]
    return {
        "qkv": (q + 2 * kv, h, pq + 2 * pkv, ph),
        "o_proj": (h, q, ph, pq),
        "gate_up": (2 * inter, h, 2 * pinter, ph),
        "down": (h, inter, ph, pinter),
    }


def elastic_points(ckpt: c.Checkpoint, name: str) -> list[tuple[int, int]]:
    """Every budget's (N, K) of projection ``name`` as the elastic model stores it (qkv
    rows hold the parent's full K/V for every budget)."""
    info, hd = ckpt.info, ckpt.info["head_dim"]
    pkv = info["num_key_value_heads"] * hd
    points = []
    for budget in ckpt.budgets:
        n, k, _, _ = projection_shapes(ckpt, budget)[name]
        if name == "qkv":
            kv = ckpt.budget(budget)["num_key_value_heads"] * hd
            n = n - 2 * kv + 2 * pkv
        points.append((n, k))
    return points


def _max_inter(value: int | str) -> int:
    return int(str(value).split("-")[-1])


def _time(fn: Any, *args: Any, reps: int, blocks: int = 5) -> float:
    """Best-of-``blocks`` mean milliseconds per call of ``fn(*args)``."""
    fn(*args)
    best = float("inf")
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(*args)
        best = min(best, (time.perf_counter() - t0) / reps * 1000)
    return round(best, 4)


def gemm_check(ckpt: c.Checkpoint, budgets: list[str], batches: tuple[int, ...]) -> list[dict]:
    """ms per projection: F.linear (contiguous / sliced view) vs vLLM's oneDNN GEMM."""
    import torch
    import torch.nn.functional as F
    from vllm import _custom_ops as ops

    from vllm_elastic.models.nested_linear import NestedLinear

    rows = []
    for b in budgets:
        for name, (n, k, pn, pk) in projection_shapes(ckpt, b).items():
            parent = torch.randn(pn, pk)
            view = parent[:n, :k]
            dense = view.contiguous()
            handler = ops.create_onednn_mm(dense.t(), 32)
            points = elastic_points(ckpt, name)
            en = points[ckpt.budgets.index(b)][0]
            nested = NestedLinear(points)
            nested.pack(torch.randn(max(p[0] for p in points), pk), None, "nested")
            runs = [(ckpt.budgets.index(b), 0)]
            for m in batches:
                x = torch.randn(m, k)
                runs = [(runs[0][0], m)]
                reps = max(2, int(4e8 / (2 * m * n * k)))
                probe = c.NoiseProbe()
                rows.append(
                    {
                        "budget": b,
                        "proj": name,
                        "M": m,
                        "N": n,
                        "K": k,
                        "linear_ms": _time(F.linear, x, dense, reps=reps),
                        "linear_view_ms": _time(F.linear, x, view, reps=reps),
                        "onednn_ms": _time(ops.onednn_mm, handler, x, None, reps=reps),
                        "elastic_N": en,
                        "nested_ms": _time(nested, torch.randn(m, pk), runs, reps=reps),
                        "foreign_cores": probe.stop()["foreign_cores"],
                    }
                )
    return rows


def tables(prof: dict[str, Any], gemm: list[dict]) -> list[str]:
    out = []
    for name, (wall, top) in prof.items():
        out.append(f"### {name}: {wall:.3f} s")
        out.append(
            c.md_table(
                ["op", "self CPU ms", "share", "calls"],
                [(t["op"], t["self_cpu_ms"], t["share"], t["calls"]) for t in top],
            )
        )
    out.append("### GEMM alone (ms per call)")
    out.append(
        c.md_table(
            [
                "budget",
                "proj",
                "M",
                "N",
                "K",
                "F.linear",
                "F.linear on slice",
                "vLLM oneDNN",
                "F.linear / oneDNN",
                "elastic N",
                "nested shells (elastic)",
                "nested / oneDNN",
                "other procs' cores",
            ],
            [
                (
                    r["budget"],
                    r["proj"],
                    r["M"],
                    r["N"],
                    r["K"],
                    r["linear_ms"],
                    r["linear_view_ms"],
                    r["onednn_ms"],
                    round(r["linear_view_ms"] / r["onednn_ms"], 2),
                    r["elastic_N"],
                    r["nested_ms"],
                    round(r["nested_ms"] / r["onednn_ms"], 2),
                    r["foreign_cores"],
                )
                for r in gemm
            ],
        )
    )
    return out


def main() -> None:
    def extra(p: Any) -> None:
        p.add_argument(
            "--budgets",
            nargs="+",
            help="budgets to profile (default: first and last; quick: first)",
        )

    settings, args = c.parse_settings(__doc__.splitlines()[0], extra)
    ckpt = c.prepare_checkpoint(settings)
    budgets = args.budgets or [ckpt.budgets[0], ckpt.budgets[-1]]
    if settings.quick and not args.budgets:
        budgets = budgets[:1]
    work = c.Workload(4, 8, 2) if settings.quick else c.Workload(32, 32, 16)
    prof = profile_engines(ckpt, budgets, work)
    gemm = gemm_check(ckpt, budgets, (4, 64) if settings.quick else (1, 4, 16, 64, 2048))
    sections = tables(prof, gemm)
    print("\n\n".join(sections))
    intro = (
        f"Profiled batch: {work.num_prompts} prompts x {work.prompt_len} -> {work.max_tokens} "
        "tokens (prefill + decode), CPU self time per operator (the profiler itself slows "
        "the runs down). GEMM: one projection of one layer, M rows (1-64 = decode batch sizes, "
        "2048 = prefill of 64 x 32), best of 5 blocks: F.linear on a contiguous slice and on "
        "a view of the parent, vLLM's oneDNN GEMM on a prepacked slice (what stock runs), "
        "and the elastic model's nested shells at this budget (its qkv N holds the parent's "
        "full K/V: `elastic N`)."
    )
    c.write_results(
        settings,
        ckpt,
        "profile",
        "Profile: elastic vs stock forward",
        {"profiles": {k: {"wall_s": w, "top": t} for k, (w, t) in prof.items()}, "gemm": gemm},
        [intro, *sections],
    )


if __name__ == "__main__":
    main()
