/* The elementwise work between a decoder layer's GEMMs, fused: RMSNorm, residual add + RMSNorm, rotary embedding
 * (in place), SiLU(gate) * up. fp32, CPU.
 *
 * Why kernels: in eager PyTorch each of these is three to ten dispatches (an fp32 RMSNorm is pow, mean, add,
 * rsqrt, mul, mul plus casts; rotate-half RoPE is chunk, neg, cat, two muls and an add for q and again for k) over
 * a few hundred floats per row. At batch-1 decode a layer ran ~130 ATen ops, and their fixed cost, not the
 * weight stream, dominated a step on small models. Here each is one call that reads and writes each row once
 * from cache.
 *
 * Numerics: the same formulas as cubelm.model.layers (fp32 statistics; rotate-half RoPE with cos/sin tables of
 * (freqs, freqs)). Compiled with -ffast-math, so sums run in vector order and multiply-adds may contract: results
 * differ from PyTorch's by float rounding (~1e-7 relative), as every kernel here does.
 *
 * Threads: a decode step has a few rows, which take less time than waking a second thread, so callers pass
 * nthreads = 1 below a row threshold and the parallel loops switch off (`if` clauses).
 */
#include <math.h>
#include <stdint.h>

static inline void norm_row(const float *restrict x, const float *restrict w, float *restrict y, int64_t dim,
                            float eps) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < dim; i++) ss += x[i] * x[i];
    const float inv = 1.f / sqrtf(ss / (float)dim + eps);
#pragma omp simd
    for (int64_t i = 0; i < dim; i++) y[i] = w[i] * (x[i] * inv);
}

/* y = rmsnorm(x) * w. x (rows, dim) rows ldx apart; y (rows, dim) contiguous. */
int rmsnorm(const float *x, int64_t ldx, const float *w, float *y, int64_t rows, int64_t dim, float eps,
            int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < rows; r++) norm_row(x + r * ldx, w, y + r * dim, dim, eps);
    return 0;
}

/* x += d (in place: the residual stream), then y = rmsnorm(x) * w. x, d rows ldx / ldd apart; y contiguous. */
int add_rmsnorm(float *x, int64_t ldx, const float *d, int64_t ldd, const float *w, float *y, int64_t rows,
                int64_t dim, float eps, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < rows; r++) {
        float *restrict xr = x + r * ldx;
        const float *restrict dr = d + r * ldd;
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) xr[i] += dr[i];
        norm_row(xr, w, y + r * dim, dim, eps);
    }
    return 0;
}

/* Rotate-half RoPE in place on `heads` consecutive heads of each row: x (rows, heads * D) rows ldx apart;
 * cos, sin (rows, D) contiguous. For i < D/2: x1' = x1 cos_i - x2 sin_i, x2' = x2 cos_{i+D/2} + x1 sin_{i+D/2}. */
int rope(float *x, int64_t ldx, int64_t heads, int64_t D, const float *cos_, const float *sin_, int64_t rows,
         int nthreads) {
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict c = cos_ + r * D, *restrict s = sin_ + r * D;
        for (int64_t h = 0; h < heads; h++) {
            float *restrict a = x + r * ldx + h * D, *restrict b = a + half;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float x1 = a[i], x2 = b[i];
                a[i] = x1 * c[i] - x2 * s[i];
                b[i] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
    }
    return 0;
}

/* y = silu(g) * u = g / (1 + exp(-g)) * u. g, u (rows, I) rows ldg / ldu apart; y (rows, I) contiguous. */
int silu_mul(const float *g, int64_t ldg, const float *u, int64_t ldu, float *y, int64_t rows, int64_t I,
             int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict gr = g + r * ldg, *restrict ur = u + r * ldu;
        float *restrict yr = y + r * I;
#pragma omp simd
        for (int64_t i = 0; i < I; i++) yr[i] = gr[i] / (1.f + expf(-gr[i])) * ur[i];
    }
    return 0;
}
