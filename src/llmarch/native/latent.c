/* llmarch: multi-head latent attention (DeepSeek-V2) in a native decode layer (decode.c #includes this file after
 * attention.c), fp32 or bf16, absorbed as llmarch.nn.latent_attention's absorbed form computes it: the query
 * (straight, or through its own normalised latent), the compressed latent and the rope key, their rotation and
 * cache write, scores against the cached latent and rope key, and the value up-projection applied to the attended
 * latent.
 */
/* Multi-head latent attention: H heads of query [q_nope (Dn) | q_rope (Dr)], the cache holding per token the
 * normalised latent (R) and the rotated, head-shared rope key (Dr); kv_up's weight ukv [H, Dn + Dv, R] row-major
 * (per head: the Dn rows absorbed into the query, then the Dv rows applied to the attended latent). */
typedef struct {
  int64_t H, R, Dn, Dr, Dv, q_rank;  /* q_rank 0: the query straight from h, else through its own latent */
  float q_eps, kv_eps;
  product_t q, q_down, kv_down;      /* q: [H (Dn + Dr), q_rank or D]; q_down: [q_rank, D]; kv_down: [R + Dr, D] */
  const void *q_norm, *kv_norm;      /* [q_rank] (NULL when q_rank is 0), [R]; fp32, or bf16 in a bf16 layer */
  const void *ukv;                   /* [H, Dn + Dv, R], plain; fp32, or bf16 in a bf16 layer */
} mla_t;

/* row r of ukv . x over R (ukv fp32, or bf16 widened) */
static inline float ukv_dot(const void *ukv, int bf16, int64_t row, const float *x, int64_t R) {
  if (!bf16) return dot((const float *)ukv + row * R, x, R);
  const uint16_t *w = (const uint16_t *)ukv + row * R;
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= R; i += 8) acc = _mm256_fmadd_ps(load8_bf16(w + i), _mm256_loadu_ps(x + i), acc);
  float t = hsum(acc);
  for (; i < R; i++) t += from_bf16(w[i]) * x[i];
  return t;
}

/* att [B, H Dv] = the latent attention of rows h [B, D] (normed), writing this step's latent and rope key to slot
 * `slot` of lat [B, 1, cap, R] and kr [B, 1, cap, Dr]; queries see slots [first, slot] (valid as for attend_f32).
 * cos / sin [B or 1, Dr] (row stride cos_stride; NULL: no rotation) rotate q_rope and the rope key, half-split.
 * bf16: caches, cos / sin, gains and ukv bf16; each product, norm, rotation step, the absorbed query, the attended
 * latent and the output rounded to bf16, as the eager bf16 layer's ops round them (its einsums are bf16 bmm's:
 * fp32 sums, rounded once). */
