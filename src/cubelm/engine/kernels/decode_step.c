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
 * Per-layer pointers (ptrs, NPTR int64 per layer; 0 = no bias):
 *   norm1, w_qkv, b_qkv, w_o, b_o, norm2, w_gate_up, b_gate_up, w_down, b_down
 * Weights are in the decode layout's tile-major (P, K, Nb) blocks (decode_layout.BlockedLinear); q/k/v and
 * gate/up are fused (outputs q | k | v and gate | up).
 * dims: hidden, Hq, Hkv, D, inter, layers, block_size, window, slots_per_layer,
 *       qkv_P, qkv_Nb, o_P, o_Nb, gu_P, gu_Nb, down_P, down_Nb
 * scale is the attention's 1/sqrt(D) as the Python path rounds it.
 * x (S, hidden) is the residual stream, updated in place; cos/sin (S, D); slots (S,) where each row's K/V goes;
 * block tables (S, max_blocks) and context lengths (S,) as in paged_decode.c; caches (layers, slots_per_layer,
 * Hkv, D); scratch holds S * (2 * hidden + (Hq + 2 * Hkv) * D + 2 * Hq * D + 3 * inter) floats.
 */
#include <string.h>

#include "decode_ops.c"
#include "paged_decode.c"
#include "skinny_gemm.c"

enum { NORM1, W_QKV, B_QKV, W_O, B_O, NORM2, W_GU, B_GU, W_DOWN, B_DOWN, NPTR };
enum { HIDDEN, HQ, HKV, HD, INTER, LAYERS, BLOCK, WINDOW, SLOTS, QKV_P, QKV_NB, O_P, O_NB, GU_P, GU_NB, DN_P, DN_NB };

static void add_bias(float *y, const float *b, int64_t rows, int64_t n) {
    if (!b) return;
    for (int64_t r = 0; r < rows; r++)
#pragma omp simd
        for (int64_t i = 0; i < n; i++) y[r * n + i] += b[i];
}

static inline const float *P(const int64_t *p, int i) { return (const float *)(intptr_t)p[i]; }

int decode_layers(const int64_t *dims, const int64_t *ptrs, float eps, float scale, float *x, const float *cos_,
                  const float *sin_, const int64_t *slots, const int64_t *tables, const int64_t *lens, int64_t S,
                  int64_t max_blocks, float *k_cache, float *v_cache, float *scratch, int nthreads) {
    const int64_t hidden = dims[HIDDEN], Hq = dims[HQ], Hkv = dims[HKV], D = dims[HD], inter = dims[INTER];
    const int64_t q_n = Hq * D, kv_n = Hkv * D, qkv_n = q_n + 2 * kv_n;
    const int64_t layer_stride = dims[SLOTS] * kv_n;
    float *h = scratch, *qkv = h + S * hidden, *q = qkv + S * qkv_n, *att = q + S * q_n;
    float *gu = att + S * q_n, *a = gu + 2 * S * inter, *o = a + S * inter;
    for (int64_t l = 0; l < dims[LAYERS]; l++) {
        const int64_t *p = ptrs + l * NPTR;
        float *kc = k_cache + l * layer_stride, *vc = v_cache + l * layer_stride;
        rmsnorm(x, hidden, P(p, NORM1), h, S, hidden, eps, 1);
        skinny_gemm(h, P(p, W_QKV), qkv, S, hidden, dims[QKV_P], dims[QKV_NB], nthreads);
        add_bias(qkv, P(p, B_QKV), S, qkv_n);
        rope(qkv, qkv_n, Hq + Hkv, D, cos_, sin_, S, 1);
        for (int64_t s = 0; s < S; s++) {
            const float *row = qkv + s * qkv_n;
            memcpy(q + s * q_n, row, sizeof(float) * (size_t)q_n);
            memcpy(kc + slots[s] * kv_n, row + q_n, sizeof(float) * (size_t)kv_n);
            memcpy(vc + slots[s] * kv_n, row + q_n + kv_n, sizeof(float) * (size_t)kv_n);
        }
        if (paged_decode_attention(q, kc, vc, tables, lens, att, S, Hq, Hkv, D, max_blocks, dims[BLOCK],
                                   dims[WINDOW], scale, nthreads))
            return 1;
        skinny_gemm(att, P(p, W_O), o, S, q_n, dims[O_P], dims[O_NB], nthreads);
        add_bias(o, P(p, B_O), S, hidden);
        add_rmsnorm(x, hidden, o, hidden, P(p, NORM2), h, S, hidden, eps, 1);
        skinny_gemm(h, P(p, W_GU), gu, S, hidden, dims[GU_P], dims[GU_NB], nthreads);
        add_bias(gu, P(p, B_GU), S, 2 * inter);
        silu_mul(gu, 2 * inter, gu + inter, 2 * inter, a, S, inter, 1);
        skinny_gemm(a, P(p, W_DOWN), o, S, inter, dims[DN_P], dims[DN_NB], nthreads);
        add_bias(o, P(p, B_DOWN), S, hidden);
        for (int64_t r = 0; r < S * hidden; r++) x[r] += o[r];
    }
    return 0;
}
