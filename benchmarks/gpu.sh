#!/usr/bin/env bash
# benchmarks/gpu.sh: the one prepared GPU benchmark run (< 8 minutes of device time).
#
# Run on the lent GPU machine from the repository root, with the wheels that machine lacks
# (lmdb for cp312, protobuf >= 7.35) carried in .whl/ (benchmarks/README.md says how to fill it):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD
#   bash benchmarks/gpu.sh
# It installs nothing, builds its small LMDBs in temp dirs, and prints for batch 256:
#   this project's img/s fp32 and bf16, PyTorch eager fp32 and AMP bf16 on the same card (same
#   process, same input batches), MFU, and the input pipeline's img/s with 16 workers.
# Each section runs under its own timeout and prints its result line even if another fails.
# Logs and JSON land in $OUT (default /tmp/gpu_bench).
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-/tmp/site:$PWD}"
# JAX and PyTorch share the card in one process: JAX must not take 75% of it up front.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"
PY="${PY:-python3}"
OUT="${OUT:-/tmp/gpu_bench}"
BATCH="${BATCH:-256}"
ITERS="${ITERS:-20}"
WARMUP="${WARMUP:-3}"
WORKERS="${WORKERS:-16}"
DEVICE="${DEVICE:-gpu}"  # DEVICE=cpu BATCH=4 ITERS=1 smoke-tests this script on a CPU machine
mkdir -p "$OUT"
T0=$(date +%s)

# section NAME SECONDS CMD...: run CMD with a timeout, keep its log, print its last lines.
section() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, t=$(( $(date +%s) - T0 ))s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep -v '^#' "$OUT/$name.log" | tail -n 4
  [ $rc -eq 0 ] || { echo "$name FAILED rc=$rc; log tail:"; tail -n 15 "$OUT/$name.log"; }
  return 0
}

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 8
"$PY" - <<'EOF' 2>&1 | tail -n 3
import jax, numpy, optax, lmdb, google.protobuf as pb
try:
    import torch; tv = torch.__version__
except ImportError:
    tv = "missing"
print(f"jax {jax.__version__} {jax.devices()}, torch {tv}, lmdb {lmdb.__version__}, protobuf {pb.__version__}")
EOF

section train_fp32 170 "$PY" benchmarks/train.py --device "$DEVICE" --batch-size "$BATCH" \
  --precision float32 --iterations "$ITERS" --warmup "$WARMUP" --workers "$WORKERS" \
  --allocator system --json "$OUT/train_fp32.json"
section train_bf16 170 "$PY" benchmarks/train.py --device "$DEVICE" --batch-size "$BATCH" \
  --precision bf16 --iterations "$ITERS" --warmup "$WARMUP" --workers "$WORKERS" \
  --allocator system --json "$OUT/train_bf16.json"
section loader 100 "$PY" benchmarks/loader.py --device "$DEVICE" --batch-size "$BATCH" \
  --workers "1,4,$WORKERS" --batches 12 --records $((4 * BATCH)) --train-json "$OUT/train_fp32.json"

echo "== summary (batch $BATCH, $(( $(date +%s) - T0 ))s)"
for name in train_fp32 train_bf16; do
  echo "$name: $(grep -E '^(ours|pytorch) ' "$OUT/$name.log" 2>/dev/null | sed -E 's/ +/ /g' | cut -c1-110 | tr '\n' ';')"
  echo "$name: $(tail -n 1 "$OUT/$name.log" 2>/dev/null)"
done
echo "loader: $(tail -n 1 "$OUT/loader.log" 2>/dev/null)"
