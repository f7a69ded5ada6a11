#!/usr/bin/env bash
# Every GPU check in one command, for a machine with an NVIDIA GPU (and TensorRT for the engine tests).
#
#   bash scripts/gpu_check.sh            # all of tests/gpu
#   bash scripts/gpu_check.sh -k fp16    # extra pytest arguments pass through
#
# Prints the machine (nvidia-smi, torch, CUDA, TensorRT, ONNX Runtime providers), then runs
# `pytest -m gpu tests/gpu -rs`: every skipped test is listed with its reason at the end, so a
# run without TensorRT says so instead of looking green. Takes a few minutes (engines for a tiny
# model are built at builder optimisation level 1). Exit code: pytest's; 5 means nothing ran
# (every module skipped, e.g. no GPU or no TensorRT).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi

echo "== nvidia-smi"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || nvidia-smi
else
  echo "nvidia-smi not found (no NVIDIA driver on PATH; on Jetson use tegrastats)"
fi

echo "== python packages"
python - <<'PY'
import platform
print("python", platform.python_version(), platform.machine())
try:
    import torch
    cuda = torch.cuda.is_available()
    print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| GPU visible:", cuda)
    if cuda:
        print("  GPU:", torch.cuda.get_device_name(), "| compute capability %d.%d" % torch.cuda.get_device_capability())
except ImportError as exc:
    print("torch: not importable:", exc)
try:
    import tensorrt
    print("tensorrt", tensorrt.__version__)
except ImportError as exc:
    print("tensorrt: NOT importable (%s) -> the engine tests will be skipped" % exc)
try:
    import onnxruntime
    print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
except ImportError as exc:
    print("onnxruntime: not importable:", exc)
PY

echo "== pytest -m gpu tests/gpu -rs"
PYTHONUNBUFFERED=1 pytest -m gpu tests/gpu -rs -v "$@"
