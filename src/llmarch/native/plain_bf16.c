/* llmarch: products of few rows with a plain bf16 weight (no packed copy), forward and backward, for training a
 * bf16 expert bank where each expert sees a few rows (llmarch.native.plain; llmarch.nn.banks). AVX-512 BF16: every
 * product is VDPBF16PS, which multiplies pairs of bf16 values exactly and adds them into fp32 sums (two roundings
 * per pair, denormal inputs and outputs flushed to zero, as in oneDNN's bf16 products); sums of fp32 written as
 * fp32, and the weight gradient rounded to bf16 once (round to nearest even). Rows of every operand are contiguous;
 * row strides are given, in elements. Same roles and names as plain.c's fp32 kernels:
 *
 * llmarch_plain_bf16_mm:    y[R, N] = x[R, K] @ W[K, N]       (W row-major: a column-major bank's input gradient)
 *   two pairs of W's rows at a time, interleaved into (k, k+1) pairs for VDPBF16PS, against y in L1.
 * llmarch_plain_bf16_mm_t:  y[R, I] = g[R, O] @ W[I, O]^T     (dot products: a column-major bank's forward)
 *   four rows of W against up to four rows of g, 32 values per instruction.
 * llmarch_plain_bf16_outer: out[I, O] = x[n, I]^T @ g[n, O]   (the weight gradient, bf16)
 *   rows paired first (x's per output row, g's per column), 64 columns per step, non-temporal stores when out is
 *   64-byte aligned and O a multiple of 32.
 * llmarch_plain_bf16_mm_round, _mm_t_round: the two products, their fp32 sums then rounded to bf16 while in cache.
 *
 * The rows of a weight of a few hundred to a thousand values fill a 4 KiB page in a few lines each, too short a
 * stream for the hardware prefetcher: each product prefetches the lines of its next rows (from memory on a Zen 5
 * EPYC, the dot products ran 2.7-5.7x faster at 1-8 rows with them). Each splits its outputs across OpenMP threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__))
#error "llmarch plain_bf16 needs AVX-512 F, BW and BF16"
#endif

#include "tiles.c"

static inline float widen(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint32_t pair_of(const uint16_t *p, int64_t stride, int two) {  /* (p[0], p[stride]) in 32 bits */
  return p[0] | (two ? (uint32_t)p[stride] << 16 : 0u);
}

static inline __m256i load16(const uint16_t *p, __mmask16 m) {  /* p NULL: a row past the end, zeros */
  if (!p) return _mm256_setzero_si256();
  return m == 0xffff ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16(m, p);
}

/* 16 columns of two rows as 16 (row 0, row 1) pairs */
static inline __m512bh pairs16(const uint16_t *w0, const uint16_t *w1, __mmask16 m, __m512i order) {
  __m512i a = _mm512_castsi256_si512(load16(w0, m)), b = _mm512_castsi256_si512(load16(w1, m));
  return (__m512bh)_mm512_permutex2var_epi16(a, order, b);
}

/* Past a few rows: register tiles of several rows, as plain.c's many_* kernels, over pairs of the shared index
 * (VDPBF16PS takes 16 pairs per operand). From BMANY_*_FROM rows the entry points below run these instead.
 * bmany_mm_t: 12 x 32 (or 8 x 48, 6 x 64) tiles of W g^T (tiles.c's w_gt_product), the pairs of g's rows
 *             transposed into a panel [O / 2, 16 V] (L2), so that W is read once, a pair of each row's values at a
 *             time; or, for row counts that would leave W g^T's last vector largely empty (tiles.c's by_panel),
 *             bmany_mm over W's rows, whose pairs are 32-bit words, transposed 16 x 16 into its panel (`trans`).
 * bmany_mm:   tiles of up to 6 rows of y by 64 columns over a panel of BMANY_SUM pairs of W's rows (their 64
 *             columns interleaved into (k, k + 1) pairs, in L1); the row tiles prefetch the next block's rows
 *             between them.
 * bmany_outer: 6 rows of out by 64 columns over a panel of g's 64 columns, its rows interleaved into (r, r + 1)
 *             pairs (in L1), x's rows paired once; rounded to bf16 and written with non-temporal stores.
 * Every sum runs over its pairs in order, BMANY_SUM pairs in registers from zero at a time. */

