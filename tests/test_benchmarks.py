"""``benchmarks/run_all.sh --quick`` runs end to end (CI-sized shapes, no speed asserted).

What is asserted is what does not depend on speed: every script writes its results, the
elastic engine's greedy outputs equal stock vLLM's on every sliced budget (both weight
packings), its weights take one copy of the model, and budget control thinks at the think
budget then answers differently, ``recompute`` exactly as two stock engines would. Quick
runs compile as vLLM's CPU CI does (dynamo, eager backend); ``test_exactness.py`` checks
the Inductor-compiled engines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from vllm_elastic.kernels import nested_gemm

ROOT = Path(__file__).resolve().parent.parent
QUICK = ROOT / "benchmarks" / "results" / "quick"
SCRIPTS = (
    "budgets", "mixed", "memory", "kv_bound", "scaling", "serve_budgets", "budget_control",
    "serve", "profile",
)  # fmt: skip


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_quick_benchmarks_run_and_agree_with_stock():
    shutil.rmtree(QUICK, ignore_errors=True)  # no stale results can pass
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "run_all.sh"), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in SCRIPTS:
        data = _load(QUICK / f"{name}.json")
        assert data["meta"]["settings"]["quick"] is True
        assert (QUICK / f"{name}.md").read_text().strip()
    assert (QUICK / "budgets_ratio.png").stat().st_size > 0

    default = "nested" if nested_gemm.unavailable_reason() else "blocked"  # auto
    variants = (
        (QUICK, default),
        (QUICK / "per_budget", "per-budget"),
        (QUICK / "nested", "nested"),
    )
    for folder, packing in variants:
        budgets = _load(folder / "budgets.json")
        assert budgets["engines"]["elastic"]["weight_packing"]["down"] == packing
        names = [r["budget"] for r in budgets["rows"]]
        assert len(names) == 3
        for row in budgets["rows"]:
            assert row["same_outputs"] == 1.0, (packing, row["budget"])
        mixed = _load(folder / "mixed.json")
        assert "+".join(names) in {r["mix"] for r in mixed["rows"]}
    scaling = _load(QUICK / "nested" / "scaling.json")
    assert {r["budget"] for r in scaling["rows"]} == set(names)

    memory = _load(QUICK / "memory.json")["summary"]
    assert memory["elastic_vs_full"] <= 1.01  # bytes, not speed: one copy of the weights
    assert memory["per_budget_packing_vs_full"] > 1.5

    # fixed KV cache: every elastic budget holds full-width K/V, each slice only its own
    kv_json = _load(QUICK / "kv_bound.json")
    kv = kv_json["rows"]
    full_width = kv[0]["stock"]["kv_bytes_per_token"]
    for row in kv:
        e, s = row["elastic"], row["stock"]
        assert e["kv_bytes_per_token"] == full_width, row["budget"]
        assert s["kv_bytes_per_token"] == row["projected_bytes_per_token"], row["budget"]
        assert e["requests_held"] == kv[0]["stock"]["requests_held"], row["budget"]
    assert kv[-1]["stock"]["requests_held"] > kv[-1]["elastic"]["requests_held"]
    # kv_layout per-budget: a non-switching request holds its budget's KV heads (in every
    # layer: the quick preset's small budget also skips one, which its slice does not hold)
    heads = {b["name"]: b["num_key_value_heads"] for b in kv_json["meta"]["model"]["budgets"]}
    parent = kv_json["meta"]["model"]["num_key_value_heads"]
    for row in kv:
        pb = row["per_budget"]
        assert pb["kv_bytes_per_token"] == full_width * heads[row["budget"]] / parent
        assert pb["requests_held"] >= row["elastic"]["requests_held"], row["budget"]
    assert kv[0]["per_budget"]["requests_held"] == kv[0]["stock"]["requests_held"]
    assert kv[-1]["per_budget"]["requests_held"] > kv[-1]["elastic"]["requests_held"]

    # an engine serving two budgets decodes the full one exactly like stock vLLM
    for row in _load(QUICK / "serve_budgets.json")["rows"]:
        assert row["same_outputs_every"] == row["same_outputs_two"] == 1.0, row["batch"]

    _assert_budget_control(QUICK / "budget_control.json")

    hybrid = QUICK / "nemotron_h"  # Star Elastic's family against stock vLLM
    budgets = _load(hybrid / "budgets.json")
    assert budgets["meta"]["model"]["family"] == "elastic_nemotron_h"
    assert [r["same_outputs"] for r in budgets["rows"]] == [1.0] * 3
    assert len(_load(hybrid / "mixed.json")["rows"]) == 4
    _assert_budget_control(hybrid / "budget_control.json")

    summary = (QUICK / "summary.md").read_text()
    assert "per-budget packing" in summary and "NemotronH" in summary
    assert "nested packing" in summary


def _assert_budget_control(path: Path) -> None:
    """Every switching config (two stock engines included) thinks exactly as the think
    budget alone and answers differently; ``recompute`` answers exactly as two stock
    engines handing the thinking over (stock small thinks, stock full re-prefills)."""
    control = _load(path)
    assert any("two engines" in name for name in control["checks"]), path
    for name, check in control["checks"].items():
        assert check["thinking_identical_to_think_budget"], name
        assert check["answer_differs_from_think_budget"], name
    assert control["two_engines_vs_recompute"]["answers_identical"] == 1.0, path
