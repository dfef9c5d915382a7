#!/usr/bin/env bash
# Replicas in the network lab: 3 node hosts, each held to 0.6 of a core (a
# cgroup quota: three small machines that together fit a 2-core box), links
# of 1 Gbit/s + 0.5 ms RTT, and a head on a host of its own serving the
# default model with --replicas 3, then with --replicas 1 (the baseline: one
# node under the same cap); `sollol bench --url` with 24 clients each time.
# A node starts inside its cgroup and sizes its thread pool to its share
# (one thread, as a one-core machine would). Prints both tables and each
# copy's request count. Needs root (namespaces).
#
# usage: scripts/lab-replicas.sh [CLIENTS] [REQUESTS]
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${1:-24}
REQUESTS=${2:-96}
SOLLOL=${SOLLOL:-target/release/sollol}
KEY=lab-replicas-$$
WORK=$(mktemp -d)
"$SOLLOL" pull smollm2 > /dev/null
"$SOLLOL" lab up --hosts 4 --head --cpu ${CPU:-0.6} --rate 1gbit --rtt-ms 0.5 --cluster-key "$KEY" --ttl-secs 900 > "$WORK/lab.out" &
LAB=$!
trap 'kill -INT $LAB 2>/dev/null; wait $LAB 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do grep -q "up for" "$WORK/lab.out" && break; sleep 0.2; done
NS=$(grep -o 'ip netns exec [^ ]*' "$WORK/lab.out" | head -1 | awk '{print $4}')
HEAD=$(sed -n 's/^host 1 (\([0-9.]*\)).*/\1/p' "$WORK/lab.out")
in_head() { ip netns exec "$NS" env SOLLOL_REGISTRY="$WORK/registry.toml" SOLLOL_CLUSTER_KEY="$KEY" "$@"; }
i=0
for addr in $(grep -o 'node at [0-9.:]*' "$WORK/lab.out" | awk '{print $3}'); do
  i=$((i + 1)); in_head "$SOLLOL" nodes add "$addr" --name "n$i" > /dev/null
done
for replicas in 3 1; do
  # Not through the function: $! must be the server itself (ip and env exec it).
  ip netns exec "$NS" env SOLLOL_REGISTRY="$WORK/registry.toml" SOLLOL_CLUSTER_KEY="$KEY" \
    "$SOLLOL" serve --listen "$HEAD:11434" --replicas "$replicas" --parallel "$CLIENTS" --max-queue 256 > "$WORK/serve.out" 2>&1 &
  SERVE=$!
  for _ in $(seq 100); do grep -q "serving on" "$WORK/serve.out" && break; sleep 0.2; done
  echo "== --replicas $replicas, $CLIENTS clients, 3 nodes at ${CPU:-0.6} core each"
  in_head "$SOLLOL" bench --url "http://$HEAD:11434" --clients "$CLIENTS" --requests "$REQUESTS"
  in_head python3 -c "
import json, urllib.request
s = json.load(urllib.request.urlopen('http://$HEAD:11434/api/sollol/status'))
for m in s['models']:
    print('requests per copy:', ', '.join(f\"{r['route']['nodes'][0]['name']}: {r['served']}\" for r in m['replicas']))"
  kill "$SERVE"; wait "$SERVE" 2>/dev/null || true
done