#ifndef BMANY_FROM  /* the fewest rows for each (Zen 5 EPYC, one thread, an expert's gate_up and down from memory,
                      * against the few-row kernels: mm 1.0-1.3x at 8-9 rows, mm_t 1.1x at 12, outer 1.2-1.5x at 16,
                      * 0.85-1.26x at 12) */
#define BMANY_MM_FROM 8
#define BMANY_MM_T_FROM 11
#define BMANY_OUTER_FROM 13
#else  /* one count for all three (an A/B build) */
#define BMANY_MM_FROM BMANY_FROM
#define BMANY_MM_T_FROM BMANY_FROM
#define BMANY_OUTER_FROM BMANY_FROM
#endif
#define BMANY_SUM 128

static inline uint32_t pair_at(const uint16_t *p, int two) {  /* (p[0], p[1]), or (p[0], 0) */
  uint32_t u = p[0];
  if (two) memcpy(&u, p, sizeof u);
  return u;
}

/* (a[c], b[c]) for c in [0, width) as 32-bit pairs at out: zeros past cols, and b NULL is a row of zeros */
static inline void pair_rows(uint32_t *out, const uint16_t *a, const uint16_t *b, int64_t cols, int64_t width) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t c = 0; c < width; c += 32) {
    __mmask32 m = lanes32(cols - c);
    __m512i va = _mm512_maskz_loadu_epi16(m, a + c);
    __m512i vb = b ? _mm512_maskz_loadu_epi16(m, b + c) : _mm512_setzero_si512();
    _mm512_storeu_si512(out + c, _mm512_permutex2var_epi16(va, lo, vb));
    _mm512_storeu_si512(out + c + 16, _mm512_permutex2var_epi16(va, hi, vb));
  }
}

/* rows i0 .. i0 + MR - 1 of z = W gt (z[i, r] = y[r0 + r, i]; V vectors of 16 rows of g), stored into y */
static inline __attribute__((always_inline)) void bmany_mm_t_tile(float *y, const uint16_t *w, const uint32_t *gt,
                                                                    int64_t R, int64_t I, int64_t O, int64_t ws,
                                                                    int64_t i0, int64_t r0, const int V,
                                                                    const int MR) {
  const uint16_t *wr[12], *nx[12];  /* this tile's rows, the next tile's (as many) */
  for (int a = 0; a < MR; a++) {
    wr[a] = w + min64(i0 + a, I - 1) * ws;  /* past I: row I - 1 again, not stored */
    nx[a] = w + min64(i0 + MR + a, I - 1) * ws;
  }
  int64_t P = (O + 1) / 2, lines = min64((O + 31) / 32, AHEAD_LINES);
  __m512 acc[12][4];
  float z[12][64];
  for (int64_t p0 = 0; p0 < P; p0 += BMANY_SUM) {
    for (int a = 0; a < MR; a++)
      for (int v = 0; v < V; v++) acc[a][v] = _mm512_setzero_ps();
    int64_t p1 = min64(P, p0 + BMANY_SUM);
    for (int64_t p = p0; p < p1; p++) {
      if ((p & 15) == 0)  /* each row of W a few lines ahead, once per line */
        for (int a = 0; a < MR; a++) _mm_prefetch((const char *)(wr[a] + 2 * p + 128), _MM_HINT_T0);
      if (p < MR * lines)  /* the next tile's rows into L2, the first line of each first */
        _mm_prefetch((const char *)(nx[p % MR] + (p / MR) * 32), _MM_HINT_T1);
      __m512bh b[4];
      for (int v = 0; v < V; v++) b[v] = (__m512bh)_mm512_load_si512(gt + p * 16 * V + 16 * v);
      int two = 2 * p + 1 < O;
      for (int a = 0; a < MR; a++) {
        __m512bh s = (__m512bh)_mm512_set1_epi32((int)pair_at(wr[a] + 2 * p, two));
        for (int v = 0; v < V; v++) acc[a][v] = _mm512_dpbf16_ps(acc[a][v], s, b[v]);
      }
    }
    for (int a = 0; a < MR; a++)
      for (int v = 0; v < V; v++)
        _mm512_storeu_ps(z[a] + 16 * v, p0 == 0 ? acc[a][v] : _mm512_add_ps(_mm512_loadu_ps(z[a] + 16 * v), acc[a][v]));
  }
  int64_t rows = min64(R - r0, 16 * V), cols = min64(MR, I - i0);
  for (int64_t r = 0; r < rows; r++)  /* row by row: each row's MR values are adjacent in y */
    for (int a = 0; a < cols; a++) y[(r0 + r) * I + i0 + a] = z[a][r];
}

