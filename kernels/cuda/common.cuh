// What every decode kernel shares: the activation block format, the GGUF
// weight blocks, warp reductions and f16 conversions.
//
// These sources compile two ways: by nvcc to PTX (the `cuda` feature's
// build.rs), and by the host C++ compiler against kernels/emu/emu.h, which
// runs a launch's threads as fibers so the unit tests run every kernel on a
// machine without a GPU. So they use only what emu.h provides: the CUDA
// built-ins below, no inline PTX, no intrinsics beyond `__dp4a`.
#pragma once

#ifdef SOLLOL_EMU
#include "../emu/emu.h"
#else
#include <cuda_fp16.h>
#include <stdint.h>
#endif

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu

// Activations quantized for the integer dot products: 32 values, their scale
// `d` (value = d · q) and `s` = d · Σq, which lets the offset or minimum of a
// weight block be applied once per block instead of per value (llama.cpp's
// q8_1 layout, with f32 scales). 40 bytes; `qs` is 4-byte aligned.
struct q8a {
    float d;
    float s;
    int8_t qs[32];
};

// GGUF weight blocks, byte for byte as the file stores them (ggml-common.h).
// Blocks are packed: a Q4_0, Q8_0 or Q6_K block's size is not a multiple of
// 4, so its quants are read with 16-bit loads (`load_i32_a2`).
#define QK4_0 32
#define Q4_0_BYTES 18  // f16 d; u8 qs[16]
#define Q4_1_BYTES 20  // f16 d, m; u8 qs[16]
#define Q8_0_BYTES 34  // f16 d; i8 qs[32]
#define QK_K 256
#define Q4_K_BYTES 144 // f16 d, dmin; u8 scales[12]; u8 qs[128]
#define Q6_K_BYTES 210 // u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d

// The weight types, in the numbering the host side passes (`DeviceType`).
#define T_Q4_0 0
#define T_Q4_1 1
#define T_Q8_0 2
#define T_Q4_K 3
#define T_Q6_K 4

// Gate functions of a gated MLP (`Gate` on the host).
#define GATE_SILU 0
#define GATE_GELU_TANH 1

// The most activation rows one mat-vec pass carries (its accumulators live in
// registers); larger batches are launched in groups of this many.
#define MAX_ROWS 8

static __device__ __forceinline__ float warp_sum(float v) {
    for (int m = WARP_SIZE / 2; m > 0; m >>= 1) v += __shfl_xor_sync(FULL_MASK, v, m);
    return v;
}

static __device__ __forceinline__ float warp_max(float v) {
    for (int m = WARP_SIZE / 2; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, m));
    return v;
}

static __device__ __forceinline__ float f16_bits_to_f32(uint16_t b) {
    return __half2float(__ushort_as_half(b));
}

static __device__ __forceinline__ uint16_t load_u16(const uint8_t* p) {
    return *(const uint16_t*)p;
}

// Four bytes at a 2-byte aligned address.
static __device__ __forceinline__ int load_i32_a2(const uint8_t* p) {
    const uint16_t* h = (const uint16_t*)p;
    return (int)((uint32_t)h[0] | ((uint32_t)h[1] << 16));
}

static __device__ __forceinline__ int load_i32_a4(const uint8_t* p) {
    return *(const int*)p;
}

// Sums a value over the block's threads (blockDim.x a multiple of 32, at most
// 1024); every thread gets the total. `scratch` holds 32 floats.
static __device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int warps = blockDim.x / WARP_SIZE;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Quantizes 32 values held one per lane of a warp into one q8a block (every
// lane must call it).
static __device__ __forceinline__ void quantize_lane_value(float v, q8a* out) {
    const int lane = threadIdx.x % WARP_SIZE;
    const float amax = warp_max(fabsf(v));
    const float d = amax / 127.0f;
    const int q = amax == 0.0f ? 0 : (int)roundf(v / d);
    const float sum = warp_sum((float)q);
    out->qs[lane] = (int8_t)q;
    if (lane == 0) {
        out->d = d;
        out->s = d * sum;
    }
}
