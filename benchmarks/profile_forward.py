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


def layer_points(model: Any) -> dict[str, list[tuple[int, int] | None]]:
    """Per projection of the first layer, every budget's (N, K) as the elastic model
    stores it (read from the model: qkv rows hold the parent's full K/V)."""
    layer = model.layers[0]
    named = {"qkv": layer.self_attn.qkv, "o_proj": layer.self_attn.o}
    named.update(gate_up=layer.mlp.up, down=layer.mlp.down)
    return {
        name: [None if lv is None else nl.levels[lv] for lv in nl.level_of]
        for name, nl in named.items()
    }


def profile_engines(ckpt: c.Checkpoint, budgets: list[str], work: c.Workload) -> tuple:
    prompts = work.prompts(ckpt)
    out: dict[str, Any] = {}
    with c.engine(ckpt.path) as llm:
        points = llm.apply_model(layer_points)[0]
        for b in budgets:
            c.log(f"  profiling elastic {b}")
            params = c.sampling(work.max_tokens, c.budget_args(b))
            out[f"elastic {b}"] = profile_run(llm, c.requests_for(prompts, params))
    for b in budgets:
        with c.engine(ckpt.sliced[b]) as llm:
            c.log(f"  profiling stock {b}")
            params = c.sampling(work.max_tokens)
            out[f"stock {b}"] = profile_run(llm, c.requests_for(prompts, params))
    return out, points


def projection_shapes(ckpt: c.Checkpoint, budget: str) -> dict[str, tuple[int, int, int, int]]:
    """name -> (N, K) of the budget's standalone layer 0 and of the parent's, from the
    family's slice declaration (the shapes of the sliced checkpoint)."""
    from vllm_elastic.checkpoint import load_elastic_config

    cfg = load_elastic_config(ckpt.path)
    spec = cfg.elastic_spec
    slices = cfg.family.slices

    def shapes(name: str) -> dict[str, tuple[int, ...]]:
        return slices.shapes(cfg, spec.parent, spec.get(name), padded=True)

    mine, parent = shapes(budget), shapes(spec.full.name)
    layer = slices.layer_prefix.format(i=0)

    def nk(table: dict, *names: str) -> tuple[int, int]:
        rows = sum(table[layer + n][0] for n in names)
        return rows, table[layer + names[0]][1]

    groups = {
        "qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "o_proj": ("self_attn.o_proj.weight",),
        "gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        "down": ("mlp.down_proj.weight",),
    }
    return {name: (*nk(mine, *ns), *nk(parent, *ns)) for name, ns in groups.items()}


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


def gemm_check(
    ckpt: c.Checkpoint, budgets: list[str], batches: tuple[int, ...], layer_points_of: dict
) -> list[dict]:
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
            points = layer_points_of[name]
            en = points[ckpt.budgets.index(b)][0]
            nested = NestedLinear(points)
            nested.pack(torch.randn(max(p[0] for p in points if p), pk), None, "nested")
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
    prof, points = profile_engines(ckpt, budgets, work)
    gemm = gemm_check(ckpt, budgets, (4, 64) if settings.quick else (1, 4, 16, 64, 2048), points)
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