/* gt[p, 0 : 16 V] = the pairs (g[r, 2p], g[r, 2p + 1]) of rows r < rows (zeros past them and past O) */
static void bmany_transpose(void *panel, const void *rows_of_g, int64_t rows, int64_t O, int64_t gs, int V) {
  uint32_t *gt = panel;
  const uint16_t *g = rows_of_g;
  int64_t P = (O + 1) / 2;
  for (int v = 0; v < V; v++)
    for (int64_t p0 = 0; p0 < P; p0 += 16) {
      __mmask32 m = lanes32(O - 2 * p0);
      __m512 r[16];
      for (int q = 0; q < 16; q++)
        r[q] = 16 * v + q < rows ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, g + (16 * v + q) * gs + 2 * p0))
                                 : _mm512_setzero_ps();
      transpose16(r);
      for (int j = 0; j < 16 && p0 + j < P; j++) _mm512_store_ps((float *)(gt + (p0 + j) * 16 * V + 16 * v), r[j]);
    }
}

/* the 12 rows of W at i0 (tiles.c's task_fn) */
static void bmany_mm_t_task(float *y, const void *w, const void *gt, int64_t R, int64_t I, int64_t O, int64_t ws,
                            int64_t i0, int64_t r0, int V) {
#define BMANY_T_TILE(i_, V_, MR_) bmany_mm_t_tile(y, w, gt, R, I, O, ws, i_, r0, V_, MR_)
  TASK_OF_12(BMANY_T_TILE, V, i0, I)
#undef BMANY_T_TILE
}

/* rows r0 .. r0 + T - 1 of y's 64 columns at j, pairs p0 .. p1 - 1 of the shared index (the panel [p1 - p0, 64],
 * in L1), added to y after the first block; next (not NULL): the next block's rows (its rows 0 .. last), of which
 * this tile prefetches pairs q0 .. q0 + count - 1 into L2, one pair every `every` steps (the row tiles share the
 * block's reads evenly: all in one tile asked for more than the memory gives) */
static inline __attribute__((always_inline)) void bmany_mm_tile(float *y, const uint16_t *x, const uint32_t *panel,
                                                                  int64_t K, int64_t N, int64_t xs, int64_t j,
                                                                  int64_t r0, int64_t p0, int64_t p1, const int T,
                                                                  const __mmask16 *m, const uint16_t *next,
                                                                  int64_t ws, int64_t last, int64_t q0,
                                                                  int64_t count, int every, int trans) {
  const uint16_t *xr[6];
  for (int r = 0; r < T; r++) xr[r] = x + (r0 + r) * xs;
  __m512 a[6][4];
  for (int r = 0; r < T; r++)
    for (int v = 0; v < 4; v++) a[r][v] = _mm512_setzero_ps();
  int wait = 0;
  for (int64_t p = p0; p < p1; p++) {
    if (next && count > 0 && --wait <= 0) {  /* the two lines of each row of the next block's pair q0; trans:
                                               * half q0 % 2 of row q0 / 2 (four lines) */
      for (int q = 0; q < 4; q++)
        _mm_prefetch((const char *)(trans ? next + min64(q0 >> 1, last) * ws + ((q0 & 1) * 4 + q) * 32
                                          : next + min64(2 * q0 + q / 2, last) * ws + 32 * (q % 2)),
                     _MM_HINT_T1);
      wait = every, q0++, count--;
    }
    __m512bh b[4];
    for (int v = 0; v < 4; v++) b[v] = (__m512bh)_mm512_load_si512(panel + (p - p0) * 64 + 16 * v);
    int two = 2 * p + 1 < K;
    for (int r = 0; r < T; r++) {
      __m512bh s = (__m512bh)_mm512_set1_epi32((int)pair_at(xr[r] + 2 * p, two));
      for (int v = 0; v < 4; v++) a[r][v] = _mm512_dpbf16_ps(a[r][v], s, b[v]);
    }
  }
  for (int r = 0; r < T; r++)
    for (int v = 0; v < 4; v++) {
      float *q = y + (r0 + r) * N + j + 16 * v;
      _mm512_mask_storeu_ps(q, m[v], p0 == 0 ? a[r][v] : _mm512_add_ps(_mm512_maskz_loadu_ps(m[v], q), a[r][v]));
    }
}

