// The CUDA built-ins the kernels under kernels/cuda use, for the host: a
// launch runs each block's threads as fibers on one OS thread (emu.cpp), so
// `__syncthreads`, `__syncwarp` and the warp shuffles are real barriers and
// every kernel can be tested on a machine without a GPU. Device memory is
// host memory. What it cannot show: speed, and races between threads that
// a barrier does not order (the fibers switch only at barriers).
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// All threads of a block run on one OS thread, one block at a time.
#define __shared__ static thread_local

struct emu_dim3 {
    unsigned x, y, z;
};
extern thread_local emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

struct uint4 {
    unsigned x, y, z, w;
};

namespace emu {
void sync_block();
void sync_warp();
// Writes `size` bytes of `in` for this lane, waits for the warp, reads lane `src`'s into `out`.
void exchange(const void* in, void* out, std::size_t size, int src);
int lane();
}  // namespace emu

inline void __syncthreads() { emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::sync_warp(); }

template <class T> inline T __shfl_xor_sync(unsigned, T v, int mask) {
    T out;
    emu::exchange(&v, &out, sizeof(T), emu::lane() ^ mask);
    return out;
}

template <class T> inline T __shfl_sync(unsigned, T v, int src) {
    T out;
    emu::exchange(&v, &out, sizeof(T), src);
    return out;
}

inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; i++) c += (int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
    return c;
}

inline float __uint_as_float(uint32_t v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// IEEE half precision, converted as CUDA does (round to nearest even).
struct __half {
    uint16_t bits;
};

inline __half __ushort_as_half(uint16_t b) { return __half{b}; }
inline uint16_t __half_as_ushort(__half h) { return h.bits; }

inline float __half2float(__half h) {
    const uint32_t sign = (uint32_t)(h.bits & 0x8000) << 16;
    const uint32_t e = (h.bits >> 10) & 0x1f, m = h.bits & 0x3ff;
    uint32_t bits;
    if (e == 0) {
        const float f = std::ldexp((float)m, -24);  // zero or subnormal
        return sign ? -f : f;
    }
    bits = e == 31 ? sign | 0x7f800000 | (m << 13) : sign | ((e + 112) << 23) | (m << 13);
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline __half __float2half(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint16_t sign = (x >> 16) & 0x8000;
    const uint32_t ax = x & 0x7fffffff;
    if (ax >= 0x7f800000) return __half{(uint16_t)(sign | 0x7c00 | (ax > 0x7f800000 ? 0x200 : 0))};
    if (ax >= 0x47800000) return __half{(uint16_t)(sign | 0x7c00)};  // ≥ 65536: infinity
    if (ax < 0x38800000) {  // below the least normal half: a multiple of 2^-24
        float a;
        std::memcpy(&a, &ax, 4);
        return __half{(uint16_t)(sign | (uint32_t)std::nearbyint(a * 16777216.0f))};
    }
    uint32_t h = (((ax >> 23) - 112) << 10) | ((ax >> 13) & 0x3ff);
    const uint32_t rest = ax & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;  // a carry into the exponent is right, up to infinity
    return __half{(uint16_t)(sign | h)};
}
