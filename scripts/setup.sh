#!/usr/bin/env bash
# Set up .venv with everything vlmscope needs (idempotent). Used by the README and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch + torchvision first, as a matching pair (transformers' Qwen-VL processors need torchvision).
case "$(uname -m)" in
    aarch64|arm64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
    *)             TORCH="torch==2.14.1 torchvision==0.29.1" ;;
esac
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q $TORCH
fi
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import vlmscope, vlmscope_models, torch, transformers; print('vlmscope', vlmscope.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