/* the panel [p1 - p0, 64]: pairs p0 .. p1 - 1 of W's rows, their 64 columns at j interleaved; trans: W given as its
 * transpose (w [N, K], rows ws apart), whose rows j .. j + 63 hold the pairs as 32-bit words: 16 x 16 blocks of
 * them transposed (zeros past N, and past K in the last word of an odd K) */
static inline void bmany_fill(uint32_t *panel, const uint16_t *w, int64_t K, int64_t N, int64_t ws, int64_t j,
                              int64_t p0, int64_t p1, int trans) {
  if (!trans) {
    for (int64_t p = p0; p < p1; p++)
      pair_rows(panel + (p - p0) * 64, w + 2 * p * ws + j, 2 * p + 1 < K ? w + (2 * p + 1) * ws + j : NULL, N - j,
                64);
    return;
  }
  for (int v = 0; v < 4; v++)
    for (int64_t p = p0; p < p1; p += 16) {
      __mmask32 m = lanes32(K - 2 * p);
      __m512 r[16];
      for (int q = 0; q < 16; q++)
        r[q] = j + 16 * v + q < N ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, w + (j + 16 * v + q) * ws + 2 * p))
                                  : _mm512_setzero_ps();
      transpose16(r);
      for (int t = 0; t < 16 && p + t < p1; t++) _mm512_store_ps((float *)(panel + (p + t - p0) * 64 + 16 * v), r[t]);
    }
}

static int bmany_mm(float *y, const uint16_t *x, const uint16_t *w, int64_t R, int64_t K, int64_t N, int64_t ws,
                    int64_t xs, int trans) {
  int ok = 1;
  int64_t P = (K + 1) / 2;
#pragma omp parallel
  {
    uint32_t *panel = thread_panel((size_t)BMANY_SUM * 64 * sizeof(uint32_t), &ok);
    int64_t j0, j1;
    split(N, 64, &j0, &j1);
#pragma omp barrier
    if (ok) {
      for (int64_t j = j0; j < j1; j += 64) {
        __mmask16 m[4];
        for (int v = 0; v < 4; v++) m[v] = lanes(N - j - 16 * v);
        for (int64_t p0 = 0; p0 < P; p0 += BMANY_SUM) {  /* a block of pairs: its panel in L1 for every row tile */
          int64_t p1 = min64(P, p0 + BMANY_SUM);
          bmany_fill(panel, w, K, N, ws, j, p0, p1, trans);
          int64_t tiles = (R + 5) / 6, r0 = 0;
          for (int64_t t = 0; t < tiles; t++) {  /* tiles of at most 6 rows, as even as they go */
            int T = (int)((R - r0) / (tiles - t));
            /* the next block: these columns' next pairs, else the first pairs of this thread's next 64 columns;
             * trans: its rows of w in halves of 4 lines (two per row) */
            int64_t pn = p1 < P ? p1 : 0, jn = p1 < P ? j : j + 64;
            int64_t steps = jn >= j1 ? 0 : trans ? 2 * min64(64, N - jn) : min64(P, pn + BMANY_SUM) - pn;
            const uint16_t *next = !steps ? NULL : trans ? w + jn * ws + 2 * pn : w + 2 * pn * ws + jn;
            int64_t last = trans ? N - 1 - jn : K - 1 - 2 * pn;
            int64_t share = (steps + tiles - 1) / tiles, q0 = t * share, count = min64(share, steps - q0);
            int every = (int)((p1 - p0) / (share > 0 ? share : 1));
#define BMANY_TILE(T_) \
  bmany_mm_tile(y, x, panel, K, N, xs, j, r0, p0, p1, T_, m, next, ws, last, q0, count, every, trans)
            TILE_OF_ROWS(BMANY_TILE, T)
#undef BMANY_TILE
            r0 += T;
          }
        }
      }
    }
    free(panel);
  }
  return ok;
}

