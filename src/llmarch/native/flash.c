/* llmarch: attention of many queries at once without materializing the scores (llmarch.native.flash), fp32,
 * AVX-512:
 *
 * llmarch_flash_fwd: out[b, h] = softmax(q[b, h] k[b, g]^T * scale, causal) v[b, g] for every batch row b and
 *   query head h (g = h / (H / G): grouped-query attention), queries t of T against keys s of S, where a causal
 *   query t sees the keys s <= t + S - T (its place at the end of the keys, as a prefill after a cache); and,
 *   where asked, each query's log-sum-exp of its scaled scores (for the backward). With key ranges lo, hi [B, T]
 *   (int32) query t of row b sees exactly the keys lo[b, t] <= s < hi[b, t] instead (padding, documents, sliding
 *   windows, causal: every mask whose rows are one run of keys; each range holds a key). With ALiBi slopes [H]
 *   each score gains -slope[h] * |t + S - T - s| (the bias computed as llmarch's ALiBi computes it, in fp32).
 * llmarch_flash_bwd: dq, dk, dv from dout, out and the log-sum-exp, the weights recomputed block by block: one pass
 *   over (b, g, block of 64 keys) for dk and dv (summed over the group's query heads and the queries that see the
 *   block), one over (b, h, block of queries) for dq; no scores saved, no two threads writing one sum.
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

/* s[r, 0:64] = a_r . kt[:, j] for T rows from r0 (a rows as apart; s rows 64 apart), the panel kt [D, 64] */
static inline __attribute__((always_inline)) void score_tile(float *s, const float *a, int64_t as, const float *kt,
                                                             int64_t D, int64_t r0, const int T) {
  __m512 acc[6][4];
  for (int r = 0; r < T; r++)
    for (int v = 0; v < 4; v++) acc[r][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d++) {
    __m512 b[4];
    for (int v = 0; v < 4; v++) b[v] = _mm512_load_ps(kt + d * KB + 16 * v);
    for (int r = 0; r < T; r++) {
      __m512 x = _mm512_set1_ps(a[(r0 + r) * as + d]);
      for (int v = 0; v < 4; v++) acc[r][v] = _mm512_fmadd_ps(x, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < T; r++)
    for (int v = 0; v < 4; v++) _mm512_store_ps(s + (r0 + r) * KB + 16 * v, acc[r][v]);
}

/* s [R, 64] = a [R, D] @ kt for R rows */
static void scores(float *s, const float *a, int64_t as, const float *kt, int64_t D, int64_t R) {
  for (int64_t r0 = 0; r0 < R; r0 += 6) {
    const int T = (int)min64(6, R - r0);
#define SCORE(T_) score_tile(s, a, as, kt, D, r0, T_)
    TILE_OF_ROWS(SCORE, T)
#undef SCORE
  }
}

/* o[r, c0 : c0 + 64] += p[r, 0:n] @ v[0:n, c0 : c0 + 64] for T rows from r0 (o rows os apart, p rows ps apart;
 * m: the valid columns) */
static inline __attribute__((always_inline)) void value_tile(float *o, int64_t os, const float *p, int64_t ps,
                                                             const float *v, int64_t vs, int64_t n, int64_t c0,
                                                             const __mmask16 *m, int64_t r0, const int T) {
  __m512 a[6][4];
  for (int r = 0; r < T; r++)
    for (int u = 0; u < 4; u++) a[r][u] = _mm512_maskz_loadu_ps(m[u], o + (r0 + r) * os + c0 + 16 * u);
  for (int64_t j = 0; j < n; j++) {
    __m512 b[4];
    for (int u = 0; u < 4; u++) b[u] = _mm512_maskz_loadu_ps(m[u], v + j * vs + c0 + 16 * u);
    for (int r = 0; r < T; r++) {
      __m512 w = _mm512_set1_ps(p[(r0 + r) * ps + j]);
      for (int u = 0; u < 4; u++) a[r][u] = _mm512_fmadd_ps(w, b[u], a[r][u]);
    }
  }
  for (int r = 0; r < T; r++)
    for (int u = 0; u < 4; u++) _mm512_mask_storeu_ps(o + (r0 + r) * os + c0 + 16 * u, m[u], a[r][u]);
}

/* o [R, C] += p [R, n] @ v [n, C] */
static void accumulate(float *o, int64_t os, const float *p, int64_t ps, const float *v, int64_t vs, int64_t n,
                       int64_t C, int64_t R) {
  for (int64_t c0 = 0; c0 < C; c0 += 64) {
    __mmask16 m[4];
    for (int u = 0; u < 4; u++) m[u] = lanes(C - c0 - 16 * u);
    for (int64_t r0 = 0; r0 < R; r0 += 6) {
      const int T = (int)min64(6, R - r0);
#define VALUE(T_) value_tile(o, os, p, ps, v, vs, n, c0, m, r0, T_)
      TILE_OF_ROWS(VALUE, T)
#undef VALUE
    }
  }
}

/* the panel kt [D, 64]: rows j0 .. j0 + n - 1 of k (rows ks apart) as columns, zeros past n */
static void panel(float *kt, const float *k, int64_t ks, int64_t D, int64_t n) {
  for (int64_t d = 0; d < D; d++)
    for (int64_t j = 0; j < KB; j++) kt[d * KB + j] = j < n ? k[j * ks + d] : 0.0f;
}

static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* which keys query t sees: its range, or causal (s <= t + off), or all of the S keys */
typedef struct {
  const int32_t *lo, *hi;  /* [T] of the batch row, or NULL */
  int64_t off, S;
  int causal;
  const float *slope;  /* the head's ALiBi slope, or NULL */
} Seen;

/* the ALiBi bias of query t over keys j0 + 16u .. j0 + 16u + 15: -(slope * |t + off - s|), rounded as torch's
 * -(slopes * dist.float()) is (the distance is exact in fp32 below 2^24) */
static inline __m512 alibi16(const Seen *w, int64_t t, int64_t j0, int u) {
  const __m512i s = _mm512_add_epi32(_mm512_set1_epi32((int32_t)(j0 + 16 * u - t - w->off)),
                                     _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512 product = _mm512_mul_ps(_mm512_set1_ps(*w->slope), _mm512_cvtepi32_ps(_mm512_abs_epi32(s)));
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(product), _mm512_set1_epi32(INT32_MIN)));
}

static inline int64_t first_key(const Seen *w, int64_t t) { return w->lo ? w->lo[t] : 0; }
static inline int64_t end_key(const Seen *w, int64_t t) {
  return w->lo ? w->hi[t] : w->causal ? min64(w->S, t + w->off + 1) : w->S;
}

/* the lanes of block vector u (keys j0 + 16u ..) that query t sees, of the block's n keys */
static inline __mmask16 seen_lanes(const Seen *w, int64_t t, int64_t j0, int64_t n, int u) {
  const int64_t a = first_key(w, t) - j0 - 16 * u, e = min64(end_key(w, t) - j0, n) - 16 * u;
  return (__mmask16)(lanes(e) & ~lanes(a));
}

/* whether query t sees a key of j0 .. j0 + n - 1 */
static inline int sees(const Seen *w, int64_t t, int64_t j0, int64_t n) {
  return first_key(w, t) < j0 + n && end_key(w, t) > j0;
}

/* the keys queries t0 .. t0 + R - 1 see between them: [*a, *e) */
static inline void block_keys(const Seen *w, int64_t t0, int64_t R, int64_t *a, int64_t *e) {
  *a = w->S, *e = 0;
  for (int64_t r = 0; r < R; r++) *a = min64(*a, first_key(w, t0 + r)), *e = max64(*e, end_key(w, t0 + r));
}

/* queries t0 .. t0 + R - 1 of one (b, h): q rows qs apart, k and v rows ks / vs apart, out rows os apart; buf: the
 * task's memory (kt [Dh, 64], s [QB, 64], o [QB, Dv], m and l [QB]); lse (or NULL): each query's log-sum-exp */
static void block(float *out, int64_t os, float *lse, const float *q, const float *k, const float *v, int64_t qs,
                  int64_t ks, int64_t vs, int64_t t0, int64_t R, int64_t Dh, int64_t Dv, const Seen *w, float scale,
                  float *buf) {
  float *kt = buf, *s = kt + Dh * KB, *o = s + QB * KB, *mx = o + QB * Dv, *sum = mx + QB;
  memset(o, 0, sizeof(float) * (size_t)(R * Dv));
  for (int64_t r = 0; r < R; r++) mx[r] = -INFINITY, sum[r] = 0.0f;
  int64_t start, end;  /* the keys the block's queries see between them */
  block_keys(w, t0, R, &start, &end);
  for (int64_t j0 = start; j0 < end; j0 += KB) {
    const int64_t n = min64(KB, end - j0);
    panel(kt, k + j0 * ks, ks, Dh, n);
    scores(s, q + t0 * qs, qs, kt, Dh, R);
    for (int64_t r = 0; r < R; r++) {  /* the online softmax: masked scores to weights, the outputs rescaled */
      float *sr = s + r * KB;
      if (!sees(w, t0 + r, j0, n)) {  /* a query that sees none of this block's keys: no weight */
        memset(sr, 0, sizeof(float) * KB);
        continue;
      }
      __m512 vmax = _mm512_set1_ps(-INFINITY), sc[4];
      __mmask16 m[4];
      for (int u = 0; u < 4; u++) {
        m[u] = seen_lanes(w, t0 + r, j0, n, u);
        sc[u] = _mm512_maskz_mul_ps(m[u], _mm512_load_ps(sr + 16 * u), _mm512_set1_ps(scale));
        if (w->slope) sc[u] = _mm512_maskz_add_ps(m[u], sc[u], alibi16(w, t0 + r, j0, u));
        vmax = _mm512_mask_max_ps(vmax, m[u], vmax, sc[u]);
      }
      const float m_new = fmaxf(mx[r], _mm512_reduce_max_ps(vmax));
      const float alpha = mx[r] == -INFINITY ? 0.0f : expf(mx[r] - m_new);
      __m512 acc = _mm512_setzero_ps();
      for (int u = 0; u < 4; u++) {
        __m512 e = _mm512_maskz_mov_ps(m[u], exp_neg16(_mm512_sub_ps(sc[u], _mm512_set1_ps(m_new))));
        _mm512_store_ps(sr + 16 * u, e);
        acc = _mm512_add_ps(acc, e);
      }
      sum[r] = sum[r] * alpha + _mm512_reduce_add_ps(acc);
      mx[r] = m_new;
      if (alpha != 1.0f)
        for (int64_t c = 0; c < Dv; c++) o[r * Dv + c] *= alpha;
    }
    accumulate(o, Dv, s, KB, v + j0 * vs, vs, n, Dv, R);
  }
  for (int64_t r = 0; r < R; r++) {
    const float inv = 1.0f / sum[r];
    for (int64_t c = 0; c < Dv; c++) out[r * os + c] = o[r * Dv + c] * inv;
    if (lse) lse[r] = mx[r] + logf(sum[r]);
  }
}

/* out [B, H, T, Dv], q [B, H, T, Dh], k [B, G, S, Dh], v [B, G, S, Dv] with the strides given (batch, head, row;
 * elements of a row contiguous); lse [B, H, T] or NULL; lo, hi [B, T] key ranges or NULL. Returns 0, or -1 without
 * memory (out untouched). */
int llmarch_flash_fwd(float *out, const float *q, const float *k, const float *v, int64_t B, int64_t H, int64_t G,
                      int64_t T, int64_t S, int64_t Dh, int64_t Dv, const int64_t *qst, const int64_t *kst,
                      const int64_t *vst, float scale, int64_t causal, float *lse, const int64_t *ost,
                      const int32_t *lo, const int32_t *hi, const float *slopes) {
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
        const Seen w = {lo ? lo + b * T : NULL, hi ? hi + b * T : NULL, off, S, (int)causal,
                        slopes ? slopes + h : NULL};
        block(out + b * ost[0] + h * ost[1] + t0 * ost[2], ost[2], lse ? lse + (b * H + h) * T + t0 : NULL,
              q + b * qst[0] + h * qst[1], k + b * kst[0] + g * kst[1], v + b * vst[0] + g * vst[1], qst[2],
              kst[2], vst[2], t0, min64(QB, T - t0), Dh, Dv, &w, scale, buf);
      }
    }
    free(buf);
  }
  return ok ? 0 : -1;
}

