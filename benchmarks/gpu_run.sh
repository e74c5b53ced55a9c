#!/usr/bin/env bash
# Everything the Triton backend needs on a CUDA machine, in one call: the `-m cuda` tests, all
# benchmarks, the plots, one compute-sanitizer memcheck run of the tests (last: the slowest).
# Results land in $WORK (default $OUT, default benchmarks/results/latest): results/*.csv,
# results/*.png, logs/*.log; $OUT/bundle.tgz holds both folders, refreshed after every stage so
# that a run cut short still returns what it finished.
#
#   benchmarks/gpu_run.sh                    # tests bench plot sanitizer
#   benchmarks/gpu_run.sh tests tune bench   # any subset (run in the order above); `tune`
#                                            # also sweeps our launch configs
#   benchmarks/gpu_run.sh auto               # the full "auto" table grid, installed
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/latest}
WORK=${WORK:-$OUT}
PY=${PYTHON:-python3}
STAGES=${*:-tests bench plot sanitizer}
export PYTHONUNBUFFERED=1
mkdir -p "$WORK/results" "$WORK/logs" "$OUT"
status=0

has() { [[ " $STAGES " == *" $1 "* ]]; }
bundle() { tar -czf "$OUT/bundle.tgz" -C "$WORK" results logs; }
stage() {  # stage NAME CMD...: run, log, time, remember failures
    local name=$1; shift
    local t0=$SECONDS
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$WORK/logs/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [[ $rc -ne 0 ]] && status=1
    bundle
    return 0
}

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu \
    --format=csv; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton',
    triton.__version__, 'cuda', torch.version.cuda)"; date -u; } > "$WORK/logs/environment.log" 2>&1
cat "$WORK/logs/environment.log"

if has tests; then
    # xdist spreads the Triton compiles over the CPUs; the kernel cache then serves the sanitizer.
    workers=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
    stage tests $PY -m pytest -m cuda tests/attn_ops/backends/triton -q $workers -p no:cacheprovider
fi
tune=""
has tune && tune="--tune"
if has bench; then
    stage bench_store $PY benchmarks/bench_store.py --out "$WORK/results"
    stage bench_overhead $PY benchmarks/bench_overhead.py --out "$WORK/results"
    stage bench_decode $PY benchmarks/bench_decode.py $tune --out "$WORK/results"
    stage bench_prefill $PY benchmarks/bench_prefill.py $tune --out "$WORK/results"
    stage bench_unified $PY benchmarks/bench_unified.py --out "$WORK/results"
elif has tune; then
    stage tune_decode $PY benchmarks/bench_decode.py --tune-only --out "$WORK/results"
    stage tune_prefill $PY benchmarks/bench_prefill.py --tune-only --out "$WORK/results"
fi
if has auto; then  # the full auto-table grid, installed into attn_ops/auto_table.json
    stage auto $PY benchmarks/bench_auto_table.py --out "$WORK/results"
fi
if has plot; then
    stage plot $PY benchmarks/plot.py --out "$WORK/results"
fi
if has sanitizer; then
    # No caching allocator: each tensor is its own cudaMalloc, so memcheck sees every overrun.
    # Graph capture, Inductor, sync-mode and profiler tests are left out (the profiler cannot run
    # beside the tool; the others are slow under it and launch the same kernels).
    stage sanitizer env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        --error-exitcode 99 $PY -m pytest -m cuda tests/attn_ops/backends/triton -q -x \
        -p no:cacheprovider -k "not graph and not inductor and not sync and not one_launch"
fi
exit $status
