// One 32-value chunk of a GGUF weight row, unpacked for `__dp4a`: each type's
// loader and its dot product with one q8a block of activations. A row of
// `cols` values has `cols / 32` chunks; a K-quant super-block holds eight.
#pragma once
#include "common.cuh"

// Eight ints of four 8-bit quants each (values 0..31 of the chunk in order)
// and the scales that turn their dot product into a value.
struct wchunk {
    int q[8];
    float s0;  // scale (Q6_K: of values 0..15)
    float s1;  // Q6_K: scale of values 16..31
    float m;   // Q4_1: minimum added; Q4_K: minimum subtracted
};

template <int T> static __device__ __forceinline__ int row_bytes(int cols) {
    if (T == T_Q4_0) return cols / 32 * Q4_0_BYTES;
    if (T == T_Q4_1) return cols / 32 * Q4_1_BYTES;
    if (T == T_Q8_0) return cols / 32 * Q8_0_BYTES;
    if (T == T_Q4_K) return cols / QK_K * Q4_K_BYTES;
    return cols / QK_K * Q6_K_BYTES;
}

// Q4_K's 6-bit scale and minimum of sub-block j (ggml's get_scale_min_k4).
static __device__ __forceinline__ void q4k_scale_min(int j, const uint8_t* q, int* sc, int* m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

template <int T> static __device__ __forceinline__ wchunk load_chunk(const uint8_t* row, int c) {
    wchunk w;
    w.s1 = 0.0f;
    w.m = 0.0f;
    if (T == T_Q4_0 || T == T_Q4_1) {
        const int bytes = T == T_Q4_0 ? Q4_0_BYTES : Q4_1_BYTES;
        const uint8_t* b = row + (size_t)c * bytes;
        w.s0 = f16_bits_to_f32(load_u16(b));
        if (T == T_Q4_1) w.m = f16_bits_to_f32(load_u16(b + 2));
        const uint8_t* qs = b + bytes - 16;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int v = T == T_Q4_0 ? load_i32_a2(qs + 4 * i) : load_i32_a4(qs + 4 * i);
            w.q[i] = v & 0x0F0F0F0F;             // values 4i..4i+3
            w.q[i + 4] = (v >> 4) & 0x0F0F0F0F;  // values 16+4i..
        }
    } else if (T == T_Q8_0) {
        const uint8_t* b = row + (size_t)c * Q8_0_BYTES;
        w.s0 = f16_bits_to_f32(load_u16(b));
#pragma unroll
        for (int i = 0; i < 8; i++) w.q[i] = load_i32_a2(b + 2 + 4 * i);
    } else if (T == T_Q4_K) {
        const uint8_t* b = row + (size_t)(c / 8) * Q4_K_BYTES;
        const int j = c % 8;  // sub-block: the low nibbles of 32 bytes, or their high ones
        int sc, m;
        q4k_scale_min(j, b + 4, &sc, &m);
        w.s0 = f16_bits_to_f32(load_u16(b)) * (float)sc;
        w.m = f16_bits_to_f32(load_u16(b + 2)) * (float)m;
        const uint8_t* qs = b + 16 + (j / 2) * 32;
        const int shift = (j % 2) * 4;
#pragma unroll
        for (int i = 0; i < 8; i++) w.q[i] = (load_i32_a4(qs + 4 * i) >> shift) & 0x0F0F0F0F;
    } else {  // T_Q6_K
        const uint8_t* b = row + (size_t)(c / 8) * Q6_K_BYTES;
        const int j = c % 8, n = j / 4, part = j % 4;
        // Values 32·part.. of the 128-value half n: low or high nibbles of
        // ql[64n + 32(part&1) ..], bits 2·part.. of qh[32n ..].
        const uint8_t* ql = b + 64 * n + 32 * (part & 1);
        const uint8_t* qh = b + 128 + 32 * n;
        const int8_t* scales = (const int8_t*)(b + 192) + 8 * n + 2 * part;
        const float d = f16_bits_to_f32(load_u16(b + 208));
        w.s0 = d * (float)scales[0];
        w.s1 = d * (float)scales[1];
        const int lshift = (part / 2) * 4, hshift = 2 * part;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int lo = (load_i32_a2(ql + 4 * i) >> lshift) & 0x0F0F0F0F;
            const int hi = ((load_i32_a2(qh + 4 * i) >> hshift) & 0x03030303) << 4;
            w.q[i] = lo | hi;  // 0..63; the offset 32 is applied in the dot product
        }
    }
    return w;
}

// Σ w·a over the chunk, in the value's units.
template <int T> static __device__ __forceinline__ float chunk_dot(const wchunk& w, const q8a& a) {
    const int* aq = (const int*)a.qs;
    if (T == T_Q6_K) {
        int d0 = 0, d1 = 0, a0 = 0, a1 = 0;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            d0 = __dp4a(w.q[i], aq[i], d0);
            a0 = __dp4a(0x01010101, aq[i], a0);
            d1 = __dp4a(w.q[i + 4], aq[i + 4], d1);
            a1 = __dp4a(0x01010101, aq[i + 4], a1);
        }
        return a.d * (w.s0 * (float)(d0 - 32 * a0) + w.s1 * (float)(d1 - 32 * a1));
    }
    int s = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) s = __dp4a(w.q[i], aq[i], s);
    if (T == T_Q4_0) return w.s0 * (a.d * (float)s - 8.0f * a.s);
    if (T == T_Q4_1) return w.s0 * a.d * (float)s + w.m * a.s;
    if (T == T_Q8_0) return w.s0 * a.d * (float)s;
    return w.s0 * a.d * (float)s - w.m * a.s;  // T_Q4_K
}

// Value k (0..31) of a loaded chunk.
template <int T> static __device__ __forceinline__ float chunk_value(const wchunk& w, int k) {
    const int byte = (w.q[k / 4] >> (8 * (k % 4))) & 0xFF;
    if (T == T_Q4_0) return w.s0 * (float)(byte - 8);
    if (T == T_Q4_1) return w.s0 * (float)byte + w.m;
    if (T == T_Q8_0) return w.s0 * (float)(int8_t)byte;
    if (T == T_Q4_K) return w.s0 * (float)byte - w.m;
    return (k < 16 ? w.s0 : w.s1) * (float)(byte - 32);  // T_Q6_K
}
