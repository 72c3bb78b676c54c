#!/usr/bin/env bash
# Lease, in the call that brings the last wheel piece (every piece in DIR, one call each: cp .carry/serve/wNN
# .carry/serve/serve-wheels.sha256 DIR/): join the pieces, check the tar, install the wheels into SITE, put the
# prompts at /tmp/keep/serve-prompts.jsonl (serve_run.sh's default) and check that this Python finds tritonserver,
# its python backend stub and tritonclient.
# usage: bash scripts/device_lease/serve_install.sh [DIR (/tmp/serve-carry)] [SITE (/tmp/site)]
# PIP_TARGET_FLAGS: extra `pip install` flags; here, to try the install on a Python other than 3.12:
#   --python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
set -euo pipefail
dir=${1:-/tmp/serve-carry}
site=${2:-/tmp/site}
cat "$dir"/w[0-9][0-9] > "$dir/serve-wheels.tar"
(cd "$dir" && sha256sum -c serve-wheels.sha256)
rm -rf "$dir/wheels" && tar -xf "$dir/serve-wheels.tar" -C "$dir" && rm "$dir/serve-wheels.tar"
mkdir -p /tmp/keep && cp "$dir/serve-prompts.jsonl" /tmp/keep/
# shellcheck disable=SC2086  # the flags are words
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
  ${PIP_TARGET_FLAGS:-} "$dir"/wheels/*.whl
echo "installed into $site:" $(ls "$site" | grep dist-info)
PYTHONPATH="$site:$(pwd)" python3 -c "
from jetspec_trt.export.server import find_tritonserver
found = find_tritonserver()
print('tritonserver', found.binary, 'stub', found.stub)"
if [ -z "${PIP_TARGET_FLAGS:-}" ]; then  # the client imports only where the wheels are this Python's
  PYTHONPATH="$site" python3 -c "import grpc, google.protobuf, tritonclient.grpc; print('tritonclient ok, grpcio',
grpc.__version__, 'protobuf', google.protobuf.__version__)"
fi
