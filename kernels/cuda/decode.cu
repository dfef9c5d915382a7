// The decode step's kernels: what a block of a llama-family model (and
// qwen, gemma) needs per token, fused where that saves a pass over memory.
//
//   rmsnorm        x → norm(x)·w (+ residual), written as f32 and/or as the
//                  q8a blocks the next quantized product reads
//   quantize_q8    f32 rows → q8a blocks
//   matvec_<t>     y = W·x (+ residual) for up to MAX_ROWS activation rows,
//                  each weight read once: Q4_0, Q4_1, Q8_0, Q4_K, Q6_K (q8a
//                  activations, int8 dot products) and F16 (f32 activations)
//   glu_<t>        y = f(W_gate·x) ⊙ (W_up·x), both products in one pass
//   get_rows_<t>   embedding rows of token ids, dequantized and scaled
//   rope_kv        per-head q/k norms, rotary positions, and the cache write
//                  of k and v (f16, position-major) for each row's session
//   attn_split     decode attention over one stretch of the context
//                  (flash-decoding), attn_combine merges the stretches
//
// Shapes and launch geometry are chosen on the host (src/kernels/device.rs),
// which checks what each kernel assumes (noted per kernel).
#include "quant.cuh"

static __device__ __forceinline__ uint16_t f32_to_f16_bits(float v) {
    return __half_as_ushort(__float2half(v));
}

// n f32 values as f16 (a GEMM's activations).
extern "C" __global__ void f32_to_f16(const float* __restrict__ x, uint16_t* __restrict__ y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) y[i] = f32_to_f16_bits(x[i]);
}

// --- norms and activation quantization -------------------------------------

// grid.x = rows, blockDim.x a multiple of 32; n % 32 == 0. `y` may be `x` or
// `residual` (each element is read and written by one thread).
extern "C" __global__ void rmsnorm(const float* x, const float* w, const float* residual, float* y, q8a* yq, int n,
                                   float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const float* xr = x + row * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    const float r = rsqrtf(ss / (float)n + eps);
    // Whole warps take 32 consecutive values, one q8a block.
    for (int base = 0; base < n; base += blockDim.x) {
        const int i = base + threadIdx.x;
        if (i >= n) break;  // the same for a whole warp
        float v = xr[i] * r;
        if (w) v *= w[i];
        if (residual) v += residual[row * n + i];
        if (y) y[row * n + i] = v;
        if (yq) quantize_lane_value(v, yq + (row * n + i) / 32);
    }
}

// One warp per q8a block; `blocks` blocks of 32 values.
extern "C" __global__ void quantize_q8(const float* __restrict__ x, q8a* __restrict__ y, int blocks) {
    const int b = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (b >= blocks) return;
    quantize_lane_value(x[(size_t)b * 32 + threadIdx.x % WARP_SIZE], y + b);
}

// --- element-wise ops on rows ----------------------------------------------

#define OP_ADD 0       // y = a + b
#define OP_SCALE 1     // y = a · s
#define OP_SILU_MUL 2  // y = silu(a) · b
#define OP_GELU_MUL 3  // y = gelu_tanh(a) · b
#define OP_GELU 4      // y = gelu_tanh(a)
#define OP_ZERO 5      // y = 0

static __device__ __forceinline__ float gate_fn(float g, int gate);

// n values; `y` may be `a` or `b`.
extern "C" __global__ void rows_op(const float* a, const float* b, float* y, int n, int op, float s) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        if (op == OP_ZERO) {
            y[i] = 0.0f;
            continue;
        }
        const float x = a[i];
        float v;
        if (op == OP_ADD) v = x + b[i];
        else if (op == OP_SCALE) v = x * s;
        else if (op == OP_SILU_MUL) v = gate_fn(x, GATE_SILU) * b[i];
        else if (op == OP_GELU_MUL) v = gate_fn(x, GATE_GELU_TANH) * b[i];
        else v = gate_fn(x, GATE_GELU_TANH);
        y[i] = v;
    }
}

// grid.x = n: row i of `dst` is row idx[i] of `src`, rows of `words` 32-bit words.
extern "C" __global__ void gather_rows(const uint32_t* __restrict__ src, const int* __restrict__ idx,
                                       uint32_t* __restrict__ dst, int words) {
    const uint32_t* s = src + (size_t)idx[blockIdx.x] * words;
    uint32_t* d = dst + (size_t)blockIdx.x * words;
    for (int i = threadIdx.x; i < words; i += blockDim.x) d[i] = s[i];
}

