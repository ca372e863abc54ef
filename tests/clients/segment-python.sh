#!/usr/bin/env bash
# A real client against the real service: Segment's official Python
# library (segment-analytics-python, gzip=True) posts to `cdp-host serve`,
# which delivers to `cdp-host sandbox`; every event must arrive.
# Usage: tests/clients/segment-python.sh [path/to/cdp-host]
set -euo pipefail
cd "$(dirname "$0")/../.."
host=${1:-target/debug/cdp-host}
events=20
python3 -c "import segment.analytics" 2>/dev/null || python3 -m pip install --quiet "segment-analytics-python==2.4.0"

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 300); do
    (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  return 1
}

sandbox_port=$(port)
serve_port=$(port)
"$host" sandbox --listen "127.0.0.1:$sandbox_port" --no-rate-limits > "$work/sandbox.log" 2>&1 &
pids+=($!)
wait_port "$sandbox_port"
KLAVIYO_API_KEY=pk_sandbox_demo CDP_HOST_CACHE_DIR="$work/cache" "$host" serve \
  --listen "127.0.0.1:$serve_port" --write-key wk_segment_python \
  --base-url "http://127.0.0.1:$sandbox_port" --spool "$work/spool.sqlite" > "$work/serve.log" 2>&1 &
pids+=($!)
wait_port "$serve_port"

python3 tests/clients/segment_python.py "http://127.0.0.1:$serve_port" wk_segment_python "$events"
for _ in $(seq 300); do
  accepted=$(python3 -c 'import json,sys,urllib.request; print(json.load(urllib.request.urlopen(sys.argv[1]))["accepted"])' \
    "http://127.0.0.1:$sandbox_port/sandbox/stats")
  [ "$accepted" -ge "$events" ] && break
  sleep 0.1
done
failed=$((events - accepted))
echo "segment-python client: $accepted passed, $failed failed"
[ "$failed" -eq 0 ]
