/* A whole decode step through the decoder layers in one native call: for each layer, RMSNorm -> fused q/k/v GEMM
 * -> RoPE -> K/V written into the paged pool -> paged attention -> o_proj -> residual add + RMSNorm -> fused
 * gate/up GEMM -> SiLU * up -> down_proj -> residual add. fp32, CPU, a few decode rows (one token per sequence).
 *
 * Why: with the elementwise work fused (decode_ops.c), a layer of the eager engine is still ~10 Python module calls
 * and ~70 ATen dispatches (views, the KV index_copy_, argument checks), which on small models cost as much as the
 * weight stream. Here the Python side prepares, once per engine, a table of every layer's weight pointers and
 * shapes (cubelm.engine.native_step), and each step is one call. The building blocks are the same kernels the
 * module path calls (included below), so both paths compute the same numbers in the same order.
 *
 * Per layer, a table of NCOL int64 (ptrs): the two norm weights, then four linears (fused q/k/v, o_proj, fused
 * gate/up, down_proj), each described by LIN values: weight, scales, bias (0 = none), kind, a, b. Kind 0 is fp32 in
 * the decode layout's tile-major (P, K, Nb) blocks (decode_layout.BlockedLinear; a = P, b = Nb): skinny_gemm.c up to
 * SKINNY_ROWS rows, blocked_gemm.c above (the same split as BlockedLinear.forward).
 * Kinds 1 and 2 are weight-only int8 and int4 (cubelm.compress.quantized_linear.QuantLinear; weight = codes,
 * scales = its scales, b = the int4 group size): qgemm.c (the caller keeps those steps to SKINNY_ROWS rows).
 * q/k/v and gate/up are fused (outputs q | k | v and gate | up).
 * dims: hidden, Hq, Hkv, D, inter, layers, block_size, window, slots_per_layer
 * scale is the attention's 1/sqrt(D) as the Python path rounds it. Returns 0; 1 when the attention's score buffers
 * or a GEMM's packing buffer cannot be allocated; 2 for a linear kind this build does not know.
 * x (S, hidden) is the residual stream, updated in place; cos/sin (S, D); slots (S,) where each row's K/V goes;
 * block tables (S, max_blocks) and context lengths (S,) as in paged_decode.c; caches (layers, slots_per_layer,
 * Hkv, D), fp32, or int8 codes when k_scale / v_scale (layers, slots_per_layer, Hkv) are given (the engine's int8
 * KV pool: rows quantized on write exactly as cubelm.engine.kv_cache.quantize_int8 does); scratch holds S * (2 * hidden + (Hq + 2 * Hkv) * D + 2 * Hq * D + 3 * inter) floats.
 */
#include <string.h>

#include "decode_ops.c"
#include "paged_decode.c"
#include "skinny_gemm.c"
#include "blocked_gemm.c"
#include "qgemm.c"

/* One (token, head) row of D values -> int8 codes and a scale: scale = absmax / 127, code = round-half-even(x /
 * scale) clamped to +-127, the all-zero row divided by FLT_MIN. IEEE division and rounding, not -ffast-math's
 * reciprocal, so the codes equal the PyTorch path's bit for bit. */
#pragma GCC push_options
#pragma GCC optimize("no-fast-math")
static void quantize_row(const float *x, int64_t D, int8_t *codes, float *scale) {
    float amax = 0.f;
    for (int64_t i = 0; i < D; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    const float s = amax / 127.f, div = s > FLT_MIN ? s : FLT_MIN;
    for (int64_t i = 0; i < D; i++) {
        float c = nearbyintf(x[i] / div);
        codes[i] = (int8_t)(c > 127.f ? 127.f : c < -127.f ? -127.f : c);
    }
    *scale = s;
}
#pragma GCC pop_options

/* The new tokens' K and V rows of one layer into the pool (fp32 copies, or int8 codes + scales). */
static void write_kv(const float *qkv, int64_t S, int64_t q_n, int64_t qkv_n, int64_t Hkv, int64_t D,
                     const int64_t *slots, void *kc, void *vc, float *ks, float *vs) {
    const int64_t kv_n = Hkv * D;
    for (int64_t s = 0; s < S; s++) {
        const float *k = qkv + s * qkv_n + q_n, *v = k + kv_n;
        if (!ks) {
            memcpy((float *)kc + slots[s] * kv_n, k, sizeof(float) * (size_t)kv_n);
            memcpy((float *)vc + slots[s] * kv_n, v, sizeof(float) * (size_t)kv_n);
            continue;
        }
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t row = slots[s] * Hkv + h;
            quantize_row(k + h * D, D, (int8_t *)kc + row * D, ks + row);
            quantize_row(v + h * D, D, (int8_t *)vc + row * D, vs + row);
        }
    }
}

