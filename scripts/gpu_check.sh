#!/usr/bin/env bash
# One GPU check, sized for a few minutes on an H100/H200 without internet: build in place, the
# CUDA tests, the engine / kernel / fine-tuning benchmarks. Everything printed goes to log.txt;
# figures to JSON files. Results land in the folder given as $1, else $OUT, else ./results.
set -uo pipefail
out="${1:-${OUT:-results}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/log.txt"
status=0

step() {
  echo "== $* ($(date +%T))" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "== failed with exit code $rc: $*" | tee -a "$log"
    status=$rc
  fi
}

step python -m pip install --no-build-isolation --no-deps -e .
step python -c "from hift_rt.engine import build_info as b; i = b(); print(i); assert i['cuda_compiled'], 'built without the CUDA backend'"
step nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step python -m hift_rt info
step python -m pytest -m cuda -q -rs
# compute-sanitizer memcheck over the engine's CUDA tests, where it is installed (about a minute:
# one seed of the ~500k-chunk stress test; torch's caching allocator off so that memcheck sees
# every allocation's bounds).
if command -v compute-sanitizer >/dev/null 2>&1; then
  step env PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
    python -m pytest -m cuda -q tests/test_engine.py -k "not random_interleaved or cuda-0"
fi
step python -m hift_rt.bench engine --json "$out/engine.json"
step python -m hift_rt.bench kernels --json "$out/kernels.json"
step python -m hift_rt.bench finetune --preset 1b --json "$out/finetune_1b.json" --plot "$out/finetune_1b.png"
step python -m hift_rt.bench finetune --preset 7b --methods hift-bf16 --gradient-checkpointing --cycles 1 \
  --json "$out/finetune_7b.json"
exit "$status"
