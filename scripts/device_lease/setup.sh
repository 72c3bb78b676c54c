#!/usr/bin/env bash
# Lease call 1 (carry .carry/prompts-mix.jsonl.gz, .carry/bench-prompts.jsonl, .whl): inputs to the fixed paths the
# pipeline reads, wheels into /tmp/site, a copy of the repo in /tmp/prepo, and what is quick on an idle GPU: the
# batched-generator kernel test, then (detached) the 0.5B-shape engine bench while the GGUF travels and converts.
# Long GPU test runs do not belong beside a training (2026-12-04: cut off at 900 s, one OOM): run them after the
# pipeline's benches, or in a lease of their own.
export PYTHONUNBUFFERED=1
mkdir -p /tmp/keep /tmp/gguf /tmp/site
cp .carry/prompts-mix.jsonl.gz .carry/bench-prompts.jsonl /tmp/keep/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
rm -rf /tmp/prepo && mkdir -p /tmp/prepo && tar --exclude=./.carry --exclude=./.whl -cf - . | tar -xf - -C /tmp/prepo
cp scripts/device_lease/*.sh /tmp/
cd /tmp/prepo && export PYTHONPATH=/tmp/prepo:/tmp/site
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
timeout 150 python3 -m pytest -q -x tests/plugins/test_triton_batch_attention.py 2>&1 | tail -2
setsid bash -c 'python3 -m jetspec_trt.cli bench --random-target qwen2.5-0.5b --budgets 16,64,256 --contexts 512 \
  --no-hf --reps 20 --output-dir /tmp/eng --tag 05b-h200 > /tmp/engbench.log 2>&1' < /dev/null > /dev/null 2>&1 &
echo "engine bench started"