/* the weights p [R, 64] of queries t0 .. t0 + R - 1 over keys j0 .. j0 + n - 1 from their scores s (in place):
 * exp(s * scale - lse), zero where a query does not see a key */
static void weights(float *s, const float *lse, int64_t t0, int64_t R, int64_t j0, int64_t n, const Seen *w,
                    float scale) {
  for (int64_t r = 0; r < R; r++) {
    const __m512 l = _mm512_set1_ps(lse[r]), sc = _mm512_set1_ps(scale);
    for (int u = 0; u < 4; u++) {
      float *x = s + r * KB + 16 * u;
      __m512 z = _mm512_mul_ps(_mm512_load_ps(x), sc);
      if (w->slope) z = _mm512_add_ps(z, alibi16(w, t0 + r, j0, u));
      const __m512 e = exp_neg16(_mm512_sub_ps(z, l));
      _mm512_store_ps(x, _mm512_maskz_mov_ps(seen_lanes(w, t0 + r, j0, n, u), e));
    }
  }
}

/* ds = p * (dp - delta) * scale (in dp), for R queries */
static void score_grads(float *dp, const float *p, const float *delta, int64_t R, float scale) {
  for (int64_t r = 0; r < R; r++)
    for (int u = 0; u < 4; u++) {
      float *x = dp + r * KB + 16 * u;
      const __m512 d = _mm512_sub_ps(_mm512_load_ps(x), _mm512_set1_ps(delta[r]));
      _mm512_store_ps(x, _mm512_mul_ps(_mm512_mul_ps(_mm512_load_ps(p + r * KB + 16 * u), d), _mm512_set1_ps(scale)));
    }
}

