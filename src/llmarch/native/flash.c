/* llmarch: attention of many queries at once without materializing the scores (a prefill's, on the CPU, no
 * gradient; llmarch.native.flash), fp32, AVX-512:
 *
 * llmarch_flash_fwd: out[b, h] = softmax(q[b, h] k[b, g]^T * scale, causal) v[b, g] for every batch row b and
 *   query head h (g = h / (H / G): grouped-query attention), queries t of T against keys s of S, where a causal
 *   query t sees the keys s <= t + S - T (its place at the end of the keys, as a prefill after a cache).
 *
 * Each task is one (b, h) and a block of QB queries; it runs over the keys it may see in blocks of 64: the block's
 * scores as register tiles of up to 6 queries x 64 keys over the keys transposed into a panel (Dh x 64, in L1), the
 * block's masked scores through an online softmax (running maximum and sum per query, exp.c's exp within 2 ulp of
 * expf, the sums so far rescaled when the maximum grows), and the weights times the block's values added
 * into the queries' fp32 outputs, tiles of up to 6 queries x 64 values; each output is divided by its sum last.
 * Sums run in key order within a block and block by block; the scores are q . k in d order, times scale.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef __AVX512F__
#error "llmarch flash needs AVX-512 F"
#endif

#include "tiles.c"
#include "exp.c"

#define QB 48  /* queries per task: 8 tiles of 6 */
#define KB 64  /* keys per block: 4 vectors */

/* s[r, 0:64] = q_r . kt[:, j] for T queries from row r0 (q rows qs apart), the panel kt [Dh, 64] */
static inline __attribute__((always_inline)) void score_tile(float *s, const float *q, int64_t qs,
                                                             const float *kt, int64_t Dh, int64_t r0, const int T) {
  __m512 a[6][4];
  for (int r = 0; r < T; r++)
    for (int v = 0; v < 4; v++) a[r][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < Dh; d++) {
    __m512 b[4];
    for (int v = 0; v < 4; v++) b[v] = _mm512_load_ps(kt + d * KB + 16 * v);
    for (int r = 0; r < T; r++) {
      __m512 x = _mm512_set1_ps(q[(r0 + r) * qs + d]);
      for (int v = 0; v < 4; v++) a[r][v] = _mm512_fmadd_ps(x, b[v], a[r][v]);
    }
  }
  for (int r = 0; r < T; r++)
    for (int v = 0; v < 4; v++) _mm512_store_ps(s + (r0 + r) * KB + 16 * v, a[r][v]);
}

/* o[r, c0 : c0 + 64] += p[r, 0:n] @ v[0:n, c0 : c0 + 64] for T queries from row r0 (m: the valid columns) */
static inline __attribute__((always_inline)) void value_tile(float *o, int64_t Dv, const float *p, const float *v,
                                                             int64_t vs, int64_t n, int64_t c0, const __mmask16 *m,
                                                             int64_t r0, const int T) {
  __m512 a[6][4];
  for (int r = 0; r < T; r++)
    for (int u = 0; u < 4; u++) a[r][u] = _mm512_maskz_loadu_ps(m[u], o + (r0 + r) * Dv + c0 + 16 * u);
  for (int64_t j = 0; j < n; j++) {
    __m512 b[4];
    for (int u = 0; u < 4; u++) b[u] = _mm512_maskz_loadu_ps(m[u], v + j * vs + c0 + 16 * u);
    for (int r = 0; r < T; r++) {
      __m512 w = _mm512_set1_ps(p[(r0 + r) * KB + j]);
      for (int u = 0; u < 4; u++) a[r][u] = _mm512_fmadd_ps(w, b[u], a[r][u]);
    }
  }
  for (int r = 0; r < T; r++)
    for (int u = 0; u < 4; u++) _mm512_mask_storeu_ps(o + (r0 + r) * Dv + c0 + 16 * u, m[u], a[r][u]);
}

/* queries t0 .. t0 + R - 1 of one (b, h): q rows qs apart, k and v rows ks / vs apart, out rows Dv apart; buf: the
 * task's memory (kt [Dh, 64], s [QB, 64], o [QB, Dv], m and l [QB]) */