static int bmany_outer(uint16_t *out, const uint16_t *x, const uint16_t *g, int64_t n, int64_t I, int64_t O,
                       int64_t xs, int64_t gs) {
  int64_t P = (n + 1) / 2, Ip = (I + 31) / 32 * 32;
  uint32_t *xp = aligned_alloc(64, (size_t)P * Ip * sizeof(uint32_t));  /* xp[p, i] = (x[2p, i], x[2p + 1, i]) */
  int ok = xp != NULL, stream = (uintptr_t)out % 64 == 0 && O % 32 == 0;
  if (!ok) return 0;
  for (int64_t p = 0; p < P; p++)
    pair_rows(xp + p * Ip, x + 2 * p * xs, 2 * p + 1 < n ? x + (2 * p + 1) * xs : NULL, I, Ip);
#pragma omp parallel
  {
    uint32_t *panel = thread_panel((size_t)P * 64 * sizeof(uint32_t), &ok);
#pragma omp barrier
    if (ok) {
#pragma omp for schedule(static)
      for (int64_t o0 = 0; o0 < O; o0 += 64) {
        for (int64_t p = 0; p < P; p++)
          pair_rows(panel + p * 64, g + 2 * p * gs + o0, 2 * p + 1 < n ? g + (2 * p + 1) * gs + o0 : NULL, O - o0, 64);
        __mmask32 m0 = lanes32(O - o0), m1 = lanes32(O - o0 - 32);
        int whole = stream && o0 + 64 <= O;
        for (int64_t i0 = 0; i0 < I; i0 += 6) {
          int64_t ia[6];
          for (int a = 0; a < 6; a++) ia[a] = min64(i0 + a, I - 1);  /* past I: row I - 1 again, not stored */
          __m512 acc[6][4];
          for (int a = 0; a < 6; a++)
            for (int v = 0; v < 4; v++) acc[a][v] = _mm512_setzero_ps();
          for (int64_t p = 0; p < P; p++) {
            __m512bh b[4];
            for (int v = 0; v < 4; v++) b[v] = (__m512bh)_mm512_load_si512(panel + p * 64 + 16 * v);
            for (int a = 0; a < 6; a++) {
              __m512bh s = (__m512bh)_mm512_set1_epi32((int)xp[p * Ip + ia[a]]);
              for (int v = 0; v < 4; v++) acc[a][v] = _mm512_dpbf16_ps(acc[a][v], s, b[v]);
            }
          }
          for (int a = 0; a < 6 && i0 + a < I; a++) {
            uint16_t *q = out + (i0 + a) * O + o0;
            __m512i h0 = (__m512i)_mm512_cvtne2ps_pbh(acc[a][1], acc[a][0]);
            __m512i h1 = (__m512i)_mm512_cvtne2ps_pbh(acc[a][3], acc[a][2]);
            if (whole) {
              _mm512_stream_si512((__m512i *)q, h0);
              _mm512_stream_si512((__m512i *)(q + 32), h1);
            } else {
              _mm512_mask_storeu_epi16(q, m0, h0);
              _mm512_mask_storeu_epi16(q + 32, m1, h1);
            }
          }
        }
      }
    }
    _mm_sfence();
    free(panel);
  }
  free(xp);
  return ok;
}

void llmarch_plain_bf16_mm(float *y, const uint16_t *x, const uint16_t *w, int64_t R, int64_t K, int64_t N,
                           int64_t ws, int64_t xs) {
  if (R >= BMANY_MM_FROM && bmany_mm(y, x, w, R, K, N, ws, xs, 0)) return;
  const __m512i order = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                         39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
#pragma omp parallel
  {
    int64_t j0, j1;
    split(N, 32, &j0, &j1);
    for (int64_t r = 0; r < R; r++) memset(y + r * N + j0, 0, (size_t)(j1 - j0) * sizeof(float));
    for (int64_t k = 0; k < K && j0 < j1; k += 4) {
      const uint16_t *wr[4];  /* rows k .. k+3; NULL past the end (zero weights, zero factors) */
      for (int q = 0; q < 4; q++) wr[q] = k + q < K ? w + (k + q) * ws : NULL;
      for (int64_t r0 = 0; r0 < R; r0 += 8) {
        int64_t T = min64(8, R - r0);
        __m512i f0[8], f1[8];
        for (int64_t r = 0; r < T; r++) {
          const uint16_t *xr = x + (r0 + r) * xs + k;
          f0[r] = _mm512_set1_epi32((int)pair_of(xr, 1, k + 1 < K));
          f1[r] = k + 2 < K ? _mm512_set1_epi32((int)pair_of(xr + 2, 1, k + 3 < K)) : _mm512_setzero_si512();
        }
        for (int64_t j = j0; j < j1; j += 16) {
          __mmask16 m = j1 - j >= 16 ? 0xffff : (__mmask16)((1u << (j1 - j)) - 1);
          if (r0 == 0 && (j - j0) % 32 == 0 && k + 8 <= K)  /* the next four rows' line */
            for (int q = 4; q < 8; q++) _mm_prefetch((const char *)(w + (k + q) * ws + j), _MM_HINT_T0);
          __m512bh p0 = pairs16(wr[0] + j, wr[1] ? wr[1] + j : NULL, m, order);
          __m512bh p1 = pairs16(wr[2] ? wr[2] + j : NULL, wr[3] ? wr[3] + j : NULL, m, order);
          for (int64_t r = 0; r < T; r++) {
            float *yr = y + (r0 + r) * N + j;
            __m512 a = m == 0xffff ? _mm512_loadu_ps(yr) : _mm512_maskz_loadu_ps(m, yr);
            a = _mm512_dpbf16_ps(a, (__m512bh)f0[r], p0);
            a = _mm512_dpbf16_ps(a, (__m512bh)f1[r], p1);
            if (m == 0xffff)
              _mm512_storeu_ps(yr, a);
            else
              _mm512_mask_storeu_ps(yr, m, a);
          }
        }
      }
    }
  }
}

