#!/usr/bin/env bash
# The project's GPU measurements in one command, sized for one lent H100/H200 (an estimated 5 minutes there;
# never run on a GPU yet). In order of priority, since a step that finds too little budget left is not run:
#   1. bench_train.py:   seconds per epoch of the harness, WRN-16-8, CIFAR-10-shaped data, batch 128, cutout,
#                        bf16, channels-last, SGD and SAM (the target: SAM <= 5 s/epoch), and whether a training
#                        step synchronises with the host;
#   2. bench_hessian.py: this package against PyHessian, small CNN (4 x 64 and 1 x 256 images) and ResNet-20
#                        (the goal: >= 5x faster at equal accuracy);
#   3. bench_sam_step.py: SAM's cost beyond its two passes, and its memory;
#   4. bench_landscape.py: a 2-D loss landscape with grid points batched through vmap against one by one.
# Each step has its own time limit, cut to what is left of BUDGET, so that one that hangs does not take the
# others with it and the whole fits one 10-minute command; the script goes on after a failed step and exits
# non-zero at the end if any failed or had no time left.
#
# Run from the repository root, on the GPU machine (docs/benchmarks.md, "On a lent GPU", has the call):
#   SHARPNESS_SOURCE_COMMIT=<commit> bash benchmarks/gpu_checks.sh
# Environment:
#   OUT      folder for the JSON results and log (default: ./gpu-checks)
#   WHEELS   folder of wheels to install first, into /tmp/site (default: .whl, skipped if absent); the GPU
#            machine has PyTorch but not kornia, kornia_rs or pyhessian
#   DEVICE   cuda (default) or cpu
#   BUDGET   seconds for all steps together (default 540)
#   QUICK=1  tiny sizes: a dry run of the plumbing on a CPU (what tests/test_benchmarks_smoke.py runs)
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu-checks}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
DEADLINE=$((SECONDS + ${BUDGET:-540}))
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
source benchmarks/gpu_env.sh

failed=()
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, output to the screen and the log
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "=== $name: not run, ${left}s of the budget left" | tee -a "$LOG"
        failed+=("$name")
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "=== $name ($(date -u +%FT%TZ), limit ${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "=== $name: TIMED OUT after ${limit}s (exit $rc)" | tee -a "$LOG"
    else
        echo "=== $name: exit $rc" | tee -a "$LOG"
    fi
    [ "$rc" -eq 0 ] || failed+=("$name")
}

{
    date -u
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu \
        --format=csv
} 2>&1 | tee -a "$LOG"

if [ "$QUICK" = 1 ]; then
    train=(--set model=cnn-small "--set=model_kwargs={width: 4}" --set train_subset=256 --set precision=fp32
        --set channels_last=false --synthetic-test 64 --epochs 2)
    hessian=(--repeats 1 --iters 4 --slq-iters 4 --reference-iters 8 --batch-size 8)
    hessian_single=(--batches 1 "${hessian[@]}")
    hessian_resnet=(--model resnet20 --batches 1 "${hessian[@]}")
    sam_step=(--models cnn-small --batch 8 --rounds 2 --warmup 1 --steps 1)
    landscape=(--model cnn-small --grid 3 --batches 1 --batch-size 8 --points 1 3 --repeats 1)
else
    train=(--epochs 3)
    hessian=(--repeats 5)
    hessian_single=(--batches 1 --batch-size 256 --repeats 5)
    hessian_resnet=(--model resnet20 --batches 1 --batch-size 64 --repeats 3)  # the CPU table's setting
    sam_step=(--rounds 15)
    landscape=(--points 1 4 11 121)
fi

step bench_train 240 "$PYTHON" benchmarks/bench_train.py --device "$DEVICE" --synthetic "${train[@]}" \
    --json "$OUT/bench_train.json"
step bench_hessian_cnn_4x64 120 "$PYTHON" benchmarks/bench_hessian.py --device "$DEVICE" "${hessian[@]}" \
    --json "$OUT/bench_hessian_cnn_4x64.json"
step bench_hessian_cnn_1x256 120 "$PYTHON" benchmarks/bench_hessian.py --device "$DEVICE" "${hessian_single[@]}" \
    --json "$OUT/bench_hessian_cnn_1x256.json"
step bench_hessian_resnet20 120 "$PYTHON" benchmarks/bench_hessian.py --device "$DEVICE" "${hessian_resnet[@]}" \
    --json "$OUT/bench_hessian_resnet20.json"
step bench_sam_step 180 "$PYTHON" benchmarks/bench_sam_step.py --device "$DEVICE" "${sam_step[@]}" \
    --json "$OUT/bench_sam_step.json"
step bench_landscape 90 "$PYTHON" benchmarks/bench_landscape.py --device "$DEVICE" "${landscape[@]}" \
    --json "$OUT/bench_landscape.json"

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}" | tee -a "$LOG"
    exit 1
fi
echo "all steps passed; results in $OUT" | tee -a "$LOG"
