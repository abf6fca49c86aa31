#!/usr/bin/env bash
# ddpmkit's GPU check: one command, under 10 minutes on one GPU, one summary table.
#
#   bash benchmarks/gpu_check.sh [--out DIR]     # on a CUDA machine (diffusers for the speed rows)
#   bash benchmarks/gpu_check.sh --dry-run       # CPU smoke run of the same steps (tests use it)
#
# Checks, each with its log in DIR (default gpu_check_out/):
#   speed fp32 / tf32 / bf16   benchmarks/speed.py on the DDPM CIFAR-10 net vs diffusers
#                              (--tf32 false; --tf32 true; --bf16 autocast), batch 128
#   train+resume bf16 / fp16   the CIFAR-10 net on 2,048 random 32x32 RGB images: 100 steps,
#                              stop, resume to 200 (channels_last weights, fused AdamW,
#                              GradScaler state for fp16)
#   torchrun 2x NCCL           50 steps on 2 GPUs (skipped with fewer)
#   sample dpm++2m             1,000 images, DPM-Solver++(2M) 20 steps, from the bf16 run
# --dry-run runs the train/resume/sample steps on the CPU with a tiny network, and only parses
# the speed.py flags (a CPU speed run of the CIFAR-10 net takes far too long to be a smoke test).
# Environment: PYTHON (default python) runs everything. Exit status 1 if a check failed.

set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=gpu_check_out
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
ROWS=()
FAILED=0

# row CHECK STATUS SECONDS DETAIL
row() { ROWS+=("$(printf '| %-18s | %-6s | %7s | %s |' "$1" "$2" "$3" "$4")"); }

# timed NAME CMD...: run CMD with its output in $OUT/NAME.log; sets RC and SECS
timed() {
    local name=$1; shift
    local t0; t0=$(date +%s.%N)
    "$@" >"$OUT/$name.log" 2>&1
    RC=$?
    SECS=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
}

fail() { FAILED=1; row "$1" FAIL "$2" "$3 (see $OUT/$4.log)"; }

read -r NGPU TORCH GPU < <($PY -c "import torch; c = torch.cuda.is_available(); \
print(torch.cuda.device_count() if c else 0, torch.__version__, \
      torch.cuda.get_device_name(0) if c else 'none')")
if [ "$DRY" = 0 ] && [ "${NGPU:-0}" = 0 ]; then
    echo "gpu_check.sh: no CUDA GPU here; --dry-run runs the CPU smoke version" >&2
    exit 2
fi
echo "# $(date -u +%Y-%m-%dT%H:%MZ)  GPUs: $NGPU ($GPU)  torch $TORCH  dry-run: $DRY"

# ---- speed vs diffusers ----------------------------------------------------------------------
SPEED_COMMON=(--device cuda --batch 128 --rounds 5 --warmup 2 --bpd-images 4 --no-tuned-diffusers)
speed_flags() {
    case $1 in
        fp32) echo "--tf32 false" ;;
        tf32) echo "--tf32 true" ;;
        bf16) echo "--tf32 true --bf16" ;;
    esac
}
if [ "$DRY" = 1 ]; then  # parse the three flag sets as speed.py would, in one process
    timed speed-flags $PY -c "import sys; sys.path.insert(0, 'benchmarks'); import speed
for mode in sys.argv[1:]:
    speed.parse_args('${SPEED_COMMON[*]}'.split() + mode.split())" \
        "$(speed_flags fp32)" "$(speed_flags tf32)" "$(speed_flags bf16)"
fi
for mode in fp32 tf32 bf16; do
    read -r -a flags <<<"$(speed_flags $mode)"
    if [ "$DRY" = 1 ]; then
        if [ "$RC" = 0 ]; then row "speed $mode" dry "$SECS" "speed.py flags parse; not run"
        else fail "speed $mode" "$SECS" "speed.py rejects its flags" speed-flags; fi
        continue
    fi
    timed "speed-$mode" $PY benchmarks/speed.py "${SPEED_COMMON[@]}" "${flags[@]}"
    detail=$(tail -n 1 "$OUT/speed-$mode.log" | $PY -c "
import json, sys
r = json.loads(sys.stdin.read())
s, q = r['summary']['ddpmkit'], r['ratios']['diffusers']
print(f\"train {s['train_img_s']:.0f} img/s ({q['train']:.2f}x diffusers), forward \"
      f\"{s['forward_img_s']:.0f} img/s ({q['forward']:.2f}x)\")" 2>/dev/null)
    if [ "$RC" = 0 ] && [ -n "$detail" ]; then row "speed $mode" ok "$SECS" "$detail"
    else fail "speed $mode" "$SECS" "speed.py failed (diffusers installed?)" "speed-$mode"; fi
done

# ---- train, stop, resume ---------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
    SIZE=8; STEPS1=2; STEPS2=4; NSAMPLE=16; SAMPLE_STEPS=2; LOG=2
    NET=(--model-channels 16 --channel-mult 1,2 --num-res-blocks 1 --attention-resolutions 4
         --groups 8 --timesteps 40 --batch-size 8 --device cpu)
else
    SIZE=32; STEPS1=100; STEPS2=200; NSAMPLE=1000; SAMPLE_STEPS=20; LOG=10
    NET=(--batch-size 128 --device cuda)
fi
DATA="$OUT/random-$SIZE.npy"
$PY -c "import numpy as np, sys; np.save(sys.argv[1], np.random.default_rng(0).integers(
    0, 256, (2048, $SIZE, $SIZE, 3), dtype=np.uint8))" "$DATA"
