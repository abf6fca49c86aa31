#!/usr/bin/env bash
# Makes .venv (if absent) and installs ddpmkit into it with its dev tools.
# A CPU build of torch is installed first when the venv has none, so that pip
# does not pull a multi-GB CUDA build; GPU users can pre-install their own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# Test-only: torch-fidelity's Inception is the reference that tests/test_fid.py compares
# ddpmkit's TF-Inception with. Its package requires torchvision, which is not needed for that
# module (the test gives it a stand-in) and does not import beside the CPU torch here; pip
# cannot express "without dependencies" in pyproject's extras, so it is installed here.
python -m pip install -q --no-deps "torch-fidelity==0.4.0"
