"""Budget control: think T tokens at a small budget, then answer A tokens at the full one.

Every request's prompt ends with ``<think>``; the end marker ``</think>`` is forced at output
index T by ``force_end.ForceEndOfThinking`` (random models never emit it), so each output is
T thinking tokens, ``</think>`` and A answer tokens. Compared, on the same prompts:

* ``full``: the full budget throughout (elastic engine, and the stock full slice at vLLM's
  default settings, compiled, and in eager mode);
* ``full+vllm_cap``: the full budget with vLLM's own ``thinking_token_budget=T`` (needs a
  ``reasoning_config``) instead of the forcing processor;
* ``small``: the thinking budget throughout (reference: the switch must change the answer),
  and ``stock small``: the same on the stock small slice (how much faster stock vLLM runs
  the thinking budget: the stock blend limit);
* ``stock small->full two engines``: what stock vLLM offers today, each size served from its
  own slice: the stock small engine thinks T tokens, then the stock full engine prefills the
  prompt, the thinking and ``</think>`` and answers (wall = the two batches' sum, no
  hand-off cost; memory = both slices). Its answers must equal ``recompute``'s;
* ``small->full reuse`` / ``recompute``: ``elastic_think_budget`` / ``elastic_answer_budget``
  with ``elastic_kv_mode``; ``small->full reuse+vllm_cap``: the switch driven by vLLM's cap.

Speedup of ``small->full`` over ``full`` is compared with the FLOP-ratio limit
``(T+A) F_full / (T F_small + A F_full)`` (F = matmul FLOPs per token); target >= 0.9 of it.

    python benchmarks/bench_budget_control.py [--quick] [--think small] [--answer full]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import common as c
from force_end import KEY as FORCE_KEY
from force_end import ForceEndOfThinking

TARGET = 0.9


@dataclass(frozen=True)
class Shape:
    """Requests per batch, prompt words, thinking and answer tokens."""

    batch: int
    prompt_len: int
    think: int
    answer: int

    @property
    def max_tokens(self) -> int:
        return self.think + 1 + self.answer


@dataclass(frozen=True)
class Config:
    """One way of serving the think-then-answer requests."""

    name: str
    engine: str  # "elastic" | a stock mode (``c.STOCK_MODES``) on a slice
    think: str | None  # budget names (None on the stock engine)
    answer: str | None
    kv_mode: str | None = None
    vllm_cap: bool = False
    slice: str | None = None  # the stock engine's slice (None: the answer budget's)
    phase: str | None = None  # a two-engine phase: "think" (T tokens) or "answer" (A tokens)

    def params(self, shape: Shape) -> Any:
        if self.phase is not None:  # the hand-off itself supplies ``</think>``
            return c.sampling(shape.think if self.phase == "think" else shape.answer)
        extra: dict[str, Any] = {}
        if self.think is not None and self.think == self.answer:
            extra["elastic_budget"] = self.think
        elif self.think is not None:
            extra.update(elastic_think_budget=self.think, elastic_answer_budget=self.answer)
            extra["elastic_kv_mode"] = self.kv_mode or "reuse"
        kw = {}
        if self.vllm_cap:
            kw["thinking_token_budget"] = shape.think
        else:
            extra[FORCE_KEY] = shape.think
        return c.sampling(shape.max_tokens, extra or None, **kw)


def two_engine_names(think: str, answer: str) -> tuple[str, str, str]:
    """The two-engine row and its two phases' config names."""
    row = f"stock {think}->{answer} two engines"
    return row, f"{row}: {think} thinks", f"{row}: {answer} answers"


def configs(think: str, answer: str) -> list[Config]:
    _, think_phase, answer_phase = two_engine_names(think, answer)
    return [
        Config(f"stock {think}", c.ANCHOR_MODE, None, None, slice=think),
        Config(think_phase, c.ANCHOR_MODE, None, None, slice=think, phase="think"),
        Config("stock full", "default", None, None),
        Config(answer_phase, "default", None, None, phase="answer"),
        Config("stock full+vllm_cap", "default", None, None, vllm_cap=True),
        Config("stock full eager", "eager", None, None),
        Config("full", "elastic", answer, answer),
        Config("full+vllm_cap", "elastic", answer, answer, vllm_cap=True),
        Config(think, "elastic", think, think),
        Config(f"{think}->{answer} reuse", "elastic", think, answer, "reuse"),
        Config(f"{think}->{answer} recompute", "elastic", think, answer, "recompute"),
        Config(f"{think}->{answer} reuse+vllm_cap", "elastic", think, answer, "reuse", True),
    ]


