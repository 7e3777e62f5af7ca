"""Collect the headline numbers of every benchmark's JSON into ``summary.md``.

python benchmarks/summarize.py [--quick | --out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import QUICK_RESULTS_DIR, RESULTS_DIR, md_table


def load(out_dir: Path, name: str) -> dict[str, Any] | None:
    path = out_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _target_row(metric: str, value: float, target: str, passed: bool) -> tuple:
    return (metric, value, target, "PASS" if passed else "FAIL")


def budgets_rows(data: dict, label: str = "") -> list[tuple]:
    return [
        _target_row(
            f"throughput elastic{label}/stock, budget {r['budget']}",
            r["throughput_ratio"],
            f">= {r['target']}",
            r["pass"],
        )
        for r in data["rows"]
    ]


def mixed_rows(data: dict, label: str = "") -> list[tuple]:
    layout = data["layout"]
    return [
        _target_row(
            f"mixed{label} {r['mix']} ({layout}) vs ideal blend",
            r["ratio"],
            f">= {r['target']}",
            r["pass"],
        )
        for r in data["rows"]
    ]


def memory_rows(data: dict) -> list[tuple]:
    s = data["summary"]
    return [
        (
            "elastic weights / stock full engine",
            s["elastic_vs_full"],
            f"<= {s['target']}",
            "PASS" if s["pass"] else "FAIL",
        ),
        ("elastic weights / checkpoint bytes", s["elastic_vs_checkpoint"], "-", "-"),
        ("sum(stock engines) / elastic", s["stock_sum_vs_elastic"], "-", "-"),
    ]


def control_rows(data: dict, label: str = "") -> list[tuple]:
    out = []
    for name, s in data["speedups"].items():
        out.append(
            (
                f"budget control{label} {name}: speedup vs full (limit {data['flop_limit']})",
                s["speedup_vs_full"],
                "-",
                "-",
            )
        )
        target, verdict = (">= 0.9", "PASS" if s["pass"] else "FAIL") if "pass" in s else ("-", "-")
        out.append(
            (f"{label.strip()} {name}: fraction of the FLOP limit".strip(), s["of_flop_limit"],
             target, verdict)
        )  # fmt: skip
        if "of_stock_blend_limit" in s:
            limit = data["stock_blend_limit"]
            out.append((f"{name}: fraction of the stock blend limit ({limit})",
                        s["of_stock_blend_limit"], "-", "-"))  # fmt: skip
    for compared in ("reuse_vs_recompute", "two_engines_vs_recompute"):
        agree = data.get(compared)
        if agree is None:
            continue
        keys = ("answers_identical", "first_token_identical", "mean_common_prefix_tokens")
        for key in keys[: 1 if compared.startswith("two") else 3]:
            out.append((f"{compared.replace('_', ' ')}: {key}", agree[key], "-", "-"))
    return out


def scaling_rows(data: dict, label: str = "") -> list[tuple]:
    out = []
    for r in data["rows"]:
        sweep = "decode" if "decode" in r["sweep"] else "prefill"
        ratio = r[f"{sweep}_ratio_default"]
        out.append(
            _target_row(
                f"latency {sweep} {r['budget']} B={r['batch']} L={r['prompt_len']}: "
                f"elastic{label}/stock (eager: {r[f'{sweep}_ratio_eager']})",
                ratio,
                ">= 0.95",
                ratio >= 0.95,
            )
        )
    return out


def kv_bound_rows(data: dict) -> list[tuple]:
    out = []
    for r in data["rows"]:
        e, s, b = r["elastic"], r["stock"], r["budget"]
        out.append(
            _target_row(
                f"fixed KV cache, budget {b}: tok/s elastic/slice (requests held "
                f"{e['requests_held']} vs {s['requests_held']}, projected "
                f"{r['projected_requests_held']})",
                r["throughput_ratio"],
                ">= 0.95",
                r["throughput_ratio"] >= 0.95,
            )
        )
        if "per_budget" in r:
            pb = r["per_budget"]
            out.append(
                _target_row(
                    f"fixed KV cache, budget {b}, kv_layout per-budget: tok/s elastic/slice "
                    f"(requests held {pb['requests_held']} vs {s['requests_held']})",
                    r["per_budget_throughput_ratio"],
                    ">= 0.95",
                    r["per_budget_throughput_ratio"] >= 0.95,
                )
            )
    return out


def serve_rows(data: dict) -> list[tuple]:
    out = []
    for r in data["rows"]:
        load = r.get("load", "saturated")
        out.append(
            _target_row(
                f"served (vllm bench serve, {load}) tok/s elastic/stock, budget {r['budget']}"
                f" (TTFT ratio {r.get('ttft_ratio', '-')}, TPOT ratio {r.get('tpot_ratio', '-')})",
                r["throughput_ratio"],
                f">= {r['target']}",
                r["pass"],
            )
        )
    return out


def serve_budgets_rows(data: dict) -> list[tuple]:
    small, full = data["budgets"]
    out = []
    for r in data["rows"]:
        b = r["batch"]
        out.append(
            _target_row(
                f"decode {full} B={b}: elastic serving {small}+{full}/stock (every budget: "
                f"{r['ratio_every']}; two vs every {r['two_vs_every']})",
                r["ratio_two"],
                f">= {r['target']}",
                r["ratio_two"] >= r["target"],
            )
        )
    return out


SECTIONS = {
    "budgets": budgets_rows,
    "serve": serve_rows,
    "mixed": mixed_rows,
    "memory": memory_rows,
    "budget_control": control_rows,
    "scaling": scaling_rows,
    "serve_budgets": serve_budgets_rows,
    "kv_bound": kv_bound_rows,
}

# run_all.sh's passes with another weight packing: folder -> (packing, sections)
PACKING_VARIANTS = {
    "per_budget": ("per-budget", {"budgets": budgets_rows, "mixed": mixed_rows}),
    "nested": ("nested", {"budgets": budgets_rows, "mixed": mixed_rows, "scaling": scaling_rows}),
}
# run_all.sh's NemotronH pass (Star Elastic's family)
HYBRID_SECTIONS = {"budgets": budgets_rows, "mixed": mixed_rows, "budget_control": control_rows}
HYBRID_DIR = "nemotron_h"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-dir", type=Path)
    args = parser.parse_args()
    out_dir = args.out_dir or (QUICK_RESULTS_DIR if args.quick else RESULTS_DIR)
    rows, meta = [], None
    for name, fn in SECTIONS.items():
        data = load(out_dir, name)
        if data is None:
            rows.append((f"{name}: no results", "-", "-", "-"))
            continue
        meta = meta or data["meta"]
        rows += fn(data)
    for folder, (packing, sections) in PACKING_VARIANTS.items():
        for name, fn in sections.items():
            data = load(out_dir / folder, name)
            if data is not None:
                rows += fn(data, f" ({packing} packing)")
    for name, fn in HYBRID_SECTIONS.items():
        data = load(out_dir / HYBRID_DIR, name)
        if data is not None:
            rows += fn(data, " NemotronH")
    lines = ["# Benchmark summary", ""]
    if meta is not None:
        m = meta["machine"]
        lines += [
            f"{m['cpu_model']}, {m['usable_cpus']} CPUs, torch threads {m['torch_threads']}; "
            f"vLLM {m['vllm']}, torch {m['torch']}; preset `{meta['settings']['preset']}`; "
            f"{'quick' if meta['settings']['quick'] else 'full'} mode.",
            "",
        ]
    lines.append(md_table(["metric", "value", "target", "verdict"], rows))
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
