#!/usr/bin/env bash
# The GPU checks in one run, on a machine with an NVIDIA GPU, its driver and
# a CUDA 13 runtime (a PyTorch cu130 environment has one); no model file is
# needed, every model is synthetic:
#   (0) the card, and its memory bandwidth measured with PyTorch (read-only
#       reduction and device-to-device copy);
#   (d) our device kernels (kernels/cuda): their unit tests on the GPU
#       against CPU references (the packed test binary beside BINARY), then
#       on them (SOLLOL_DEVICE_KERNELS=1): logits of random models against
#       the CPU, a 2-stage pipeline with the f32 wire, and prefill and
#       decode tok/s of a Llama-3-8B shape in Q4_0, Q4_K and f16, one
#       session and 8 batched, beside candle's Q4_0 and our Q4_0 without
#       CUDA graphs (SOLLOL_DEVICE_GRAPHS=0) in the same run.
# With GPU_CHECK_FULL=1, candle's path as measured before as well:
#   (a) logits of random models on the GPU vs the same binary on the CPU;
#   (b) a 2-stage pipeline whose two node processes share the one GPU vs
#       the single-process engine, f32 and f16 wire: same greedy tokens;
#   (c) prefill and decode tok/s of the 8B shape, Q4_K and f16.
#
#   scripts/gpu-check.sh [BINARY] [OUTDIR]
#
# BINARY is target/cuda/release/sollol (from scripts/build-cuda.sh) or the
# packed target/cuda/sollol.xz; every result goes to OUTDIR as JSON lines
# (results.jsonl), every command's output to OUTDIR/log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-target/cuda/release/sollol}"
OUTDIR="${2:-${OUT:-gpu-check}}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/log.txt"
RESULTS="$OUTDIR/results.jsonl"
: >"$LOG"
: >"$RESULTS"

unpack() { # unpack FILE.xz DEST: the executable, unpacked
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"
  chmod +x "$2"
}
if [[ "$BIN" == *.xz ]]; then
  TESTS="${BIN%/*}/sollol-tests.xz"
  unpack "$BIN" /tmp/sollol-cuda
  BIN=/tmp/sollol-cuda
  if [ -f "$TESTS" ]; then
    unpack "$TESTS" /tmp/sollol-cuda-tests
    TESTS=/tmp/sollol-cuda-tests
  fi
fi
TESTS="${GPU_CHECK_TESTS:-${TESTS:-}}"

# The CUDA 13 libraries the binary links (cudart, cublas, curand) from the
# Python environment's NVIDIA wheels; libcuda.so.1 comes from the driver.
SITE="$(python3 -c 'import site; print(site.getsitepackages()[0])')"
for lib in libcudart.so.13 libcublas.so.13 libcurand.so.10; do
  found="$(find "$SITE/nvidia" -name "$lib" -print -quit 2>/dev/null)"
  [ -n "$found" ] && LD_LIBRARY_PATH="$(dirname "$found"):${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH
export RUST_LOG=warn
# Overridable for a dry run of this script on a machine without a GPU.
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
BIG="${GPU_CHECK_BIG:-llama-8b}"
MID="${GPU_CHECK_MID:-llama-1b}"