TRAIN=(-m ddpmkit train --config cifar10 --data "$DATA" "${NET[@]}" --max-minutes 0
       --checkpoint-every 1000 --log-every "$LOG" --sample-every 0 --warmup-steps 10 --no-progress)

# metrics NAME RUN: one line about the run's last metrics row
metrics() {
    $PY - "$2/metrics.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
r = rows[-1]
loss = f"{float(r['loss']):.4f}" if r["loss"] else "-"
print(f"step {r['step']}, loss {loss}, {float(r['steps_per_s']):.2f} steps/s, "
      f"skipped {r['skipped']} (overflow {r.get('overflow') or 0})")
EOF
}

for prec in bf16 fp16; do
    run="$OUT/run-$prec"
    rm -rf "$run"
    timed "train-$prec-a" $PY "${TRAIN[@]}" --out "$run" --precision "$prec" --max-steps "$STEPS1"
    rc1=$RC; s1=$SECS
    timed "train-$prec-b" $PY "${TRAIN[@]}" --out "$run" --precision "$prec" --max-steps "$STEPS2"
    total=$((s1 + SECS))
    if [ "$rc1" = 0 ] && [ "$RC" = 0 ] && grep -q "resuming from .*step-$(printf %07d "$STEPS1")" \
            "$OUT/train-$prec-b.log" && [ -d "$run/checkpoints/step-$(printf %07d "$STEPS2")" ]; then
        row "train+resume $prec" ok "$total" "$(metrics "$prec" "$run")"
    else
        fail "train+resume $prec" "$total" "train or resume failed" "train-$prec-b"
    fi
done

# ---- 2 GPUs, NCCL ----------------------------------------------------------------------------
if [ "$DRY" = 0 ] && [ "$NGPU" -ge 2 ]; then
    run="$OUT/run-ddp"
    rm -rf "$run"
    # "-m -- ddpmkit": torchrun's own options end at "--" (see docs/scaling.md)
    timed torchrun $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m -- \
        "${TRAIN[@]:1}" --batch-size 64 --device cuda --precision bf16 --out "$run" --max-steps 50
    if [ "$RC" = 0 ] && [ -d "$run/checkpoints/step-0000050" ]; then
        row "torchrun 2x NCCL" ok "$SECS" "$(metrics ddp "$run")"
    else
        fail "torchrun 2x NCCL" "$SECS" "2-process training failed" torchrun
    fi
else
    row "torchrun 2x NCCL" skip - "needs 2 GPUs (found $NGPU$([ "$DRY" = 1 ] && echo ', dry run'))"
fi

# ---- sampling --------------------------------------------------------------------------------
timed sample $PY -m ddpmkit sample --checkpoint "$OUT/run-bf16" --num-samples "$NSAMPLE" \
    --batch-size 500 --sampler dpm++2m --steps "$SAMPLE_STEPS" --out "$OUT/samples.npz" \
    --no-progress "${NET[@]: -2}"
shape=$($PY -c "import numpy as np, sys; a = np.load(sys.argv[1])['arr_0']; \
print(a.dtype, 'x'.join(map(str, a.shape)))" "$OUT/samples.npz" 2>/dev/null)
if [ "$RC" = 0 ] && [ "$shape" = "uint8 ${NSAMPLE}x${SIZE}x${SIZE}x3" ]; then
    rate=$(awk -v n="$NSAMPLE" -v s="$SECS" 'BEGIN { printf "%.0f", n / (s > 0 ? s : 1) }')
    row "sample dpm++2m" ok "$SECS" "$NSAMPLE images, $SAMPLE_STEPS steps, ~$rate img/s incl. start-up; $shape"
else
    fail "sample dpm++2m" "$SECS" "sampling failed or wrong output ($shape)" sample
fi

# ---- summary ---------------------------------------------------------------------------------
{
    echo
    echo "| check              | status | seconds | detail |"
    echo "|--------------------|--------|---------|--------|"
    printf '%s\n' "${ROWS[@]}"
} | tee "$OUT/summary.md"
exit "$FAILED"
