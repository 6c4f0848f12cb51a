/* llmarch: the attention of a native decode layer (decode.c #includes this file after gemv.c, rows.c and vec.c):
 * one query per row over its cache (fp32 or bf16), for grouped-query attention and, through latent.c, multi-head
 * latent attention.
 *
 * Scores q.k in fp32 (keys four at a time: four independent sums, each summed as dot() sums it), times scale, plus
 * -(slope * distance) with ALiBi; softmax with the maximum subtracted, exp by a polynomial within 2 ulp of expf; the
 * weighted sum of values (32 output dims in 4 registers across all values) divided by the weights' sum last, as a
 * flash kernel does.
 */

/* o [Dh] = softmax(p * scale + bias, masked) @ v, for raw scores p [S] (overwritten: S + 8 floats) and values v
 * (rows of Dh of type T, stride vs). valid (S bytes, or NULL: all) marks the keys a query may see; with none
 * visible it sees all (as the eager mask does). LD8 reads 8 elements of T as fp32, LD1 one. */
#define WEIGHTED(NAME, T, LD8, LD1)                                                                            \
  static void NAME(float *p, const uint8_t *valid, int64_t S, float scale, const float *slope, const T *v,   \
                   int64_t vs, int64_t Dh, float *o) {                                                      \
    int any = valid == NULL;                                                                                \
    for (int64_t j = 0; j < S; j++) any |= valid && valid[j];                                               \
    if (!any) valid = NULL;                                                                                 \
    float m = -INFINITY;                                                                                    \
    int64_t j = 0;                                                                                          \
    for (; j < S; j++) {                                                                                    \
      p[j] = valid && !valid[j] ? -INFINITY                                                                 \
             : slope ? p[j] * scale + -(*slope * (float)(S - 1 - j)) : p[j] * scale;                        \
      m = p[j] > m ? p[j] : m;                                                                              \
    }                                                                                                       \
    j = 0;                                                                                                  \
    __m256 vm = _mm256_set1_ps(m), acc = _mm256_setzero_ps();                                               \
    for (; j + 8 <= S; j += 8) {                                                                            \
      __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(p + j), vm));                                        \
      _mm256_storeu_ps(p + j, e);                                                                           \
      acc = _mm256_add_ps(acc, e);                                                                          \
    }                                                                                                       \
    float sum = hsum(acc);                                                                                  \
    if (j < S) {                                                                                            \
      float tail[8] = {0}, e[8];                                                                            \
      for (int64_t t = j; t < S; t++) tail[t - j] = p[t] - m;                                               \
      _mm256_storeu_ps(e, exp_neg(_mm256_loadu_ps(tail)));                                                  \
      for (int64_t t = j; t < S; t++) sum += (p[t] = e[t - j]);                                             \
    }                                                                                                       \
    int64_t d = 0;                                                                                          \
    for (; d + 32 <= Dh; d += 32) {                                                                         \
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                           \
      for (int64_t s = 0; s < S; s++) {                                                                     \
        const __m256 w = _mm256_set1_ps(p[s]);                                                              \
        const T *vr = v + s * vs + d;                                                                       \
        a0 = _mm256_fmadd_ps(w, LD8(vr), a0);                                                               \
        a1 = _mm256_fmadd_ps(w, LD8(vr + 8), a1);                                                           \
        a2 = _mm256_fmadd_ps(w, LD8(vr + 16), a2);                                                          \
        a3 = _mm256_fmadd_ps(w, LD8(vr + 24), a3);                                                          \
      }                                                                                                     \
      _mm256_storeu_ps(o + d, a0), _mm256_storeu_ps(o + d + 8, a1);                                         \
      _mm256_storeu_ps(o + d + 16, a2), _mm256_storeu_ps(o + d + 24, a3);                                   \
    }                                                                                                       \
    for (; d + 8 <= Dh; d += 8) {                                                                           \
      __m256 a = _mm256_setzero_ps();                                                                       \
      for (int64_t s = 0; s < S; s++) a = _mm256_fmadd_ps(_mm256_set1_ps(p[s]), LD8(v + s * vs + d), a);   \
      _mm256_storeu_ps(o + d, a);                                                                           \
    }                                                                                                       \
    for (; d < Dh; d++) {                                                                                   \
      float a = 0.0f;                                                                                       \
      for (int64_t s = 0; s < S; s++) a += p[s] * LD1(v[s * vs + d]);                                       \
      o[d] = a;                                                                                             \
    }                                                                                                       \
    const float inv = 1.0f / sum;                                                                           \
    for (int64_t i = 0; i < Dh; i++) o[i] *= inv;                                                           \
  }

