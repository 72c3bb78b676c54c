#!/usr/bin/env bash
# Lease: the GPU serving run (issue 14 item 4) on one engine, in one call. Exports a Triton repository of ENGINE_DIR
# (DEVICE, in-flight batching of INFLIGHT sequences), starts `jetspec-trt serve` on it (the carried tritonserver:
# serve_install.sh first), runs the serving bench (bench --serve-url) at CLIENTS concurrent streaming clients
# within CAP_S seconds, stops the server, and copies the bench's JSON/PNG and console output and the server log's
# tail to $OUT. The bench rewrites its JSON after every pass, so a run cut at CAP_S keeps the passes it finished.
# usage: bash scripts/device_lease/serve_run.sh ENGINE_DIR [TAG (the engine dir's name)]
# Env: CLIENTS (1,4,16,64), NUM_PROMPTS (64), MAX_NEW (128), PROMPTS (/tmp/keep/serve-prompts.jsonl),
#   INFLIGHT (64), DEVICE (cuda), BASE_PORT (8000: HTTP; gRPC +1, metrics +2), READY_S (180), PASS_S (300),
#   CAP_S (530 s less the time the script has taken so far: with the server's stop (at most 45 s) the call stays
#   inside its 600 s)
# Exit status: the bench's (0; 2: a request failed or was lost, or a stream differs beyond a bf16 near tie: the
# JSON's "failures"; 124: cut at CAP_S), or 1 when the server did not start.
set -uo pipefail
engine=${1:?usage: serve_run.sh ENGINE_DIR [TAG]}
tag=${2:-$(basename "$engine")}
export PYTHONPATH=$(pwd):/tmp/site PYTHONUNBUFFERED=1
out=${OUT:-/tmp/serve-out}
port=${BASE_PORT:-8000}
repo=/tmp/serve-repo-$tag
log=/tmp/serve-$tag.log
results=/tmp/serve-results
mkdir -p "$out" "$results"
copy_out() { tail -c 2000000 "$log" > "$out/serve-$tag.log"; cp "$results"/serving-*-"$tag".* "$out"/ 2>/dev/null; }
python3 -m jetspec_trt.cli export triton "$engine" --output "$repo" --device "${DEVICE:-cuda}" \
  --inflight-batch "${INFLIGHT:-64}" --overwrite || exit 1
python3 -m jetspec_trt.cli serve "$repo" --address 127.0.0.1 --http-port "$port" --grpc-port $((port + 1)) \
  --metrics-port $((port + 2)) --ready-timeout "${READY_S:-180}" > "$log" 2>&1 < /dev/null &
serve=$!
start=$SECONDS
until grep -q "^serving " "$log"; do
  if ! kill -0 "$serve" 2>/dev/null || [ $((SECONDS - start)) -gt $((${READY_S:-180} + 30)) ]; then
    echo "=== serve did not become ready:"; tail -20 "$log"; kill -TERM "$serve" 2>/dev/null; copy_out; exit 1
  fi
  sleep 2
done
cap=${CAP_S:-$((530 - SECONDS))}
echo "=== $(date +%T) serve ready after $((SECONDS - start)) s; bench (cap $cap s)"
timeout "$cap" python3 -m jetspec_trt.cli bench --engine "$engine" --serve-url "127.0.0.1:$((port + 1))" \
  --metrics-url "http://127.0.0.1:$((port + 2))/metrics" --clients "${CLIENTS:-1,4,16,64}" \
  --num-prompts "${NUM_PROMPTS:-64}" --max-new-tokens "${MAX_NEW:-128}" \
  --prompts-file "${PROMPTS:-/tmp/keep/serve-prompts.jsonl}" --pass-timeout "${PASS_S:-300}" \
  --output-dir "$results" --tag "$tag" 2>&1 | tee "$out/serving-bench-$tag.txt"
rc=${PIPESTATUS[0]}
echo "=== $(date +%T) bench exit $rc; stopping serve"
kill -TERM "$serve"
for _ in $(seq 45); do kill -0 "$serve" 2>/dev/null || break; sleep 1; done
kill -0 "$serve" 2>/dev/null && { echo "=== serve did not stop in 45 s: killed (next run: another BASE_PORT)";
                                  kill -KILL "$serve"; }
wait "$serve"; echo "=== serve exit $?"
copy_out
ls -l "$out"
exit "$rc"
