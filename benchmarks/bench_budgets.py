"""Per-budget speed: the elastic engine at budget b vs stock vLLM serving b's slice.

One elastic engine serves every budget of the checkpoint (``extra_args={"elastic_budget":
b}``); then one stock engine per budget serves the checkpoint ``slice_checkpoint`` wrote
for it. Both get the same fixed prompts (greedy, ``ignore_eos``, fixed ``max_tokens``),
a warm-up run and timed runs. Stock engines run at vLLM's defaults (torch.compile on
CPU), the anchor, and in eager mode (an extra column). The elastic engine's timed runs
(budgets interleaved) are split into a phase before and one after the stock engines.
Target: elastic output tokens/s >= 0.95x stock at its defaults, per budget.
Greedy outputs are compared too (same weights, so they should mostly match).

    python benchmarks/bench_budgets.py [--quick]
"""

from __future__ import annotations

from typing import Any

import common as c

TARGET = 0.95


def elastic_phase(ckpt: c.Checkpoint, work: c.Workload, repeats: int) -> dict[str, Any]:
    """Every budget on one elastic engine, timed in interleaved rounds."""
    c.log(f"elastic engine: {ckpt.path}")
    with c.engine(ckpt.path) as llm:
        info = c.engine_info(llm)
        named = {b: c.workload_requests(ckpt, work, b) for b in ckpt.budgets}
        runs = c.measure_interleaved(llm, named, repeats)
    return {"engine": info, "runs": runs}


def run_elastic(ckpt: c.Checkpoint, work: c.Workload, repeats: int, stock: Any) -> dict:
    """Elastic timed runs split before and after ``stock()`` (which runs the stock
    engines), so a drift of the machine's speed during the run hits both sides."""
    before = elastic_phase(ckpt, work, (repeats + 1) // 2)
    stock_result = stock()
    after = elastic_phase(ckpt, work, max(repeats // 2, 1))
    runs = {b: before["runs"][b].merged(after["runs"][b]) for b in ckpt.budgets}
    return {"engine": before["engine"], "runs": runs}, stock_result


def run_stock(ckpt: c.Checkpoint, work: c.Workload, repeats: int) -> dict[str, Any]:
    """One stock engine per sliced checkpoint and stock mode (``c.STOCK_MODES``: its
    defaults, the anchor, and eager), created and closed in turn."""
    runs: dict[str, dict] = {m: {} for m in c.STOCK_MODES}
    info: dict[str, dict] = {m: {} for m in c.STOCK_MODES}
    for mode, b, llm in c.stock_engines(ckpt):
        info[mode][b] = c.engine_info(llm)
        runs[mode][b] = c.measure(llm, c.workload_requests(ckpt, work), repeats)
    return {"engine": info, "runs": runs}


def compare(ckpt: c.Checkpoint, elastic: dict[str, Any], stock: dict[str, Any]) -> list[dict]:
    """One row per budget: throughput, latency, their ratios and the verdict."""
    rows = []
    for b in ckpt.budgets:
        e, s = elastic["runs"][b], stock["runs"][c.ANCHOR_MODE][b]
        eager = stock["runs"]["eager"][b]
        ratio = e.tokens_per_s / s.tokens_per_s
        rows.append(
            {
                "budget": b,
                "fraction": ckpt.budget(b)["fraction"],
                "elastic": e.summary(),
                "stock": s.summary(),
                "stock_eager": eager.summary(),
                "stock_startup_s": stock["engine"][c.ANCHOR_MODE][b]["startup_s"],
                "throughput_ratio": round(ratio, 4),
                "throughput_ratio_vs_eager": round(e.tokens_per_s / eager.tokens_per_s, 4),
                "latency_ratio": round(
                    s.best.summary()["latency_mean_s"] / e.best.summary()["latency_mean_s"], 4
                ),
                "same_outputs": c.same_outputs(e.best.outputs, eager.best.outputs),
                "same_outputs_compiled": c.same_outputs(e.best.outputs, s.best.outputs),
                "target": TARGET,
                "pass": ratio >= TARGET,
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    return c.md_table(
        [
            "budget",
            "params frac",
            "elastic tok/s",
            "stock tok/s",
            "ratio",
            "stock eager tok/s",
            "ratio vs eager",
            "stock start (s)",
            "elastic lat (s)",
            "stock lat (s)",
            "lat ratio",
            "same outputs (eager / compiled)",
            "other procs' cores (e/s)",
            f">= {TARGET}",
        ],
        [
            (
                r["budget"],
                r["fraction"],
                r["elastic"]["tokens_per_s"],
                r["stock"]["tokens_per_s"],
                r["throughput_ratio"],
                r["stock_eager"]["tokens_per_s"],
                r["throughput_ratio_vs_eager"],
                r["stock_startup_s"],
                r["elastic"]["latency_mean_s"],
                r["stock"]["latency_mean_s"],
                r["latency_ratio"],
                f"{r['same_outputs']} / {r['same_outputs_compiled']}",
                f"{r['elastic']['foreign_cores']} / {r['stock']['foreign_cores']}",
                c.verdict(r["throughput_ratio"], TARGET),
            )
            for r in rows
        ],
    )


def plots(settings: c.Settings, rows: list[dict]) -> list:
    names = [r["budget"] for r in rows]
    return [
        c.bar_plot(
            settings.out_dir / "budgets_throughput.png",
            names,
            {
                "elastic": [r["elastic"]["tokens_per_s"] for r in rows],
                "stock (sliced, defaults)": [r["stock"]["tokens_per_s"] for r in rows],
                "stock (sliced, eager)": [r["stock_eager"]["tokens_per_s"] for r in rows],
            },
            "output tokens/s",
            "Throughput per budget",
        ),
        c.bar_plot(
            settings.out_dir / "budgets_ratio.png",
            names,
            {
                "elastic / stock defaults": [r["throughput_ratio"] for r in rows],
                "elastic / stock eager": [r["throughput_ratio_vs_eager"] for r in rows],
            },
            "throughput ratio",
            "Elastic vs stock per budget",
            target=TARGET,
        ),
    ]


def main() -> None:
    settings, _ = c.parse_settings(__doc__.splitlines()[0])
    ckpt = c.prepare_checkpoint(settings)
    work = c.Workload.for_settings(settings)
    elastic, stock = run_elastic(
        ckpt, work, settings.repeats, lambda: run_stock(ckpt, work, settings.repeats)
    )
    rows = compare(ckpt, elastic, stock)
    md = table(rows)
    print(md)
    intro = (
        f"Workload: {work.num_prompts} prompts x {work.prompt_len} tokens -> "
        f"{work.max_tokens} output tokens each (greedy, ignore_eos), all submitted at once. "
        "Latency = mean per-request completion time. Ratio = elastic tok/s / stock tok/s "
        "at stock vLLM's default settings (compiled); stock eager is the extra column; "
        "stock start = engine start-up incl. compilation."
    )
    c.write_results(
        settings,
        ckpt,
        "budgets",
        "Elastic engine vs stock vLLM per budget",
        {
            "workload": work.__dict__,
            "engines": {"elastic": elastic["engine"], "stock": stock["engine"]},
            "rows": rows,
        },
        [intro, md],
        plots(settings, rows),
    )


if __name__ == "__main__":
    main()
