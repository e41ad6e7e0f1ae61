#!/usr/bin/env bash
# The GPU checks of issues 8 and 19 in one go, in at most 8 minutes:
#   1. tests/test_gpu.py (marked gpu: each method on CUDA with amp + channels_last + compile, compiled = eager,
#      fused = reference, device pipeline = CPU pipeline, GPU share caps memory, 1-worker Ray Train on NCCL);
#   2. bench/step_counts.py --device cuda: ATen calls, host reads per step and epoch, graphs of the captured step;
#   3. bench/gpu_search.py: reference vs fused vs compiled/captured at batch 64/256 and the 50-epoch estimate;
#   4. bench/gpu_pack.py: aggregate throughput of 1, 2, 4, 8 searches packed on the GPU.
# The suite exits non-zero when any stage fails, and names the stages that did.
# Tables go to OUTDIR (summary.md collects them). Without CUDA the tests skip, and the two benchmarks run a CPU
# smoke test that proves the scripts work (marked as such: not GPU figures).
#
#   bench/gpu_suite.sh OUTDIR            (PYTHON=/path/to/python to pick the interpreter)
set -u
OUT=${1:?usage: bench/gpu_suite.sh OUTDIR}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BUDGET=${GPU_SUITE_BUDGET_S:-470}  # seconds for the three stages together (8 minutes with start-up)
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
stage() {  # stage NAME SECONDS COMMAND...: run with a hard time limit, log to OUTDIR/NAME.log
  local name=$1 limit=$2; shift 2
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  if [ "$limit" -le 5 ]; then echo "== $name: skipped, the suite's $BUDGET s are spent" | tee "$OUT/$name.log"; return; fi
  echo "== $name (at most ${limit} s)"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/$name.log"
  [ "$rc" -ne 0 ] && FAILED+=("$name (exit $rc)")
  return 0
}
FAILED=()

CUDA=$($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>/dev/null)
{
  echo "# GPU suite ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "- Device: ${CUDA:-none (CPU only)}; torch $($PY -c 'import torch; print(torch.__version__)')"
  echo "- Command: bench/gpu_suite.sh $OUT"
} > "$OUT/summary.md"

# -n 0: one process (the suite's two xdist workers would only add a start-up here)
stage tests 170 "$PY" -m pytest tests/test_gpu.py -m gpu -q -rs -p no:cacheprovider --timeout 160 -n 0
if [ -n "$CUDA" ]; then
  stage counts 90 "$PY" bench/step_counts.py --device cuda
  stage search 200 "$PY" bench/gpu_search.py --out "$OUT" --timeout 120 --variants reference fused fused+captured
  stage pack 95 "$PY" bench/gpu_pack.py --out "$OUT" --seconds 8 --timeout 60
else
  echo "no CUDA device: skipped the CUDA counts and GPU benchmarks; CPU smoke runs of the benchmark scripts follow (not GPU figures)"
  stage search 200 "$PY" bench/gpu_search.py --out "$OUT" --smoke --allow-cpu --timeout 120
  stage pack 150 "$PY" bench/gpu_pack.py --out "$OUT" --smoke --allow-cpu --timeout 70
fi

{
  echo
  echo "## Tests"
  echo
  echo '```'
  tail -n 15 "$OUT/tests.log"
  echo '```'
  if [ -f "$OUT/counts.log" ]; then echo; echo "## step counts (CUDA)"; echo; grep '^|' "$OUT/counts.log"; fi
  for t in gpu_search gpu_pack; do
    echo
    echo "## ${t}"
    echo
    if [ -f "$OUT/$t.md" ]; then cat "$OUT/$t.md"; else echo "(no table: see ${t#gpu_}.log)"; fi
  done
  echo
  echo "Total: $(( $(date +%s) - START )) s"
} >> "$OUT/summary.md"
if ((${#FAILED[@]})); then
  printf '\nFAILED stages: %s\n' "${FAILED[*]}" | tee -a "$OUT/summary.md"
fi
cat "$OUT/summary.md"
((${#FAILED[@]} == 0))
