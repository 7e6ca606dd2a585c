/* Paged decode attention on CPU: one query token per sequence, K/V read straight from the block pool.
 *
 * Why a kernel: with PyTorch ops, decode attention must first gather every sequence's blocks into a padded
 * (S, Hkv, max_len, D) tensor and then run SDPA over it: the context is read three times and written once,
 * padding included. Here each task walks one sequence's block table once, so K and V are read once and only up
 * to the sequence's own length. The G = Hq / Hkv query heads that share a KV head reuse each loaded K/V row
 * (GQA for free).
 *
 * Layouts (all fp32, contiguous):
 *   q            (S, Hq, D)           out  (S, Hq, D)
 *   k_cache/v_cache (num_slots, Hkv, D), slot = block_id * block_size + offset
 *   block_tables (S, max_blocks) int64,  context_lens (S,) int64 (tokens including the new one)
 * window > 0 keeps only the last `window` positions (sliding window, HF semantics).
 *
 * A task is a sequence and a range of its KV heads: all heads when there are enough sequences to keep every
 * thread busy (a token's cache row (Hkv, D) is then read as one contiguous run: random block placement costs
 * little), single heads otherwise (batch 1 still uses every thread).
 * The softmax is exact (scores, their max, exp-sum, normalise), not an online approximation. The file is built
 * with -ffast-math for vectorised expf and reassociated sums, so no infinity may appear: maxima start at
 * -FLT_MAX and only real positions are visited.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Blocks sit anywhere in the pool, which defeats the hardware prefetcher at every block boundary: while one
 * block is processed, ask for the matching row of the next one when it lies elsewhere. */
static inline void prefetch_row(const float *p, int64_t floats) {
    for (int64_t i = 0; i < floats; i += 16) __builtin_prefetch(p + i, 0, 3);
}

/* The start of the block after the current run when it is not the adjacent one in memory (adjacent blocks are
 * what the hardware prefetcher already streams), else NULL. */
static inline const float *far_next(const int64_t *table, int64_t pos, int64_t run, int64_t left,
                                    int64_t block_size, const float *cache, int64_t row_stride) {
    if (run >= left) return 0;
    const int64_t cur = table[pos / block_size], nxt = table[(pos + run) / block_size];
    return nxt == cur + 1 ? 0 : cache + nxt * block_size * row_stride;
}

/* Query rows r = 0..R-1 (R = nh * G) of one task; row r reads KV head r / G of the task's range.
 * qs (R, D) scaled queries, scores (R, n), acc (R, D) the output rows. Inlined with D a literal. */
static inline void attend(const float *restrict qs, const float *restrict k_cache, const float *restrict v_cache,
                          const int64_t *table, int64_t first, int64_t n, int64_t row_stride, int64_t block_size,
                          int64_t R, int64_t G, const int64_t D, float *restrict scores, float *restrict acc) {
    float mx[R];
    for (int64_t r = 0; r < R; r++) mx[r] = -FLT_MAX;
    /* pass 1: scores, walking whole blocks (no division per position) */
    for (int64_t t = 0; t < n;) {
        const int64_t pos = first + t, off = pos % block_size;
        const int64_t run = (block_size - off < n - t) ? block_size - off : n - t;
        const float *row = k_cache + (table[pos / block_size] * block_size + off) * row_stride;
        const float *next = far_next(table, pos, run, n - t, block_size, k_cache, row_stride);
        for (int64_t i = 0; i < run; i++, row += row_stride) {
            if (next) prefetch_row(next + i * row_stride, R / G * D);
            for (int64_t r = 0; r < R; r++) {
                const float *qr = qs + r * D, *kr = row + (r / G) * D;
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < D; d++) dot += qr[d] * kr[d];
                scores[r * n + t + i] = dot;
                mx[r] = dot > mx[r] ? dot : mx[r];
            }
        }
        t += run;
    }
    for (int64_t r = 0; r < R; r++) {
        float *sr = scores + r * n, sum = 0.f;
        const float m = mx[r];
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; t++) {
            sr[t] = expf(sr[t] - m);
            sum += sr[t];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t t = 0; t < n; t++) sr[t] *= inv;
    }
    /* pass 2: the weighted sum of V rows, each row loaded once for all the query rows that share it */
    for (int64_t i = 0; i < R * D; i++) acc[i] = 0.f;
    for (int64_t t = 0; t < n;) {
        const int64_t pos = first + t, off = pos % block_size;
        const int64_t run = (block_size - off < n - t) ? block_size - off : n - t;
        const float *row = v_cache + (table[pos / block_size] * block_size + off) * row_stride;
        const float *next = far_next(table, pos, run, n - t, block_size, v_cache, row_stride);
        for (int64_t i = 0; i < run; i++, row += row_stride) {
            if (next) prefetch_row(next + i * row_stride, R / G * D);
            for (int64_t r = 0; r < R; r++) {
                const float w = scores[r * n + t + i], *vr = row + (r / G) * D;
                float *ar = acc + r * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) ar[d] += w * vr[d];
            }
        }
        t += run;
    }
}

int paged_decode_attention(const float *q, const float *k_cache, const float *v_cache,
                           const int64_t *block_tables, const int64_t *context_lens, float *out,
                           int64_t S, int64_t Hq, int64_t Hkv, int64_t D, int64_t max_blocks,
                           int64_t block_size, int64_t window, float scale, int nthreads) {
    const int64_t G = Hq / Hkv;
    const int64_t nh = S >= 4 * (int64_t)nthreads ? Hkv : 1;  /* KV heads per task */
    const int64_t tasks_per_seq = Hkv / nh, R = nh * G;
    int64_t max_len = 1;
    for (int64_t s = 0; s < S; s++) max_len = context_lens[s] > max_len ? context_lens[s] : max_len;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *scores = malloc(sizeof(float) * (size_t)(R * max_len));  /* per-thread scratch */
        float *qs = malloc(sizeof(float) * (size_t)(R * D));
        if (!scores || !qs) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < S * tasks_per_seq; task++) {
            if (!scores || !qs) continue;
            const int64_t s = task / tasks_per_seq, h0 = (task % tasks_per_seq) * nh;
            const int64_t len = context_lens[s];
            const int64_t first = (window > 0 && len > window) ? len - window : 0;
            const float *qh = q + (s * Hq + h0 * G) * D;  /* the task's R query rows are contiguous */
            for (int64_t i = 0; i < R * D; i++) qs[i] = qh[i] * scale;
            float *oh = out + (s * Hq + h0 * G) * D;
            const float *kc = k_cache + h0 * D, *vc = v_cache + h0 * D;
            const int64_t *table = block_tables + s * max_blocks;
            if (D == 64)
                attend(qs, kc, vc, table, first, len - first, Hkv * D, block_size, R, G, 64, scores, oh);
            else if (D == 128)
                attend(qs, kc, vc, table, first, len - first, Hkv * D, block_size, R, G, 128, scores, oh);
            else
                attend(qs, kc, vc, table, first, len - first, Hkv * D, block_size, R, G, D, scores, oh);
        }
        free(scores);
        free(qs);
    }
    return failed;
}
