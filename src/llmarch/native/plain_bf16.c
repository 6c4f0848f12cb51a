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

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static inline float widen(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint32_t pair_of(const uint16_t *p, int64_t stride, int two) {  /* (p[0], p[stride]) in 32 bits */
  return p[0] | (two ? (uint32_t)p[stride] << 16 : 0u);
}

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

static inline __m256i load16(const uint16_t *p, __mmask16 m) {  /* p NULL: a row past the end, zeros */
  if (!p) return _mm256_setzero_si256();
  return m == 0xffff ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16(m, p);
}

/* 16 columns of two rows as 16 (row 0, row 1) pairs */
static inline __m512bh pairs16(const uint16_t *w0, const uint16_t *w1, __mmask16 m, __m512i order) {
  __m512i a = _mm512_castsi256_si512(load16(w0, m)), b = _mm512_castsi256_si512(load16(w1, m));
  return (__m512bh)_mm512_permutex2var_epi16(a, order, b);
}

void llmarch_plain_bf16_mm(float *y, const uint16_t *x, const uint16_t *w, int64_t R, int64_t K, int64_t N,
                           int64_t ws, int64_t xs) {
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
