/* y = x @ W^T for a few rows of x (decode) with W in cubelm's int8 or int4 format (cubelm.compress.quantize).
 *
 * Decode is memory-bound: a step reads every weight once, so 8-bit weights read a quarter of fp32's bytes and
 * 4-bit ones about a sixth. The kernel must then compute faster than the bytes arrive. Each input row is first
 * quantized to int8 in blocks of 32 (scale = block absmax / 127, code = round(x * 127 / absmax)); a block of 32
 * weights then costs one integer dot product:
 *  - AVX2, int8 weights: |x| (u8) times sign(w, x) (s8) with vpmaddubsw, pairs summed to int32 with vpmaddwd.
 *    The sign trick keeps both operands within 127 in magnitude, so the int16 pair sums (at most 2 * 127 * 127)
 *    never saturate, which the unsigned-offset trick (x + 128 against int8 weights) does not guarantee.
 *  - AVX2, int4 weights: the stored codes are already unsigned (q + 8, 0..15), so they go straight into
 *    vpmaddubsw against the signed activation codes (pair sums <= 2 * 15 * 127), and the offset is removed once
 *    per group: sum(q x) = sum(code x) - 8 sum(x), with sum(x) per activation block computed once per call.
 *    Measured against the sign trick on int4: equal at one row, ~10% less CPU time at four rows.
 *  - AVX-512 VNNI: vpdpbusd does maddubs + madd + add in one instruction (same operands, on 32 lanes of a
 *    256-bit register via AVX512VL).
 *  - elsewhere: plain C with int32 sums (the same numbers).
 * The block's int32 sum is converted to float and accumulated with the product of the block's activation scale
 * and the weight scale (per row for int8, per group for int4), so results equal the exact integer dot products
 * scaled and summed in float (up to float rounding of that sum).
 *
 * Layouts: x (M, K) fp32; int8: W (N, K) int8, ws (N,) fp32; int4: W (N, 16 * ceil(K/32)) uint8 with each
 * aligned block of 32 inputs as 16 bytes (byte j: code j + 8 in the low nibble, code j + 16 + 8 in the high one;
 * a partial last block padded with zero weights), ws (N, ceil(K/G)) fp32 with G a multiple of 32. y (M, N) fp32 row-major. Output rows are split over the threads; the weight
 * row of one output is read from memory once and stays in L1 for the M activation rows.
 */
#if defined(__AVX2__)
#include <immintrin.h> /* x86 only: other CPUs build the plain C paths */
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QB 32 /* inputs per activation block = per int4 block */

/* Row m of x -> codes xq (padded with zeros to nb * QB) and block scales xd. */
static void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *xq, float *xd) {
    const int64_t nb = (K + QB - 1) / QB;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + m * K + b * QB;
            const int64_t len = K - b * QB < QB ? K - b * QB : QB;
            float amax = 0.f;
            for (int64_t i = 0; i < len; i++) amax = fmaxf(amax, fabsf(xb[i]));
            const float inv = amax > 0.f ? 127.f / amax : 0.f;
            int8_t *q = xq + (m * nb + b) * QB;
            for (int64_t i = 0; i < QB; i++) q[i] = i < len ? (int8_t)nearbyintf(xb[i] * inv) : 0;
            xd[m * nb + b] = amax / 127.f;
        }
    }
}

#if defined(__AVX2__)
static inline __m256i dot_i8(__m256i xq, __m256i w, __m256i acc) {
    const __m256i ax = _mm256_sign_epi8(xq, xq), sw = _mm256_sign_epi8(w, xq);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, ax, sw);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), _mm256_set1_epi16(1)));
#endif
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The 32 stored codes (q + 8, unsigned 0..15) of one block; high nibbles are inputs 16..31. */
static inline __m256i unpack_codes(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
}

/* sum over the block of code * x, codes unsigned (<= 15) and x signed: no sign trick needed, and the int16 pair
 * sums stay below 2 * 15 * 127. The "- 8 * sum(x)" of the offset is applied once per group (xcorr). */
static inline __m256i dot_u4(__m256i codes, __m256i xq) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), codes, xq);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xq), _mm256_set1_epi16(1));
#endif
}
#endif

/* sum_b xd[b] * (xq_b . w_b) over the full blocks, for one (activation row, int8 weight row) pair */
static float row_int8(const int8_t *xq, const float *xd, const int8_t *w, int64_t K) {
    const int64_t full = K / QB;
    float total = 0.f;
    int64_t b = 0;
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (; b < full; b++) {
        const __m256i s = dot_i8(_mm256_loadu_si256((const __m256i *)(xq + b * QB)),
                                 _mm256_loadu_si256((const __m256i *)(w + b * QB)), _mm256_setzero_si256());
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(xd[b]), acc);
    }
    total = hsum(acc);
#endif
    for (; b < full; b++) {
        int32_t s = 0;
        for (int i = 0; i < QB; i++) s += (int32_t)xq[b * QB + i] * w[b * QB + i];
        total += (float)s * xd[b];
    }
    if (K % QB) { /* the partial last block */
        int32_t s = 0;
        for (int64_t k = full * QB; k < K; k++) s += (int32_t)xq[k] * w[k];
        total += (float)s * xd[full];
    }
    return total;
}

