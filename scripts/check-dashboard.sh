#!/usr/bin/env bash
# The dashboard in headless Chromium: starts `sollol serve` over a 2-stage
# local pipeline, runs one generation, renders /dashboard (JavaScript and all),
# and checks that the DOM shows both nodes healthy (with the link each
# reports), the model's layer map, and
# the last minutes' charts (tok/s, each node's busy share and round trip, the
# model's hop latency) drawn from the head's samples.
# Leaves a screenshot in target/dashboard.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/sollol
chrome=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$chrome" ] || { echo "check-dashboard: no chromium (apt-get install chromium)"; exit 1; }

log=$(mktemp)
profile=$(mktemp -d)
"$bin" serve --listen 127.0.0.1:0 --local-nodes 2 >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$profile" "$log"' EXIT
for _ in $(seq 1 100); do grep -q "serving on" "$log" && break; sleep 0.1; done
addr=$(sed -n 's/^sollol serving on http:\/\///p' "$log")
[ -n "$addr" ] || { cat "$log"; echo "check-dashboard: the server did not start"; exit 1; }
curl -sf "http://$addr/api/generate" -d '{"model":"smollm2","prompt":"Hi","stream":false,"options":{"num_predict":2}}' >/dev/null
# A few samples (one every 2 s) before and after a longer generation.
sleep 3
curl -sf "http://$addr/api/generate" -d '{"model":"smollm2","prompt":"Once upon a time","stream":false,"options":{"num_predict":48}}' >/dev/null
sleep 5

flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking
       --disable-component-update --disable-sync --user-data-dir="$profile" --virtual-time-budget=5000)
dom=$(timeout 60 "$chrome" "${flags[@]}" --dump-dom "http://$addr/dashboard" 2>/dev/null)
timeout 60 "$chrome" "${flags[@]}" --window-size=1200,700 --screenshot="$PWD/target/dashboard.png" "http://$addr/dashboard" >/dev/null 2>&1 || true

fail=0
for want in '>local-1 0-14<' '>local-2 15-29<' 'smollm2 — 30 layers on local' '<td>loopback</td>'; do
  if grep -qF -- "$want" <<<"$dom"; then echo "ok   dashboard shows '$want'"; else echo "FAIL dashboard lacks '$want'"; fail=1; fi
done
plots=$(grep -o 'class="chart-plot"' <<<"$dom" | wc -l)
lines=$(grep -o '<polyline' <<<"$dom" | wc -l)
if [ "$plots" -eq 4 ] && [ "$lines" -ge 5 ]; then echo "ok   dashboard draws 4 charts with $lines lines"; else echo "FAIL dashboard draws $plots charts, $lines lines"; fail=1; fi
for want in 'local-1: ' 'smollm2: '; do
  if grep -qF -- "$want" <<<"$dom"; then echo "ok   a chart's key shows '$want'"; else echo "FAIL no chart key shows '$want'"; fail=1; fi
done
healthy=$(grep -o '<td class="up">healthy</td>' <<<"$dom" | wc -l)
if [ "$healthy" -eq 2 ]; then echo "ok   dashboard lists 2 healthy nodes"; else echo "FAIL dashboard lists $healthy healthy nodes"; fail=1; fi
exit $fail