static void mla_attention(const mla_t *M, int bf16, const float *h, int64_t B, int64_t D, void *lat, void *kr,
                          int64_t cap, int64_t first, int64_t slot, const void *cos, const void *sin,
                          int64_t cos_stride, const uint8_t *valid, int64_t valid_stride, float scale, float *att) {
  const int64_t H = M->H, R = M->R, Dn = M->Dn, Dr = M->Dr, Dv = M->Dv, Q = H * (Dn + Dr), S = slot + 1 - first;
  const int64_t Ql = M->q_rank;
  float *q = malloc(sizeof(float) * B * Q), *kv = malloc(sizeof(float) * B * (R + Dr));
  float *ql = malloc(sizeof(float) * B * (Ql > R ? Ql : R) * 2);
  float *qr = malloc(sizeof(float) * B * H * Dr), *qa = malloc(sizeof(float) * B * H * R);
  float *ya = malloc(sizeof(float) * B * H * R);
  if (Ql > 0) {
    product(&M->q_down, h, ql, B, Ql, D);  /* (bf16: rms_rows and rotate_rows round what they read) */
    rms_rows(bf16, ql, M->q_norm, ql + B * Ql, B, Ql, M->q_eps);
    product(&M->q, ql + B * Ql, q, B, Q, Ql);
  } else {
    product(&M->q, h, q, B, Q, D);
  }
  product(&M->kv_down, h, kv, B, R + Dr, D);
  if (bf16) round_bf16(q, B * Q);
  for (int64_t b = 0; b < B; b++) memcpy(ql + b * R, kv + b * (R + Dr), sizeof(float) * R);
  rms_rows(bf16, ql, M->kv_norm, ql + B * R, B, R, M->kv_eps); /* the latent, normalised */
  if (cos != NULL) {
    rotate_rows(bf16, q + Dn, cos, sin, qr, B, H, Dr, Q, Dn + Dr, cos_stride);
    rotate_rows(bf16, kv + R, cos, sin, ya, B, 1, Dr, R + Dr, 0, cos_stride);
  } else {
    for (int64_t bh = 0; bh < B * H; bh++) memcpy(qr + bh * Dr, q + bh * (Dn + Dr) + Dn, sizeof(float) * Dr);
    for (int64_t b = 0; b < B; b++) memcpy(ya + b * Dr, kv + b * (R + Dr) + R, sizeof(float) * Dr);
  }
  for (int64_t b = 0; b < B; b++) { /* this step's latent and rope key into the caches */
    const int64_t at = b * cap + slot;
    if (bf16) {
      for (int64_t i = 0; i < R; i++) ((uint16_t *)lat)[at * R + i] = to_bf16(ql[B * R + b * R + i]);
      for (int64_t i = 0; i < Dr; i++) ((uint16_t *)kr)[at * Dr + i] = to_bf16(ya[b * Dr + i]);
    } else {
      memcpy((float *)lat + at * R, ql + B * R + b * R, sizeof(float) * R);
      memcpy((float *)kr + at * Dr, ya + b * Dr, sizeof(float) * Dr);
    }
  }
  memset(qa, 0, sizeof(float) * B * H * R);
  for (int64_t hd = 0; hd < H; hd++) /* qa[b, h] = q_nope[b, h] @ W_UK[h] ([Dn] x [Dn, R]), 8 lanes of R at a time */
    for (int64_t n = 0; n < Dn; n++) {
      const int64_t row = (hd * (Dn + Dv) + n) * R;
      const float *w32 = (const float *)M->ukv + row;
      const uint16_t *w16 = (const uint16_t *)M->ukv + row;
      int64_t r = 0;
      for (; r + 8 <= R; r += 8) {
        const __m256 w = bf16 ? load8_bf16(w16 + r) : _mm256_loadu_ps(w32 + r);
        for (int64_t b = 0; b < B; b++) {
          float *o = qa + (b * H + hd) * R + r;
          _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_set1_ps(q[b * Q + hd * (Dn + Dr) + n]), w, _mm256_loadu_ps(o)));
        }
      }
      for (; r < R; r++)
        for (int64_t b = 0; b < B; b++)
          qa[(b * H + hd) * R + r] += q[b * Q + hd * (Dn + Dr) + n] * (bf16 ? from_bf16(w16[r]) : w32[r]);
    }
  if (bf16) round_bf16(qa, B * H * R);
  _Pragma("omp parallel for schedule(static) if (B * H * S * R >= (1 << 18))")
  for (int64_t bh = 0; bh < B * H; bh++) {
    const int64_t b = bh / H, base = b * cap + first;
    const uint8_t *vb = valid ? valid + b * valid_stride : NULL;
    float *p = malloc(sizeof(float) * (S + 8));
    memset(p, 0, sizeof(float) * S);
    if (bf16) {
      const uint16_t *l16 = (const uint16_t *)lat + base * R;
      scores_bf16(qa + bh * R, l16, R, S, R, p);
      scores_bf16(qr + bh * Dr, (const uint16_t *)kr + base * Dr, Dr, S, Dr, p);
      weighted_bf16(p, vb, S, scale, NULL, l16, R, R, ya + bh * R);
    } else {
      const float *l32 = (const float *)lat + base * R;
      scores_f32(qa + bh * R, l32, R, S, R, p);
      scores_f32(qr + bh * Dr, (const float *)kr + base * Dr, Dr, S, Dr, p);
      weighted_f32(p, vb, S, scale, NULL, l32, R, R, ya + bh * R);
    }
    free(p);
  }
  if (bf16) round_bf16(ya, B * H * R);
  for (int64_t hd = 0; hd < H; hd++) /* att[b, h] = W_UV[h] ([Dv, R]) @ ya[b, h]; each row of W_UV read once */
    for (int64_t v = 0; v < Dv; v++)
      for (int64_t b = 0; b < B; b++)
        att[(b * H + hd) * Dv + v] = ukv_dot(M->ukv, bf16, hd * (Dn + Dv) + Dn + v, ya + (b * H + hd) * R, R);
  if (bf16) round_bf16(att, B * H * Dv);
  free(q), free(kv), free(ql), free(qr), free(qa), free(ya);
}
