#!/usr/bin/env bash
# Creates .venv with everything bagnet_fast needs and builds the package (C++/CUDA extension
# included) in editable mode. Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# torch 2.14.1 is a CUDA 13 build: with nvcc present the CUDA sources compile even without a GPU.
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision, triton" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q $TORCH_SPEC
fi
.venv/bin/python -m pip install -q setuptools wheel pybind11 ninja numpy tqdm \
  pytest pytest-benchmark pillow matplotlib captum timm
# The CPU peers of `bench --peers` and the benchmark suite (optional extra bagnet_fast[peers]):
# installed here so that their tests run.
.venv/bin/python -m pip install -q onnxruntime openvino onnx onnxscript
export MAX_JOBS=${MAX_JOBS:-2}
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import bagnet_fast, bagnet_fast._C as C; print('bagnet_fast', bagnet_fast.__version__, 'extension loaded, CUDA part:', bool(C.with_cuda))"
