#!/usr/bin/env bash
# Builds sollol with the `cuda` feature on a machine without a system CUDA
# install: NVIDIA's CUDA 13.0 toolkit pieces come from PyPI wheels into a
# local prefix, plus link-time shims (unversioned .so names and a libcuda
# stub; the real driver library is loaded at run time).
#
#   scripts/build-cuda.sh            # prefix: ~/.cache/sollol/cuda13
#   CUDA_PREFIX=/opt/cu13 scripts/build-cuda.sh
#
# Idempotent: wheels already installed and shims already made are kept.
# The binary is target/cuda/release/sollol. Run it with LD_LIBRARY_PATH pointing at a CUDA 13 runtime (the
# wheels' lib directory, or a PyTorch cu130 environment's nvidia/cu13/lib).
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX="${CUDA_PREFIX:-$HOME/.cache/sollol/cuda13}"
PIP="$PREFIX/pip"
CUDA_HOME="$PIP/nvidia/cu13"
# Pinned together: unpinned nvcc pulls a newer nvvm whose PTX a 13.0 driver refuses.
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
  nvidia-cuda-nvrtc==13.0.88
)

mkdir -p "$PIP"
if [ ! -x "$CUDA_HOME/bin/nvcc" ] || [ ! -f "$CUDA_HOME/lib/libcublas.so.13" ]; then
  echo "installing the CUDA 13.0 wheels into $PIP (about 675 MB)" >&2
  python3 -m pip install --quiet --no-deps --only-binary=:all: --target "$PIP" --upgrade "${WHEELS[@]}"
fi

# Link-time shims.
STUBS="$CUDA_HOME/lib/stubs"
mkdir -p "$STUBS"
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  target="$CUDA_HOME/lib/$lib"
  [ -f "$target" ] || { echo "missing $target after installing the wheels" >&2; exit 1; }
  ln -sf "../$lib" "$STUBS/${lib%%.so.*}.so"
done
if [ ! -f "$STUBS/libcuda.so" ]; then
  echo "building a libcuda.so link stub from cuda.h" >&2
  tmp="$(mktemp -d)"
  for flags in "" "-DCUDA_API_PER_THREAD_DEFAULT_STREAM=1"; do
    cc -E $flags -I "$CUDA_HOME/include" "$CUDA_HOME/include/cuda.h"
  done | grep -oE '\bcu[A-Za-z0-9_]+ *\(' | tr -d ' (' | sort -u \
    | awk '{ printf "int %s(void){return 999;}\n", $1 }' > "$tmp/stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUBS/libcuda.so" "$tmp/stub.c"
  rm -rf "$tmp"
fi

cat > "$PREFIX/env.sh" <<ENV
export CUDA_HOME="$CUDA_HOME" CUDA_PATH="$CUDA_HOME" CUDA_ROOT="$CUDA_HOME"
export PATH="$CUDA_HOME/bin:\$PATH"
export CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$CUDA_HOME/lib/stubs:$CUDA_HOME/lib"
ENV
# shellcheck disable=SC1091
source "$PREFIX/env.sh"
echo "building with CUDA_HOME=$CUDA_HOME, compute capability $CUDA_COMPUTE_CAP" >&2
# A target directory of its own, so the CPU build in target/ stays as it is.
cargo build --release -j "${JOBS:-2}" --features cuda --bins --target-dir target/cuda "$@"
echo "built target/cuda/release/sollol; at run time: export LD_LIBRARY_PATH=$CUDA_HOME/lib:\$LD_LIBRARY_PATH" >&2
# The library's unit tests with the feature: the device kernels' tests run
# on the GPU there (`kernels::device::tests::on_gpu`).
tests="$(cargo test --release -j "${JOBS:-2}" --features cuda --lib --no-run --target-dir target/cuda --message-format=json "$@" |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])' | tail -n 1)"
# What travels to a GPU machine: stripped and xz-packed (about 12 MB each;
# at most 64 MiB can be carried); scripts/gpu-check.sh unpacks them.
strip -o target/cuda/sollol.stripped target/cuda/release/sollol
xz -T0 -6 -c target/cuda/sollol.stripped >target/cuda/sollol.xz
strip -o target/cuda/sollol-tests.stripped "$tests"
xz -T0 -6 -c target/cuda/sollol-tests.stripped >target/cuda/sollol-tests.xz
ls -l target/cuda/sollol.xz target/cuda/sollol-tests.xz >&2
