/* llmarch: products of few rows with a plain fp32 weight (row-major, no packed copy), forward and backward, for
 * training an expert bank where each expert sees a few rows (llmarch.native.plain; llmarch.nn.banks). AVX2 + FMA.
 * Rows of every operand are contiguous; row strides are given. Summation runs over the shared index in order,
 * one fused multiply-add per term (the fp32 product, summation order aside).
 *
 * llmarch_plain_mm:    y[R, N] = x[R, K] @ W[K, N]            (the bank's [in, out] layout)
 *   k in steps of 4, y accumulated in place: four rows of W are read as four sequential streams, while y (R x N,
 *   L1 or L2 sized for few rows) is loaded, updated and stored (torch's BLAS was 1.2-2x slower at 2-12 rows on an
 *   AVX2 EPYC for a 512 x 2048 weight from memory, docs/performance.md).
 * llmarch_plain_mm_t:  y[R, I] = g[R, O] @ W[I, O]^T          (the input gradient through the same weight)
 *   dot products: two rows of W (two streams) against up to four rows of g at a time, 8 partial sums.
 * llmarch_plain_outer: out[I, O] = x[n, I]^T @ g[n, O]        (the weight gradient: a sum of n outer products)
 *   one output row's 64 columns at a time, over a panel of g that stays in L1 (x transposed first, g copied with
 *   a pad when its rows are 4 KiB apart); written with non-temporal stores (out is not read back soon: a gradient
 *   of several MB, which would only evict the operands) when out is 32-byte aligned and O a multiple of 8.
 * llmarch_plain_zero:  nbytes zero bytes at p, non-temporal (2.3-3x torch's zero_ for a 2-48 MB gradient there).
 * Each splits its outputs across OpenMP threads. Compiled for AVX-512, the first three run register tiles of
 * several rows past a few (the many_* kernels below).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if !(defined(__AVX2__) && defined(__FMA__))
#error "llmarch plain needs AVX2 with FMA"
#endif

#include "tiles.c"

#ifdef __AVX512F__
/* Past a few rows, on AVX-512: register tiles of several rows, each weight value loaded once per tile. From
 * MANY_*_FROM rows the entry points below run these instead (an expert of a training batch often sees 16-64 rows:
 * top-2 of 8 experts at 128 tokens). Each tile's sums (up to 24 registers) run MANY_SUM terms from zero, then add
 * to the running sums.
 * many_mm:    tiles of up to 6 rows of y by 64 columns over a panel of MANY_SUM rows of W's 64 columns copied to
 *             L1 (W's rows are several KB apart: read in place, a panel's lines share a few cache sets); the row
 *             tiles prefetch the next block's rows between them.
 * many_mm_t:  y = g W^T as z = W g^T (tiles.c's w_gt_product): up to 64 rows of g transposed 16 x 16 at a time
 *             into a panel [O, 16 V] in L2, tasks of 12 rows of W in tiles of 12 x 32 (8 x 48, 6 x 64 for more
 *             rows of g), so that W is read once, as streams of broadcast values; or, for row counts that would
 *             leave W g^T's last vector largely empty (tiles.c's by_panel), as many_mm over W's rows transposed
 *             16 x 16 into its panel (`trans`).
 * many_outer: tiles of 6 rows of out by 64 columns over a 64-column panel of g copied once (n rows, in L1), x
 *             transposed once, summed over r in order; whole 64-byte lines written with non-temporal stores. */
#ifndef MANY_FROM  /* the fewest rows for each (benchmarks/train_rows.py; Zen 5 EPYC, one thread, weights from memory:
                     * mm 1.1-1.6x the few-row kernel at 5-6 rows, mm_t 1.0-1.3x at 11, outer 1.1-1.2x at 6) */
#define MANY_MM_FROM 5
#define MANY_MM_T_FROM 11
#define MANY_OUTER_FROM 6
#else  /* one count for all three (an A/B build) */
#define MANY_MM_FROM MANY_FROM
#define MANY_MM_T_FROM MANY_FROM
#define MANY_OUTER_FROM MANY_FROM
#endif
#define MANY_SUM 128  /* terms summed in registers from zero, then added to the running sums (the error of a
                        * sum over K grows with its run of sequential additions) */