// grid.x = n: y[idx[i]] += w[i] · src[i], rows of `width`. The rows of one
// launch are distinct; launches in turn add in their order.
extern "C" __global__ void scatter_add(float* __restrict__ y, const float* __restrict__ src, const int* __restrict__ idx,
                                       const float* __restrict__ w, int width) {
    float* d = y + (size_t)idx[blockIdx.x] * width;
    const float* s = src + (size_t)blockIdx.x * width;
    const float wi = w[blockIdx.x];
    for (int i = threadIdx.x; i < width; i += blockDim.x) d[i] += wi * s[i];
}

// --- mat-vec products -------------------------------------------------------

static __device__ __forceinline__ float gate_fn(float g, int gate) {
    if (gate == GATE_SILU) return g / (1.0f + expf(-g));
    return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
}

// Each lane's partial sums of one or two weight rows against `nb` activation
// rows (`chunks` q8a blocks each): every weight chunk is loaded once.
template <int T, int NW>
static __device__ __forceinline__ void q_row_dots(const uint8_t* w0, const uint8_t* w1, const q8a* x, int chunks,
                                                  int nb, float acc[NW][MAX_ROWS]) {
    for (int c = threadIdx.x % WARP_SIZE; c < chunks; c += WARP_SIZE) {
        const wchunk a = load_chunk<T>(w0, c);
        wchunk b;
        if (NW == 2) b = load_chunk<T>(w1, c);
#pragma unroll
        for (int r = 0; r < MAX_ROWS; r++) {
            if (r < nb) {
                const q8a& xa = x[(size_t)r * chunks + c];
                acc[0][r] += chunk_dot<T>(a, xa);
                if (NW == 2) acc[NW - 1][r] += chunk_dot<T>(b, xa);
            }
        }
    }
}

// Eight float weights at `p` (16-byte aligned): f16 or f32.
static __device__ __forceinline__ void load8(const uint16_t* p, float w[8]) {
    const uint4 r = *(const uint4*)p;
    const uint32_t v[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        w[2 * i] = f16_bits_to_f32((uint16_t)(v[i] & 0xFFFF));
        w[2 * i + 1] = f16_bits_to_f32((uint16_t)(v[i] >> 16));
    }
}

static __device__ __forceinline__ void load8(const float* p, float w[8]) {
    const uint4 a = ((const uint4*)p)[0], b = ((const uint4*)p)[1];
    const uint32_t v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 8; i++) w[i] = __uint_as_float(v[i]);
}

// The same for float weights (f16 or f32) and f32 activations; cols % 8 == 0,
// rows 16-byte aligned.
template <class W, int NW>
static __device__ __forceinline__ void float_row_dots(const W* w0, const W* w1, const float* x, int cols, int nb,
                                                      float acc[NW][MAX_ROWS]) {
    for (int k = (threadIdx.x % WARP_SIZE) * 8; k < cols; k += WARP_SIZE * 8) {
        float wa[8], wb[8];
        load8(w0 + k, wa);
        if (NW == 2) load8(w1 + k, wb);
#pragma unroll
        for (int r = 0; r < MAX_ROWS; r++) {
            if (r < nb) {
                const float* xr = x + (size_t)r * cols + k;
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    acc[0][r] += wa[i] * xr[i];
                    if (NW == 2) acc[NW - 1][r] += wb[i] * xr[i];
                }
            }
        }
    }
}

// One warp per output row. y[r·rows + row] for activation row r; `residual`
// (may be `y`) is added.
template <int NW>
static __device__ __forceinline__ void finish_rows(float acc[NW][MAX_ROWS], float* y, const float* residual, int row,
                                                   int rows, int nb, int gate) {
#pragma unroll
    for (int r = 0; r < MAX_ROWS; r++) {
        if (r < nb) {
            const float a = warp_sum(acc[0][r]);
            const float b = NW == 2 ? warp_sum(acc[NW - 1][r]) : 0.0f;
            if (threadIdx.x % WARP_SIZE == 0) {
                const size_t o = (size_t)r * rows + row;
                float v = NW == 2 ? gate_fn(a, gate) * b : a;
                if (residual) v += residual[o];
                y[o] = v;
            }
        }
    }
}

template <int T>
static __device__ void matvec_q(const uint8_t* w, const q8a* x, float* y, const float* residual, int rows, int cols,
                                int nb) {
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= rows) return;
    float acc[1][MAX_ROWS] = {};
    const uint8_t* wr = w + (size_t)row * row_bytes<T>(cols);
    q_row_dots<T, 1>(wr, wr, x, cols / 32, nb, acc);
    finish_rows<1>(acc, y, residual, row, rows, nb, 0);
}

