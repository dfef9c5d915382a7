#!/usr/bin/env bash
# A 4-stage pipeline in the network lab over three kinds of link, against
# the analytical model (`sollol plan --explain`): for each link, the
# prediction from the link's nominal rate and RTT, then one session's decode (`sollol generate --nodes`, the even
# plan the prediction uses) and 8 clients served (`sollol serve` over the
# 4 nodes, each offering 60 MB so the model needs several, + `sollol bench
# --url`), and between them the prediction over the links as timed then
# (node → node round the ring, `plan --explain --nodes`). Needs root (namespaces). The lab's hosts share this machine's
# cores (the nodes report the same cores): the prediction counts their stages
# taking turns (`--shared-cores`), and both it and the serving head pick the
# micro-batch count the model predicts fastest. With CPU=0.5 each node's host
# is held to that share of a core (hosts as separate, smaller machines; the
# prediction still assumes this machine's whole speed per stage).
#
# usage: [CPU=0.5] scripts/lab-network.sh [LINKS...]   (default: 1gbit:0.5 100mbit:5 50mbit:40)
set -euo pipefail
cd "$(dirname "$0")/.."
SOLLOL=${SOLLOL:-target/release/sollol}
LINKS=("$@")
[ ${#LINKS[@]} -gt 0 ] || LINKS=(1gbit:0.5 100mbit:5 50mbit:40)
KEY=lab-network-$$
CORES=--shared-cores
[ -z "${CPU:-}" ] || CORES=
MODEL=$("$SOLLOL" pull smollm2)
WORK=$(mktemp -d)
trap 'kill -INT ${LAB:-0} 2>/dev/null; wait ${LAB:-0} 2>/dev/null; rm -rf "$WORK"' EXIT
for link in "${LINKS[@]}"; do
  rate=${link%%:*}; rtt=${link##*:}
  echo "== 4 stages, links of $rate + $rtt ms RTT"
  "$SOLLOL" plan --model "$MODEL" --node a=60MB --node b=60MB --node c=60MB --node d=60MB --strategy even \
    --explain --rate "$rate" --rtt-ms "$rtt" --clients 8 $CORES 2>/dev/null | sed -n '/Predicted/,$p'
  "$SOLLOL" lab up --hosts 5 --head --rate "$rate" --rtt-ms "$rtt" ${CPU:+--cpu "$CPU"} --cluster-key "$KEY" --ttl-secs 600 \
    --node-args --memory-limit 60MB > "$WORK/lab.out" &
  LAB=$!
  for _ in $(seq 150); do grep -q "up for" "$WORK/lab.out" && break; sleep 0.2; done
  NS=$(grep -o 'ip netns exec [^ ]*' "$WORK/lab.out" | head -1 | awk '{print $4}')
  HEAD=$(sed -n 's/^host 1 (\([0-9.]*\)).*/\1/p' "$WORK/lab.out")
  NODES=$(grep -o 'node at [0-9.:]*' "$WORK/lab.out" | awk '{print $3}' | paste -sd,)
  run() { ip netns exec "$NS" env SOLLOL_REGISTRY="$WORK/registry.toml" SOLLOL_CLUSTER_KEY="$KEY" "$@"; }
  echo "-- one session (generate --nodes, 64 tokens, best of 3):"
  for _ in 1 2 3; do
    run "$SOLLOL" generate --nodes "$NODES" --model "$MODEL" -n 64 "Once upon a time" 2>&1 >/dev/null | grep -o 'decode [0-9.]* tok/s'
  done
  rm -f "$WORK/registry.toml"
  i=0
  for addr in ${NODES//,/ }; do i=$((i + 1)); run "$SOLLOL" nodes add "$addr" --name "n$i" > /dev/null; done
  echo "-- the prediction over the links as the head and the nodes time them now:"
  run "$SOLLOL" plan --model "$MODEL" --nodes n1,n2,n3,n4 --strategy even --explain --clients 8 \
    $CORES 2>/dev/null | sed -n '/Predicted/,$p'
  ip netns exec "$NS" env SOLLOL_REGISTRY="$WORK/registry.toml" SOLLOL_CLUSTER_KEY="$KEY" SOLLOL_LOG=sollol::head::pipeline=info \
    "$SOLLOL" serve --listen "$HEAD:11434" --parallel 8 > "$WORK/serve.out" 2>&1 &
  SERVE=$!
  for _ in $(seq 100); do grep -q "serving on" "$WORK/serve.out" && break; sleep 0.2; done
  echo "-- 8 clients served:"
  run "$SOLLOL" bench --url "http://$HEAD:11434" --clients 8 --requests 32 | tail -1
  echo "-- the head's micro-batch counts for new sessions, as they changed:"
  sed 's/\x1b\[[0-9;]*m//g' "$WORK/serve.out" | grep -o 'micro_batches=[0-9]* sessions=[0-9]*' | paste -sd' ' || true
  kill "$SERVE"; wait "$SERVE" 2>/dev/null || true
  kill -INT "$LAB"; wait "$LAB" 2>/dev/null || true
  LAB=
done