step() { # step NAME TIMEOUT COMMAND...: runs it, logs it, keeps JSON lines
  local name="$1" limit="$2"
  shift 2
  echo "=== $name: $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUTDIR/step.out" 2>>"$LOG"
  local rc=$?
  cat "$OUTDIR/step.out" >>"$LOG"
  grep '^{' "$OUTDIR/step.out" | python3 -c '
import json, sys
for line in sys.stdin:
    v = json.loads(line); v["check"] = sys.argv[1]; print(json.dumps(v))' "$name" >>"$RESULTS"
  echo "=== $name: exit $rc in $((SECONDS - start)) s" | tee -a "$LOG"
  tail -n 3 "$OUTDIR/step.out"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
ldd "$BIN" | grep -E 'cuda|cublas|curand|not found' | tee -a "$LOG"

step bandwidth 120 python3 -c '
import json, time, torch
n = 4 << 30
x = torch.ones(n // 4, dtype=torch.float32, device="cuda")
y = torch.empty_like(x)
def timed(f, reps=20):
    for _ in range(3): f()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(reps): f()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / reps
read = n / timed(lambda: x.sum())
copy = 2 * n / timed(lambda: y.copy_(x))
print(json.dumps({"card": torch.cuda.get_device_name(0), "read_bytes_per_s": read, "copy_bytes_per_s": copy}))'

B=("$BIN" bench --json)

# (d) Our device kernels first: what no GPU has run before.
if [ -n "$TESTS" ] && [ -x "$TESTS" ]; then
  step kernel-tests 240 env SOLLOL_REQUIRE_GPU=1 "$TESTS" on_gpu --test-threads 1
else
  echo "=== kernel-tests: no test binary (build it with scripts/build-cuda.sh)" | tee -a "$LOG"
fi
K=(env SOLLOL_DEVICE_KERNELS=1)
for quant in q4_0 q4_k q6_k q8_0 f16; do
  step "kernels-logits-tiny-$quant" 120 "${K[@]}" "${B[@]}" --synthetic tiny --quant "$quant" --device "$DEVICE" --check-against cpu --prompt-tokens 64 --tokens 32
done
step kernels-pipeline-tiny-f32 150 "${K[@]}" "${B[@]}" --synthetic tiny --quant q4_0 --device "$DEVICE" --stages 0,2 --wire f32 --rounds 2 --tokens 64
# The same 8B shape on candle's ops and on ours, in this run.
step "speed-$BIG-q4_0" 240 "${B[@]}" --synthetic "$BIG" --quant q4_0 --device "$DEVICE" --prompt-tokens 512 --tokens 128 --rounds 2
for quant in q4_0 q4_k f16; do
  step "kernels-speed-$BIG-$quant" 240 "${K[@]}" "${B[@]}" --synthetic "$BIG" --quant "$quant" --device "$DEVICE" --prompt-tokens 512 --tokens 128 --rounds 2 --concurrency 1,8
done
# What the graphs give: the same kernels launched one by one.
step "kernels-nographs-speed-$BIG-q4_0" 240 "${K[@]}" SOLLOL_DEVICE_GRAPHS=0 "${B[@]}" --synthetic "$BIG" --quant q4_0 --device "$DEVICE" --prompt-tokens 512 --tokens 128 --rounds 2

# The candle path's checks, as measured before (GPU_CHECK_FULL=1).
if [ "${GPU_CHECK_FULL:-0}" = 1 ]; then
  # A node reports the device's memory for planning: registered, then a
  # memory_aware plan of a 70B model over it.
  export SOLLOL_REGISTRY="$OUTDIR/registry.toml"
  "$BIN" node --listen 127.0.0.1:7791 --device "$DEVICE" 2>>"$LOG" &
  NODE=$!
  sleep 3
  step node-memory 60 "$BIN" nodes add 127.0.0.1:7791 --name gpu
  step node-list 60 "$BIN" nodes list --json
  step node-plan 60 "$BIN" plan --model synthetic:llama-70b:q4_0 --nodes gpu --strategy memory_aware --json
  kill "$NODE"
  for quant in f32 f16 q8_0 q4_0 q4_k q6_k; do
    step "logits-tiny-$quant" 120 "${B[@]}" --synthetic tiny --quant "$quant" --device "$DEVICE" --check-against cpu --prompt-tokens 64 --tokens 32
  done
  step logits-smollm2-q4_0 120 "${B[@]}" --synthetic smollm2-135m --quant q4_0 --device "$DEVICE" --check-against cpu --prompt-tokens 64 --tokens 16
  for wire in f32 f16; do
    step "pipeline-tiny-$wire" 150 "${B[@]}" --synthetic tiny --quant q4_0 --device "$DEVICE" --stages 0,2 --wire "$wire" --rounds 2 --tokens 64
  done
  step "pipeline-$MID-f16" 200 "${B[@]}" --synthetic "$MID" --quant q4_0 --device "$DEVICE" --stages 0,2 --wire f16 --rounds 2 --tokens 64
  step "speed-$BIG-q4_k" 240 "${B[@]}" --synthetic "$BIG" --quant q4_k --device "$DEVICE" --prompt-tokens 512 --tokens 128 --rounds 2
  step "speed-$BIG-f16" 240 "${B[@]}" --synthetic "$BIG" --quant f16 --device "$DEVICE" --prompt-tokens 512 --tokens 128 --rounds 2
fi

# The fraction of the memory-bandwidth floor each decode reached.
python3 - "$RESULTS" <<'PY' | tee -a "$LOG" "$OUTDIR/summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
bw = max([r.get("read_bytes_per_s", 0) for r in rows] + [r.get("copy_bytes_per_s", 0) for r in rows])
for r in rows:
    if "against" in r:
        print(f'{r["check"]} ({"/".join(r.get("backends", []))}): max rel err {r["max_rel_err"]:.3e}, max abs err {r["max_abs_err"]:.3e}, top token {r["top_token_agreement"]}/{r["steps"]} (margin where not: {r["max_disagreement_margin"]:.3e})')
    for res in r.get("results", []):
        line = f'{r["check"]} stages={res["stages"]}: prefill {res["prefill_tok_s"]:.1f} tok/s, decode {res["decode_tok_s"]:.1f} tok/s, tokens mismatch at {res["first_token_mismatch"]}'
        if bw and r.get("weight_bytes_per_token"):
            floor = bw / r["weight_bytes_per_token"]
            line += f', floor {floor:.0f} tok/s at {bw / 1e12:.2f} TB/s -> {res["decode_tok_s"] / floor:.1%} of it'
        print(line)
    if "sessions" in r:
        print(f'{r["check"]}: {r["sessions"]} sessions batched: {r["aggregate_decode_tok_s"]:.1f} tok/s aggregate, {r["ratio"]:.2f}x one session')
PY
