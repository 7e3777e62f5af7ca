#!/usr/bin/env bash
# Run every benchmark in turn, then write results/summary.md (results/quick/ with --quick).
# Usage: benchmarks/run_all.sh [--quick] [other flags passed to every script]
# PYTHON overrides the interpreter (default: the repo's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
QUICK=()
for arg in "$@"; do [ "$arg" = "--quick" ] && QUICK=(--quick); done
SCRIPTS=(bench_budgets bench_mixed bench_memory bench_kv_bound bench_scaling bench_serve_budgets bench_budget_control bench_serve profile_forward)
start=$SECONDS
for script in "${SCRIPTS[@]}"; do
    echo "=== $script $* ($((SECONDS - start)) s elapsed)"
    "$PY" "benchmarks/$script.py" "$@"
done
# other weight packings (the default, auto, is blocked where our nested GEMM kernel runs):
# per-budget (one packed copy per budget: memory = the stock engines' sum) and nested
# (one copy as oneDNN shells, 2c+1 GEMMs at level c)
for variant in "per-budget:bench_budgets bench_mixed" "nested:bench_budgets bench_mixed bench_scaling"; do
    packing=${variant%%:*}
    VARIANT_DIR=benchmarks/results/${packing//-/_}
    [ ${#QUICK[@]} -gt 0 ] && VARIANT_DIR=benchmarks/results/quick/${packing//-/_}
    for script in ${variant#*:}; do
        echo "=== $script --weight-packing $packing ($((SECONDS - start)) s elapsed)"
        "$PY" "benchmarks/$script.py" "$@" --weight-packing "$packing" --out-dir "$VARIANT_DIR"
    done
done
# Star Elastic's family: NemotronH (Mamba-2 + attention + MLP; stock vLLM's CPU build cannot
# run its MoE layers, so the comparison preset has none)
HYBRID_DIR=benchmarks/results/nemotron_h
HYBRID_PRESET=hybrid_bench
[ ${#QUICK[@]} -gt 0 ] && HYBRID_DIR=benchmarks/results/quick/nemotron_h && HYBRID_PRESET=hybrid_quick
for script in bench_budgets bench_mixed bench_budget_control; do
    echo "=== $script --preset $HYBRID_PRESET ($((SECONDS - start)) s elapsed)"
    "$PY" "benchmarks/$script.py" "$@" --preset "$HYBRID_PRESET" --out-dir "$HYBRID_DIR"
done
"$PY" benchmarks/summarize.py "${QUICK[@]}"
echo "=== all done in $((SECONDS - start)) s"