static float row_int4(const int8_t *xq, const float *xd, const float *xcorr, const uint8_t *w, const float *ws,
                      int64_t K, int64_t G) {
    const int64_t nb = (K + QB - 1) / QB, per_group = G / QB; /* padded codes and activations are zeros */
    float total = 0.f;
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i s = dot_u4(unpack_codes(w + b * QB / 2), _mm256_loadu_si256((const __m256i *)(xq + b * QB)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(xd[b] * ws[b / per_group]), acc);
    }
    total = hsum(acc);
    for (int64_t g = 0; g < (nb + per_group - 1) / per_group; g++) total -= ws[g] * xcorr[g];
#else
    (void)xcorr;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * QB / 2;
        const int8_t *q = xq + b * QB;
        int32_t s = 0;
        for (int j = 0; j < QB / 2; j++)
            s += (int32_t)q[j] * ((p[j] & 0x0F) - 8) + (int32_t)q[j + QB / 2] * ((p[j] >> 4) - 8);
        total += (float)s * (xd[b] * ws[b / per_group]);
    }
#endif
    return total;
}

#if defined(__AVX2__)
/* Four output rows against one activation row: the activation block is loaded once for four weight rows, and four
 * independent accumulators hide the FMA latency (one chain per row would wait on it every block). */
static void rows4(const int8_t *xq, const float *xd, const float *xcorr, const void *W, const float *ws, int64_t n,
                  int64_t K, int64_t G, int bits, float *out) {
    const int64_t nb = (K + QB - 1) / QB;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    if (bits == 8) {
        const int64_t full = K / QB;
        const int8_t *w = (const int8_t *)W + n * K;
        for (int64_t b = 0; b < full; b++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * QB));
            const __m256 d = _mm256_set1_ps(xd[b]);
            for (int r = 0; r < 4; r++) {
                const __m256i s = dot_i8(x, _mm256_loadu_si256((const __m256i *)(w + r * K + b * QB)),
                                         _mm256_setzero_si256());
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc[r]);
            }
        }
        for (int r = 0; r < 4; r++) {
            float t = hsum(acc[r]);
            if (K % QB) {
                int32_t s = 0;
                for (int64_t k = full * QB; k < K; k++) s += (int32_t)xq[k] * w[r * K + k];
                t += (float)s * xd[full];
            }
            out[r] = t * ws[n + r];
        }
        return;
    }
    const int64_t ng = (K + G - 1) / G, per_group = G / QB, row = nb * (QB / 2);
    const uint8_t *w = (const uint8_t *)W + n * row;
    const float *s4 = ws + n * ng;
    for (int64_t b = 0; b < nb; b++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * QB));
        const int64_t g = b / per_group;
        for (int r = 0; r < 4; r++) {
            const __m256i s = dot_u4(unpack_codes(w + r * row + b * (QB / 2)), x);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(xd[b] * s4[r * ng + g]), acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) {
        float t = hsum(acc[r]);
        for (int64_t gi = 0; gi < ng; gi++) t -= s4[r * ng + gi] * xcorr[gi];
        out[r] = t;
    }
}
#endif

/* bits 8: W int8 (N, K), ws (N,); bits 4: W uint8 (N, 16 * nb), ws (N, ceil(K/G)). Returns 0, or -1 if out of memory. */
int qgemm(const float *x, const void *W, const float *ws, float *y, int64_t M, int64_t K, int64_t N, int bits,
          int64_t G, int nthreads) {
    const int64_t nb = (K + QB - 1) / QB, ngroups = G > 0 ? (K + G - 1) / G : 0;
    int8_t *xq = aligned_alloc(64, (size_t)(M * nb * QB + 64));
    float *xd = malloc(sizeof(float) * (size_t)(M * nb));
    if (xq == NULL || xd == NULL) {
        free(xq);
        free(xd);
        return -1;
    }
    quantize_rows(x, M, K, xq, xd);
    /* int4: per activation row and weight group, 8 * sum over the group's blocks of xd * sum(codes of x); the
     * kernels take codes + 8 as unsigned bytes and subtract this, scaled by the group's weight scale, once. */
    float *xcorr = calloc((size_t)(M * (ngroups > 0 ? ngroups : 1)), sizeof(float));
    if (xcorr == NULL) {
        free(xq);
        free(xd);
        return -1;
    }
    for (int64_t m = 0; bits == 4 && m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            int32_t sx = 0;
            for (int i = 0; i < QB; i++) sx += xq[(m * nb + b) * QB + i];
            xcorr[m * ngroups + b / (G / QB)] += 8.f * (float)sx * xd[m * nb + b];
        }
#if defined(__AVX2__)
    /* Measured (one thread, CPU time, base preset's 48 projections, AVX2 host): one row runs fastest one output at a
     * time (int8 9.8 ms vs 14.8 ms four at a time, int4 8.7 vs 9.8; fp32 skinny_gemm 39 ms); from two rows on,
     * four outputs at a time (int4 23 vs 28 ms at four rows, int8 equal). */
    const int64_t N4 = M >= 2 ? N / 4 * 4 : 0;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N4; n += 4) {
        for (int64_t m = 0; m < M; m++) {
            float out[4];
            rows4(xq + m * nb * QB, xd + m * nb, xcorr + m * ngroups, W, ws, n, K, G, bits, out);
            for (int r = 0; r < 4; r++) y[m * N + n + r] = out[r];
        }
    }
#else
    const int64_t N4 = 0;
#endif
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = N4; n < N; n++) {
        for (int64_t m = 0; m < M; m++) {
            const int8_t *q = xq + m * nb * QB;
            const float *d = xd + m * nb;
            y[m * N + n] = bits == 8 ? row_int8(q, d, (const int8_t *)W + n * K, K) * ws[n]
                                     : row_int4(q, d, xcorr + m * ngroups, (const uint8_t *)W + n * nb * (QB / 2),
                                                ws + n * ngroups, K, G);
        }
    }
    free(xq);
    free(xd);
    free(xcorr);
    return 0;
}
