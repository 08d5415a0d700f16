#!/usr/bin/env bash
# One reduced config through the harness on a lent GPU, sized to one 10-minute device command, with the results
# copied back flat into $OUT (what comes back from the device is at most 8 files, no deeper than two folders).
#
#   bash benchmarks/gpu_reduced_run.sh CONFIG [sharpness compare options...]
#   e.g. SHARPNESS_DATA_DIR=/tmp/cifar10 OUT=$OUT bash benchmarks/gpu_reduced_run.sh \
#            reduced/cifar10_wrn16-8_noise40 --seeds 0 --device cuda
#
# The runs go to $RUNS (default /tmp/sharpness-runs/<config name>; a WRN-16-8 run's model.pt and checkpoint.pt
# hold its parameters three times over, about 130 MB, more than can come back). `sharpness compare` gets SIGTERM
# when BUDGET seconds (default 540) have passed: a run then saves a mid-epoch checkpoint and stops, and the same
# command, run again on the same (still warm) machine, skips the finished runs and resumes the stopped one.
# compare reuses a run only if its config.yaml is this config: changed options stop with an error naming them,
# never with the old results. Copied to $OUT: report.md and report.png when the compare finished, and for each
# run <run>.summary.json (when finished) and <run>.metrics.jsonl.
# Environment: OUT (default ./gpu-runs), RUNS, BUDGET, WHEELS (default .whl, installed into /tmp/site if
# present, as in gpu_checks.sh), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 CONFIG [sharpness compare options...]" >&2; exit 2; }

config=$1
shift
for arg in "$@"; do
    case $arg in --out | --out=*) echo "$0: the runs go to \$RUNS; leave out --out" >&2; exit 2 ;; esac
done

OUT=${OUT:-gpu-runs}
RUNS=${RUNS:-/tmp/sharpness-runs/$(basename "$config" .yaml)}
mkdir -p "$OUT" "$RUNS"
source benchmarks/gpu_env.sh

timeout -s TERM --kill-after=30 "${BUDGET:-540}" "$PYTHON" -m sharpness compare "$config" --out "$RUNS" \
    --no-progress "$@" 2>&1 | tee "$OUT/compare.log"
rc=${PIPESTATUS[0]}

for file in report.md report.png; do
    [ -f "$RUNS/$file" ] && cp "$RUNS/$file" "$OUT/"
done
for run in "$RUNS"/*/; do
    name=$(basename "$run")
    [ -f "$run/summary.json" ] && cp "$run/summary.json" "$OUT/$name.summary.json"
    [ -f "$run/metrics.jsonl" ] && cp "$run/metrics.jsonl" "$OUT/$name.metrics.jsonl"
done
if [ "$rc" -eq 124 ]; then
    echo "budget of ${BUDGET:-540}s reached: the stopped run saved a checkpoint;" \
        "run the same command again (same machine) to resume"
fi
echo "compare exit $rc; in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
