/* y = w * (x / sqrt(mean(x^2) + eps)), row by row (RMSNorm), fp32.
 *
 * Why a kernel: in PyTorch an fp32 RMSNorm is six or seven eager ops (pow, mean, add, rsqrt, mul, mul, and the
 * dtype casts), each a dispatch of a few microseconds over a row of a few hundred floats. A decode step runs
 * 2 * layers + 1 of them, which on the `small` preset was ~9% of a batch-1 step. Here it is one call that reads each
 * row twice from cache. The sum of squares is accumulated in float with -ffast-math's vector order, so results
 * differ from PyTorch's by float rounding (~1e-7 relative), as every kernel here does.
 *
 * Layouts: x (rows, dim) rows ldx apart, unit column stride; w (dim,); y (rows, dim) contiguous.
 */
#include <math.h>
#include <stdint.h>

static void row(const float *restrict x, const float *restrict w, float *restrict y, int64_t dim, float eps) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < dim; i++) ss += x[i] * x[i];
    const float inv = 1.f / sqrtf(ss / (float)dim + eps);
#pragma omp simd
    for (int64_t i = 0; i < dim; i++) y[i] = w[i] * (x[i] * inv);
}

int rmsnorm(const float *x, int64_t ldx, const float *w, float *y, int64_t rows, int64_t dim, float eps,
            int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < rows; r++) row(x + r * ldx, w, y + r * dim, dim, eps);
    return 0;
}
