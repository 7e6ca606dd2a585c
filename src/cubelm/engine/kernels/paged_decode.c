/* Paged decode attention on CPU: one query token per sequence, K/V read straight from the block pool.
 *
 * Why a kernel: with PyTorch ops, decode attention must first gather every sequence's blocks into a padded
 * (S, Hkv, max_len, D) tensor and then run SDPA over it: the context is read three times and written once,
 * padding included. Here each task walks one sequence's block table once, so K and V are read once and only up
 * to the sequence's own length. The G = Hq / Hkv query heads that share a KV head reuse each loaded K/V row
 * (GQA for free).
 *
 * Layouts (contiguous):
 *   q            (S, Hq, D) fp32      out  (S, Hq, D) fp32
 *   k_cache/v_cache (num_slots, Hkv, D) fp32, slot = block_id * block_size + offset
 *   block_tables (S, max_blocks) int64,  context_lens (S,) int64 (tokens including the new one)
 * window > 0 keeps only the last `window` positions (sliding window, HF semantics).
 *
 * int8 pool (paged_decode_attention_i8, cubelm/engine/kv_cache.py): k/v codes (num_slots, Hkv, D) int8 and
 * k/v scales (num_slots, Hkv) fp32, value = code * scale. The codes are converted to float in registers as they
 * are read, and the scale is applied once per row (to the dot product for K, to the softmax weight for V), so a
 * decode reads about a quarter of the fp32 bytes and no dequantized copy of the cache ever exists.
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
static inline void prefetch_row(const void *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch((const char *)p + i, 0, 3);
}

/* The block after the current run when it is not the adjacent one in memory (adjacent blocks are what the
 * hardware prefetcher already streams), else -1. */
static inline int64_t far_next(const int64_t *table, int64_t pos, int64_t run, int64_t left, int64_t block_size) {
    if (run >= left) return -1;
    const int64_t cur = table[pos / block_size], nxt = table[(pos + run) / block_size];
    return nxt == cur + 1 ? -1 : nxt;
}

/* scores (R, n) <- softmax of each row, given each row's maximum */
static inline void softmax_rows(float *restrict scores, const float *mx, int64_t R, int64_t n) {
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
}

/* Query rows r = 0..R-1 (R = nh * G) of one task; row r reads KV head r / G of the task's range.
 * qs (R, D) scaled queries, scores (R, n), acc (R, D) the output rows. The compiler clones it for each literal
 * D it is called with; noinline keeps those clones separate functions, as they were before attend_i8 existed
 * (inlining both variants into the OpenMP body changes the fp32 code for no gain). */
