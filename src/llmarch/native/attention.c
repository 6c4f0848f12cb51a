/* llmarch: the attention of a native decode layer (decode.c #includes this file after gemv.c, rows.c and ffn.c):
 * one query per row over its cache, for grouped-query attention (fp32 or bf16 caches) and for multi-head latent
 * attention (DeepSeek-V2; fp32), absorbed as llmarch.nn.latent_attention's absorbed form computes it.
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

/* Multi-head latent attention: H heads of query [q_nope (Dn) | q_rope (Dr)], the cache holding per token the
 * normalised latent (R) and the rotated, head-shared rope key (Dr); kv_up's weight ukv [H, Dn + Dv, R] row-major
 * (per head: the Dn rows absorbed into the query, then the Dv rows applied to the attended latent). */
typedef struct {
  int64_t H, R, Dn, Dr, Dv, q_rank;  /* q_rank 0: the query straight from h, else through its own latent */
  float q_eps, kv_eps;
  product_t q, q_down, kv_down;      /* q: [H (Dn + Dr), q_rank or D]; q_down: [q_rank, D]; kv_down: [R + Dr, D] */
  const float *q_norm, *kv_norm;     /* [q_rank] (NULL when q_rank is 0), [R] */
  const float *ukv;                  /* [H, Dn + Dv, R], plain */
} mla_t;

/* att [B, H Dv] = the latent attention of rows h [B, D] (normed), writing this step's latent and rope key to slot
 * `slot` of lat [B, 1, cap, R] and kr [B, 1, cap, Dr]; queries see slots [first, slot] (valid as for attend_f32).
 * cos / sin [B or 1, Dr] (row stride cos_stride; NULL: no rotation) rotate q_rope and the rope key, half-split. */
static void mla_attention(const mla_t *M, const float *h, int64_t B, int64_t D, float *lat, float *kr, int64_t cap,
                          int64_t first, int64_t slot, const float *cos, const float *sin, int64_t cos_stride,
                          const uint8_t *valid, int64_t valid_stride, float scale, float *att) {
  const int64_t H = M->H, R = M->R, Dn = M->Dn, Dr = M->Dr, Dv = M->Dv, Q = H * (Dn + Dr), S = slot + 1 - first;
  float *q = malloc(sizeof(float) * B * Q), *kv = malloc(sizeof(float) * B * (R + Dr));
  float *ql = malloc(sizeof(float) * B * (M->q_rank > R ? M->q_rank : R) * 2);
  float *qr = malloc(sizeof(float) * B * H * Dr), *qa = malloc(sizeof(float) * B * H * R);
  float *ya = malloc(sizeof(float) * B * H * R);
  if (M->q_rank > 0) {
    product(&M->q_down, h, ql, B, M->q_rank, D);
    llmarch_rms_norm(ql, M->q_norm, ql + B * M->q_rank, B, M->q_rank, M->q_eps);
    product(&M->q, ql + B * M->q_rank, q, B, Q, M->q_rank);
  } else {
    product(&M->q, h, q, B, Q, D);
  }
  product(&M->kv_down, h, kv, B, R + Dr, D);
  for (int64_t b = 0; b < B; b++) memcpy(ql + b * R, kv + b * (R + Dr), sizeof(float) * R);
  for (int64_t b = 0; b < B; b++) /* the latent, normalised, straight into the cache */
    llmarch_rms_norm(ql + b * R, M->kv_norm, lat + (b * cap + slot) * R, 1, R, M->kv_eps);
  if (cos != NULL) {
    llmarch_rotate_half(q + Dn, cos, sin, qr, B, H, 1, Dr, Q, Dn + Dr, 0, cos_stride, cos_stride);
    llmarch_rotate_half(kv + R, cos, sin, ya, B, 1, 1, Dr, R + Dr, 0, 0, cos_stride, cos_stride);
  } else {
    for (int64_t bh = 0; bh < B * H; bh++) memcpy(qr + bh * Dr, q + bh * (Dn + Dr) + Dn, sizeof(float) * Dr);
    for (int64_t b = 0; b < B; b++) memcpy(ya + b * Dr, kv + b * (R + Dr) + R, sizeof(float) * Dr);
  }
  for (int64_t b = 0; b < B; b++) memcpy(kr + (b * cap + slot) * Dr, ya + b * Dr, sizeof(float) * Dr);
  memset(qa, 0, sizeof(float) * B * H * R);
  for (int64_t hd = 0; hd < H; hd++) /* qa[b, h] = q_nope[b, h] @ W_UK[h] ([Dn] x [Dn, R]) */
    for (int64_t n = 0; n < Dn; n++) {
      const float *w = M->ukv + (hd * (Dn + Dv) + n) * R;
      for (int64_t b = 0; b < B; b++) {
        const float c = q[b * Q + hd * (Dn + Dr) + n];
        float *o = qa + (b * H + hd) * R;
        for (int64_t r = 0; r < R; r++) o[r] += c * w[r];
      }
    }
  _Pragma("omp parallel for schedule(static) if (B * H * S * R >= (1 << 18))")
  for (int64_t bh = 0; bh < B * H; bh++) {
    const int64_t b = bh / H, base = b * cap + first;
    float *p = malloc(sizeof(float) * (S + 8));
    memset(p, 0, sizeof(float) * S);
    scores_f32(qa + bh * R, lat + base * R, R, S, R, p);
    scores_f32(qr + bh * Dr, kr + base * Dr, Dr, S, Dr, p);
    weighted_f32(p, valid ? valid + b * valid_stride : NULL, S, scale, NULL, lat + base * R, R, R, ya + bh * R);
    free(p);
  }
  for (int64_t hd = 0; hd < H; hd++) /* att[b, h] = W_UV[h] ([Dv, R]) @ ya[b, h]; each row of W_UV read once */
    for (int64_t v = 0; v < Dv; v++)
      for (int64_t b = 0; b < B; b++)
        att[(b * H + hd) * Dv + v] = dot(M->ukv + (hd * (Dn + Dv) + Dn + v) * R, ya + (b * H + hd) * R, R);
  free(q), free(kv), free(ql), free(qr), free(qa), free(ya);
}