/* at [64, QB] = a [R, 64]^T (rows past R zero) */
static void transpose_block(float *at, const float *a, int64_t R) {
  for (int64_t j = 0; j < KB; j++)
    for (int64_t r = 0; r < QB; r++) at[j * QB + r] = r < R ? a[r * KB + j] : 0.0f;
}

/* dq, dk, dv [contiguous, fp32] of llmarch_flash_fwd's out for dout [B, H, T, Dv] (contiguous), given out's
 * log-sum-exp lse and delta = rowsum(dout * out) [B, H, T]; q, k, v as there. The pass over key blocks also adds
 * each block's share of dq into its thread's own dq sums (the first thread's is dq), added up at the end; where
 * those would take more than shares_max bytes (or shares_max < 0), a second pass over query blocks recomputes the
 * weights for dq instead. lo, hi, slopes: as the forward's. Returns 0, or -1 without memory. */
int llmarch_flash_bwd(float *dq, float *dk, float *dv, const float *q, const float *k, const float *v,
                      const float *dout, const float *lse, const float *delta, int64_t B, int64_t H, int64_t G,
                      int64_t T, int64_t S, int64_t Dh, int64_t Dv, const int64_t *qst, const int64_t *kst,
                      const int64_t *vst, float scale, int64_t causal, int64_t shares_max, const int32_t *lo,
                      const int32_t *hi, const float *slopes) {
  const int64_t per = H / G, off = S - T, kblocks = (S + KB - 1) / KB, qblocks = (T + QB - 1) / QB;
  const int64_t D = Dh > Dv ? Dh : Dv, nq = B * H * T * Dh;
  /* kt, vt [D, 64]; s, dp [QB, 64]; at [64, QB]; acc_k [64, Dh], acc_v [64, Dv] (or acc_q [QB, Dh]) */
  const size_t floats = (size_t)(2 * D * KB + 2 * QB * KB + KB * QB + KB * (Dh + Dv) + QB * Dh);
#ifdef _OPENMP
  const int64_t team = omp_get_max_threads();
#else
  const int64_t team = 1;
#endif
  /* each query block's keys between its queries: [kspan[2i], kspan[2i + 1]) of block i = b * qblocks + t0 / QB */
  int64_t *kspan = malloc(sizeof(int64_t) * (size_t)(2 * B * qblocks));
  if (!kspan) return -1;
  for (int64_t i = 0; i < B * qblocks; i++) {
    const int64_t b = i / qblocks, t0 = i % qblocks * QB;
    const Seen w = {lo ? lo + b * T : NULL, hi ? hi + b * T : NULL, off, S, (int)causal, NULL};
    block_keys(&w, t0, min64(QB, T - t0), kspan + 2 * i, kspan + 2 * i + 1);
  }
  float *shares = NULL;  /* threads 1 .. team - 1's dq sums from zeros (a thread with no work adds zeros); 0's: dq */
  const int share = shares_max >= 0 && (team - 1) * nq * (int64_t)sizeof(float) <= shares_max;
  if (share && team > 1 && !(shares = calloc((size_t)((team - 1) * nq), sizeof(float)))) {
    free(kspan);
    return -1;
  }
  if (share) memset(dq, 0, sizeof(float) * (size_t)nq);
  int ok = 1;
#pragma omp parallel
  {
    float *buf = thread_panel((floats * sizeof(float) + 63) / 64 * 64, &ok);
#ifdef _OPENMP
    const int64_t me = omp_get_thread_num();
#else
    const int64_t me = 0;
#endif
    float *dq_own = !share ? NULL : me == 0 ? dq : shares + (me - 1) * nq;
#pragma omp barrier
    if (ok) {
      float *kt = buf, *vt = kt + D * KB, *s = vt + D * KB, *dp = s + QB * KB, *at = dp + QB * KB;
      float *acc_k = at + KB * QB, *acc_v = acc_k + KB * Dh, *acc_q = acc_v + KB * Dv;
#pragma omp for schedule(dynamic)
      for (int64_t i = 0; i < B * G * kblocks; i++) {  /* dk, dv of the keys j0 .. j0 + n - 1 of (b, g) */
        const int64_t b = i / (G * kblocks), g = i / kblocks % G, j0 = (i % kblocks) * KB, n = min64(KB, S - j0);
        const float *kb = k + b * kst[0] + g * kst[1] + j0 * kst[2], *vb = v + b * vst[0] + g * vst[1] + j0 * vst[2];
        panel(kt, kb, kst[2], Dh, n);
        panel(vt, vb, vst[2], Dv, n);
        memset(acc_k, 0, sizeof(float) * (size_t)(KB * (Dh + Dv)));
        Seen w = {lo ? lo + b * T : NULL, hi ? hi + b * T : NULL, off, S, (int)causal, NULL};
        for (int64_t h = g * per; h < (g + 1) * per; h++)
          for (int64_t t0 = 0; t0 < T; t0 += QB) {
            w.slope = slopes ? slopes + h : NULL;
            const int64_t *span = kspan + 2 * (b * qblocks + t0 / QB);
            if (span[0] >= j0 + n || span[1] <= j0) continue;  /* no query of the block sees these keys */
            const int64_t R = min64(QB, T - t0), bh = b * H + h;
            const float *qb = q + b * qst[0] + h * qst[1] + t0 * qst[2], *gb = dout + (bh * T + t0) * Dv;
            scores(s, qb, qst[2], kt, Dh, R);
            weights(s, lse + bh * T + t0, t0, R, j0, n, &w, scale);
            transpose_block(at, s, R);
            accumulate(acc_v, Dv, at, QB, gb, Dv, R, Dv, n);  /* dv += p^T dout */
            scores(dp, gb, Dv, vt, Dv, R);                    /* dp = dout v^T */
            score_grads(dp, s, delta + bh * T + t0, R, scale);
            transpose_block(at, dp, R);
            accumulate(acc_k, Dh, at, QB, qb, qst[2], R, Dh, n);  /* dk += ds^T q */
            if (dq_own) accumulate(dq_own + (bh * T + t0) * Dh, Dh, dp, KB, kb, kst[2], n, Dh, R);  /* dq += ds k */
          }
        for (int64_t j = 0; j < n; j++) {
          memcpy(dk + ((b * G + g) * S + j0 + j) * Dh, acc_k + j * Dh, sizeof(float) * (size_t)Dh);
          memcpy(dv + ((b * G + g) * S + j0 + j) * Dv, acc_v + j * Dv, sizeof(float) * (size_t)Dv);
        }
      }
      if (share && team > 1) {  /* dq = the threads' sums (each thread's, zeros where it had no work) */
#pragma omp for schedule(static)
        for (int64_t e = 0; e < nq; e++)
          for (int64_t t = 0; t < team - 1; t++) dq[e] += shares[t * nq + e];
      }
#pragma omp for schedule(dynamic)
      for (int64_t i = 0; i < (share ? 0 : B * H * qblocks); i++) {  /* dq of the queries t0 .. t0 + R - 1 of (b, h) */
        const int64_t b = i / (H * qblocks), h = i / qblocks % H, t0 = (qblocks - 1 - i % qblocks) * QB;
        const int64_t R = min64(QB, T - t0), bh = b * H + h, g = h / per;
        const int64_t *span = kspan + 2 * (b * qblocks + t0 / QB), end = span[1];
        const Seen w = {lo ? lo + b * T : NULL, hi ? hi + b * T : NULL, off, S, (int)causal,
                        slopes ? slopes + h : NULL};
        const float *qb = q + b * qst[0] + h * qst[1] + t0 * qst[2], *gb = dout + (bh * T + t0) * Dv;
        memset(acc_q, 0, sizeof(float) * (size_t)(QB * Dh));
        for (int64_t j0 = span[0]; j0 < end; j0 += KB) {
          const int64_t n = min64(KB, end - j0);
          const float *kb = k + b * kst[0] + g * kst[1] + j0 * kst[2];
          panel(kt, kb, kst[2], Dh, n);
          panel(vt, v + b * vst[0] + g * vst[1] + j0 * vst[2], vst[2], Dv, n);
          scores(s, qb, qst[2], kt, Dh, R);
          weights(s, lse + bh * T + t0, t0, R, j0, n, &w, scale);
          scores(dp, gb, Dv, vt, Dv, R);
          score_grads(dp, s, delta + bh * T + t0, R, scale);
          accumulate(acc_q, Dh, dp, KB, kb, kst[2], n, Dh, R);  /* dq += ds k */
        }
        memcpy(dq + (bh * T + t0) * Dh, acc_q, sizeof(float) * (size_t)(R * Dh));
      }
    }
    free(buf);
  }
  free(shares);
  free(kspan);
  return ok ? 0 : -1;
}