static __attribute__((noinline)) void attend(const float *restrict qs, const float *restrict k_cache,
                          const float *restrict v_cache, const int64_t *table, int64_t first, int64_t n,
                          int64_t row_stride, int64_t block_size, int64_t R, int64_t G, const int64_t D,
                          float *restrict scores, float *restrict acc) {
    float mx[R];
    for (int64_t r = 0; r < R; r++) mx[r] = -FLT_MAX;
    /* pass 1: scores, walking whole blocks (no division per position) */
    for (int64_t t = 0; t < n;) {
        const int64_t pos = first + t, off = pos % block_size;
        const int64_t run = (block_size - off < n - t) ? block_size - off : n - t;
        const float *row = k_cache + (table[pos / block_size] * block_size + off) * row_stride;
        const int64_t nb = far_next(table, pos, run, n - t, block_size);
        const float *next = nb < 0 ? 0 : k_cache + nb * block_size * row_stride;
        for (int64_t i = 0; i < run; i++, row += row_stride) {
            if (next) prefetch_row(next + i * row_stride, R / G * D * 4);
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
    softmax_rows(scores, mx, R, n);
    /* pass 2: the weighted sum of V rows, each row loaded once for all the query rows that share it */
    for (int64_t i = 0; i < R * D; i++) acc[i] = 0.f;
    for (int64_t t = 0; t < n;) {
        const int64_t pos = first + t, off = pos % block_size;
        const int64_t run = (block_size - off < n - t) ? block_size - off : n - t;
        const float *row = v_cache + (table[pos / block_size] * block_size + off) * row_stride;
        const int64_t nb = far_next(table, pos, run, n - t, block_size);
        const float *next = nb < 0 ? 0 : v_cache + nb * block_size * row_stride;
        for (int64_t i = 0; i < run; i++, row += row_stride) {
            if (next) prefetch_row(next + i * row_stride, R / G * D * 4);
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

/* attend() for an int8 pool: codes (num_slots, Hkv, D) read from k_codes/v_codes + h0 * D, their scales
 * (num_slots, Hkv) from k_scale/v_scale + h0. score = scale_k * (q . code_k); acc += (w * scale_v) * code_v. */
static __attribute__((noinline)) void attend_i8(const float *restrict qs, const int8_t *restrict k_codes,
                             const float *restrict k_scale, const int8_t *restrict v_codes,
                             const float *restrict v_scale, const int64_t *table, int64_t first, int64_t n,
                             int64_t Hkv, int64_t block_size, int64_t R, int64_t G, const int64_t D,
                             float *restrict scores, float *restrict acc) {
    const int64_t row_stride = Hkv * D;
    float mx[R], row_f[D];  /* row_f: one K or V row of one head in fp32, in L1 (not a copy of the cache) */
    for (int64_t r = 0; r < R; r++) mx[r] = -FLT_MAX;
    for (int64_t t = 0; t < n;) {
        const int64_t pos = first + t, off = pos % block_size;
        const int64_t run = (block_size - off < n - t) ? block_size - off : n - t;
        const int64_t slot = table[pos / block_size] * block_size + off;
        const int8_t *row = k_codes + slot * row_stride;
        const float *srow = k_scale + slot * Hkv;
        const int64_t nb = far_next(table, pos, run, n - t, block_size);
        if (nb >= 0) prefetch_row(k_scale + nb * block_size * Hkv, run * Hkv * 4);
        const int8_t *next = nb < 0 ? 0 : k_codes + nb * block_size * row_stride;
        for (int64_t i = 0; i < run; i++, row += row_stride, srow += Hkv) {
            if (next) prefetch_row(next + i * row_stride, R / G * D);
            for (int64_t h = 0; h < R / G; h++) {
                const int8_t *kr = row + h * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) row_f[d] = (float)kr[d];  /* converted once for its G queries */
                for (int64_t r = h * G; r < (h + 1) * G; r++) {
                    const float *qr = qs + r * D;
                    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < D; d++) dot += qr[d] * row_f[d];
                    dot *= srow[h];
                    scores[r * n + t + i] = dot;
                    mx[r] = dot > mx[r] ? dot : mx[r];
                }
            }
        }
        t += run;
    }
    softmax_rows(scores, mx, R, n);
    for (int64_t i = 0; i < R * D; i++) acc[i] = 0.f;
    for (int64_t t = 0; t < n;) {
        const int64_t pos = first + t, off = pos % block_size;
        const int64_t run = (block_size - off < n - t) ? block_size - off : n - t;
        const int64_t slot = table[pos / block_size] * block_size + off;
        const int8_t *row = v_codes + slot * row_stride;
        const float *srow = v_scale + slot * Hkv;
        const int64_t nb = far_next(table, pos, run, n - t, block_size);
        if (nb >= 0) prefetch_row(v_scale + nb * block_size * Hkv, run * Hkv * 4);
        const int8_t *next = nb < 0 ? 0 : v_codes + nb * block_size * row_stride;
        for (int64_t i = 0; i < run; i++, row += row_stride, srow += Hkv) {
            if (next) prefetch_row(next + i * row_stride, R / G * D);
            for (int64_t h = 0; h < R / G; h++) {
                const int8_t *vr = row + h * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) row_f[d] = (float)vr[d];
                for (int64_t r = h * G; r < (h + 1) * G; r++) {
                    const float w = scores[r * n + t + i] * srow[h];
                    float *ar = acc + r * D;
#pragma omp simd
                    for (int64_t d = 0; d < D; d++) ar[d] += w * row_f[d];
                }
            }
        }
        t += run;
    }
}

/* One task = one sequence and a range of its KV heads (see the top of the file); k_scale == NULL: fp32 pool. */
static int run_tasks(const float *q, const void *k_cache, const void *v_cache, const float *k_scale,
                     const float *v_scale, const int64_t *block_tables, const int64_t *context_lens, float *out,
                     int64_t S, int64_t Hq, int64_t Hkv, int64_t D, int64_t max_blocks, int64_t block_size,
                     int64_t window, float scale, int nthreads) {
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
            const int64_t first = (window > 0 && len > window) ? len - window : 0, n = len - first;
            const float *qh = q + (s * Hq + h0 * G) * D;  /* the task's R query rows are contiguous */
            for (int64_t i = 0; i < R * D; i++) qs[i] = qh[i] * scale;
            float *oh = out + (s * Hq + h0 * G) * D;
            const int64_t *table = block_tables + s * max_blocks;
            if (k_scale) {
                const int8_t *kc = (const int8_t *)k_cache + h0 * D, *vc = (const int8_t *)v_cache + h0 * D;
                const float *ks = k_scale + h0, *vs = v_scale + h0;
                if (D == 64)
                    attend_i8(qs, kc, ks, vc, vs, table, first, n, Hkv, block_size, R, G, 64, scores, oh);
                else if (D == 128)
                    attend_i8(qs, kc, ks, vc, vs, table, first, n, Hkv, block_size, R, G, 128, scores, oh);
                else
                    attend_i8(qs, kc, ks, vc, vs, table, first, n, Hkv, block_size, R, G, D, scores, oh);
            } else {
                const float *kc = (const float *)k_cache + h0 * D, *vc = (const float *)v_cache + h0 * D;
                if (D == 64)
                    attend(qs, kc, vc, table, first, n, Hkv * D, block_size, R, G, 64, scores, oh);
                else if (D == 128)
                    attend(qs, kc, vc, table, first, n, Hkv * D, block_size, R, G, 128, scores, oh);
                else
                    attend(qs, kc, vc, table, first, n, Hkv * D, block_size, R, G, D, scores, oh);
            }
        }
        free(scores);
        free(qs);
    }
    return failed;
}

int paged_decode_attention(const float *q, const float *k_cache, const float *v_cache,
                           const int64_t *block_tables, const int64_t *context_lens, float *out,
                           int64_t S, int64_t Hq, int64_t Hkv, int64_t D, int64_t max_blocks,
                           int64_t block_size, int64_t window, float scale, int nthreads) {
    return run_tasks(q, k_cache, v_cache, 0, 0, block_tables, context_lens, out, S, Hq, Hkv, D, max_blocks,
                     block_size, window, scale, nthreads);
}

int paged_decode_attention_i8(const float *q, const int8_t *k_codes, const int8_t *v_codes, const float *k_scale,
                              const float *v_scale, const int64_t *block_tables, const int64_t *context_lens,
                              float *out, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, int64_t max_blocks,
                              int64_t block_size, int64_t window, float scale, int nthreads) {
    return run_tasks(q, k_codes, v_codes, k_scale, v_scale, block_tables, context_lens, out, S, Hq, Hkv, D,
                     max_blocks, block_size, window, scale, nthreads);
}