/* rows r0 .. r0 + T - 1 of y's 64 columns at j, rows k0 .. k1 - 1 of W (the panel [k1 - k0, 64], in L1), added to
 * y after the first block; next (not NULL): the next block's 64 columns of W, of which this tile prefetches rows
 * q0 .. q0 + count - 1 into L2, one row every `every` steps (the row tiles share the block's reads evenly: all in
 * one tile asked for more than the memory gives) */
static inline __attribute__((always_inline)) void many_mm_tile(float *y, const float *x, const float *panel,
                                                                 int64_t N, int64_t xs, int64_t j, int64_t r0,
                                                                 int64_t k0, int64_t k1, const int T,
                                                                 const __mmask16 *m, const float *next, int64_t ws,
                                                                 int64_t q0, int64_t count, int every, int trans) {
  const float *xr[6];
  for (int r = 0; r < T; r++) xr[r] = x + (r0 + r) * xs;
  __m512 a[6][4];
  for (int r = 0; r < T; r++)
    for (int v = 0; v < 4; v++) a[r][v] = _mm512_setzero_ps();
  int wait = 0;
  for (int64_t k = k0; k < k1; k++) {
    if (next && count > 0 && --wait <= 0) {  /* the next block's row q0 (trans: half q0 % 2 of row q0 / 2) */
      const float *line = next + (q0 >> trans) * ws + (q0 & trans) * 64;
      for (int v = 0; v < 4; v++) _mm_prefetch((const char *)(line + 16 * v), _MM_HINT_T1);
      wait = every, q0++, count--;
    }
    __m512 b[4];
    for (int v = 0; v < 4; v++) b[v] = _mm512_load_ps(panel + (k - k0) * 64 + 16 * v);
    for (int r = 0; r < T; r++) {
      __m512 s = _mm512_set1_ps(xr[r][k]);
      for (int v = 0; v < 4; v++) a[r][v] = _mm512_fmadd_ps(s, b[v], a[r][v]);
    }
  }
  for (int r = 0; r < T; r++)
    for (int v = 0; v < 4; v++) {
      float *q = y + (r0 + r) * N + j + 16 * v;
      _mm512_mask_storeu_ps(q, m[v], k0 == 0 ? a[r][v] : _mm512_add_ps(_mm512_maskz_loadu_ps(m[v], q), a[r][v]));
    }
}

/* the panel [k1 - k0, 64]: rows k0 .. k1 - 1 of W's 64 columns at j, copied; trans: W given as its transpose
 * (w [N, K], rows ws apart), 16 x 16 blocks of its rows j .. j + 63 transposed (zeros past N) */
static inline void many_fill(float *panel, const float *w, int64_t N, int64_t ws, int64_t j, int64_t k0, int64_t k1,
                             const __mmask16 *m, int trans) {
  if (!trans) {
    for (int64_t k = k0; k < k1; k++)
      for (int v = 0; v < 4; v++)
        _mm512_store_ps(panel + (k - k0) * 64 + 16 * v, _mm512_maskz_loadu_ps(m[v], w + k * ws + j + 16 * v));
    return;
  }
  for (int v = 0; v < 4; v++)
    for (int64_t k = k0; k < k1; k += 16) {
      __mmask16 mk = lanes(k1 - k);
      __m512 r[16];
      for (int q = 0; q < 16; q++)
        r[q] = j + 16 * v + q < N ? _mm512_maskz_loadu_ps(mk, w + (j + 16 * v + q) * ws + k) : _mm512_setzero_ps();
      transpose16(r);
      for (int t = 0; t < 16 && k + t < k1; t++) _mm512_store_ps(panel + (k + t - k0) * 64 + 16 * v, r[t]);
    }
}

