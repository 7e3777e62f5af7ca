"""Tensor parallelism (TP=2, two CPU worker processes): at every budget, greedy ids and
top logprobs equal stock vLLM's on the sliced checkpoint, through the per-rank-prefix
weight layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REF_MAX_TOKENS, assert_same_output, budget_names

NAME = "llama_bias"


def test_tp2_matches_stock_at_every_budget(checkpoint, reference, prompts, engines):
    budgets = budget_names(NAME)
    want = {b: reference(NAME, b) for b in budgets}
    engines.close()
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("tp_generate.py")), str(checkpoint(NAME)),
         "2", json.dumps(prompts), json.dumps(budgets), str(REF_MAX_TOKENS)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT ") :])
    for b in budgets:
        for i, (ids, steps) in enumerate(got[b]):
            lps = [{int(t): lp for t, lp in step} for step in steps]
            assert_same_output((ids, lps), want[b][i], f"TP=2 budget {b} prompt {i}")
