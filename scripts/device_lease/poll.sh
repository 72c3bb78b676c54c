#!/usr/bin/env bash
# Lease: wait up to $1 s or until file $2 exists (or the pipeline ends), then report. usage: poll.sh SECONDS [FILE]
end=$((SECONDS + $1))
while [ $SECONDS -lt $end ]; do
  kill -0 "$(cat /tmp/pipe.pid 2>/dev/null)" 2>/dev/null || { echo "pipeline not running"; break; }
  [ -n "${2:-}" ] && [ -e "$2" ] && { echo "found $2"; break; }
  sleep 5
done
date +%T; grep "^===" /tmp/w.log | tail -4; tail -2 /tmp/w.log | cut -c1-300
for f in /tmp/w/train-*.log; do [ -f "$f" ] && { echo "-- $f"; tail -c 600 "$f" | tr '\r' '\n' | tail -3; }; done
[ -f /tmp/gputests.log ] && { echo "-- gpu tests"; grep -E "passed|failed|error|===" /tmp/gputests.log | tail -4; }
