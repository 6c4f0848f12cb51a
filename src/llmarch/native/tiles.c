/* llmarch: helpers shared by plain.c (fp32) and plain_bf16.c (bf16): a thread's share of a range and, for their
 * AVX-512 register tiles, masks for the last lanes of a row and a 16 x 16 transpose of 32-bit values (fp32, or
 * pairs of bf16). */
#include <stdint.h>
#include <stdlib.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* the W g^T tiles (plain.c's many_mm_t_tile, plain_bf16.c's bmany_mm_t_tile) prefetch the first lines of the next
 * tile's rows of W into L2: a row's start is where the hardware prefetcher has not caught on yet. The first 16
 * lines (1 KB) took the forward of a bf16 expert 1.05-1.3x faster, its fp32 input gradient 1.04-1.29x (Zen 5 EPYC,
 * from memory; all of a row's 128 lines: 0.9x at 16-32 rows of a 512 x 2048 fp32 expert) */
#define AHEAD_LINES 16

static inline void split(int64_t n, int64_t align, int64_t *lo, int64_t *hi) {  /* this thread's share of [0, n) */
#ifdef _OPENMP
  int64_t parts = omp_get_num_threads(), me = omp_get_thread_num();
#else
  int64_t parts = 1, me = 0;
#endif
  int64_t per = ((n + parts - 1) / parts + align - 1) / align * align;
  *lo = min64(n, me * per);
  *hi = min64(n, *lo + per);
}

/* a thread's buffer of `bytes` (a multiple of 64), 64-byte aligned; on failure NULL, and *ok cleared: the caller's
 * threads pass a barrier, then work only if every allocation succeeded */
static inline void *thread_panel(size_t bytes, int *ok) {
  void *p = aligned_alloc(64, bytes);
  if (!p) {
#pragma omp atomic write
    *ok = 0;
  }
  return p;
}

/* tile(T) for the T (1-6) rows a tile takes: each count a tile of its own, compiled with it */
#define TILE_OF_ROWS(tile, T)                                                                         \
  switch (T) {                                                                                        \
    case 1: tile(1); break;                                                                           \
    case 2: tile(2); break;                                                                           \
    case 3: tile(3); break;                                                                           \
    case 4: tile(4); break;                                                                           \
    case 5: tile(5); break;                                                                           \
    default: tile(6);                                                                                 \
  }

/* 12 rows of W from i0 (of I) against V (1-4) vectors of 16 rows of g: tile(i, V, MR) for tiles of MR rows of W,
 * 12-24 sums each (two of 6 rows for four vectors, 8 + 4 rows for three) */
#define TASK_OF_12(tile, V, i0, I)                                                                    \
  switch (V) {                                                                                        \
    case 1: tile(i0, 1, 12); break;                                                                   \
    case 2: tile(i0, 2, 12); break;                                                                   \
    case 3: tile(i0, 3, 8); if ((i0) + 8 < (I)) tile((i0) + 8, 3, 4); break;                          \
    default: tile(i0, 4, 6); if ((i0) + 6 < (I)) tile((i0) + 6, 4, 6);                               \
  }

#ifdef __AVX512F__
static inline __mmask16 lanes(int64_t left) {  /* the first min(left, 16) of 16 lanes */
  return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

static inline __mmask32 lanes32(int64_t left) {  /* the first min(left, 32) of 32 lanes */
  return left >= 32 ? (__mmask32)0xFFFFFFFFu : left <= 0 ? (__mmask32)0 : (__mmask32)((1u << left) - 1);
}

/* the 16 x 16 block in r, transposed in place (r[j] becomes column j) */
static inline void transpose16(__m512 *r) {
  __m512 t[16];
  for (int i = 0; i < 8; i++) {  /* per 128-bit lane: (a0 b0 a1 b1), (a2 b2 a3 b3) */
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {  /* r[4i + j], lane L: column 4L + j of rows 4i .. 4i + 3 */
    __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; j++) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
  }
  for (int j = 0; j < 4; j++) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
    r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xDD);
  }
}

/* y = g W^T past a few rows either as W g^T (w_gt_product below), whose vectors run over 16 rows of g each, or as an
 * x @ W product over W's rows transposed into its panel (plain.c's many_mm, plain_bf16.c's bmany_mm, `trans`), which
 * pads no rows but transposes every block of W. Zen 5 EPYC, one thread, an expert's two matrices from memory
 * (benchmarks/plain_ab.py, the panel against --before-flags=-DMM_T_PANEL(R,p)=0): past 32 rows but at multiples of
 * 16 the panel ran 1.1-1.4x (fp32 and bf16); at 17-24 rows 1.05-1.16x for fp32's 512 x 2048 and 0.98x for its
 * 1024 x 512, but 0.84-1.0x in bf16 (pairs: p = 1); at multiples of 16 and at 25-31 rows 0.67-0.93x. An A/B build
 * may set MM_T_PANEL(R, p). */
#ifndef MM_T_PANEL
#define MM_T_PANEL(R, p) by_panel(R, p)
#endif
static inline int by_panel(int64_t R, int pairs) {
  int64_t rem = R % 16;
  return R > 16 && rem != 0 && (R > 32 || (!pairs && rem <= 8));
}

/* y[R, I] = g[R, O] W[I, O]^T as z = W g^T (plain.c's many_mm_t, plain_bf16.c's bmany_mm_t): up to 64 rows of g at
 * a time made into a panel gt by panel(gt, g rows, rows, O, gs, V) (V = vectors of 16 of the rows), then tasks of
 * 12 rows of W, task(y, w, gt, R, I, O, ws, i0, r0, V), split across threads. g's elements are `elem` bytes;
 * gt_bytes: the panel for 64 rows. 0 if the panel could not be allocated. */
typedef void (*panel_fn)(void *gt, const void *g, int64_t rows, int64_t O, int64_t gs, int V);
typedef void (*task_fn)(float *y, const void *w, const void *gt, int64_t R, int64_t I, int64_t O, int64_t ws,
                        int64_t i0, int64_t r0, int V);

static int w_gt_product(float *y, const void *g, const void *w, int64_t R, int64_t I, int64_t O, int64_t ws,
                        int64_t gs, size_t elem, size_t gt_bytes, panel_fn panel, task_fn task) {
  void *gt = aligned_alloc(64, gt_bytes);
  if (!gt) return 0;
  for (int64_t r0 = 0; r0 < R; r0 += 64) {
    int64_t rows = min64(64, R - r0);
    int V = (int)((rows + 15) / 16);
    panel(gt, (const char *)g + r0 * gs * elem, rows, O, gs, V);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < (I + 11) / 12; t++) task(y, w, gt, R, I, O, ws, t * 12, r0, V);
  }
  free(gt);
  return 1;
}
#endif
