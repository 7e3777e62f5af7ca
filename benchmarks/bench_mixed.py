"""Mixed-budget batches on one elastic engine vs the ideal blend of homogeneous batches.

The same request batch runs homogeneously at every budget (time ``T_b``), then split
across budgets: 50/50 for every pair and 1/3 each across three. Requests alternate budgets
(``--layout interleaved``, request i -> budget i mod k, the realistic case: rows of
different budgets are interleaved in the persistent batch) or come in blocks
(``--layout blocked``). The ideal blend is the harmonic mix of the homogeneous runs:
``ideal_time = sum_b share_b * T_b`` (total tokens / that = ideal tokens/s).
Ratio = ideal_time / mixed_time; target >= 0.9. All batches are timed in interleaved
rounds on one engine, so a drift of the machine's speed hits them alike.

    python benchmarks/bench_mixed.py [--quick] [--layout interleaved|blocked]
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any

import common as c

TARGET = 0.9


def mixes(budgets: list[str]) -> list[tuple[str, ...]]:
    """Every pair of budgets, then the first three together."""
    out = list(itertools.combinations(budgets, 2))
    if len(budgets) >= 3:
        out.append(tuple(budgets[:3]))
    return out


def assignment(n: int, mix: tuple[str, ...], layout: str) -> list[str]:
    """Budget of each of ``n`` requests: equal shares, interleaved or in blocks."""
    if layout == "interleaved":
        return [mix[i % len(mix)] for i in range(n)]
    return [mix[min(i * len(mix) // n, len(mix) - 1)] for i in range(n)]


def mixed_requests(ckpt: c.Checkpoint, work: c.Workload, budgets: list[str]) -> list:
    """The workload with request i at ``budgets[i]``."""
    params = [c.sampling(work.max_tokens, c.budget_args(b)) for b in budgets]
    return c.requests_for(work.prompts(ckpt), params)


def run_all(ckpt: c.Checkpoint, work: c.Workload, repeats: int, layout: str) -> tuple:
    """Homogeneous and mixed batches on one engine, timed in interleaved rounds."""
    named = {b: c.workload_requests(ckpt, work, b) for b in ckpt.budgets}
    todo = {"+".join(m): (m, assignment(work.num_prompts, m, layout)) for m in mixes(ckpt.budgets)}
    named.update({k: mixed_requests(ckpt, work, labels) for k, (_, labels) in todo.items()})
    c.log(f"elastic engine {ckpt.path}: {list(named)} ({layout})")
    with c.engine(ckpt.path) as llm:
        info = c.engine_info(llm)
        runs = c.measure_interleaved(llm, named, repeats)
    homo = {b: runs[b] for b in ckpt.budgets}
    rows = [evaluate(m, labels, runs[k], homo) for k, (m, labels) in todo.items()]
    return info, homo, rows


def per_budget_latency(run: c.BatchRun, budgets: list[str]) -> dict[str, float]:
    """Mean completion time of each budget's requests within one mixed run."""
    return {
        b: round(statistics.fmean(t for t, x in zip(run.latency_s, budgets) if x == b), 4)
        for b in dict.fromkeys(budgets)
    }


def evaluate(mix: tuple[str, ...], labels: list[str], mixed: c.Measurement, homo: dict) -> dict:
    """Ideal blend of the homogeneous runs vs the mixed run."""
    shares = {b: labels.count(b) / len(labels) for b in mix}
    ideal = sum(shares[b] * homo[b].wall_s for b in mix)
    ratio = ideal / mixed.wall_s
    return {
        "mix": "+".join(mix),
        "shares": shares,
        "mixed": mixed.summary(),
        "ideal_wall_s": round(ideal, 4),
        "ideal_tokens_per_s": round(mixed.best.output_tokens / ideal, 2),
        "ratio": round(ratio, 4),
        "latency_by_budget_s": per_budget_latency(mixed.best, labels),
        "target": TARGET,
        "pass": ratio >= TARGET,
    }


def table(homo: dict[str, c.Measurement], rows: list[dict]) -> tuple[str, str]:
    homo_md = c.md_table(
        ["budget", "tok/s", "wall (s)", "latency (s)"],
        [
            (b, m.tokens_per_s, m.wall_s, m.best.summary()["latency_mean_s"])
            for b, m in homo.items()
        ],
    )
    mixed_md = c.md_table(
        ["mix", "mixed tok/s", "ideal tok/s", "ratio", "mixed wall (s)", "ideal wall (s)"]
        + [f">= {TARGET}"],
        [
            (
                r["mix"],
                r["mixed"]["tokens_per_s"],
                r["ideal_tokens_per_s"],
                r["ratio"],
                r["mixed"]["wall_s"],
                r["ideal_wall_s"],
                c.verdict(r["ratio"], TARGET),
            )
            for r in rows
        ],
    )
    return homo_md, mixed_md


def main() -> None:
    def extra(p: Any) -> None:
        p.add_argument("--layout", choices=("interleaved", "blocked"), default="interleaved")

    settings, args = c.parse_settings(__doc__.splitlines()[0], extra)
    ckpt = c.prepare_checkpoint(settings)
    work = c.Workload.for_settings(settings)
    info, homo, rows = run_all(ckpt, work, settings.repeats, args.layout)
    homo_md, mixed_md = table(homo, rows)
    print(mixed_md)
    name = "mixed" if args.layout == "interleaved" else f"mixed_{args.layout}"
    plot = c.bar_plot(
        settings.out_dir / f"{name}.png",
        [r["mix"] for r in rows],
        {
            "mixed tok/s": [r["mixed"]["tokens_per_s"] for r in rows],
            "ideal blend tok/s": [r["ideal_tokens_per_s"] for r in rows],
        },
        "output tokens/s",
        f"Mixed batches ({args.layout}) vs ideal blend",
    )
    intro = (
        f"Workload: {work.num_prompts} prompts x {work.prompt_len} -> {work.max_tokens} tokens; "
        f"layout `{args.layout}`. Ideal = sum of share x homogeneous time; "
        "ratio = ideal time / mixed time."
    )
    c.write_results(
        settings,
        ckpt,
        name,
        f"Mixed-budget batches ({args.layout}) vs the ideal blend",
        {
            "workload": work.__dict__,
            "layout": args.layout,
            "engine": info,
            "homogeneous": {b: m.summary() for b, m in homo.items()},
            "rows": rows,
        },
        [intro, "## Homogeneous batches (elastic engine)", homo_md, "## Mixed batches", mixed_md],
        [plot],
    )


if __name__ == "__main__":
    main()
