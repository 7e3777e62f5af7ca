"""Cost vs batch size and context length: elastic (full, and a 1/3-each mixed batch) vs
stock vLLM on the full checkpoint.

Each point submits B prompts of L tokens and generates M tokens each, streaming, so the
run splits into prefill (time until every request has its first token) and decode
(remaining time / (M-1) steps). Batch sweep: B in (1, 4, 16, 64) at L=32; context sweep:
L in (32, 256, 1024) at B=4. One warm-up per engine and mode (largest batch, longest
context), then timed runs per point (elastic full and mixed interleaved). No target: the
table shows where the elastic engine's overhead grows (ratio = stock time / elastic time,
1.0 = parity).

    python benchmarks/bench_scaling.py [--quick]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import common as c


@dataclass(frozen=True)
class Grid:
    batches: tuple[int, ...]
    batch_prompt_len: int
    contexts: tuple[int, ...]
    context_batch: int
    max_tokens: int

    def points(self) -> list[tuple[int, int]]:
        """(B, L) of both sweeps, without duplicates."""
        pts = [(b, self.batch_prompt_len) for b in self.batches]
        pts += [(self.context_batch, n) for n in self.contexts]
        return list(dict.fromkeys(pts))


FULL_GRID = Grid((1, 4, 16, 64), 32, (32, 256, 1024), 4, 16)
QUICK_GRID = Grid((1, 4), 16, (16, 64), 2, 4)


def labels_for(mode: str, budgets: list[str], n: int) -> list[str | None]:
    """Budget per request: ``full`` -> all the first budget, ``mixed`` -> interleaved
    thirds over the first three budgets, ``stock`` -> the model's own."""
    if mode == "stock":
        return [None] * n
    if mode == "full":
        return [budgets[0]] * n
    mix = budgets[:3]
    return [mix[i % len(mix)] for i in range(n)]


def point_requests(ckpt: c.Checkpoint, mode: str, b: int, n: int, m: int) -> list[c.Request]:
    prompts = c.make_prompts(b, n, ckpt.info["vocab_size"], seed=n)
    params = [c.sampling(m, c.budget_args(x)) for x in labels_for(mode, ckpt.budgets, b)]
    return c.requests_for(prompts, params)


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


def run_modes(llm: Any, ckpt: c.Checkpoint, modes: list[str], grid: Grid, repeats: int) -> dict:
    """Warm up each mode, then every grid point with the modes timed in interleaved rounds;
    returns {mode: {"B,L": summary}}."""
    m = grid.max_tokens
    warm = ((max(grid.batches), grid.batch_prompt_len), (grid.context_batch, max(grid.contexts)))
    for mode in modes:
        for b, n in warm:
            c.run_batch(llm, point_requests(ckpt, mode, b, n, m), stream=True, quiet=False)
    out: dict[str, dict] = {mode: {} for mode in modes}
    for b, n in grid.points():
        c.log(f"  {modes}: B={b} L={n}")
        named = {mode: point_requests(ckpt, mode, b, n, m) for mode in modes}
        res = c.measure_interleaved(llm, named, repeats, warmup=0, stream=True)
        for mode in modes:
            out[mode][f"{b},{n}"] = point_summary(res[mode], b, n, m)
    return out


def run_all(ckpt: c.Checkpoint, grid: Grid, repeats: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    c.log(f"elastic engine {ckpt.path}")
    with c.engine(ckpt.path, max_model_len=2048) as llm:
        results["engine_elastic"] = c.engine_info(llm)
        results.update(run_modes(llm, ckpt, ["full", "mixed"], grid, repeats))
    c.log(f"stock engine {ckpt.sliced[ckpt.budgets[0]]}")
    with c.engine(ckpt.sliced[ckpt.budgets[0]], max_model_len=2048) as llm:
        results["engine_stock"] = c.engine_info(llm)
        results.update(run_modes(llm, ckpt, ["stock"], grid, repeats))
    return results


def rows(results: dict[str, Any], grid: Grid) -> list[tuple]:
    out = []
    for b, n in grid.points():
        k = f"{b},{n}"
        f, x, s = results["full"][k], results["mixed"][k], results["stock"][k]
        out.append(
            (
                b,
                n,
                s["prefill_s"],
                f["prefill_s"],
                x["prefill_s"],
                s["decode_ms_per_step"],
                f["decode_ms_per_step"],
                x["decode_ms_per_step"],
                round(s["wall_s"] / f["wall_s"], 3),
                round(s["wall_s"] / x["wall_s"], 3),
            )
        )
    return out


HEADERS = [
    "B",
    "L",
    "prefill stock (s)",
    "prefill elastic full (s)",
    "prefill elastic mixed (s)",
    "decode stock (ms/step)",
    "decode elastic full (ms/step)",
    "decode elastic mixed (ms/step)",
    "stock/elastic full",
    "stock/elastic mixed",
]


def plots(settings: c.Settings, results: dict, grid: Grid) -> list:
    def series(key: str, pts: list[str]) -> dict[str, list[float]]:
        names = {"stock": "stock full", "full": "elastic full", "mixed": "elastic mixed 1/3"}
        return {names[m]: [results[m][p][key] for p in pts] for m in ("stock", "full", "mixed")}

    bpts = [f"{b},{grid.batch_prompt_len}" for b in grid.batches]
    cpts = [f"{grid.context_batch},{n}" for n in grid.contexts]
    return [
        c.line_plot(
            settings.out_dir / "scaling_batch_decode.png",
            list(grid.batches),
            series("decode_ms_per_step", bpts),
            "batch size",
            "decode ms / step",
            f"Decode cost vs batch (prompt {grid.batch_prompt_len})",
        ),
        c.line_plot(
            settings.out_dir / "scaling_context_prefill.png",
            list(grid.contexts),
            series("prefill_s", cpts),
            "prompt length",
            "prefill s",
            f"Prefill cost vs context (batch {grid.context_batch})",
        ),
        c.line_plot(
            settings.out_dir / "scaling_context_decode.png",
            list(grid.contexts),
            series("decode_ms_per_step", cpts),
            "prompt length",
            "decode ms / step",
            f"Decode cost vs context (batch {grid.context_batch})",
        ),
    ]


def main() -> None:
    settings, _ = c.parse_settings(__doc__.splitlines()[0])
    ckpt = c.prepare_checkpoint(settings)
    grid = QUICK_GRID if settings.quick else FULL_GRID
    results = run_all(ckpt, grid, settings.repeats)
    md = c.md_table(HEADERS, rows(results, grid))
    print(md)
    intro = (
        f"M={grid.max_tokens} output tokens per request. Mixed = requests interleaved over "
        f"{ckpt.budgets[:3]} (1/3 each). Prefill = time until every request has its first "
        "token; decode = the rest / (M-1). Ratios are whole-run times (>1: elastic faster)."
    )
    c.write_results(
        settings,
        ckpt,
        "scaling",
        "Cost vs batch size and context length",
        {"grid": grid.__dict__, **results},
        [intro, md],
        plots(settings, results, grid),
    )


if __name__ == "__main__":
    main()
