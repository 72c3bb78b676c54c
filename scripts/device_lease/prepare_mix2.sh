#!/usr/bin/env bash
# Here (no GPU), after prepare_carry.sh made .carry/prompts-mix.jsonl.gz: the second training mix,
# .carry/prompts-mix2.jsonl.gz. Runs 3-10 answered the first mix's prompts 0-38767 (run 8 a second time); the
# rest of it (38800-49999 and 50064 on: 50000-50063 are scripts/probe_head.py's held-out prompts) goes in turns
# with math prompts (CHAMP's competition problems and mathgenerator's synthetic ones, in turns), so any prefix is
# half chat, half math: MATH-500 is the suite where the head falls short (issue 12), and the first mix has almost no
# math. Start it at PROMPT_OFFSET 0 with DATA=/tmp/keep/prompts-mix2.jsonl.gz. Run from the repo root with the venv.
set -euo pipefail
python - <<'PY'
import gzip, itertools, json
from jetspec_trt.datasets import load_prompt_messages

with gzip.open(".carry/prompts-mix.jsonl.gz", "rt", encoding="utf-8") as f:
    first = [json.loads(line)["messages"] for line in f]
chat = first[38800:50000] + first[50064:]
math = load_prompt_messages("mathgen,champ", len(chat))
mixed = [m for pair in itertools.zip_longest(chat, math) for m in pair if m is not None]
with gzip.open(".carry/prompts-mix2.jsonl.gz", "wt", encoding="utf-8") as f:
    for messages in mixed:
        f.write(json.dumps({"messages": messages}) + "\n")
print(len(mixed), "training prompts:", len(chat), "chat,", len(math), "math")
PY
