#!/usr/bin/env bash
# gpu_check.sh: the GPU checks of segpipe in one run of at most 8 minutes, from a fresh clone after
# `make setup` (a CUDA build of torch: `make setup` installs one where nvidia-smi exists).
#
#   benchmarks/gpu_check.sh [--out FILE] [--keep]    on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh --cpu-smoke              the same steps on the CPU with tiny sizes
#
# Steps, each under its own time limit:
#   1. synthesise 8 ct3d phantoms (4 with --cpu-smoke, 32x32x16)
#   2. train the phantom bundle a few epochs with CUDA AMP: fp16 with a grad scaler
#      (--set 'amp_dtype=$torch.float16'), then bf16 (--set 'amp_dtype=$torch.bfloat16'); loss per epoch
#   3. a one-process torchrun: a process group on nccl and an all-reduce (gloo on the CPU)
#   4. inference, shipped phantom weights: MONAI sliding_window_inference (fp32, overlap 0.5, Gaussian)
#      against the bundle's inferer in each tiling mode (blend, overlap-tile; amp on), on a CT-sized
#      mosaic of phantoms with true labels (Dice) and on a 512x512x300 volume: s, Mvox/s, peak GPU memory
#   5. the out-of-memory fallback: GPU memory capped (torch.cuda.set_per_process_memory_fraction)
#      below the stitched output, so the predictor must stitch on the CPU, with the same argmax
#   6. one summary table, printed and written to FILE (default: gpu_check_<UTC time>.md in the
#      system's temporary folder)
# Without a CUDA GPU (and without --cpu-smoke) it says so in one line and exits 0: there is nothing
# to check; it is never part of CI. Exit status 1 when a step fails (the table still shows the rest).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
SMOKE=0
KEEP=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke|--dry-run) SMOKE=1 ;;
    --keep) KEEP=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ ! -x "$PY" ]; then
  echo "gpu_check: no .venv in $ROOT: run 'make setup' first" >&2
  exit 2
fi
if [ "$SMOKE" = 0 ]; then
  if ! CUDA_INFO="$("$PY" -c 'import torch, sys; ok = torch.cuda.is_available(); print(torch.cuda.get_device_name(0) if ok else "torch " + torch.__version__ + " sees no CUDA GPU"); sys.exit(0 if ok else 1)' 2>/dev/null)"; then
    echo "gpu_check: skipped: ${CUDA_INFO:-torch could not be imported} (a CUDA build of torch and a GPU are needed; --cpu-smoke runs the steps on the CPU)"
    exit 0
  fi
  DEVICE=cuda; TINY=(); EPOCHS=4; N=8; SHAPE=(); LIMIT=(synth 30 train 75 summary 20 nccl 30 infer 150 oom 100)
  echo "gpu_check: $CUDA_INFO"
else
  DEVICE=cpu; TINY=(--tiny); EPOCHS=2; N=4; SHAPE=(--shape 32 32 16); LIMIT=(synth 60 train 300 summary 60 nccl 60 infer 400 oom 120)
  echo "gpu_check: CPU smoke run (tiny sizes, same steps)"
fi
limit() { local i; for ((i = 0; i < ${#LIMIT[@]}; i += 2)); do [ "${LIMIT[i]}" = "$1" ] && echo "${LIMIT[i+1]}"; done; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
RESULTS="$WORK/results"
mkdir -p "$RESULTS"
[ -n "$OUT" ] || OUT="${TMPDIR:-/tmp}/gpu_check_$(date -u +%Y%m%d_%H%M%S).md"
[ "$KEEP" = 1 ] || trap 'rm -rf "$WORK"' EXIT
FAILED=()
START=$(date +%s)

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $WORK/NAME.log
  local name="$1" secs="$2"; shift 2
  local t0=$(date +%s)
  echo "gpu_check: [$name] (limit ${secs} s) $*"
  if timeout --kill-after=10 "$secs" "$@" >"$WORK/$name.log" 2>&1; then
    echo "gpu_check: [$name] ok in $(( $(date +%s) - t0 )) s"
    echo $(( $(date +%s) - t0 )) >"$WORK/$name.wall"
  else
    local rc=$?
    echo "gpu_check: [$name] FAILED (exit $rc after $(( $(date +%s) - t0 )) s); last lines of $WORK/$name.log:"
    tail -n 15 "$WORK/$name.log" | sed 's/^/    /'
    FAILED+=("$name")
  fi
}

export MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db"
step synth "$(limit synth)" "$PY" -m pipeline synth --kind ct3d --n "$N" --out "$WORK/ct" "${SHAPE[@]}"
for dt in float16 bfloat16; do
  step "train_$dt" "$(limit train)" "$PY" -m pipeline train bundles/phantom_ct_3d --manifest "$WORK/ct/dataset.json" \
    --epochs "$EPOCHS" --device "$DEVICE" --set "output_dir=$WORK/train_$dt" --set "amp_dtype=\$torch.$dt" \
    --set val_interval=1 --set num_folds=2
  [ -f "$WORK/train_$dt.wall" ] && cp "$WORK/train_$dt.wall" "$WORK/train_$dt/wall_s" 2>/dev/null
done
step train_summary "$(limit summary)" "$PY" benchmarks/gpu_check.py train --results "$RESULTS" --runs "$WORK/train_float16" "$WORK/train_bfloat16"
step nccl "$(limit nccl)" "$ROOT/.venv/bin/torchrun" --nproc_per_node 1 --master_port 29517 benchmarks/gpu_check.py nccl --results "$RESULTS"
step infer "$(limit infer)" "$PY" benchmarks/gpu_check.py infer --device "$DEVICE" "${TINY[@]}" --results "$RESULTS"
step oom "$(limit oom)" "$PY" benchmarks/gpu_check.py oom --device "$DEVICE" "${TINY[@]}" --results "$RESULTS"
"$PY" benchmarks/gpu_check.py table --results "$RESULTS" --out "$OUT"
echo "gpu_check: $(( $(date +%s) - START )) s in all; table written to $OUT${FAILED[*]:+; FAILED: ${FAILED[*]}}"
[ "$KEEP" = 1 ] && echo "gpu_check: work folder kept: $WORK"
[ ${#FAILED[@]} -eq 0 ]