template <int T>
static __device__ void glu_q(const uint8_t* wg, const uint8_t* wu, const q8a* x, float* y, int rows, int cols, int nb,
                             int gate) {
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= rows) return;
    float acc[2][MAX_ROWS] = {};
    const size_t o = (size_t)row * row_bytes<T>(cols);
    q_row_dots<T, 2>(wg + o, wu + o, x, cols / 32, nb, acc);
    finish_rows<2>(acc, y, nullptr, row, rows, nb, gate);
}

#define QUANTIZED_KERNELS(name, T)                                                                                  \
    extern "C" __global__ void matvec_##name(const uint8_t* w, const q8a* x, float* y, const float* residual,       \
                                             int rows, int cols, int nb) {                                          \
        matvec_q<T>(w, x, y, residual, rows, cols, nb);                                                             \
    }                                                                                                               \
    extern "C" __global__ void glu_##name(const uint8_t* wg, const uint8_t* wu, const q8a* x, float* y, int rows,   \
                                          int cols, int nb, int gate) {                                             \
        glu_q<T>(wg, wu, x, y, rows, cols, nb, gate);                                                               \
    }                                                                                                               \
    /* grid.x = rows: the whole matrix as f16, for a GEMM. */                                                       \
    extern "C" __global__ void to_f16_##name(const uint8_t* w, uint16_t* y, int cols) {                               \
        const uint8_t* row = w + (size_t)blockIdx.x * row_bytes<T>(cols);                                            \
        const int lane = threadIdx.x % WARP_SIZE;                                                                    \
        for (int c = threadIdx.x / WARP_SIZE; c < cols / 32; c += blockDim.x / WARP_SIZE) {                          \
            const wchunk wc = load_chunk<T>(row, c);                                                                 \
            y[(size_t)blockIdx.x * cols + c * 32 + lane] = f32_to_f16_bits(chunk_value<T>(wc, lane));                \
        }                                                                                                            \
    }                                                                                                                \
    /* grid.x = tokens; one warp per chunk of 32 values. */                                                         \
    extern "C" __global__ void get_rows_##name(const uint8_t* w, const int* tokens, float* y, int cols, float scale) { \
        const uint8_t* row = w + (size_t)tokens[blockIdx.x] * row_bytes<T>(cols);                                   \
        const int lane = threadIdx.x % WARP_SIZE;                                                                   \
        for (int c = threadIdx.x / WARP_SIZE; c < cols / 32; c += blockDim.x / WARP_SIZE) {                         \
            const wchunk wc = load_chunk<T>(row, c);                                                                \
            y[(size_t)blockIdx.x * cols + c * 32 + lane] = chunk_value<T>(wc, lane) * scale;                        \
        }                                                                                                           \
    }

QUANTIZED_KERNELS(q4_0, T_Q4_0)
QUANTIZED_KERNELS(q4_1, T_Q4_1)
QUANTIZED_KERNELS(q8_0, T_Q8_0)
QUANTIZED_KERNELS(q4_k, T_Q4_K)
QUANTIZED_KERNELS(q6_k, T_Q6_K)

#define FLOAT_KERNELS(name, W, to_f32)                                                                               \
    extern "C" __global__ void matvec_##name(const W* w, const float* x, float* y, const float* residual, int rows,   \
                                             int cols, int nb) {                                                     \
        const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;                             \
        if (row >= rows) return;                                                                                     \
        float acc[1][MAX_ROWS] = {};                                                                                 \
        const W* wr = w + (size_t)row * cols;                                                                        \
        float_row_dots<W, 1>(wr, wr, x, cols, nb, acc);                                                              \
        finish_rows<1>(acc, y, residual, row, rows, nb, 0);                                                          \
    }                                                                                                                \
    extern "C" __global__ void glu_##name(const W* wg, const W* wu, const float* x, float* y, int rows, int cols,    \
                                          int nb, int gate) {                                                        \
        const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;                             \
        if (row >= rows) return;                                                                                     \
        float acc[2][MAX_ROWS] = {};                                                                                 \
        const size_t o = (size_t)row * cols;                                                                         \
        float_row_dots<W, 2>(wg + o, wu + o, x, cols, nb, acc);                                                      \
        finish_rows<2>(acc, y, nullptr, row, rows, nb, gate);                                                        \
    }                                                                                                                \
    extern "C" __global__ void get_rows_##name(const W* w, const int* tokens, float* y, int cols, float scale) {     \
        const W* row = w + (size_t)tokens[blockIdx.x] * cols;                                                        \
        for (int i = threadIdx.x; i < cols; i += blockDim.x) y[(size_t)blockIdx.x * cols + i] = to_f32(row[i]) * scale; \
    }                                                                                                                \
    extern "C" __global__ void to_f16_##name(const W* w, uint16_t* y, int cols) {                                   \
        const W* row = w + (size_t)blockIdx.x * cols;                                                                \
        for (int i = threadIdx.x; i < cols; i += blockDim.x) y[(size_t)blockIdx.x * cols + i] = f32_to_f16_bits(to_f32(row[i])); \
    }