/* y's 64 columns at j: blocks of MANY_SUM rows of W made into the panel (many_fill), and for each, R rows of y in
 * tiles of at most 6, as even as they go (32 rows: 5, 5, 5, 5, 6, 6) */
static void many_mm_panel(float *y, const float *x, const float *w, float *panel, int64_t R, int64_t K, int64_t N,
                          int64_t ws, int64_t xs, int64_t j, int64_t j_end, int trans) {
  __mmask16 m[4];
  for (int v = 0; v < 4; v++) m[v] = lanes(N - j - 16 * v);
  for (int64_t k0 = 0; k0 < K; k0 += MANY_SUM) {
    int64_t k1 = min64(K, k0 + MANY_SUM);
    many_fill(panel, w, N, ws, j, k0, k1, m, trans);
    /* the next block: these columns' next rows, else the first rows of this thread's next 64 columns; trans: its
     * rows of w in halves of 64 values (two per row) */
    int64_t jn = k1 < K ? j : j + 64, kn = k1 < K ? k1 : 0;
    const float *next = jn >= j_end ? NULL : trans ? w + jn * ws + kn : w + kn * ws + jn;
    int64_t rows = !next ? 0 : trans ? 2 * min64(64, N - jn) : min64(K, kn + MANY_SUM) - kn, tiles = (R + 5) / 6;
    int64_t share = (rows + tiles - 1) / tiles, r0 = 0;
    for (int64_t t = 0; t < tiles; t++) {
      int T = (int)((R - r0) / (tiles - t)), every = (int)((k1 - k0) / (share > 0 ? share : 1));
      int64_t q0 = t * share, count = min64(share, rows - q0);
#define MANY_TILE(T_) many_mm_tile(y, x, panel, N, xs, j, r0, k0, k1, T_, m, next, ws, q0, count, every, trans)
      TILE_OF_ROWS(MANY_TILE, T)
#undef MANY_TILE
      r0 += T;
    }
  }
}

static int many_mm(float *y, const float *x, const float *w, int64_t R, int64_t K, int64_t N, int64_t ws,
                   int64_t xs, int trans) {
  int ok = 1;
#pragma omp parallel
  {
    float *panel = thread_panel((size_t)MANY_SUM * 64 * sizeof(float), &ok);
#pragma omp barrier
    if (ok) {
      int64_t j0, j1;
      split(N, 64, &j0, &j1);
      for (int64_t j = j0; j < j1; j += 64) many_mm_panel(y, x, w, panel, R, K, N, ws, xs, j, j1, trans);
    }
    free(panel);
  }
  return ok;
}

/* rows i0 .. i0 + MR - 1 of z = W gt (z[i, r] = y[r0 + r, i]; V vectors of 16 rows of g), stored into y */
static inline __attribute__((always_inline)) void many_mm_t_tile(float *y, const float *w, const float *gt,
                                                                   int64_t R, int64_t I, int64_t O, int64_t ws,
                                                                   int64_t i0, int64_t r0, const int V,
                                                                   const int MR) {
  const float *wr[12], *nx[12];  /* this tile's rows, the next tile's (as many) */
  for (int a = 0; a < MR; a++) {
    wr[a] = w + min64(i0 + a, I - 1) * ws;  /* past I: row I - 1 again, not stored */
    nx[a] = w + min64(i0 + MR + a, I - 1) * ws;
  }
  int64_t lines = min64((O + 15) / 16, AHEAD_LINES);
  __m512 acc[12][4];
  float z[12][64];
  for (int64_t o0 = 0; o0 < O; o0 += MANY_SUM) {
    for (int a = 0; a < MR; a++)
      for (int v = 0; v < V; v++) acc[a][v] = _mm512_setzero_ps();
    for (int64_t o = o0; o < min64(O, o0 + MANY_SUM); o++) {
      if ((o & 15) == 0)  /* each row of W a few lines ahead, once per line */
        for (int a = 0; a < MR; a++) _mm_prefetch((const char *)(wr[a] + o + 64), _MM_HINT_T0);
      if (o < MR * lines)  /* the next tile's rows into L2, the first line of each first */
        _mm_prefetch((const char *)(nx[o % MR] + (o / MR) * 16), _MM_HINT_T1);
      __m512 b[4];
      for (int v = 0; v < V; v++) b[v] = _mm512_load_ps(gt + o * 16 * V + 16 * v);
      for (int a = 0; a < MR; a++) {
        __m512 s = _mm512_set1_ps(wr[a][o]);
        for (int v = 0; v < V; v++) acc[a][v] = _mm512_fmadd_ps(s, b[v], acc[a][v]);
      }
    }
    for (int a = 0; a < MR; a++)
      for (int v = 0; v < V; v++)
        _mm512_storeu_ps(z[a] + 16 * v, o0 == 0 ? acc[a][v] : _mm512_add_ps(_mm512_loadu_ps(z[a] + 16 * v), acc[a][v]));
  }
  int64_t rows = min64(R - r0, 16 * V);
  int64_t cols = min64(MR, I - i0);
  for (int64_t r = 0; r < rows; r++)  /* row by row: each row's MR values are adjacent in y */
    for (int a = 0; a < cols; a++) y[(r0 + r) * I + i0 + a] = z[a][r];
}

