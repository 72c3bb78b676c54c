#!/usr/bin/env bash
# Lease, once every GGUF piece is in /tmp/gguf (one call per piece: cp .carry/gguf/gNN /tmp/gguf/) and the engine
# bench has finished: copy the repo (with the head to continue) and start the pipeline detached.
# usage: bash scripts/device_lease/launch.sh GEN_S TRAIN_S PROMPT_OFFSET [LAYERS] [TEMPS] [BASELINE]
rm -rf /tmp/repo && mkdir -p /tmp/repo /tmp/w
tar --exclude=./.carry --exclude=./.whl -cf - . | tar -xf - -C /tmp/repo
cd /tmp/repo && sha256sum heads/qwen2.5-coder-0.5b-jetspec/model.safetensors && ls /tmp/gguf | tr '\n' ' ' && echo
PROMPT_OFFSET=$3 LAYERS="${4:-1}" TEMPS="${5:-0}" BASELINE="${6:-0}" TAG=head setsid bash scripts/device_head_pipeline.sh /tmp/w "$1" "$2" \
  > /tmp/w.log 2>&1 < /dev/null &
echo $! > /tmp/pipe.pid
sleep 2; cat /tmp/w.log
