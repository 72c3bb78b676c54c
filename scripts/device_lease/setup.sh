#!/usr/bin/env bash
# Lease call 1 (carry .carry/prompts-mix.jsonl.gz or .carry/prompts-mix2.jsonl.gz, .carry/bench-prompts.jsonl, .whl):
# inputs to the fixed paths the pipeline reads, wheels into /tmp/site, a copy of the repo in /tmp/prepo, and what
# is quick on an idle GPU: the GPU tests named by GPU_TESTS (detached, at most 170 s) while the GGUF travels and
# converts.
# Long GPU test runs do not belong beside a training (2026-12-04: cut off at 900 s, one OOM): run them after the
# pipeline's benches, or in a lease of their own.
export PYTHONUNBUFFERED=1
mkdir -p /tmp/keep /tmp/gguf /tmp/site
cp .carry/bench-prompts.jsonl /tmp/keep/
cp .carry/prompts-mix*.jsonl.gz /tmp/keep/  # whichever mixes were carried
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
rm -rf /tmp/prepo && mkdir -p /tmp/prepo && tar --exclude=./.carry --exclude=./.whl -cf - . | tar -xf - -C /tmp/prepo
cp scripts/device_lease/*.sh /tmp/
cd /tmp/prepo && export PYTHONPATH=/tmp/prepo:/tmp/site
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
# The idle window (GGUF pieces travel, then convert on the CPU) holds the GPU tests of what changed since the
# last lease, detached and capped so they end before the pipeline generates: poll.sh shows their summary line.
setsid bash -c "timeout 170 python3 -m pytest -q -p no:cacheprovider ${GPU_TESTS:-tests/runtime/test_graph_sampling_gpu.py \
  tests/runtime/test_graph_decoder_gpu.py tests/train/test_features_gpu.py} > /tmp/gputests.log 2>&1; \
  echo \"=== gpu tests exit \$?\" >> /tmp/gputests.log" < /dev/null > /dev/null 2>&1 &
echo "gpu tests started"