/* gt[o, 0 : 16 V] = g[r0 .. r0 + rows - 1, o] (zeros past rows), by 16 x 16 blocks */
static void many_transpose(void *panel, const void *rows_of_g, int64_t rows, int64_t O, int64_t gs, int V) {
  float *gt = panel;
  const float *g = rows_of_g;
  for (int v = 0; v < V; v++)
    for (int64_t o0 = 0; o0 < O; o0 += 16) {
      __mmask16 m = lanes(O - o0);
      __m512 r[16];
      for (int q = 0; q < 16; q++)
        r[q] = 16 * v + q < rows ? _mm512_maskz_loadu_ps(m, g + (16 * v + q) * gs + o0) : _mm512_setzero_ps();
      transpose16(r);
      for (int j = 0; j < 16 && o0 + j < O; j++) _mm512_store_ps(gt + (o0 + j) * 16 * V + 16 * v, r[j]);
    }
}

/* the 12 rows of W at i0 (tiles.c's task_fn) */
static void many_mm_t_task(float *y, const void *w, const void *gt, int64_t R, int64_t I, int64_t O, int64_t ws,
                           int64_t i0, int64_t r0, int V) {
#define MANY_T_TILE(i_, V_, MR_) many_mm_t_tile(y, w, gt, R, I, O, ws, i_, r0, V_, MR_)
  TASK_OF_12(MANY_T_TILE, V, i0, I)
#undef MANY_T_TILE
}

static int many_outer(float *out, const float *x, const float *g, int64_t n, int64_t I, int64_t O, int64_t xs,
                      int64_t gs) {
  int V = (int)((n + 15) / 16);  /* x transposed: row i's n factors adjacent, rows 16 V apart */
  float *xt = aligned_alloc(64, (size_t)(I + 15) / 16 * 16 * 16 * V * sizeof(float));
  int ok = xt != NULL, stream = (uintptr_t)out % 64 == 0 && O % 16 == 0;
  if (!ok) return 0;
  many_transpose(xt, x, n, I, xs, V);
#pragma omp parallel
  {
    float *panel = thread_panel((size_t)n * 64 * sizeof(float), &ok);
#pragma omp barrier
    if (ok) {
#pragma omp for schedule(static)
      for (int64_t o0 = 0; o0 < O; o0 += 64) {
        __mmask16 m[4];
        for (int v = 0; v < 4; v++) m[v] = lanes(O - o0 - 16 * v);
        for (int64_t r = 0; r < n; r++)
          for (int v = 0; v < 4; v++)
            _mm512_store_ps(panel + r * 64 + 16 * v, _mm512_maskz_loadu_ps(m[v], g + r * gs + o0 + 16 * v));
        int whole = stream && o0 + 64 <= O;
        for (int64_t i0 = 0; i0 < I; i0 += 6) {
          const float *xr[6];
          for (int a = 0; a < 6; a++) xr[a] = xt + min64(i0 + a, I - 1) * 16 * V;
          __m512 acc[6][4];
          for (int a = 0; a < 6; a++)
            for (int v = 0; v < 4; v++) acc[a][v] = _mm512_setzero_ps();
          for (int64_t r = 0; r < n; r++) {
            __m512 b[4];
            for (int v = 0; v < 4; v++) b[v] = _mm512_load_ps(panel + r * 64 + 16 * v);
            for (int a = 0; a < 6; a++) {
              __m512 s = _mm512_set1_ps(xr[a][r]);
              for (int v = 0; v < 4; v++) acc[a][v] = _mm512_fmadd_ps(s, b[v], acc[a][v]);
            }
          }
          for (int a = 0; a < 6 && i0 + a < I; a++) {
            float *p = out + (i0 + a) * O + o0;
            for (int v = 0; v < 4; v++) {
              if (whole)
                _mm512_stream_ps(p + 16 * v, acc[a][v]);
              else
                _mm512_mask_storeu_ps(p + 16 * v, m[v], acc[a][v]);
            }
          }
        }
      }
    }
    _mm_sfence();
    free(panel);
  }
  free(xt);
  return ok;
}
#endif