/* p[j] += q [n] . k_j for S keys (rows of n elements of T, stride ks). */
#define SCORES(NAME, T, LD8, LD1)                                                                              \
  static void NAME(const float *q, const T *k, int64_t ks, int64_t S, int64_t n, float *p) {                \
    int64_t j = 0;                                                                                          \
    for (; j + 4 <= S; j += 4) {                                                                            \
      const T *kj = k + j * ks;                                                                             \
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                           \
      int64_t i = 0;                                                                                        \
      for (; i + 8 <= n; i += 8) {                                                                          \
        const __m256 qi = _mm256_loadu_ps(q + i);                                                           \
        a0 = _mm256_fmadd_ps(qi, LD8(kj + i), a0);                                                          \
        a1 = _mm256_fmadd_ps(qi, LD8(kj + ks + i), a1);                                                     \
        a2 = _mm256_fmadd_ps(qi, LD8(kj + 2 * ks + i), a2);                                                 \
        a3 = _mm256_fmadd_ps(qi, LD8(kj + 3 * ks + i), a3);                                                 \
      }                                                                                                     \
      float t[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};                                                \
      for (; i < n; i++)                                                                                    \
        for (int r = 0; r < 4; r++) t[r] += q[i] * LD1(kj[r * ks + i]);                                     \
      for (int r = 0; r < 4; r++) p[j + r] += t[r];                                                         \
    }                                                                                                       \
    for (; j < S; j++) {                                                                                    \
      __m256 a = _mm256_setzero_ps();                                                                       \
      int64_t i = 0;                                                                                        \
      for (; i + 8 <= n; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), LD8(k + j * ks + i), a);       \
      float t = hsum(a);                                                                                    \
      for (; i < n; i++) t += q[i] * LD1(k[j * ks + i]);                                                    \
      p[j] += t;                                                                                            \
    }                                                                                                       \
  }

#define F32_LD1(e) (e)
WEIGHTED(weighted_f32, float, load8_f32, F32_LD1)
WEIGHTED(weighted_bf16, uint16_t, load8_bf16, from_bf16)
SCORES(scores_f32, float, load8_f32, F32_LD1)
SCORES(scores_bf16, uint16_t, load8_bf16, from_bf16)

/* One query head q [Dh] over S keys / values of one kv head (rows of Dh, contiguous) -> o [Dh]; p: S + 8 floats. */
static void attend_f32(const float *q, const float *k, const float *v, const uint8_t *valid, int64_t S, int64_t Dh,
                       float scale, const float *slope, float *p, float *o) {
  memset(p, 0, sizeof(float) * S);
  scores_f32(q, k, Dh, S, Dh, p);
  weighted_f32(p, valid, S, scale, slope, v, Dh, Dh, o);
}

static void attend_bf16(const float *q, const uint16_t *k, const uint16_t *v, const uint8_t *valid, int64_t S,
                        int64_t Dh, float scale, const float *slope, float *p, float *o) {
  memset(p, 0, sizeof(float) * S);
  scores_bf16(q, k, Dh, S, Dh, p);
  weighted_bf16(p, valid, S, scale, slope, v, Dh, Dh, o);
}
