#!/usr/bin/env bash
# Everything only a GPU can show, in one run (a lent GPU's time is short): the GPU tests (compiled
# Triton kernels in bf16/fp16/fp32, DALI GPU decode), then every benchmark. Each step's output goes to
# benchmarks/results/ (and to $OUT when set, for a remote run); a failing step is reported and the
# rest still run; the exit status is the number of failed steps.
#
#   bash benchmarks/gpu_checks.sh            # after `make env TORCH_SPEC=` (the machine's CUDA torch)
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_checks_$(date -u +%Y%m%dT%H%M%SZ).log"
failed=0

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

unset TRITON_INTERPRET
step environment 60 "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
step kernel-and-decode-tests 900 "$PY" -m pytest tests/kernels tests/data/test_decode.py -q -ra
step resampler-bench 600 "$PY" benchmarks/resampler_bench.py
step loss-bench 600 "$PY" benchmarks/loss_bench.py
step data-bench 600 "$PY" benchmarks/data_bench.py
step train-bench-1b 900 "$PY" benchmarks/train_bench.py --config configs/bench_1b.yaml --steps 20 --warmup 5

if [ -n "${OUT:-}" ]; then
    cp "$RESULTS"/*.json "$RESULTS"/*.txt "$LOG" "$OUT"/ 2>/dev/null
fi
echo "$failed step(s) failed; log: $LOG"
exit "$failed"