/* y[:, j0:j1] for rows r0 .. r0 + T - 1 (T <= 4) over k in [k0, k1) of 4 at a time; first: y not yet written;
 * ahead: prefetch the next four rows' lines (rows of a few KB are streams too short for the hardware prefetcher:
 * 1.5-1.8x from memory at 2-8 rows on a Zen 5 EPYC) */
static inline void mm_k4(float *y, const float *x, const float *w, int64_t T, int64_t N, int64_t ws, int64_t xs,
                         int64_t k, int64_t j0, int64_t j1, int first, int ahead) {
  const float *w0 = w + k * ws, *w1 = w0 + ws, *w2 = w1 + ws, *w3 = w2 + ws;
  __m256 b[4][4];
  for (int r = 0; r < 4; r++)
    for (int q = 0; q < 4; q++) b[r][q] = _mm256_set1_ps(r < T ? x[r * xs + k + q] : 0.f);
  int64_t j = j0;
  for (; j + 8 <= j1; j += 8) {
    if (ahead && ((j - j0) & 15) == 0)  /* once per 64-byte line */
      for (int q = 1; q <= 4; q++) _mm_prefetch((const char *)(w3 + q * ws + j), _MM_HINT_T0);
    __m256 v0 = _mm256_loadu_ps(w0 + j), v1 = _mm256_loadu_ps(w1 + j);
    __m256 v2 = _mm256_loadu_ps(w2 + j), v3 = _mm256_loadu_ps(w3 + j);
    for (int r = 0; r < 4; r++) {
      if (r >= T) break;
      float *yr = y + r * N + j;
      __m256 a = first ? _mm256_mul_ps(b[r][0], v0) : _mm256_fmadd_ps(b[r][0], v0, _mm256_loadu_ps(yr));
      a = _mm256_fmadd_ps(b[r][1], v1, a);
      a = _mm256_fmadd_ps(b[r][2], v2, a);
      _mm256_storeu_ps(yr, _mm256_fmadd_ps(b[r][3], v3, a));
    }
  }
  for (; j < j1; j++)
    for (int64_t r = 0; r < T; r++) {
      float a = first ? x[r * xs + k] * w0[j] : __builtin_fmaf(x[r * xs + k], w0[j], y[r * N + j]);
      a = __builtin_fmaf(x[r * xs + k + 1], w1[j], a);
      a = __builtin_fmaf(x[r * xs + k + 2], w2[j], a);
      y[r * N + j] = __builtin_fmaf(x[r * xs + k + 3], w3[j], a);
    }
}

