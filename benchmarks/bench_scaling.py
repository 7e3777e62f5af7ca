"""Latency regime: every budget, elastic vs stock vLLM on its slice, over batch size and
prompt length.

Each point submits B prompts of L tokens and generates M tokens each, streaming, so the
run splits into prefill (time until every request has its first token) and decode
(remaining time / (M-1) steps). Decode sweep: B in (1, 2, 4, 8, 16, 32, 64) at L=32;
prefill sweep: L in (32, 128, 512, 2016) at B=1 (the presets hold 2048 positions). The
elastic engine runs every budget (budgets interleaved per point); each slice runs on
stock vLLM at its default settings (torch.compile on CPU: the anchor) and in eager mode
(an extra column). One warm-up per engine and budget (largest batch, longest prompt),
then timed runs per point. Ratios are elastic speed / stock speed (1.0 = parity): decode
ms/step for the decode sweep, prefill time for the prefill sweep. Target (reported, not
asserted): >= 0.95 everywhere.

    python benchmarks/bench_scaling.py [--quick]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import common as c

TARGET = 0.95


@dataclass(frozen=True)
class Grid:
    batches: tuple[int, ...]
    batch_prompt_len: int
    contexts: tuple[int, ...]
    context_batch: int
    max_tokens: int

    def decode_points(self) -> list[tuple[int, int]]:
        return [(b, self.batch_prompt_len) for b in self.batches]

    def prefill_points(self) -> list[tuple[int, int]]:
        return [(self.context_batch, n) for n in self.contexts]

    def points(self) -> list[tuple[int, int]]:
        """(B, L) of both sweeps, without duplicates."""
        return list(dict.fromkeys(self.decode_points() + self.prefill_points()))

    @property
    def max_model_len(self) -> int:
        return max(self.contexts) + self.max_tokens + 16


FULL_GRID = Grid((1, 2, 4, 8, 16, 32, 64), 32, (32, 128, 512, 2016), 1, 16)
QUICK_GRID = Grid((1, 4), 16, (16, 64), 1, 4)


def key(b: int, n: int) -> str:
    return f"{b},{n}"


def point_requests(ckpt: c.Checkpoint, budget: str | None, b: int, n: int, m: int) -> list:
    """B fixed prompts of L tokens (the same on every engine), at ``budget`` (None: the
    stock engine's own model)."""
    prompts = c.make_prompts(b, n, ckpt.info["vocab_size"], seed=n)
    return c.requests_for(prompts, c.sampling(m, c.budget_args(budget)))


def point_summary(res: c.Measurement, b: int, n: int, m: int) -> dict[str, Any]:
    """The run's summary plus its prefill / decode split."""
    prefill = max(res.best.ttft_s)
    return {
        **res.summary(),
        "batch": b,
        "prompt_len": n,
        "prefill_s": round(prefill, 4),
        "decode_ms_per_step": round(1000 * (res.wall_s - prefill) / max(m - 1, 1), 3),
    }


def run_points(
    llm: Any, ckpt: c.Checkpoint, labels: dict[str, str | None], grid: Grid, repeats: int
) -> dict[str, dict[str, Any]]:
    """Warm up each label, then every grid point with the labels timed in interleaved
    rounds; returns {label: {"B,L": summary}}."""
    m = grid.max_tokens
    warm = ((max(grid.batches), grid.batch_prompt_len), (grid.context_batch, max(grid.contexts)))
    for budget in labels.values():
        for b, n in warm:
            c.run_batch(llm, point_requests(ckpt, budget, b, n, m), stream=True, quiet=False)
    out: dict[str, dict] = {label: {} for label in labels}
    for b, n in grid.points():
        c.log(f"  {list(labels)}: B={b} L={n}")
        named = {label: point_requests(ckpt, x, b, n, m) for label, x in labels.items()}
        res = c.measure_interleaved(llm, named, repeats, warmup=0, stream=True)
        for label in labels:
            out[label][key(b, n)] = point_summary(res[label], b, n, m)
    return out


def run_all(ckpt: c.Checkpoint, grid: Grid, repeats: int) -> dict[str, Any]:
    """{"elastic": {budget: points}, "stock_<mode>": {budget: points}, "engines": ...}."""
    results: dict[str, Any] = {"engines": {}}
    c.log(f"elastic engine {ckpt.path}")
    with c.engine(ckpt.path, max_model_len=grid.max_model_len) as llm:
        results["engines"]["elastic"] = c.engine_info(llm)
        results["elastic"] = run_points(llm, ckpt, {b: b for b in ckpt.budgets}, grid, repeats)
    for mode in c.STOCK_MODES:
        results[f"stock_{mode}"] = {}
    for mode, b, llm in c.stock_engines(ckpt, max_model_len=grid.max_model_len):
        results["engines"][f"stock_{mode}_{b}"] = c.engine_info(llm)
        results[f"stock_{mode}"][b] = run_points(llm, ckpt, {b: None}, grid, repeats)[b]
    return results


def ratios(results: dict[str, Any], grid: Grid) -> list[dict[str, Any]]:
    """One row per budget and point: elastic speed / stock speed (defaults and eager)."""
    rows = []
    decode = set(grid.decode_points())
    for budget, points in results["elastic"].items():
        for b, n in grid.points():
            e = points[key(b, n)]
            row = {"budget": budget, "batch": b, "prompt_len": n, "sweep": []}
            if (b, n) in decode:
                row["sweep"].append("decode")
            if (b, n) in grid.prefill_points():
                row["sweep"].append("prefill")
            row["elastic"] = {k: e[k] for k in ("decode_ms_per_step", "prefill_s")}
            for mode in c.STOCK_MODES:
                s = results[f"stock_{mode}"][budget][key(b, n)]
                row[f"stock_{mode}"] = {k: s[k] for k in ("decode_ms_per_step", "prefill_s")}
                row[f"decode_ratio_{mode}"] = round(
                    s["decode_ms_per_step"] / e["decode_ms_per_step"], 3
                )
                row[f"prefill_ratio_{mode}"] = round(s["prefill_s"] / e["prefill_s"], 3)
            rows.append(row)
    return rows


def headline(row: dict[str, Any], mode: str) -> float:
    """The ratio the row's sweep is about (decode for the decode sweep, else prefill)."""
    sweep = "decode" if "decode" in row["sweep"] else "prefill"
    return row[f"{sweep}_ratio_{mode}"]


def table(rows: list[dict[str, Any]]) -> str:
    return c.md_table(
        [
            "budget",
            "B",
            "L",
            "sweep",
            "decode ms/step elastic",
            "stock",
            "stock eager",
            "prefill s elastic",
            "stock",
            "stock eager",
            "ratio vs stock",
            "vs stock eager",
            f">= {TARGET}",
        ],
        [
            (
                r["budget"],
                r["batch"],
                r["prompt_len"],
                "+".join(r["sweep"]),
                r["elastic"]["decode_ms_per_step"],
                r["stock_default"]["decode_ms_per_step"],
                r["stock_eager"]["decode_ms_per_step"],
                r["elastic"]["prefill_s"],
                r["stock_default"]["prefill_s"],
                r["stock_eager"]["prefill_s"],
                headline(r, "default"),
                headline(r, "eager"),
                c.verdict(headline(r, "default"), TARGET),
            )
            for r in rows
        ],
    )


def plots(settings: c.Settings, rows: list[dict[str, Any]], grid: Grid) -> list:
    budgets = list(dict.fromkeys(r["budget"] for r in rows))

    def series(sweep: str) -> dict[str, list[float]]:
        out = {}
        for b in budgets:
            pts = [r for r in rows if r["budget"] == b and sweep in r["sweep"]]
            out[f"{b} vs stock"] = [r[f"{sweep}_ratio_default"] for r in pts]
            out[f"{b} vs stock eager"] = [r[f"{sweep}_ratio_eager"] for r in pts]
        return out

    return [
        c.line_plot(
            settings.out_dir / "scaling_batch_decode.png",
            list(grid.batches),
            series("decode"),
            "batch size",
            "elastic / stock decode speed",
            f"Decode vs batch (prompt {grid.batch_prompt_len})",
        ),
        c.line_plot(
            settings.out_dir / "scaling_context_prefill.png",
            list(grid.contexts),
            series("prefill"),
            "prompt length",
            "elastic / stock prefill speed",
            f"Prefill vs prompt length (batch {grid.context_batch})",
        ),
    ]


def main() -> None:
    settings, _ = c.parse_settings(__doc__.splitlines()[0])
    ckpt = c.prepare_checkpoint(settings)
    grid = QUICK_GRID if settings.quick else FULL_GRID
    results = run_all(ckpt, grid, settings.repeats)
    rows = ratios(results, grid)
    md = table(rows)
    print(md)
    intro = (
        f"M={grid.max_tokens} output tokens per request. Prefill = time until every "
        "request has its first token; decode = the rest / (M-1). Ratio = elastic speed / "
        "stock speed on the budget's slice (>1: elastic faster): decode ms/step on the "
        "decode sweep, prefill time on the prefill sweep; stock = vLLM at its default "
        "settings (compiled), stock eager = an extra column."
    )
    c.write_results(
        settings,
        ckpt,
        "scaling",
        "Latency regime: every budget vs its slice, over batch size and prompt length",
        {"grid": grid.__dict__, "rows": rows, **results},
        [intro, md],
        plots(settings, rows, grid),
    )


if __name__ == "__main__":
    main()
