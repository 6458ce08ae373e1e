#!/usr/bin/env bash
# The GPU check, for one H100/H200 without internet, sized to finish in under 9 minutes: every step
# has a time budget (`timeout`), the most important first. Writes at most 8 files to the folder
# given as $1, else $OUT, else ./results:
#   log.txt            everything printed (tests, tables, figures)
#   engine.json        transfer engine: bandwidth, swap, overlap, a small copy's host time beside a swap
#   kernels.json       update kernels (every state format) and grad norm against copy bandwidth and torch
#   finetune_1b.json   1.35 B Llama: full, hift-bf16 (offload) and hift-nooffload in interleaved rounds,
#   finetune_1b.png      timed as a training loop runs (no per-step synchronize); host time per call
#   finetune_7b.json   Llama-2-7B shape, grad. checkpointing: the default state window against the
#                        whole-group slot, and int8 + kahan state at that window
#   finetune_8b.json   Llama-3-8B shape with the efficient LM loss: memory (wrap included), wrap time
#   finetune_1b_compile.json  1.35 B: full-bf16 against hift-bf16, both through hift_rt.compile
#                        (inductor): step time, compile time, graphs compiled after the warm-up
set -uo pipefail
out="${1:-${OUT:-results}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/log.txt"
status=0

step() {  # step SECONDS command...: run it under a time budget, log everything, remember failures
  local budget=$1
  shift
  echo "== $* (budget ${budget}s, $(date +%T))" | tee -a "$log"
  timeout "$budget" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "== failed with exit code $rc$([ "$rc" -eq 124 ] && echo ' (over its time budget)'): $*" | tee -a "$log"
    status=$rc
  fi
}

step 60 python -m pip install --no-build-isolation --no-deps -e .
step 10 python -c "from hift_rt.engine import build_info as b; i = b(); print(i); assert i['cuda_compiled'], 'built without the CUDA backend'"
step 5 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step 10 python -m hift_rt info
# The CUDA tests: engine (the two that crashed on an H200 at 2766244 included), runtime, NCCL with
# one rank, the efficient loss, then the kernels (many compiled variants: last, so a slow compile
# cannot starve the rest).
step 130 python -m pytest -m cuda -q -rs tests/test_engine.py tests/test_runtime_cuda.py tests/test_distributed.py \
  tests/test_linear_cross_entropy.py tests/test_compile.py tests/test_kernels.py tests/test_kernels_compact.py
step 25 python -m hift_rt.bench engine --json "$out/engine.json"
step 40 python -m hift_rt.bench kernels --json "$out/kernels.json"
step 55 python -m hift_rt.bench finetune --preset 1b --methods full,hift-bf16,hift-nooffload --rounds 2 \
  --cycles 1 --json "$out/finetune_1b.json" --plot "$out/finetune_1b.png"
step 65 python -m hift_rt.bench finetune --preset 7b --methods hift-bf16,hift-bf16-slot,hift-bf16-int8-kahan \
  --gradient-checkpointing --cycles 1 --json "$out/finetune_7b.json"
step 45 python -m hift_rt.bench finetune --preset 8b --methods hift-bf16 --gradient-checkpointing --cycles 1 \
  --json "$out/finetune_8b.json"
step 70 python -m hift_rt.bench finetune --preset 1b --methods full-bf16,hift-bf16 --compile --cycles 1 \
  --json "$out/finetune_1b_compile.json"
# compute-sanitizer memcheck over the engine's CUDA tests and a short runtime test, where it is
# installed: one seed of the ~500k-chunk stress test; torch's caching allocator off so that
# memcheck sees every allocation. The budgets add up to 555 s.
if command -v compute-sanitizer >/dev/null 2>&1; then
  step 40 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
    python -m pytest -m cuda -q tests/test_engine.py tests/test_runtime_cuda.py \
    -k "(not random_interleaved or cuda-0) and not memory_is and not wrap_reserves and not matches_reference"
fi
exit "$status"
