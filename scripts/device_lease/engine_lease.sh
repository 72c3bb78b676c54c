#!/usr/bin/env bash
# The engine lease (issues 15 and 16: the Qwen3-8B shape, random weights; no carry beyond the tree).
#   bash scripts/device_lease/engine_lease.sh tests   # call 1: the engine bench's GPU test, the kernels' GPU tests
#                                                     # (~7 min in all, in the call), then, if the bench's test
#   bash scripts/device_lease/engine_lease.sh benches # passed, the benches detached (this mode; /tmp/engine-lease.log)
#   bash scripts/device_lease/engine_lease.sh poll S  # later calls: wait up to S s for the benches, copy results to $OUT
# Benches, in the order their numbers matter (a lease cut short keeps the finished files, each written at once):
#   1. contexts 512..8192 in an engine built for 32 K, bf16 then FP8 (the build's default recipe) in the same
#      process, every comparison on (the defaults' AR step with the gated down GEMV and with PDL launches, bf16
#      small-M rows at 8B, the FP8 defaults' rounds on the FP8 skinny GEMM), HF generate last (issues 15 and 16;
#      lease 15 ran context 32768 too, and context 512 in a 704-token engine; lease 16 ran pdl_probe.py)
#   2. the Qwen3-8B shape batched, AR against speculative (issue 14 item 5; 12-15 minutes, silent until its end)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site  # /tmp/site: the carried wheels (modelopt for the FP8 tests)
RES=/tmp/res LOG=/tmp/engine-lease.log
case "${1:-}" in
tests)
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
  # .whl carried (the head moved aside for room): nvidia-modelopt and its needs, which the FP8 tests' pair uses
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  mkdir -p "$RES"
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/bench/test_engine_bench_gpu.py 2>&1 | tail -15
  ok=${PIPESTATUS[0]}
  # The kernels' own tests, before the benches (never beside a timing): what landed after lease 16 first (the
  # gated GEMV and PDL launches in a graphed step, the attention's fused merge, sampled batch generation), then
  # the kernels' CUDA twins
  timeout "${TEST_S:-200}" python3 -m pytest -q -p no:cacheprovider tests/plugins/test_gemv.py \
    tests/plugins/test_triton_tree_attention.py::test_fused_merge_on_cuda \
    tests/runtime/test_batch_decode_gpu.py tests/plugins/test_layer_kernels.py tests/plugins/test_skinny_gemm.py \
    tests/runtime/test_context_scaling_gpu.py tests/plugins/test_triton_tree_build.py \
    -k "variants or gated or replay or cuda or context or matches_reference" 2>&1 | tail -25
  if [ "$ok" = 0 ]; then setsid bash "$0" benches < /dev/null > /dev/null 2>&1 & echo "benches started"
  else echo "engine bench test failed ($ok): benches not started"; fi
  ;;
benches)
  jt() { echo "=== $(date +%T) jetspec-trt $*"; python3 -m jetspec_trt "$@" --output-dir "$RES"; echo "=== exit $?"; }
  {
    jt bench --random-target qwen3-8b --budgets 16,64,256 --contexts 512,2048,8192 --max-seq-len 32960 \
      --fp8 --reps 10 --tag 32k-fp8-all
    jt bench --random-target qwen3-8b --batch 1,4,16,64 --budgets 16 --max-new-tokens 128 --tag 8b
    echo "=== done"
  } > "$LOG" 2>&1
  ;;
poll)
  end=$((SECONDS + ${2:-0}))
  while [ $SECONDS -lt $end ] && ! grep -q "^=== done" "$LOG" 2>/dev/null; do sleep 5; done
  date +%T; grep "^===" "$LOG"; tail -c 1500 "$LOG" | tr '\r' '\n' | tail -6
  mkdir -p "$OUT/r" && cp "$RES"/* "$OUT/r/" 2>/dev/null; cp "$LOG" "$OUT/" 2>/dev/null; ls "$OUT/r"
  ;;
*) echo "usage: $0 tests|benches|poll SECONDS" >&2; exit 2 ;;
esac
