#!/usr/bin/env bash
# Every GPU check in one command, for a machine with an NVIDIA GPU (and TensorRT for the engine tests).
#
#   bash scripts/gpu_check.sh            # all of tests/gpu
#   bash scripts/gpu_check.sh -k fp16    # extra pytest arguments pass through
#   ENGINES=0 bash scripts/gpu_check.sh  # skip the engine check (scripts/gpu_engines.py)
#   GPU_BUNDLES=DIR bash scripts/gpu_check.sh  # reuse bundles from `gpu_engines.py --part prepare --out DIR`
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
PYTHONUNBUFFERED=1 timeout 150 pytest -m gpu tests/gpu -rs -v "$@"
rc=$?

# Engine check (needs TensorRT): every bundle kind parsed, fp16/INT8/FP8 engines with two profiles,
# the engine inspector's per-layer precisions, parity at odd batch sizes, a rejected timing cache,
# build time / plan size / memory / texts/s at 32x128 and 8x512 for the shipped model, then the
# NV-Embed-v2 shape with 2 layers. Sized for <= 5 min in all on one H100/H200 (part 2 is cut at 100 s).
# GPU_BUNDLES=DIR: part 1's ONNX bundles exported ahead on any machine
# (`python scripts/gpu_engines.py --part prepare --out DIR`): copied in, so part 1 only builds engines.
if [ "${ENGINES:-1}" = "1" ]; then
  if [ -n "${GPU_BUNDLES:-}" ]; then
    mkdir -p "${OUT:-/tmp/nvembed-gpu}" && cp -r "$GPU_BUNDLES"/onnx-* "${OUT:-/tmp/nvembed-gpu}"/
  fi
  echo "== scripts/gpu_engines.py --part 1"
  PYTHONUNBUFFERED=1 timeout 120 python scripts/gpu_engines.py --part 1 --out "${OUT:-/tmp/nvembed-gpu}"
  e1=$?
  echo "== scripts/gpu_engines.py --part 2 (NV-Embed-v2 shape, 2 layers)"
  PYTHONUNBUFFERED=1 timeout 100 python scripts/gpu_engines.py --part 2 --layers 2 --out "${OUT:-/tmp/nvembed-gpu}"
  e2=$?
  echo "engine check exit codes: part 1 $e1, part 2 $e2 (5: TensorRT not importable, 124: cut by the timeout)"
  [ "$rc" = "0" ] && [ "$e1" != "0" ] && rc=$e1
  [ "$rc" = "0" ] && [ "$e2" != "0" ] && rc=$e2  # part 2 failing or cut by its timeout fails the check too
fi
exit $rc