void llmarch_plain_mm(float *y, const float *x, const float *w, int64_t R, int64_t K, int64_t N, int64_t ws,
                      int64_t xs) {
#ifdef __AVX512F__
  if (R >= MANY_MM_FROM && many_mm(y, x, w, R, K, N, ws, xs, 0)) return;
#endif
#pragma omp parallel
  {
#ifdef _OPENMP
    int64_t parts = omp_get_num_threads(), me = omp_get_thread_num();
#else
    int64_t parts = 1, me = 0;
#endif
    int64_t per = ((N + parts - 1) / parts + 7) / 8 * 8, j0 = min64(N, me * per), j1 = min64(N, j0 + per);
    if (j0 < j1) {
      for (int64_t r0 = 0; r0 < R; r0 += 4) {
        int64_t T = min64(4, R - r0);
        float *yr = y + r0 * N;
        const float *xr = x + r0 * xs;
        int64_t k = 0;
        for (; k + 4 <= K; k += 4) mm_k4(yr, xr, w, T, N, ws, xs, k, j0, j1, k == 0, r0 == 0 && k + 8 <= K);
        for (; k < K; k++)  /* the last K % 4 terms, one at a time */
          for (int64_t r = 0; r < T; r++)
            for (int64_t j = j0; j < j1; j++)
              yr[r * N + j] = k == 0 ? xr[r * xs] * w[j] : __builtin_fmaf(xr[r * xs + k], w[k * ws + j], yr[r * N + j]);
      }
    }
  }
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

void llmarch_plain_mm_t(float *y, const float *g, const float *w, int64_t R, int64_t I, int64_t O, int64_t ws,
                        int64_t gs) {
#ifdef __AVX512F__
  if (R >= MANY_MM_T_FROM && MM_T_PANEL(R, 0) && many_mm(y, g, w, R, O, I, ws, gs, 1)) return;
  if (R >= MANY_MM_T_FROM && w_gt_product(y, g, w, R, I, O, ws, gs, sizeof(float), (size_t)O * 64 * sizeof(float),
                                           many_transpose, many_mm_t_task))
    return;
#endif
  int64_t Ov = O - O % 8;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < I; i += 2) {
    int two = i + 1 < I;
    const float *w0 = w + i * ws, *w1 = w + (two ? i + 1 : i) * ws;
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      int64_t T = min64(4, R - r0);
      __m256 a[4][2];
      for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
      for (int64_t o = 0; o < Ov; o += 8) {
        if (r0 == 0 && (o & 15) == 0 && i + 3 < I) {  /* the next two rows' line (as mm_k4: 1.5-1.9x) */
          _mm_prefetch((const char *)(w + (i + 2) * ws + o), _MM_HINT_T0);
          _mm_prefetch((const char *)(w + (i + 3) * ws + o), _MM_HINT_T0);
        }
        __m256 v0 = _mm256_loadu_ps(w0 + o), v1 = _mm256_loadu_ps(w1 + o);
        for (int r = 0; r < 4; r++) {
          if (r >= T) break;
          __m256 gv = _mm256_loadu_ps(g + (r0 + r) * gs + o);
          a[r][0] = _mm256_fmadd_ps(gv, v0, a[r][0]);
          a[r][1] = _mm256_fmadd_ps(gv, v1, a[r][1]);
        }
      }
      for (int64_t r = 0; r < T; r++) {
        const float *gr = g + (r0 + r) * gs;
        float s0 = hsum(a[r][0]), s1 = hsum(a[r][1]);
        for (int64_t o = Ov; o < O; o++) {
          s0 = __builtin_fmaf(gr[o], w0[o], s0);
          s1 = __builtin_fmaf(gr[o], w1[o], s1);
        }
        y[(r0 + r) * I + i] = s0;
        if (two) y[(r0 + r) * I + i + 1] = s1;
      }
    }
  }
}