static __device__ __forceinline__ float same_f32(float v) { return v; }

FLOAT_KERNELS(f16, uint16_t, f16_bits_to_f32)
FLOAT_KERNELS(f32, float, same_f32)

// --- rotary positions and the cache write -----------------------------------

// grid = (n_heads + n_kv_heads, rows), one warp each: query heads rotate in
// place, key heads are rotated into the row's K cache and their V copied
// into its V cache. Caches are f16 `[capacity, n_kv_heads, head_dim]` (one
// per session and layer: `kc[r]`, `vc[r]`), written at position `pos[r]`.
// `cos`/`sin` are `[positions, rot / 2]`; pairs (2i, 2i+1), or (i, i + rot/2)
// when `neox`; values past `rot` do not rotate. `qn`/`kn`: per-head RMSNorm
// weights (qwen3, gemma3) or null.
extern "C" __global__ void rope_kv(float* q, const float* k, const float* v, uint16_t* const* kc, uint16_t* const* vc,
                                   const int* pos, const float* cos, const float* sin, const float* qn,
                                   const float* kn, int nh, int nkv, int hd, int rot, int neox, float eps) {
    const int r = blockIdx.y, h = blockIdx.x, lane = threadIdx.x;
    const bool is_q = h < nh;
    const int kvh = h - nh;
    const float* src = is_q ? q + ((size_t)r * nh + h) * hd : k + ((size_t)r * nkv + kvh) * hd;
    const float* nw = is_q ? qn : kn;
    float scale = 1.0f;
    if (nw) {
        float ss = 0.0f;
        for (int d = lane; d < hd; d += WARP_SIZE) ss += src[d] * src[d];
        scale = rsqrtf(warp_sum(ss) / (float)hd + eps);
    }
    const size_t cache_at = ((size_t)pos[r] * nkv + (is_q ? 0 : kvh)) * hd;
    float* qo = is_q ? q + ((size_t)r * nh + h) * hd : nullptr;
    uint16_t* ko = is_q ? nullptr : kc[r] + cache_at;
    const int half_rot = rot / 2;
    const float* cr = cos + (size_t)pos[r] * half_rot;
    const float* sr = sin + (size_t)pos[r] * half_rot;
    // A lane reads and writes only its own pairs, so q can rotate in place.
    for (int i = lane; i < half_rot; i += WARP_SIZE) {
        const int ia = neox ? i : 2 * i, ib = neox ? i + half_rot : 2 * i + 1;
        float xa = src[ia], xb = src[ib];
        if (nw) xa *= scale * nw[ia], xb *= scale * nw[ib];
        const float ya = xa * cr[i] - xb * sr[i], yb = xa * sr[i] + xb * cr[i];
        if (is_q) {
            qo[ia] = ya, qo[ib] = yb;
        } else {
            ko[ia] = f32_to_f16_bits(ya), ko[ib] = f32_to_f16_bits(yb);
        }
    }
    for (int d = rot + lane; d < hd; d += WARP_SIZE) {
        const float x = nw ? src[d] * scale * nw[d] : src[d];
        if (is_q) qo[d] = x;
        else ko[d] = f32_to_f16_bits(x);
    }
    if (!is_q) {
        const float* vs = v + ((size_t)r * nkv + kvh) * hd;
        uint16_t* vo = vc[r] + cache_at;
        for (int d = lane; d < hd; d += WARP_SIZE) vo[d] = f32_to_f16_bits(vs[d]);
    }
}

// --- decode attention (flash-decoding) --------------------------------------

#define ATTN_WARPS 4
#define HEAD_DIM_MAX 256

