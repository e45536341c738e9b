#!/usr/bin/env bash
# benchmarks/gpu.sh: the one prepared GPU benchmark run (< 8 minutes of device time).
#
# Run on the lent GPU machine from the repository root, in one go: `bash benchmarks/gpu.sh`.
# The wheels that machine lacks (lmdb for cp312, protobuf >= 7.35) travel in .whl/
# (benchmarks/README.md says how to fill it here); the script installs them from there into
# $SITE (default /tmp/site, no network, no dependencies resolved) when .whl/ holds any, then
# checks that everything the benchmarks import is importable and stops with one line naming
# what is missing otherwise. It builds its small LMDBs in temp dirs and prints for batch 256:
#   this project's img/s fp32 and bf16, PyTorch eager fp32 and AMP bf16 on the same card (same
#   process, same input batches), MFU, the share of our step spent waiting for input, and the
#   input pipeline's img/s (raw and JPEG Datums, 1 and 4 workers and one per core) against the
#   fp32 step's rate.
# Each section runs under its own timeout and prints its result line even if another fails.
# Logs and JSON land in $OUT (default /tmp/gpu_bench).
set -u -o pipefail
cd "$(dirname "$0")/.."
SITE="${SITE:-/tmp/site}"
PY="${PY:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || { echo "gpu.sh: installing .whl/*.whl into $SITE failed"; exit 1; }
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# JAX and PyTorch share the card in one process: JAX must not take 75% of it up front.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"
OUT="${OUT:-/tmp/gpu_bench}"
BATCH="${BATCH:-256}"
ITERS="${ITERS:-20}"
WARMUP="${WARMUP:-3}"
WORKERS="${WORKERS:-$(nproc)}"
# CPU convolution plans (model/autotune.py; unused on a GPU): CONV_PLANS=heuristic skips measuring
CONV_PLANS="${CONV_PLANS:-auto}"
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

"$PY" - <<'EOF' || exit 1
import importlib, sys
missing = []
for name in ("jax", "numpy", "optax", "lmdb", "cv2", "google.protobuf", "data.proto.caffe_pb2",
             "data.pipeline", "model.train"):
    try:
        importlib.import_module(name)
    except Exception as err:  # ImportError, or protobuf's gencode version check
        missing.append(f"{name} ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
if missing:
    print("gpu.sh: cannot import " + "; ".join(missing) + ": carry the missing wheels in .whl/"
          " (benchmarks/README.md, 'Running gpu.sh')")
    sys.exit(1)
EOF

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
  --allocator system --conv-plans "$CONV_PLANS" --json "$OUT/train_fp32.json"
section train_bf16 170 "$PY" benchmarks/train.py --device "$DEVICE" --batch-size "$BATCH" \
  --precision bf16 --iterations "$ITERS" --warmup "$WARMUP" --workers "$WORKERS" \
  --allocator system --conv-plans "$CONV_PLANS" --json "$OUT/train_bf16.json"
section loader 100 "$PY" benchmarks/loader.py --device "$DEVICE" --batch-size "$BATCH" \
  --workers "$(printf '%s\n' 1 4 "$WORKERS" | sort -nu | paste -sd,)" --batches 12 \
  --records $((4 * BATCH)) --train-json "$OUT/train_fp32.json"

echo "== summary (batch $BATCH, $(( $(date +%s) - T0 ))s)"
for name in train_fp32 train_bf16; do
  echo "$name: $(grep -E '^(ours|pytorch) ' "$OUT/$name.log" 2>/dev/null | sed -E 's/ +/ /g' | cut -c1-110 | tr '\n' ';')"
  echo "$name: $(tail -n 1 "$OUT/$name.log" 2>/dev/null)"
  echo "$name: $(grep -m1 'waiting for input' "$OUT/$name.log" 2>/dev/null | sed 's/^# //')"
done
echo "loader: $(tail -n 1 "$OUT/loader.log" 2>/dev/null)"