#define SKINNY_ROWS 8 /* = cubelm.engine.kernels.skinny_gemm.MAX_ROWS */
enum { W, SCALES, BIAS, KIND, ARG_A, ARG_B, LIN };                        /* one linear's descriptor */
enum { NORM1, NORM2, QKV, O = QKV + LIN, GU = O + LIN, DOWN = GU + LIN, NCOL = DOWN + LIN };
enum { HIDDEN, HQ, HKV, HD, INTER, LAYERS, BLOCK, WINDOW, SLOTS };

static void add_bias(float *restrict y, const float *restrict b, int64_t rows, int64_t n) {
    if (!b) return;
    for (int64_t r = 0; r < rows; r++)
#pragma omp simd
        for (int64_t i = 0; i < n; i++) y[r * n + i] += b[i];
}

static inline const float *P(const int64_t *p, int i) { return (const float *)(intptr_t)p[i]; }

/* y (M, N) = x (M, K) @ W^T + b for the linear described at lin. */
static int linear(const int64_t *lin, const float *x, float *y, int64_t M, int64_t K, int64_t N, int nthreads) {
    switch (lin[KIND]) {
        case 0:
            if (M <= SKINNY_ROWS)
                skinny_gemm(x, P(lin, W), y, M, K, lin[ARG_A], lin[ARG_B], nthreads);
            else if (blocked_gemm(x, P(lin, W), y, M, K, lin[ARG_A], lin[ARG_B], nthreads))
                return 1;
            break;
        case 1: /* fall through: qgemm takes the bits */
        case 2:
            if (qgemm(x, P(lin, W), P(lin, SCALES), y, M, K, N, lin[KIND] == 1 ? 8 : 4, lin[ARG_B], nthreads))
                return 1;
            break;
        default: return 2;
    }
    add_bias(y, P(lin, BIAS), M, N);
    return 0;
}

int decode_layers(const int64_t *dims, const int64_t *ptrs, float eps, float scale, float *x, const float *cos_,
                  const float *sin_, const int64_t *slots, const int64_t *tables, const int64_t *lens, int64_t S,
                  int64_t max_blocks, void *k_cache, void *v_cache, float *k_scale, float *v_scale, float *scratch,
                  int nthreads) {
    const int64_t hidden = dims[HIDDEN], Hq = dims[HQ], Hkv = dims[HKV], D = dims[HD], inter = dims[INTER];
    const int64_t q_n = Hq * D, kv_n = Hkv * D, qkv_n = q_n + 2 * kv_n;
    const int64_t layer_rows = dims[SLOTS] * Hkv, elem = k_scale ? 1 : (int64_t)sizeof(float);
    float *h = scratch, *qkv = h + S * hidden, *q = qkv + S * qkv_n, *att = q + S * q_n;
    float *gu = att + S * q_n, *a = gu + 2 * S * inter, *o = a + S * inter;
    const int ew = S > SKINNY_ROWS ? nthreads : 1; /* threads for the elementwise kernels: worth it on many rows */
    int err = 0;
    for (int64_t l = 0; l < dims[LAYERS] && !err; l++) {
        const int64_t *p = ptrs + l * NCOL;
        char *kc = (char *)k_cache + l * layer_rows * D * elem, *vc = (char *)v_cache + l * layer_rows * D * elem;
        float *ks = k_scale ? k_scale + l * layer_rows : 0, *vs = v_scale ? v_scale + l * layer_rows : 0;
        rmsnorm(x, hidden, P(p, NORM1), h, S, hidden, eps, ew);
        if ((err = linear(p + QKV, h, qkv, S, hidden, qkv_n, nthreads))) break;
        rope(qkv, qkv_n, Hq + Hkv, D, cos_, sin_, S, ew);
        for (int64_t s = 0; s < S; s++) memcpy(q + s * q_n, qkv + s * qkv_n, sizeof(float) * (size_t)q_n);
        write_kv(qkv, S, q_n, qkv_n, Hkv, D, slots, kc, vc, ks, vs);
        err = ks ? paged_decode_attention_i8(q, (const int8_t *)kc, (const int8_t *)vc, ks, vs, tables, lens, att, S,
                                             Hq, Hkv, D, max_blocks, dims[BLOCK], dims[WINDOW], scale, nthreads)
                 : paged_decode_attention(q, (const float *)kc, (const float *)vc, tables, lens, att, S, Hq, Hkv, D,
                                          max_blocks, dims[BLOCK], dims[WINDOW], scale, nthreads);
        if (err) break;
        if ((err = linear(p + O, att, o, S, q_n, hidden, nthreads))) break;
        add_rmsnorm(x, hidden, o, hidden, P(p, NORM2), h, S, hidden, eps, ew);
        if ((err = linear(p + GU, h, gu, S, hidden, 2 * inter, nthreads))) break;
        silu_mul(gu, 2 * inter, gu + inter, 2 * inter, a, S, inter, ew);
        if ((err = linear(p + DOWN, a, o, S, inter, hidden, nthreads))) break;
        for (int64_t r = 0; r < S * hidden; r++) x[r] += o[r];
    }
    return err;
}
