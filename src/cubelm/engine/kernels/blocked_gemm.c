/* y = x @ W for many rows of x (batched decode, prompt chunks): a register-blocked GEMM over the engine's blocked
 * weight layout.
 *
 * Why a kernel: above a handful of rows the work is compute-bound, and MKL's batched matmul over the weight blocks
 * (the previous path) reaches only part of the FMA peak on a batched decode step's shapes, then needs a (P, M, Nb)
 * -> (M, N) copy. Measured on base's shapes (2 threads, AVX2 EPYC, docs/benchmarks.md section (g)): 34 rows,
 * 100-111 GFLOP/s for MKL vs 99-127 here; the 32,000-column head at 16 rows 68 vs 83.
 *
 * Layouts (fp32, contiguous): x (M, K); W (P, K, Nb): block p holds output columns p*Nb .. (p+1)*Nb as a row-major
 * (K, Nb) matrix (cubelm.engine.decode_layout.BlockedLinear); y (M, P*Nb) row-major.
 * Blocking: a task is one weight block p and a chunk of MC rows; K runs in chunks of KC. Each (KC, Nb) slice of the
 * block is packed into Nb / NR contiguous (KC, NR) strips in a per-thread buffer (in place, a strip is one cache
 * line every Nb floats, which lands on a few L1 sets and is evicted before its reuse; packing measured 5-25%
 * faster than reading in place); each strip then stays in L1 while every 6-row panel of the chunk passes over it.
 * That copy runs at DRAM speed between the arithmetic, so the engine stores blocks exactly one strip wide (Nb == NR,
 * cubelm.engine.kernels.skinny_gemm.strip_width), which are read in place: the (kc, NR) slice is contiguous.
 * Sums run over k in order within a chunk, chunks in order: the result equals a dot product per output up to
 * float rounding.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define VL 16
#else
#define VL 8
#endif
#define NR (2 * VL) /* columns per micro-tile: two vectors */
#define MR 6        /* rows per micro-tile: 6 x 2 accumulators + 2 weight vectors + 1 broadcast <= 16 registers */
#define KC 256
#define MC 96

typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4))); /* unaligned loads and stores */

/* rows x NR outputs over k in [0, kc); rows is a literal at each call site so the accumulators stay in registers */
static inline __attribute__((always_inline)) void bg_micro(const int rows, const float *restrict a, int64_t lda,
                                                        const float *restrict b, int64_t ldb, float *restrict c,
                                                        int64_t ldc, int64_t kc, int first) {
    vf c0[MR], c1[MR];
    for (int m = 0; m < rows; m++) {
        if (first) {
            c0[m] = (vf){0};
            c1[m] = (vf){0};
        } else {
            c0[m] = *(const vfu *)(c + m * ldc);
            c1[m] = *(const vfu *)(c + m * ldc + VL);
        }
    }
    for (int64_t k = 0; k < kc; k++) {
        const vf b0 = *(const vfu *)(b + k * ldb), b1 = *(const vfu *)(b + k * ldb + VL);
        for (int m = 0; m < rows; m++) {
            const float av = a[m * lda + k];
            c0[m] += av * b0;
            c1[m] += av * b1;
        }
    }
    for (int m = 0; m < rows; m++) {
        *(vfu *)(c + m * ldc) = c0[m];
        *(vfu *)(c + m * ldc + VL) = c1[m];
    }
}

/* columns of a block beyond the last full NR strip (Nb not a multiple of NR): plain loops */
static void bg_edge(const float *a, int64_t lda, const float *b, int64_t ldb, float *c, int64_t ldc, int64_t rows,
                 int64_t width, int64_t kc, int first) {
    for (int64_t m = 0; m < rows; m++)
        for (int64_t j = 0; j < width; j++) {
            float acc = first ? 0.f : c[m * ldc + j];
            for (int64_t k = 0; k < kc; k++) acc += a[m * lda + k] * b[k * ldb + j];
            c[m * ldc + j] = acc;
        }
}

static void bg_panel(int64_t rows, const float *a, int64_t lda, const float *b, int64_t ldb, float *c, int64_t ldc,
                  int64_t kc, int first) {
    switch (rows) {
        case 6: bg_micro(6, a, lda, b, ldb, c, ldc, kc, first); break;
        case 5: bg_micro(5, a, lda, b, ldb, c, ldc, kc, first); break;
        case 4: bg_micro(4, a, lda, b, ldb, c, ldc, kc, first); break;
        case 3: bg_micro(3, a, lda, b, ldb, c, ldc, kc, first); break;
        case 2: bg_micro(2, a, lda, b, ldb, c, ldc, kc, first); break;
        case 1: bg_micro(1, a, lda, b, ldb, c, ldc, kc, first); break;
    }
}

/* Per-thread scratch for the packed weight slice: grown once, kept for the process (a fresh 128 KB malloc per task
 * would be an mmap and a page fault per touch). */
static _Thread_local float *pack_buf = 0;
static _Thread_local int64_t pack_cap = 0;

static float *bg_scratch(int64_t n) {
    if (n > pack_cap) {
        free(pack_buf);
        pack_buf = aligned_alloc(64, (size_t)((n * 4 + 63) / 64 * 64));
        pack_cap = pack_buf ? n : 0;
    }
    return pack_buf;
}

/* The block width whose blocks need no packing: the engine's decode layout uses it (decode_layout.py). */
int blocked_gemm_strip(void) { return NR; }

int blocked_gemm(const float *x, const float *W, float *y, int64_t M, int64_t K, int64_t P, int64_t Nb,
                 int nthreads) {
    const int64_t chunks = (M + MC - 1) / MC, N = P * Nb, full = Nb / NR * NR, strips = full / NR;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t t = 0; t < P * chunks; t++) {
        const int64_t p = t / chunks, m0 = (t % chunks) * MC, m1 = m0 + MC < M ? m0 + MC : M;
        const float *w = W + p * K * Nb;
        float *yb = y + p * Nb;
        const int packs = Nb != NR && full > 0; /* a block narrower than a strip has only edge columns */
        float *pk = packs ? bg_scratch(KC * full) : 0;
        if (packs && !pk) {
            failed = 1;
            continue;
        }
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int64_t kc = K - k0 < KC ? K - k0 : KC;
            const int first = k0 == 0;
            /* (kc, Nb) slice -> strips of (kc, NR) contiguous: the micro-kernel then streams its strip from L1
             * instead of one cache line every Nb floats (which maps the strip onto a few L1 sets). Blocks exactly
             * one strip wide (Nb == NR, the layout the engine picks when this kernel is built) already are. */
            const float *strip = pk;
            if (Nb == NR)
                strip = w + k0 * NR;
            else
                for (int64_t k = 0; k < kc; k++) {
                    const float *src = w + (k0 + k) * Nb;
                    for (int64_t j = 0; j < strips; j++)
                        memcpy(pk + (j * kc + k) * NR, src + j * NR, sizeof(float) * NR);
                }
            for (int64_t j = 0; j < strips; j++) {
                for (int64_t m = m0; m < m1; m += MR) {
                    const int64_t rows = m1 - m < MR ? m1 - m : MR;
                    bg_panel(rows, x + m * K + k0, K, strip + j * kc * NR, NR, yb + m * N + j * NR, N, kc, first);
                }
            }
            if (full < Nb)
                for (int64_t m = m0; m < m1; m += MR) {
                    const int64_t rows = m1 - m < MR ? m1 - m : MR;
                    bg_edge(x + m * K + k0, K, w + k0 * Nb + full, Nb, yb + m * N + full, N, rows, Nb - full, kc, first);
                }
        }
    }
    return failed ? -1 : 0;
}