/* one output row's 64 columns at o: the sum over r of x[r, i] g[r, o:o+64] (xi = x + i) */
static inline void outer64(float *p, const float *xi, const float *g, int64_t n, int64_t xs, int64_t gs, int stream) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t r = 0; r < n; r++) {
    const float *gr = g + r * gs;
    __m256 b = _mm256_broadcast_ss(xi + r * xs);
    a0 = _mm256_fmadd_ps(b, _mm256_loadu_ps(gr), a0);
    a1 = _mm256_fmadd_ps(b, _mm256_loadu_ps(gr + 8), a1);
    a2 = _mm256_fmadd_ps(b, _mm256_loadu_ps(gr + 16), a2);
    a3 = _mm256_fmadd_ps(b, _mm256_loadu_ps(gr + 24), a3);
    a4 = _mm256_fmadd_ps(b, _mm256_loadu_ps(gr + 32), a4);
    a5 = _mm256_fmadd_ps(b, _mm256_loadu_ps(gr + 40), a5);
    a6 = _mm256_fmadd_ps(b, _mm256_loadu_ps(gr + 48), a6);
    a7 = _mm256_fmadd_ps(b, _mm256_loadu_ps(gr + 56), a7);
  }
  __m256 a[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
  for (int v = 0; v < 8; v++) {
    if (stream)
      _mm256_stream_ps(p + 8 * v, a[v]);
    else
      _mm256_storeu_ps(p + 8 * v, a[v]);
  }
}

#define OUTER_PANEL 4096  /* floats of g per pass (16 KiB): its n rows stay in L1 while every output row is made */

void llmarch_plain_outer(float *out, const float *x, const float *g, int64_t n, int64_t I, int64_t O, int64_t xs,
                         int64_t gs) {
#ifdef __AVX512F__
  if (n >= MANY_OUTER_FROM && many_outer(out, x, g, n, I, O, xs, gs)) return;
#endif
  int stream = (uintptr_t)out % 32 == 0 && O % 8 == 0;
  int64_t Ov = O - O % 64, cols = OUTER_PANEL / n / 64 * 64;
  float *copy = NULL, *xt = malloc((size_t)(n * I) * sizeof(float));
  if (cols < 64) cols = 64;
  if (xt) {  /* x transposed, so that one output row's n factors are adjacent (not n lines in a few L1 sets) */
    for (int64_t r = 0; r < n; r++)
      for (int64_t i = 0; i < I; i++) xt[i * n + r] = x[r * xs + i];
    x = xt, xs = 1;
  }
  if (n > 4 && gs % 1024 == 0 && (copy = malloc((size_t)(n * (O + 16)) * sizeof(float)))) {
    /* rows of g 4 KiB apart share the same L1 sets: copied with a 64-byte pad between rows */
    for (int64_t r = 0; r < n; r++) memcpy(copy + r * (O + 16), g + r * gs, (size_t)O * sizeof(float));
    g = copy, gs = O + 16;
  }
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t part = 0; part < I; part += 64) {  /* rows in runs of 64 per thread */
      int64_t i1 = min64(I, part + 64);
      for (int64_t o0 = 0; o0 < Ov; o0 += cols)
        for (int64_t i = part; i < i1; i++)
          for (int64_t o = o0; o < min64(Ov, o0 + cols); o += 64)
            outer64(out + i * O + o, xt ? x + i * n : x + i, g + o, n, xt ? 1 : xs, gs, stream);
      for (int64_t i = part; i < i1; i++)
        for (int64_t o = Ov; o < O; o++) {
          float s = 0.f;
          for (int64_t r = 0; r < n; r++) s = __builtin_fmaf(xt ? x[i * n + r] : x[r * xs + i], g[r * gs + o], s);
          out[i * O + o] = s;
        }
    }
    _mm_sfence();  /* each thread orders its own non-temporal stores before the region's barrier */
  }
  free(copy);
  free(xt);
}

void llmarch_plain_zero(char *p, int64_t nbytes) {
  int64_t head = min64(nbytes, (int64_t)((32 - (uintptr_t)p % 32) % 32));
  memset(p, 0, (size_t)head);
  int64_t body = (nbytes - head) / 32 * 32;
  __m256 z = _mm256_setzero_ps();
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t i = head; i < head + body; i += 32) _mm256_stream_ps((float *)(p + i), z);
    _mm_sfence();
  }
  memset(p + head + body, 0, (size_t)(nbytes - head - body));
}