void llmarch_plain_bf16_mm_t(float *y, const uint16_t *g, const uint16_t *w, int64_t R, int64_t I, int64_t O,
                             int64_t ws, int64_t gs) {
  if (R >= BMANY_MM_T_FROM && MM_T_PANEL(R, 1) && bmany_mm(y, g, w, R, O, I, ws, gs, 1)) return;
  if (R >= BMANY_MM_T_FROM && w_gt_product(y, g, w, R, I, O, ws, gs, sizeof(uint16_t),
                                            (size_t)(O + 1) / 2 * 64 * sizeof(uint32_t), bmany_transpose,
                                            bmany_mm_t_task))
    return;
#pragma omp parallel for schedule(static)
  for (int64_t i0 = 0; i0 < I; i0 += 4) {
    int64_t NB = min64(4, I - i0);
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      int64_t RB = min64(4, R - r0);
      __m512 acc[4][4];
      for (int a = 0; a < 4; a++)
        for (int b = 0; b < 4; b++) acc[a][b] = _mm512_setzero_ps();
      for (int64_t o = 0; o < O; o += 32) {
        __mmask32 m = O - o >= 32 ? 0xffffffffu : (__mmask32)((1u << (O - o)) - 1);
        __m512bh wv[4];
        for (int b = 0; b < 4; b++)  /* rows past the end repeat the first (their sums are not written) */
          wv[b] = (__m512bh)_mm512_maskz_loadu_epi16(m, w + (i0 + (b < NB ? b : 0)) * ws + o);
        if (r0 == 0 && i0 + 8 <= I)  /* the next four rows' line */
          for (int b = 0; b < 4; b++) _mm_prefetch((const char *)(w + (i0 + 4 + b) * ws + o), _MM_HINT_T0);
        for (int a = 0; a < RB; a++) {
          __m512bh gv = (__m512bh)_mm512_maskz_loadu_epi16(m, g + (r0 + a) * gs + o);
          for (int b = 0; b < 4; b++) acc[a][b] = _mm512_dpbf16_ps(acc[a][b], gv, wv[b]);
        }
      }
      for (int a = 0; a < RB; a++)
        for (int b = 0; b < NB; b++) y[(r0 + a) * I + i0 + b] = _mm512_reduce_add_ps(acc[a][b]);
    }
  }
}

