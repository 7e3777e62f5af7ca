"""Serving fewer budgets: the full budget's decode on an engine serving every budget vs one
serving only the smallest and the full (engine option ``serve_budgets``), against stock
vLLM on the full slice at its default settings.

With nested packing a budget ``c`` levels up sums ``2c + 1`` GEMMs per projection, so the
full budget of a three-budget checkpoint runs 5 and of a two-budget engine 3 (same 1.0x
memory): fewer oneDNN calls, which is what costs at few rows. The three engines cannot be
alive at once (in-process engines share global state), so they take turns: ``--rounds``
rounds of stock, elastic (every budget), elastic (two budgets), each visit timing every
batch size ``--repeats`` times after a warm-up; a point's time is its best over all
rounds. Ratios: stock time / elastic time (1.0 = parity); two/all = the two-budget
engine's speed-up over the every-budget one.

    python benchmarks/bench_serve_budgets.py [--quick] [--rounds N]
"""

from __future__ import annotations

from typing import Any

import common as c

TARGET = 0.95
ENGINES = ("stock", "elastic, every budget", "elastic, two budgets")


def _extra(parser: Any) -> None:
    parser.add_argument("--rounds", type=int, help="turns of the engines (default 3, quick 1)")


def points(quick: bool) -> dict[int, int]:
    """Batch size -> output tokens per request (32-token prompts; quick: 8)."""
    return {1: 8, 4: 8} if quick else {1: 64, 4: 48, 16: 32, 64: 32}


def run_rounds(ckpt: c.Checkpoint, full: str, small: str, pts: dict[int, int], rounds: int,
               repeats: int, prompt_len: int) -> dict[str, dict[int, c.Measurement]]:  # fmt: skip
    """Every engine's best time per batch size over ``rounds`` turns."""
    prompts = {b: c.make_prompts(b, prompt_len, ckpt.info["vocab_size"]) for b in pts}

    def at(budget: str | None) -> dict[int, list[c.Request]]:  # None: no elastic keys (stock)
        return {
            b: c.requests_for(prompts[b], c.sampling(pts[b], c.budget_args(budget))) for b in pts
        }

    plain, requests = at(None), at(full)
    two = {"additional_config": {"elastic": {"serve_budgets": [small, full]}}}
    engines = {
        ENGINES[0]: (ckpt.sliced[full], {}, plain),
        ENGINES[1]: (ckpt.path, {}, requests),
        ENGINES[2]: (ckpt.path, two, requests),
    }
    out: dict[str, dict[int, c.Measurement]] = {name: {} for name in engines}
    for r in range(rounds):
        for name, (model, overrides, reqs) in engines.items():
            c.log(f"round {r + 1}/{rounds}: {name}")
            with c.engine(model, **overrides) as llm:
                got = c.measure_interleaved(llm, {str(b): reqs[b] for b in pts}, repeats)
            for b in pts:
                m = got[str(b)]
                out[name][b] = out[name][b].merged(m) if b in out[name] else m
    return out


def rows_of(runs: dict[str, dict[int, c.Measurement]], pts: dict[int, int]) -> list[dict]:
    stock, every, two = (runs[name] for name in ENGINES)
    rows = []
    for b in pts:
        rows.append(
            {
                "batch": b,
                "max_tokens": pts[b],
                "wall_s": {name: round(runs[name][b].wall_s, 4) for name in ENGINES},
                "runs": {name: runs[name][b].summary() for name in ENGINES},
                "ratio_every": round(stock[b].wall_s / every[b].wall_s, 4),
                "ratio_two": round(stock[b].wall_s / two[b].wall_s, 4),
                "two_vs_every": round(every[b].wall_s / two[b].wall_s, 4),
                "same_outputs_every": c.same_outputs(stock[b].best.outputs, every[b].best.outputs),
                "same_outputs_two": c.same_outputs(stock[b].best.outputs, two[b].best.outputs),
                "target": TARGET,
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    return c.md_table(
        [
            "B",
            "tokens",
            "stock s",
            "elastic (every) s",
            "elastic (two) s",
            "every/stock",
            "two/stock",
            "two vs every",
            "same outputs (every, two)",
        ],  # fmt: skip
        [
            (
                r["batch"],
                r["max_tokens"],
                *r["wall_s"].values(),
                r["ratio_every"],
                r["ratio_two"],
                r["two_vs_every"],
                f"{r['same_outputs_every']}, {r['same_outputs_two']}",
            )  # fmt: skip
            for r in rows
        ],
    )


def main() -> None:
    settings, args = c.parse_settings(__doc__.splitlines()[0], _extra)
    ckpt = c.prepare_checkpoint(settings)
    by_size = sorted(ckpt.budgets, key=lambda b: ckpt.budget(b)["fraction"])
    small, full = by_size[0], by_size[-1]
    pts = points(settings.quick)
    rounds = args.rounds or (1 if settings.quick else 3)
    prompt_len = 32
    runs = run_rounds(ckpt, full, small, pts, rounds, settings.repeats, prompt_len)
    rows = rows_of(runs, pts)
    md = table(rows)
    print(md)
    intro = (
        f"Budget `{full}` decoding: B requests of {prompt_len} prompt tokens, greedy. Engines "
        f"in turns ({rounds} rounds; each visit a warm-up then {settings.repeats} timed runs "
        f"per batch size); best time per point over all rounds. `two`: the elastic engine "
        f"with `serve_budgets: [{small}, {full}]` ({full}: 3 GEMMs per projection instead of "
        f"{2 * (len(ckpt.info['budgets']) - 1) + 1}). Ratios: stock time / elastic time."
    )
    plot = c.bar_plot(
        settings.out_dir / "serve_budgets.png",
        [f"B={r['batch']}" for r in rows],
        {
            "every budget / stock": [r["ratio_every"] for r in rows],
            f"{small}+{full} / stock": [r["ratio_two"] for r in rows],
        },
        "speed vs stock (compiled)",
        f"Budget {full}: engine serving every budget vs two",
        target=TARGET,
    )
    c.write_results(
        settings,
        ckpt,
        "serve_budgets",
        "Serving fewer budgets: the full budget's decode",
        {"budgets": [small, full], "rounds": rounds, "rows": rows},
        [intro, md],
        [plot],
    )


if __name__ == "__main__":
    main()
