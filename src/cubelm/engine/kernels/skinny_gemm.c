/* y = x @ W for a few rows of x (M <= ~8): the weight-streaming GEMM of decode steps.
 *
 * Why a kernel: MKL runs GEMMs with a handful of rows far below the memory system's speed here. Measured on the
 * base preset's shapes with the weights in DRAM: one row at 19-50 GB/s, four rows at 14-18 GB/s, where this
 * kernel streams 50-57 GB/s (one row) and ~38 GB/s (four rows, where it becomes compute-bound). It reads the
 * weights in the engine's tile-major layout, keeps an (MR x TILE) block of outputs in vector registers, reads
 * each weight element once per group of MR rows, and splits the column tiles over the threads.
 *
 * Layouts (fp32, contiguous): x (M, K); W (P, K, Nb): block p holds output columns p*Nb .. (p+1)*Nb as a row-major
 * (K, Nb) matrix (cubelm.engine.decode_layout.BlockedLinear); y (M, P*Nb) row-major.
 * Sums run over k in order; results equal a dot product per output up to float rounding.
 */
#include <stdint.h>

#if defined(__AVX512F__)
#define TILE 64 /* four 16-float registers per row */
#else
#define TILE 32 /* four 8-float registers per row (AVX2) */
#endif

/* MR rows x WIDTH columns of a block whose rows are ldw floats apart; inlined with MR and WIDTH literals
 * (MR * WIDTH / lanes accumulator registers: 16 of the 32 AVX-512 or 16 AVX2 registers). */
static inline void tile_kernel(const float *restrict x, int64_t K, const float *restrict w, int64_t ldw,
                               float *restrict y, int64_t ldy, const int MR, const int WIDTH) {
    float acc[MR][WIDTH];
    for (int m = 0; m < MR; m++)
        for (int c = 0; c < WIDTH; c++) acc[m][c] = 0.f;
    for (int64_t k = 0; k < K; k++) {
        const float *wk = w + k * ldw;
        for (int m = 0; m < MR; m++) {
            const float xv = x[m * K + k];
#pragma omp simd
            for (int c = 0; c < WIDTH; c++) acc[m][c] += xv * wk[c];
        }
    }
    for (int m = 0; m < MR; m++)
        for (int c = 0; c < WIDTH; c++) y[m * ldy + c] = acc[m][c];
}

/* Columns left over when Nb is not a multiple of TILE: plain loops. */
static void edge_kernel(const float *x, int64_t K, const float *w, int64_t ldw, float *y, int64_t ldy, int64_t M,
                        int64_t width) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < width; c++) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; k++) acc += x[m * K + k] * w[k * ldw + c];
            y[m * ldy + c] = acc;
        }
}

/* Blocks one strip wide (Nb == STRIP: the layout the engine uses when blocked_gemm.c is built, which reads such
 * blocks without packing them): NS consecutive blocks, each a contiguous (K, STRIP) run, side by side in one task,
 * MR rows x NS * STRIP accumulators. NS streams of sequential reads, the same sums in the same order as
 * tile_kernel over a 128-column block (k ascending, one accumulator per output). */
#define STRIP (TILE / 2)
static inline void strips_kernel(const float *restrict x, int64_t K, const float *restrict w, float *restrict y,
                                 int64_t ldy, const int MR, const int NS) {
    float acc[MR][NS][STRIP];
    for (int m = 0; m < MR; m++)
        for (int s = 0; s < NS; s++)
            for (int c = 0; c < STRIP; c++) acc[m][s][c] = 0.f;
    for (int64_t k = 0; k < K; k++)
        for (int m = 0; m < MR; m++) {
            const float xv = x[m * K + k];
            for (int s = 0; s < NS; s++) {
                const float *ws = w + (s * K + k) * STRIP;
#pragma omp simd
                for (int c = 0; c < STRIP; c++) acc[m][s][c] += xv * ws[c];
            }
        }
    for (int m = 0; m < MR; m++)
        for (int s = 0; s < NS; s++)
            for (int c = 0; c < STRIP; c++) y[m * ldy + s * STRIP + c] = acc[m][s][c];
}

