#!/usr/bin/env bash
# The GPU records benchmarks/README.md asks for, in one call of the device tool (its time is short): each record
# under its own time limit, in order of importance, its log (and JSON) under $OUT; the tail of each log is printed.
#   OUT=/tmp/gpu bash benchmarks/gpu_records.sh [TOTAL_SECONDS]      (default 560)
# Fashion-MNIST: $MCMI_LAB_DATA, else the usual places (mcmi_lab.datasets).
set -u
OUT=${OUT:-/tmp/gpu_records}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEV=${DEVICE:-cuda}
budget=${1:-560}
t0=$SECONDS

record() {  # record NAME LIMIT COMMAND...: run it under min(LIMIT, time left), log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local left=$((budget - (SECONDS - t0)))
  ((limit > left)) && limit=$left
  if ((limit < 30)); then
    echo "== $name: skipped, ${left}s left"
    return
  fi
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "   rc=$? at $((SECONDS - t0))s"
  tail -n "${TAIL:-30}" "$OUT/$name.log"
}

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,utilization.gpu --format=csv
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  nproc
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"
record stack 150 $PY -m benchmarks.stack --device "$DEV" --samples 8192
record study 420 $PY -m benchmarks.study --seeds 0 1 2 --device "$DEV" --json "$OUT/study.json"
record benchmarks 600 $PY -m benchmarks --device "$DEV" --profile --compile
echo "== done at $((SECONDS - t0))s"
