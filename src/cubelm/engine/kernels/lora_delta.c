/* y[rows of slot s] += (x A_s^T) (s B_s^T) for every row of a few-row step, all adapters in one call (multi-LoRA).
 *
 * Why a kernel: in a decode step every projection adds a rank-r product per adapter present. In PyTorch that is two
 * small GEMMs plus slicing per adapter and projection (~25 us of dispatch each, whatever the size), which on the
 * base preset cost more than the products; here one call does every segment of a projection: a shrink
 * h = x A^T (r values per row) and an expand y += h (sB^T), both with register accumulators, MR rows at a time so
 * each weight element read serves MR rows. Prompt chunks (many rows per adapter) stay with MKL's GEMMs.
 *
 * Layouts (fp32): x (M, K) rows ldx apart; y (M, N) rows ldy apart, unit column stride (a projection's columns of
 * the fused q/k/v output are fine); at (S, K, R): slot s's A^T, rank r in its first r columns; bt (S, R, N): slot
 * s's s*B^T in its first r rows; R is a multiple of RB. segments: n_seg triples (slot, first row, end row); ranks[s]
 * the rank of slot s on this projection (0: the adapter leaves it alone). Sums run over k, then r, in order.
 */
#include <stdint.h>

#define RB 16 /* ranks per shrink pass (R is padded to a multiple of it) */
#define NB 32 /* output columns per expand pass */
#define MR 4  /* rows per work item */

/* h (rows, R) = x (rows, K) @ at (K, R)[:, :rank], rank rounded up to RB (the extra columns are never read). */
static inline void shrink(const float *restrict x, int64_t ldx, const float *restrict at, int64_t K, int64_t R,
                          int64_t rank, float *restrict h, const int rows) {
    for (int64_t r0 = 0; r0 < rank; r0 += RB) {
        float acc[MR][RB];
        for (int m = 0; m < rows; m++)
            for (int j = 0; j < RB; j++) acc[m][j] = 0.f;
        for (int64_t k = 0; k < K; k++) {
            const float *ak = at + k * R + r0;
            for (int m = 0; m < rows; m++) {
                const float xv = x[m * ldx + k];
#pragma omp simd
                for (int j = 0; j < RB; j++) acc[m][j] += xv * ak[j];
            }
        }
        for (int m = 0; m < rows; m++)
            for (int j = 0; j < RB; j++) h[m * R + r0 + j] = acc[m][j];
    }
}

/* y (rows, N) += h (rows, R)[:, :rank] @ bt (R, N)[:rank]. */
static inline void expand(float *restrict y, int64_t ldy, const float *restrict bt, int64_t N, int64_t rank,
                          const float *restrict h, int64_t R, const int rows) {
    int64_t n0 = 0;
    for (; n0 + NB <= N; n0 += NB) {
        float acc[MR][NB];
        for (int m = 0; m < rows; m++)
            for (int c = 0; c < NB; c++) acc[m][c] = y[m * ldy + n0 + c];
        for (int64_t r = 0; r < rank; r++) {
            const float *br = bt + r * N + n0;
            for (int m = 0; m < rows; m++) {
                const float hv = h[m * R + r];
#pragma omp simd
                for (int c = 0; c < NB; c++) acc[m][c] += hv * br[c];
            }
        }
        for (int m = 0; m < rows; m++)
            for (int c = 0; c < NB; c++) y[m * ldy + n0 + c] = acc[m][c];
    }
    for (; n0 < N; n0++)
        for (int m = 0; m < rows; m++) {
            float s = y[m * ldy + n0];
            for (int64_t r = 0; r < rank; r++) s += h[m * R + r] * bt[r * N + n0];
            y[m * ldy + n0] = s;
        }
}

static inline void rows_delta(const float *x, int64_t ldx, float *y, int64_t ldy, const float *at, const float *bt,
                              int64_t K, int64_t N, int64_t R, int64_t rank, float *h, const int rows) {
    shrink(x, ldx, at, K, R, rank, h, rows);
    expand(y, ldy, bt, N, rank, h, R, rows);
}

int lora_delta(const float *x, int64_t ldx, float *y, int64_t ldy, const float *at, const float *bt,
               const int64_t *segments, int64_t n_seg, const int64_t *ranks, int64_t K, int64_t N, int64_t R,
               int nthreads) {
    if (R % RB) return 1;
    int64_t items = 0;
    for (int64_t s = 0; s < n_seg; s++) items += (segments[3 * s + 2] - segments[3 * s + 1] + MR - 1) / MR;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && items > 1)
    for (int64_t item = 0; item < items; item++) {
        int64_t s = 0, first = item;  /* find the item's segment: a handful of segments, a linear walk */
        for (;; s++) {
            const int64_t n = (segments[3 * s + 2] - segments[3 * s + 1] + MR - 1) / MR;
            if (first < n) break;
            first -= n;
        }
        const int64_t slot = segments[3 * s], row = segments[3 * s + 1] + first * MR, end = segments[3 * s + 2];
        const int64_t rank = ranks[slot];
        if (rank == 0) continue;
        const int rows = end - row < MR ? (int)(end - row) : MR;
        float h[MR * R];
        const float *xs = x + row * ldx, *ats = at + slot * K * R, *bts = bt + slot * R * N;
        float *ys = y + row * ldy;
        switch (rows) {  /* literal row counts: the accumulators stay in registers */
            case 4: rows_delta(xs, ldx, ys, ldy, ats, bts, K, N, R, rank, h, 4); break;
            case 3: rows_delta(xs, ldx, ys, ldy, ats, bts, K, N, R, rank, h, 3); break;
            case 2: rows_delta(xs, ldx, ys, ldy, ats, bts, K, N, R, rank, h, 2); break;
            default: rows_delta(xs, ldx, ys, ldy, ats, bts, K, N, R, rank, h, 1); break;
        }
    }
    return 0;
}
