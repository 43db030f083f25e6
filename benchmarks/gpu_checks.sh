#!/usr/bin/env bash
# Everything only a GPU can show, in one run that fits a short GPU lease (budget: 9 minutes on one H100):
# the open work first (the loss benchmark with its profile), then the kernel tests compiled on the GPU
# (bf16/fp16/fp32) and the benchmarks, in priority order. Each
# step has its own timeout and writes its results as soon as it ends; the last lines are one summary
# table. Results: benchmarks/results/*_<gpu>.{json,txt} (gpu = h100, h200, ...), plus the log; with
# $OUT set (a remote run), the log and a tarball of this run's results are copied there as well.
#
#   make gpu-kit                          # on a CPU machine with internet: wheels the GPU machine lacks -> .whl/
#   bash benchmarks/gpu_checks.sh         # on the GPU machine: installs .whl/ + this tree into /tmp, then runs
#   bash benchmarks/gpu_checks.sh --dry-run   # anywhere: print the plan and the time budget, run nothing
#   bash benchmarks/gpu_checks.sh --only kernel-tests,loss-bench   # a subset (a rerun after a fix)
#
# No virtual environment is needed: the wheels in .whl/ (megatron-core, webdataset, Liger, Cut
# Cross-Entropy) go to $SITE with pip --no-index --target; PYTHONPATH holds this checkout and $SITE
# (kernels/ is linked as emu_mc/kernels for the run unless emu_mc is installed). PY (default python3)
# must have torch + triton.
set -u
cd "$(dirname "$0")/.."
DRY=0
ONLY=""
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --only) ONLY=",$2,"; shift ;;
        *) echo "usage: $0 [--dry-run] [--only STEP,STEP...]"; exit 2 ;;
    esac
    shift
done
PY=${PY:-python3}
SITE=${SITE:-/tmp/emu_mc_site}
RESULTS=benchmarks/results
BUDGET_S=540

# Kernel tests compile one Triton build per shape: spread them over processes where pytest-xdist is there.
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 12")

# name | timeout (s) | command, in priority order. {tag} becomes the GPU tag (h100, h200, ...).
STEPS=(
  "environment|10|nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda, torch.cuda.get_device_name())'"
  "loss-bench|75|$PY benchmarks/loss_bench.py --rows 4096 16384 --vocab 32000 --profile ours eager --out $RESULTS/loss_bench_{tag}.json"
  "kernel-tests|115|$PY -m pytest tests/kernels -q -ra -p no:cacheprovider -p no:benchmark $XDIST --durations=8 --junitxml=$RESULTS/kernel_tests_{tag}.xml"
  "generate-bench|40|$PY benchmarks/generate_bench.py --batch-sizes 1 --new-tokens 16 --reps 1 --out $RESULTS/generate_bench_{tag}.json"
  "decoder-bench|65|$PY benchmarks/decoder_bench.py --steps 4 --out $RESULTS/decoder_bench_{tag}.json"
  "resampler-bench|55|$PY benchmarks/resampler_bench.py --batch 1024 --out $RESULTS/resampler_bench_{tag}.json"
  "attention-bench|40|$PY benchmarks/attention_bench.py --out $RESULTS/attention_bench_{tag}.json"
  "train-bench-1b|110|$PY benchmarks/train_bench.py --config configs/bench_1b.yaml --steps 8 --warmup 3 --variants fused fused-local-attn --profile-step 6 --out $RESULTS/train_bench_{tag}.json"
  "resampler-tune|30|$PY benchmarks/resampler_tune.py --out $RESULTS/resampler_tune_bench_{tag}.json"
)

selected() { [ -z "$ONLY" ] || [[ $ONLY == *",$1,"* ]]; }
plan_total=0
for s in "${STEPS[@]}"; do
    selected "$(cut -d'|' -f1 <<<"$s")" && plan_total=$((plan_total + $(cut -d'|' -f2 <<<"$s")))
