#!/usr/bin/env bash
# Set up .venv with vlmscope installed from its wheel, as users get it (idempotent).
# Used by the README's two commands and by CI. The test suite runs against this install, never
# against the source tree: after editing the code, run this again (it rebuilds the wheel, ~15 s).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=77"
# torch + torchvision first, as a matching pair (transformers' Qwen-VL processors need torchvision).
case "$(uname -m)" in
    aarch64|arm64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
    *)             TORCH="torch==2.14.1 torchvision==0.29.1" ;;
esac
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q $TORCH
fi
# Build the wheel from a clean build directory (a stale build/ would ship deleted modules),
# then install it, not an editable link: the suite tests exactly what ships.
rm -rf build dist ./*.egg-info model/*.egg-info
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w dist .
WHEEL=$(ls dist/vlmscope-*.whl)
.venv/bin/python -m pip uninstall -q -y vlmscope >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "${WHEEL}[test]"
rm -rf build ./*.egg-info model/*.egg-info
.venv/bin/python -I -c "import vlmscope, vlmscope_models, torch, transformers; print('vlmscope', vlmscope.__version__, 'from', vlmscope.__path__[0], '| torch', torch.__version__, '| transformers', transformers.__version__)"