// grid = (splits, n_heads, rows), ATTN_WARPS warps. Row r's query attends to
// positions [0, lens[r]) of its caches (the newest included), or the last
// `window` of them when window > 0; split s takes positions
// [s·split, (s+1)·split). Writes the split's running max, its sum of
// exponentials and its unnormalized output: part[((r·nh + h)·splits + s)·(hd + 2) ..]
// = [m, l, o_0 .. o_{hd-1}]. hd % 32 == 0, hd ≤ HEAD_DIM_MAX.
extern "C" __global__ void attn_split(const float* q, const uint16_t* const* kc, const uint16_t* const* vc,
                                      const int* lens, float* part, int nh, int nkv, int hd, int split, float scale,
                                      int window) {
    __shared__ float s_m[ATTN_WARPS], s_l[ATTN_WARPS];
    __shared__ float s_o[ATTN_WARPS][HEAD_DIM_MAX];
    const int s = blockIdx.x, h = blockIdx.y, r = blockIdx.z, splits = gridDim.x;
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int per_lane = hd / WARP_SIZE;
    const int len = lens[r];
    int lo = s * split;
    const int hi = min(len, lo + split);
    if (window > 0) lo = max(lo, len - window);
    const int kvh = h / (nh / nkv);
    float qr[HEAD_DIM_MAX / WARP_SIZE], o[HEAD_DIM_MAX / WARP_SIZE];
    const float* qh = q + ((size_t)r * nh + h) * hd;
    for (int j = 0; j < per_lane; j++) qr[j] = qh[lane + WARP_SIZE * j] * scale, o[j] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (int p = lo + warp; p < hi; p += ATTN_WARPS) {
        const size_t at = ((size_t)p * nkv + kvh) * hd;
        const uint16_t* kp = kc[r] + at;
        float sc = 0.0f;
        for (int j = 0; j < per_lane; j++) sc += qr[j] * f16_bits_to_f32(kp[lane + WARP_SIZE * j]);
        sc = warp_sum(sc);
        const float mn = fmaxf(m, sc);
        const float corr = expf(m - mn), e = expf(sc - mn);
        l = l * corr + e;
        const uint16_t* vp = vc[r] + at;
        for (int j = 0; j < per_lane; j++) o[j] = o[j] * corr + e * f16_bits_to_f32(vp[lane + WARP_SIZE * j]);
        m = mn;
    }
    if (lane == 0) s_m[warp] = m, s_l[warp] = l;
    for (int j = 0; j < per_lane; j++) s_o[warp][lane + WARP_SIZE * j] = o[j];
    __syncthreads();
    if (warp != 0) return;
    float mx = -INFINITY;
    for (int w = 0; w < ATTN_WARPS; w++) mx = fmaxf(mx, s_m[w]);
    float f[ATTN_WARPS], total = 0.0f;
    for (int w = 0; w < ATTN_WARPS; w++) {
        f[w] = s_m[w] == -INFINITY ? 0.0f : expf(s_m[w] - mx);
        total += s_l[w] * f[w];
    }
    float* out = part + (((size_t)r * nh + h) * splits + s) * (hd + 2);
    if (lane == 0) out[0] = mx, out[1] = total;
    for (int d = lane; d < hd; d += WARP_SIZE) {
        float acc = 0.0f;
        for (int w = 0; w < ATTN_WARPS; w++) acc += s_o[w][d] * f[w];
        out[2 + d] = acc;
    }
}

// grid = (n_heads, rows), one warp: y[r, h·hd ..] = Σ_s o_s·e^(m_s − M) / Σ_s l_s·e^(m_s − M).
extern "C" __global__ void attn_combine(const float* part, float* y, int nh, int hd, int splits) {
    const int h = blockIdx.x, r = blockIdx.y, lane = threadIdx.x;
    const float* p = part + ((size_t)r * nh + h) * splits * (hd + 2);
    float mx = -INFINITY;
    for (int s = 0; s < splits; s++) mx = fmaxf(mx, p[s * (hd + 2)]);
    float total = 0.0f;
    for (int s = 0; s < splits; s++) {
        const float m = p[s * (hd + 2)];
        if (m != -INFINITY) total += p[s * (hd + 2) + 1] * expf(m - mx);
    }
    for (int d = lane; d < hd; d += WARP_SIZE) {
        float acc = 0.0f;
        for (int s = 0; s < splits; s++) {
            const float m = p[s * (hd + 2)];
            if (m != -INFINITY) acc += p[s * (hd + 2) + 2 + d] * expf(m - mx);
        }
        y[((size_t)r * nh + h) * hd + d] = acc / total;
    }
}