done
if [ "$DRY" = 1 ]; then
    printf '%-18s %8s  %s\n' step "limit s" command
    for s in "${STEPS[@]}"; do
        IFS='|' read -r name limit cmd <<<"$s"
        selected "$name" || continue
        script=$(grep -o 'benchmarks/[a-z_]*\.py' <<<"$cmd" | head -1)
        [ -n "$script" ] && [ ! -f "$script" ] && cmd="(skipped: $script does not exist yet)"
        printf '%-18s %8s  %s\n' "$name" "$limit" "$cmd"
    done
    echo "wheel kit: $(ls .whl/*.whl 2>/dev/null | wc -l) wheel(s) in .whl/ ($(du -sh .whl 2>/dev/null | cut -f1 || echo 0))"
    echo "total of step limits: ${plan_total} s (budget ${BUDGET_S} s; the kit install adds ~10 s)"
    [ "$plan_total" -le "$BUDGET_S" ] || { echo "over budget"; exit 1; }
    exit 0
fi

unset TRITON_INTERPRET
mkdir -p "$RESULTS" "$SITE"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || echo "warning: the wheel kit did not install"
fi
if [ ! -e emu_mc/kernels ] && ! "$PY" -c "import emu_mc.kernels" 2>/dev/null; then
    ln -s ../kernels emu_mc/kernels  # what setup.py's package-dir mapping does for an installed copy
    trap 'rm -f emu_mc/kernels' EXIT
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
TAG=$("$PY" -c "import re, torch; n = torch.cuda.get_device_name(); m = re.search(r'[A-Z]\d{2,3}', n); \
print((m.group(0) if m else re.sub(r'\W+', '_', n)).lower())" 2>/dev/null) || { echo "no CUDA device"; exit 1; }
LOG="$RESULTS/gpu_checks_${TAG}.log"
: >"$LOG"
SUMMARY=()
failed=0
start_all=$SECONDS

for s in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$s"
    selected "$name" || continue
    cmd=${cmd//\{tag\}/$TAG}
    script=$(grep -o 'benchmarks/[a-z_]*\.py' <<<"$cmd" | head -1)
    if [ -n "$script" ] && [ ! -f "$script" ]; then
        SUMMARY+=("$(printf '%-18s %-8s %6s %6s  %s' "$name" skipped - "$limit" "$script does not exist yet")")
        continue
    fi
    echo "=== $name (limit ${limit} s): $cmd" | tee -a "$LOG"
    t0=$SECONDS
    timeout -k 5 "$limit" bash -c "$cmd" 2>&1 | tee "$SITE/step.log"
    rc=${PIPESTATUS[0]}
    cat "$SITE/step.log" >>"$LOG"
    took=$((SECONDS - t0))
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status="exit $rc" ;; esac
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
    echo "=== $name: $status after ${took} s" | tee -a "$LOG"
    SUMMARY+=("$(printf '%-18s %-8s %6s %6s  %s' "$name" "$status" "$took" "$limit" "$(grep -v '^\s*$' "$SITE/step.log" | tail -n 1 | cut -c1-90)")")
    if [ -n "${OUT:-}" ]; then  # after every step, so a lease cut short still returns what ended
        cp "$LOG" "$OUT/" && tar -czf "$OUT/gpu_results_${TAG}.tar.gz" $RESULTS/*_"${TAG}"[._]* 2>/dev/null
    fi
done

{
    echo
    echo "GPU checks on $TAG, $(date -u +%Y-%m-%dT%H:%M:%SZ), ${failed} step(s) failed, $((SECONDS - start_all)) s in all"
    printf '%-18s %-8s %6s %6s\n' step status "took s" "limit"
    printf '%s\n' "${SUMMARY[@]}"
} | tee -a "$LOG"
[ -n "${OUT:-}" ] && cp "$LOG" "$OUT/" && tar -czf "$OUT/gpu_results_${TAG}.tar.gz" $RESULTS/*_"${TAG}"[._]* 2>/dev/null
exit "$failed"
