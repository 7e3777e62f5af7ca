# One command each: `make demo` (set up + run the main job), `make test` (set up + tests).
.PHONY: setup demo test lint bench-quick

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/vllm-elastic demo

test: setup
	.venv/bin/python -m pytest -q -rs --durations=15 tests

lint: setup
	.venv/bin/ruff check vllm_elastic tests benchmarks examples scripts
	.venv/bin/ruff format --check vllm_elastic tests benchmarks examples scripts

bench-quick: setup
	bash benchmarks/run_all.sh --quick