def reasoning_kwargs() -> dict[str, Any]:
    """Engine kwargs that enable vLLM's reasoning config (``<think>`` / ``</think>``)."""
    from vllm.config.reasoning import ReasoningConfig

    return {
        "reasoning_config": ReasoningConfig(
            reasoning_parser="qwen3", reasoning_start_str="<think>", reasoning_end_str="</think>"
        )
    }


def open_control_engine(path: Any, **overrides: Any) -> tuple[Any, str | None]:
    """An engine with the forcing processor and, if vLLM accepts it, a reasoning config.

    Returns the engine and why the reasoning config could not be used (None if it could).
    """
    kw = {"logits_processors": [ForceEndOfThinking], "max_model_len": 512, **overrides}
    try:
        return c.open_engine(path, **kw, **reasoning_kwargs()), None
    except Exception as e:  # noqa: BLE001 - recorded in the results
        reason = f"{type(e).__name__}: {e}"
        c.log(f"reasoning_config rejected ({reason}); running without vLLM's cap")
        return c.open_engine(path, **kw), reason


def token_ids(path: Any) -> tuple[int, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    start, end = tok.convert_tokens_to_ids(["<think>", "</think>"])
    return start, end


def run_engine(
    path: Any,
    todo: list[Config],
    shape: Shape,
    prompts: list[list[int]],
    repeats: int,
    own_prompts: dict[str, list[list[int]]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Measure every config of one engine in interleaved rounds (``own_prompts``: configs
    with prompts of their own); a config that fails on a one-request trial records its
    error instead."""
    llm, cap_error = open_control_engine(path, **overrides)
    out: dict[str, Any] = {}
    named = {}
    try:
        for cfg in todo:
            reqs = c.requests_for((own_prompts or {}).get(cfg.name, prompts), cfg.params(shape))
            if cfg.vllm_cap and cap_error:
                out[cfg.name] = {"error": f"no reasoning_config: {cap_error}"}
                continue
            try:
                c.run_batch(llm, reqs[:1], quiet=False)
            except Exception as e:  # noqa: BLE001 - recorded in the results
                out[cfg.name] = {"error": f"{type(e).__name__}: {e}"}
                continue
            named[cfg.name] = reqs
        c.log(f"  configs: {list(named)}")
        c.run_batch(llm, next(iter(named.values())), quiet=False)  # full-size warm-up, once
        out.update(c.measure_interleaved(llm, named, repeats, warmup=0))
    finally:
        c.close_engine(llm)
    return {cfg.name: out[cfg.name] for cfg in todo}


def handoff_prompts(
    prompts: list[list[int]], thinking: c.Measurement, end_id: int
) -> list[list[int]]:
    """The answer engine's prompts: each prompt, the think engine's tokens, ``</think>``."""
    return [p + o + [end_id] for p, o in zip(prompts, thinking.best.outputs, strict=True)]


def two_engines(thinking: c.Measurement, answering: c.Measurement, end_id: int) -> c.Measurement:
    """The two phases as one run: the best of each, one after the other (wall times add,
    outputs are thinking, ``</think>``, answer; noise the worse of the two)."""
    t, a = thinking.best, answering.best
    run = c.BatchRun(
        wall_s=t.wall_s + a.wall_s,
        prompt_tokens=t.prompt_tokens,
        output_tokens=t.output_tokens + len(t.outputs) + a.output_tokens,
        latency_s=[t.wall_s + x for x in a.latency_s],
        ttft_s=[],
        outputs=[x + [end_id] + y for x, y in zip(t.outputs, a.outputs, strict=True)],
        noise={k: (min if k == "calib_gflops" else max)(t.noise[k], a.noise[k]) for k in t.noise},
    )
    return c.Measurement.of([run])


def end_positions(outputs: list[list[int]], end_id: int) -> list[int]:
    """Index of the first ``</think>`` in each output (-1 when absent)."""
    return [o.index(end_id) if end_id in o else -1 for o in outputs]


def split(outputs: list[list[int]], at: int) -> tuple[list, list]:
    return [o[:at] for o in outputs], [o[at + 1 :] for o in outputs]


def flop_limit(
    ckpt: c.Checkpoint, shape: Shape, think: str, answer: str, think_extra: int = 0
) -> float:
    """``(T+A) F_answer / (T F_think + A F_answer)``, ``F_think`` plus ``think_extra``
    (e.g. what a ``reuse`` thinking token spends writing the answer budget's Mamba state)."""
    t, a = shape.think, shape.answer
    fa, ft = ckpt.flops(answer), ckpt.flops(think) + think_extra
    return (t + a) * fa / (t * ft + a * fa)


def analyse(
    ckpt: c.Checkpoint, shape: Shape, results: dict, think: str, answer: str, end_id: int
) -> dict[str, Any]:
    """Rows per config, switch checks and speedups vs the FLOP limit."""
    ok = {k: v for k, v in results.items() if isinstance(v, c.Measurement)}
    rows = {}
    for name, res in results.items():
        if name not in ok:
            rows[name] = res
            continue
        ends = end_positions(res.best.outputs, end_id)
        rows[name] = {
            **res.summary(),
            "end_at_T": sum(e == shape.think for e in ends) / len(ends),
            "end_positions": sorted(set(ends)),
        }
    limit = flop_limit(ckpt, shape, think, answer)
    state_flops = ckpt.reuse_state_flops(think, answer)
    state_limit = flop_limit(ckpt, shape, think, answer, state_flops)
    base = ok.get("full")
    stock_full, stock_think = ok.get("stock full"), ok.get(f"stock {think}")
    stock_blend = stock_ratio = None
    if stock_full is not None and stock_think is not None:
        # what a perfect hand-off between the stock slices could give: thinking at stock
        # ``think``'s measured speed, answering at stock ``full``'s
        stock_blend = _blend_limit(shape, stock_full.wall_s, stock_think.wall_s)
        stock_ratio = round(stock_full.wall_s / stock_think.wall_s, 4)
    checks, speedups = {}, {}
    think_only = ok.get(think)
    for name, res in ok.items():
        if "->" not in name:
            continue
        if think_only is not None:
            t_same, _ = split(think_only.best.outputs, shape.think)
            t_sw, a_sw = split(res.best.outputs, shape.think)
            _, a_small = split(think_only.best.outputs, shape.think)
            checks[name] = {
                "thinking_identical_to_think_budget": t_same == t_sw,
                "answer_differs_from_think_budget": c.same_outputs(a_sw, a_small) < 1.0,
                "answers_identical_fraction": c.same_outputs(a_sw, a_small),
            }
        if base is not None:
            sp = base.wall_s / res.wall_s
            entry = {"speedup_vs_full": round(sp, 4), "of_flop_limit": round(sp / limit, 4)}
            if "reuse" in name and state_limit != limit:
                entry["of_state_write_flop_limit"] = round(sp / state_limit, 4)
            for stock, key in (("stock full", ""), ("stock full eager", "_eager")):
                if stock in ok:
                    entry[f"speedup_vs_stock_full{key}"] = round(ok[stock].wall_s / res.wall_s, 4)
            if think_only is not None:
                blend = _blend_limit(shape, base.wall_s, think_only.wall_s)
                entry["measured_blend_limit"] = round(blend, 4)
                entry["of_blend_limit"] = round(sp / blend, 4)
            if stock_blend is not None and "speedup_vs_stock_full" in entry:
                entry["of_stock_blend_limit"] = round(
                    entry["speedup_vs_stock_full"] / stock_blend, 4
                )
            if not name.startswith("stock"):  # the target is ours, not stock vLLM's
                entry["pass"] = sp / limit >= TARGET
            speedups[name] = entry
    out = {
        "rows": rows,
        "flop_limit": round(limit, 4),
        "flop_limit_with_state_writes": round(state_limit, 4),
        "reuse_state_write_flops_per_token": state_flops,
        "flop_ratio": round(ckpt.flops(answer) / ckpt.flops(think), 4),
        "stock_speed_ratio": stock_ratio,
        "stock_blend_limit": None if stock_blend is None else round(stock_blend, 4),
        "checks": checks,
        "speedups": speedups,
    }
    recompute = ok.get(f"{think}->{answer} recompute")
    compared = {
        "reuse_vs_recompute": f"{think}->{answer} reuse",
        "two_engines_vs_recompute": two_engine_names(think, answer)[0],
    }
    for key, name in compared.items():
        res = ok.get(name)
        if res is not None and recompute is not None:
            out[key] = agreement(
                split(res.best.outputs, shape.think)[1],
                split(recompute.best.outputs, shape.think)[1],
            )
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """How often two configs' answers agree: whole answers, first token, common prefix."""

    def common(x: list[int], y: list[int]) -> int:
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        return n

    pairs = list(zip(a, b, strict=True))
    return {
        "answers_identical": round(c.same_outputs(a, b), 4),
        "first_token_identical": round(sum(x[:1] == y[:1] for x, y in pairs) / len(pairs), 4),
        "mean_common_prefix_tokens": round(sum(common(x, y) for x, y in pairs) / len(pairs), 2),
        "answer_tokens": max((len(x) for x in a), default=0),
    }


def _blend_limit(shape: Shape, t_full: float, t_think: float) -> float:
    """Speedup if T/(T+A) of the full run's time ran at the think budget's measured speed."""
    t, a = shape.think, shape.answer
    return t_full / ((t * t_think + a * t_full) / (t + a))


def tables(analysis: dict[str, Any]) -> list[str]:
    runs = c.md_table(
        ["config", "tok/s", "wall (s)", "latency (s)", "</think> at T", "error"],
        [
            (
                name,
                r.get("tokens_per_s", "-"),
                r.get("wall_s", "-"),
                r.get("latency_mean_s", "-"),
                r.get("end_at_T", "-"),
                r.get("error", ""),
            )
            for name, r in analysis["rows"].items()
        ],
    )
    sp = c.md_table(
        [
            "config",
            "speedup vs full",
            "vs stock full",
            "vs stock full eager",
            "FLOP limit",
            "of limit",
            "of limit with state writes",
            "blend limit",
            "of stock blend limit",
            f">= {TARGET} of limit",
        ],
        [
            (
                name,
                s["speedup_vs_full"],
                s.get("speedup_vs_stock_full", "-"),
                s.get("speedup_vs_stock_full_eager", "-"),
                analysis["flop_limit"],
                s["of_flop_limit"],
                s.get("of_state_write_flop_limit", "-"),
                s.get("measured_blend_limit", "-"),
                s.get("of_stock_blend_limit", "-"),
                {True: "PASS", False: "FAIL"}.get(s.get("pass"), "-"),
            )
            for name, s in analysis["speedups"].items()
        ],
    )
    chk = c.md_table(
        ["config", "thinking = think budget's", "answer changed by switch", "same answers"],
        [
            (
                n,
                v["thinking_identical_to_think_budget"],
                v["answer_differs_from_think_budget"],
                v["answers_identical_fraction"],
            )
            for n, v in analysis["checks"].items()
        ],
    )
    out = [runs, sp, chk]
    compared = {
        "reuse_vs_recompute": "reuse vs recompute (same requests; recompute re-runs the "
        "thinking tokens at the answer budget, reuse keeps their K/V from the think budget)",
        "two_engines_vs_recompute": "two stock engines vs recompute (the same computation: "
        "answers must be identical)",
    }
    agreements = [(k, text) for k, text in compared.items() if k in analysis]
    if agreements:
        first = analysis[agreements[0][0]]
        out.append(
            c.md_table(
                ["compared", *first],
                [[text, *analysis[k].values()] for k, text in agreements],
            )
        )
    return out


def main() -> None:
    def extra(p: Any) -> None:
        p.add_argument("--think", help="thinking budget (default: the smallest)")
        p.add_argument("--answer", help="answer budget (default: the full one)")

    settings, args = c.parse_settings(__doc__.splitlines()[0], extra)
    ckpt = c.prepare_checkpoint(settings)
    think, answer = args.think or ckpt.budgets[-1], args.answer or ckpt.budgets[0]
    shape = Shape(4, 8, 8, 4) if settings.quick else Shape(32, 16, 96, 32)
    start_id, end_id = token_ids(ckpt.path)
    prompts = [
        p + [start_id]
        for p in c.make_prompts(shape.batch, shape.prompt_len, ckpt.info["vocab_size"])
    ]
    todo = configs(think, answer)
    two_row, think_phase, answer_phase = two_engine_names(think, answer)
    results: dict[str, Any] = {}
    c.log(f"stock engine ({c.ANCHOR_MODE}) {ckpt.sliced[think]}")
    thinkers = [x for x in todo if x.slice == think]
    anchor = c.STOCK_MODES[c.ANCHOR_MODE]
    results.update(
        run_engine(ckpt.sliced[think], thinkers, shape, prompts, settings.repeats, **anchor)
    )
    handoff = {}
    if isinstance(results[think_phase], c.Measurement):
        handoff[answer_phase] = handoff_prompts(prompts, results[think_phase], end_id)
    for mode, overrides in c.STOCK_MODES.items():
        c.log(f"stock engine ({mode}) {ckpt.sliced[answer]}")
        stock = [x for x in todo if x.engine == mode and x.slice is None]
        if not handoff:
            stock = [x for x in stock if x.phase is None]
        results.update(
            run_engine(
                ckpt.sliced[answer], stock, shape, prompts, settings.repeats, handoff, **overrides
            )
        )
    phases = results.pop(think_phase), results.pop(answer_phase, None)
    if all(isinstance(m, c.Measurement) for m in phases):
        results[two_row] = two_engines(*phases, end_id)
    c.log(f"elastic engine {ckpt.path}")
    elastic = [x for x in todo if x.engine == "elastic"]
    results.update(run_engine(ckpt.path, elastic, shape, prompts, settings.repeats))
    analysis = analyse(ckpt, shape, results, think, answer, end_id)
    sections = tables(analysis)
    print("\n\n".join(sections))
    names = list(analysis["speedups"])
    plot = c.bar_plot(
        settings.out_dir / "budget_control.png",
        names,
        {
            "vs elastic full": [analysis["speedups"][n]["speedup_vs_full"] for n in names],
            "vs stock full": [
                analysis["speedups"][n].get("speedup_vs_stock_full", 0) for n in names
            ],
            "FLOP limit": [analysis["flop_limit"]] * len(names),
        },
        "speedup",
        f"Think {shape.think} at {think}, answer {shape.answer} at {answer}",
    )
    intro = (
        f"{shape.batch} requests, prompt {shape.prompt_len} words + `<think>`, T={shape.think} "
        f"thinking tokens, `</think>`, A={shape.answer} answer tokens (greedy). "
        f"F_{answer}/F_{think} = {ckpt.flops(answer) / ckpt.flops(think):.3f}. "
        "Blend limit = speedup if the thinking share of the full run ran at the measured "
        f"speed of the `{think}` budget. Limit with state writes "
        f"({analysis['flop_limit_with_state_writes']}): F_{think} plus the "
        f"{analysis['reuse_state_write_flops_per_token'] / 1e6:.2f} MFLOP per token a "
        f"`reuse` thinking token spends writing `{answer}`'s Mamba state "
        "(`spec.cost.reuse_state_write_flops`). "
        f"Stock blend limit ({analysis['stock_blend_limit']}): the same with the stock "
        f"slices' measured speeds (stock `{think}` runs {analysis['stock_speed_ratio']}x "
        f"faster than stock `{answer}` for {analysis['flop_ratio']}x fewer FLOPs); its "
        "fraction is the speedup over stock full divided by it. "
        f"`{two_row}`: the stock `{think}` slice thinks, the stock `{answer}` slice "
        "prefills prompt + thinking + `</think>` and answers (the two batches' wall times "
        "added, no hand-off cost; both slices' weights in memory)."
    )
    c.write_results(
        settings,
        ckpt,
        "budget_control",
        "Budget control: think small, answer full",
        {"shape": shape.__dict__, "think": think, "answer": answer, **analysis},
        [
            intro,
            "## Runs",
            sections[0],
            "## Speedups",
            sections[1],
            "## Switch checks",
            sections[2],
            *(["## Answers compared", *sections[3:]] if len(sections) > 3 else []),
        ],
        [plot],
    )


if __name__ == "__main__":
    main()