/* rows x ns strips with literal counts (ns <= max_ns: one row takes 8 strips, two rows 4) */
static void strips_task(const float *x, int64_t K, const float *w, float *y, int64_t ldy, int64_t rows, int64_t ns) {
#define S1(N) case N: strips_kernel(x, K, w, y, ldy, 1, N); break;
#define S2(N) case N: strips_kernel(x, K, w, y, ldy, 2, N); break;
    if (rows == 1)
        switch (ns) { S1(1) S1(2) S1(3) S1(4) S1(5) S1(6) S1(7) S1(8) }
    else
        switch (ns) { S2(1) S2(2) S2(3) S2(4) }
#undef S1
#undef S2
}

static void skinny_strips(const float *x, const float *W, float *y, int64_t M, int64_t K, int64_t P, int nthreads) {
    const int64_t ns = M == 1 ? 8 : 4, groups = (P + ns - 1) / ns, N = P * STRIP;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t p0 = g * ns, n = P - p0 < ns ? P - p0 : ns;
        const float *w = W + p0 * K * STRIP;
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) strips_task(x + m * K, K, w, y + m * N + p0 * STRIP, N, 2, n);
        if (m < M) strips_task(x + m * K, K, w, y + m * N + p0 * STRIP, N, 1, n);
    }
}

int skinny_gemm_strip(void) { return STRIP; }

int skinny_gemm(const float *x, const float *W, float *y, int64_t M, int64_t K, int64_t P, int64_t Nb, int nthreads) {
    if (Nb == STRIP) {
        skinny_strips(x, W, y, M, K, P, nthreads);
        return 0;
    }
    /* A block row (Nb floats) is read in one pass when Nb is two tiles wide: two half-width strips of the same
     * rows would each stream half of every row and defeat the prefetcher (measured: 27 vs 44 GB/s on base).
     * With AVX2 (8-float tiles of 32 columns) a 128-column block takes one 1-row task of 16 accumulators
     * (measured on the small/base shapes, one thread: 15-20% faster than two 64-column strips). */
    const int full = M == 1 && TILE == 32 && Nb % 128 == 0;
    const int wide = !full && Nb % (2 * TILE) == 0;
    const int64_t width = full ? 128 : wide ? 2 * TILE : TILE;
    const int64_t tiles = (Nb + width - 1) / width, N = P * Nb;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < P * tiles; t++) {
        const int64_t p = t / tiles, c = (t % tiles) * width;
        const float *w = W + p * K * Nb + c;
        float *yt = y + p * Nb + c;
        if (c + width > Nb) {
            edge_kernel(x, K, w, Nb, yt, N, M, Nb - c);
            continue;
        }
        int64_t m = 0;
        if (full) {
            tile_kernel(x, K, w, Nb, yt, N, 1, 128);
            continue;
        }
        if (wide) {
            for (; m + 2 <= M; m += 2) tile_kernel(x + m * K, K, w, Nb, yt + m * N, N, 2, 2 * TILE);
            if (m < M) tile_kernel(x + m * K, K, w, Nb, yt + m * N, N, 1, 2 * TILE);
            continue;
        }
        for (; m + 4 <= M; m += 4) tile_kernel(x + m * K, K, w, Nb, yt + m * N, N, 4, TILE);
        switch (M - m) {
            case 3: tile_kernel(x + m * K, K, w, Nb, yt + m * N, N, 3, TILE); break;
            case 2: tile_kernel(x + m * K, K, w, Nb, yt + m * N, N, 2, TILE); break;
            case 1: tile_kernel(x + m * K, K, w, Nb, yt + m * N, N, 1, TILE); break;
        }
    }
    return 0;
}