static void block(float *out, const float *q, const float *k, const float *v, int64_t qs, int64_t ks, int64_t vs,
                  int64_t t0, int64_t R, int64_t S, int64_t Dh, int64_t Dv, int64_t off, int causal, float scale,
                  float *buf) {
  float *kt = buf, *s = kt + Dh * KB, *o = s + QB * KB, *mx = o + QB * Dv, *sum = mx + QB;
  memset(o, 0, sizeof(float) * (size_t)(R * Dv));
  for (int64_t r = 0; r < R; r++) mx[r] = -INFINITY, sum[r] = 0.0f;
  const int64_t end = causal ? min64(S, t0 + R + off) : S;  /* the keys the block's last query sees */
  for (int64_t j0 = 0; j0 < end; j0 += KB) {
    const int64_t n = min64(KB, end - j0);
    for (int64_t d = 0; d < Dh; d++)  /* the panel: keys j0 .. j0 + n - 1 as columns, zeros past n */
      for (int64_t j = 0; j < KB; j++) kt[d * KB + j] = j < n ? k[(j0 + j) * ks + d] : 0.0f;
    for (int64_t r0 = 0; r0 < R; r0 += 6) {
      const int T = (int)min64(6, R - r0);
#define SCORE(T_) score_tile(s, q + t0 * qs, qs, kt, Dh, r0, T_)
      TILE_OF_ROWS(SCORE, T)
#undef SCORE
    }
    for (int64_t r = 0; r < R; r++) {  /* the online softmax: masked scores to weights, the outputs rescaled */
      float *sr = s + r * KB;
      const int64_t seen = causal ? min64(n, t0 + r + off + 1 - j0) : n;  /* keys j0 .. j0 + seen - 1 */
      if (seen <= 0) {  /* a causal query before this block's keys: no weight */
        memset(sr, 0, sizeof(float) * KB);
        continue;
      }
      __m512 vmax = _mm512_set1_ps(-INFINITY), sc[4];
      for (int u = 0; u < 4; u++) {
        sc[u] = _mm512_maskz_mul_ps(lanes(seen - 16 * u), _mm512_load_ps(sr + 16 * u), _mm512_set1_ps(scale));
        vmax = _mm512_mask_max_ps(vmax, lanes(seen - 16 * u), vmax, sc[u]);
      }
      const float m_new = fmaxf(mx[r], _mm512_reduce_max_ps(vmax));
      const float alpha = mx[r] == -INFINITY ? 0.0f : expf(mx[r] - m_new);
      __m512 acc = _mm512_setzero_ps();
      for (int u = 0; u < 4; u++) {
        __m512 e = _mm512_maskz_mov_ps(lanes(seen - 16 * u), exp_neg16(_mm512_sub_ps(sc[u], _mm512_set1_ps(m_new))));
        _mm512_store_ps(sr + 16 * u, e);
        acc = _mm512_add_ps(acc, e);
      }
      sum[r] = sum[r] * alpha + _mm512_reduce_add_ps(acc);
      mx[r] = m_new;
      if (alpha != 1.0f)
        for (int64_t c = 0; c < Dv; c++) o[r * Dv + c] *= alpha;
    }
    for (int64_t c0 = 0; c0 < Dv; c0 += 64) {
      __mmask16 m[4];
      for (int u = 0; u < 4; u++) m[u] = lanes(Dv - c0 - 16 * u);
      for (int64_t r0 = 0; r0 < R; r0 += 6) {
        const int T = (int)min64(6, R - r0);
#define VALUE(T_) value_tile(o, Dv, s, v + j0 * vs, vs, n, c0, m, r0, T_)
        TILE_OF_ROWS(VALUE, T)
#undef VALUE
      }
    }
  }
  for (int64_t r = 0; r < R; r++) {
    const float inv = 1.0f / sum[r];
    for (int64_t c = 0; c < Dv; c++) out[r * Dv + c] = o[r * Dv + c] * inv;
  }
}

/* out [B, H, T, Dv] contiguous; q [B, H, T, Dh], k [B, G, S, Dh], v [B, G, S, Dv] with the strides given (batch,
 * head, row; elements of a row contiguous). Returns 0, or -1 without memory (out untouched). */
int llmarch_flash_fwd(float *out, const float *q, const float *k, const float *v, int64_t B, int64_t H, int64_t G,
                      int64_t T, int64_t S, int64_t Dh, int64_t Dv, const int64_t *qst, const int64_t *kst,
                      const int64_t *vst, float scale, int64_t causal) {
  const int64_t blocks = (T + QB - 1) / QB, tasks = B * H * blocks, per = H / G, off = S - T;
  const size_t floats = (size_t)(Dh * KB + QB * KB + QB * Dv + 2 * QB);
  int ok = 1;
#pragma omp parallel
  {
    float *buf = thread_panel((floats * sizeof(float) + 63) / 64 * 64, &ok);
#pragma omp barrier
    if (ok) {
#pragma omp for schedule(dynamic)
      for (int64_t i = 0; i < tasks; i++) {
        /* the query blocks of a head last to first: with causal keys the longest tasks first */
        const int64_t b = i / (H * blocks), h = i / blocks % H, t0 = (blocks - 1 - i % blocks) * QB;
        const int64_t g = h / per;
        block(out + ((b * H + h) * T + t0) * Dv, q + b * qst[0] + h * qst[1], k + b * kst[0] + g * kst[1],
              v + b * vst[0] + g * vst[1], qst[2], kst[2], vst[2], t0, min64(QB, T - t0), S, Dh, Dv, off,
              (int)causal, scale, buf);
      }
    }
    free(buf);
  }
  return ok ? 0 : -1;
}