void llmarch_plain_bf16_outer(uint16_t *out, const uint16_t *x, const uint16_t *g, int64_t n, int64_t I, int64_t O,
                              int64_t xs, int64_t gs) {
  if (n >= BMANY_OUTER_FROM && bmany_outer(out, x, g, n, I, O, xs, gs)) return;
  int64_t P = (n + 1) / 2;  /* pairs of rows; an odd last row pairs with zeros */
  uint32_t *gp = malloc((size_t)(P * O) * sizeof(uint32_t)), *xp = malloc((size_t)(P * I) * sizeof(uint32_t));
  int64_t Ov = gp && xp ? O - O % 64 : 0;  /* no memory: every column by the scalar loop */
  for (int64_t p = 0; p < P && Ov; p++) {
    int two = 2 * p + 1 < n;
    for (int64_t o = 0; o < O; o++) gp[p * O + o] = pair_of(g + 2 * p * gs + o, gs, two);
    for (int64_t i = 0; i < I; i++) xp[i * P + p] = pair_of(x + 2 * p * xs + i, xs, two);
  }
  int stream = (uintptr_t)out % 64 == 0 && O % 32 == 0;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < I; i++) {
      uint16_t *oi = out + i * O;
      for (int64_t o = 0; o < Ov; o += 64) {
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int64_t p = 0; p < P; p++) {
          __m512bh f = (__m512bh)_mm512_set1_epi32((int)xp[i * P + p]);
          const uint32_t *q = gp + p * O + o;
          s0 = _mm512_dpbf16_ps(s0, f, (__m512bh)_mm512_loadu_si512(q));
          s1 = _mm512_dpbf16_ps(s1, f, (__m512bh)_mm512_loadu_si512(q + 16));
          s2 = _mm512_dpbf16_ps(s2, f, (__m512bh)_mm512_loadu_si512(q + 32));
          s3 = _mm512_dpbf16_ps(s3, f, (__m512bh)_mm512_loadu_si512(q + 48));
        }
        __m512i h0 = (__m512i)_mm512_cvtne2ps_pbh(s1, s0), h1 = (__m512i)_mm512_cvtne2ps_pbh(s3, s2);
        if (stream) {
          _mm512_stream_si512((__m512i *)(oi + o), h0);
          _mm512_stream_si512((__m512i *)(oi + o + 32), h1);
        } else {
          _mm512_storeu_si512(oi + o, h0);
          _mm512_storeu_si512(oi + o + 32, h1);
        }
      }
      for (int64_t o = Ov; o < O; o++) {  /* the last O % 64 columns: fp32 sums of the same products */
        float s = 0.f;
        for (int64_t r = 0; r < n; r++) s = __builtin_fmaf(widen(x[r * xs + i]), widen(g[r * gs + o]), s);
        oi[o] = (uint16_t)_mm_extract_epi16((__m128i)_mm_cvtneps_pbh(_mm_set_ss(s)), 0);
      }
    }
    _mm_sfence();  /* each thread orders its own non-temporal stores before the region's barrier */
  }
  free(gp);
  free(xp);
}

/* dst[0 : n] = src's fp32 values rounded to bf16 as torch rounds them (to nearest, ties to even, subnormals kept),
 * split across threads in whole blocks of 1024. The sums' NaNs are the products' (x86's default NaN) or carry a
 * bf16 operand's payload: their low 16 bits are zero, so the rounding bias leaves them NaN */
static void round_to_bf16(uint16_t *dst, const float *src, int64_t n) {
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
#pragma omp parallel for schedule(static) if (n >= 65536)
  for (int64_t b = 0; b < (n + 1023) / 1024; b++)
    for (int64_t i = b * 1024; i < min64(n, b * 1024 + 1024); i += 16) {
      __mmask16 m = lanes(n - i);
      __m512i u = _mm512_maskz_loadu_epi32(m, src + i);
      __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);  /* the kept part's last bit: ties to even */
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, bias)), 16);
      _mm256_mask_storeu_epi16(dst + i, m, _mm512_cvtepi32_epi16(r));
    }
}

/* llmarch_plain_bf16_mm and _mm_t with their sums rounded to bf16 into out (y: the fp32 sums, scratch [R, N] /
 * [R, I]), while they are in cache: an expert bank's products rounded expert by expert, where one pass over the
 * whole fp32 batch afterwards read it back from memory */
void llmarch_plain_bf16_mm_round(uint16_t *out, float *y, const uint16_t *x, const uint16_t *w, int64_t R,
                                 int64_t K, int64_t N, int64_t ws, int64_t xs) {
  llmarch_plain_bf16_mm(y, x, w, R, K, N, ws, xs);
  round_to_bf16(out, y, R * N);
}

void llmarch_plain_bf16_mm_t_round(uint16_t *out, float *y, const uint16_t *g, const uint16_t *w, int64_t R,
                                   int64_t I, int64_t O, int64_t ws, int64_t gs) {
  llmarch_plain_bf16_mm_t(y, g, w, R, I, O, ws, gs);
  round_to_bf16(out, y, R * I);
}
