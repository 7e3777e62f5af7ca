"""Tensor parallelism (TP=2, two CPU worker processes): every budget gives the same
greedy ids as TP=1, through the per-rank-prefix weight layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import budget_names, greedy

NAME = "llama_bias"


def test_tp2_matches_tp1_at_every_budget(checkpoint, elastic_llm, prompts, engines):
    budgets = budget_names(NAME)
    llm = elastic_llm(NAME)
    want = {b: [ids for ids, _ in greedy(llm, prompts, [{"elastic_budget": b}] * 4, 8)]
            for b in budgets}  # fmt: skip
    engines.close()
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("tp_generate.py")), str(checkpoint(NAME)),
         "2", json.dumps(prompts), json.dumps(budgets)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(lines[-1][len("RESULT ") :]) == want
