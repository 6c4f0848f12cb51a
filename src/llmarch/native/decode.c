/* llmarch: one decoder layer of a decode step (one new token per row) in one call, fp32 or bf16 activations, where
 * the eager step runs ~40 torch ops and 4 kernel calls per layer (llmarch.nn.fused_decode says which layers
 * qualify).
 *
 * llmarch_decode_layer(L, x, B, kbuf, vbuf, cap, first, slot, cos, sin, cos_stride, valid, valid_stride, alibi): a
 * pre-norm block of grouped-query attention and an FFN, x [B, D] the residual stream (updated in place):
 *   h = norm1(x); qkv = h W_qkv^T + b; q, k rotated (half-split RoPE over the whole head, when cos is not NULL);
 *   k, v written to slot `slot` of each row's cache (kbuf / vbuf [B, G, cap, Dh]); each query head attends to
 *   slots [first, slot] of its kv head (head h reads kv head h / (H / G)), those of row b whose byte in
 *   valid[b * valid_stride + j - first] is nonzero (valid NULL: all; none nonzero: all), each score q.k * scale
 *   plus -(alibi[h] * (slot - j)) where alibi (ALiBi's per-head slopes) is not NULL; x += attn W_out^T + b;
 *   h = norm2(x); x += act(h W_up^T + b) W_down^T + b, or for a gated FFN (act(gate) * up) W_down^T + b with
 *   [gate | up] = h W_up^T + b; or, where L->moe is set, x += the mixture of experts over h (ffn.c).
 * Norms: RMSNorm (rows.c's, the mean of squares summed in double) or LayerNorm (mean and variance in double, then
 * (x - mean) * rstd * w + b in fp32). Products: gemv.c's (fp32, int8 or bf16 weights in its blocked layout). The
 * rotation: rows.c's (the bits of llmarch.nn.rope's torch form); the FFN half: ffn.c. Attention: scores q.k *
 * scale in fp32, softmax with the maximum subtracted, exp by a polynomial within 2 ulp of expf, the weighted sum of
 * values divided by the weights' sum last, as a flash kernel does. Activations (ffn.c): silu(g) = g / (1 +
 * exp(-g)), the tanh GELU through exp(-2|u|), relu, the erf GELU with erff. Summation order and exp's last bits
 * aside, torch's values (the tests hold logits to the eager step's at 1e-5). A bf16 layer rounds where torch's
 * bf16 ops round (see llmarch_decode_layer), so its values are the eager bf16 step's up to the rare rounding that
 * summation order flips.
 */
#include "gemv.c"
#include "rows.c"
#include "ffn.c"

#include <math.h>
#include <stdlib.h>

enum { RMS_NORM_KIND = 0, LAYER_NORM_KIND = 1 };

typedef struct {
  int64_t D, H, G, Dh, F;
  int64_t norm, act, gated;     /* norm kind, activation, whether the FFN is gated (up has 2F outputs) */
  float eps1, eps2, scale;
  const void *norm1, *norm2, *norm1_bias, *norm2_bias;  /* fp32 (bf16 in a bf16 layer); LayerNorm biases may be NULL */
  product_t qkv, out, up, down;  /* up and down unused where moe is set */
  const moe_t *moe;              /* a mixture-of-experts FFN, or NULL (fp32 layers only) */
  int64_t bf16;                  /* a bf16 layer (see llmarch_decode_layer) */
} layer_t;

/* One query head q [Dh] over S keys / values (rows of Dh of type T, stride Dh) -> o [Dh]; p: S floats of scratch.
 * valid (S bytes, or NULL: all) marks the keys it may see; with none visible it sees all (as the eager mask does).
 * Keys go four at a time (four independent sums, each summed as dot() sums it); 32 output dims in 4 registers
 * across all values. LD8 reads 8 elements of T as fp32, LD1 one. */
#define ATTEND(NAME, T, LD8, LD1)                                                                              \
  static void NAME(const float *q, const T *k, const T *v, const uint8_t *valid, int64_t S, int64_t Dh,     \
                   float scale, const float *slope, float *p, float *o) {                                   \
    int any = valid == NULL;                                                                                \
    for (int64_t j = 0; j < S; j++) any |= valid && valid[j];                                               \
    if (!any) valid = NULL;                                                                                 \
    int64_t j = 0;                                                                                          \
    for (; j + 4 <= S; j += 4) {                                                                            \
      const T *kj = k + j * Dh;                                                                             \
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                           \
      int64_t i = 0;                                                                                        \
      for (; i + 8 <= Dh; i += 8) {                                                                         \
        const __m256 qi = _mm256_loadu_ps(q + i);                                                           \
        a0 = _mm256_fmadd_ps(qi, LD8(kj + i), a0);                                                          \
        a1 = _mm256_fmadd_ps(qi, LD8(kj + Dh + i), a1);                                                     \
        a2 = _mm256_fmadd_ps(qi, LD8(kj + 2 * Dh + i), a2);                                                 \
        a3 = _mm256_fmadd_ps(qi, LD8(kj + 3 * Dh + i), a3);                                                 \
      }                                                                                                     \
      p[j] = hsum(a0), p[j + 1] = hsum(a1), p[j + 2] = hsum(a2), p[j + 3] = hsum(a3);                       \
      for (; i < Dh; i++)                                                                                   \
        for (int r = 0; r < 4; r++) p[j + r] += q[i] * LD1(kj[r * Dh + i]);                                 \
    }                                                                                                       \
    for (; j < S; j++) {                                                                                    \
      __m256 a = _mm256_setzero_ps();                                                                       \
      int64_t i = 0;                                                                                        \
      for (; i + 8 <= Dh; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), LD8(k + j * Dh + i), a);      \
      p[j] = hsum(a);                                                                                       \
      for (; i < Dh; i++) p[j] += q[i] * LD1(k[j * Dh + i]);                                                \
    }                                                                                                       \
    float m = -INFINITY;                                                                                    \
    for (j = 0; j < S; j++) {                                                                               \
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
        const T *vs = v + s * Dh + d;                                                                       \
        a0 = _mm256_fmadd_ps(w, LD8(vs), a0);                                                               \
        a1 = _mm256_fmadd_ps(w, LD8(vs + 8), a1);                                                           \
        a2 = _mm256_fmadd_ps(w, LD8(vs + 16), a2);                                                          \
        a3 = _mm256_fmadd_ps(w, LD8(vs + 24), a3);                                                          \
      }                                                                                                     \
      _mm256_storeu_ps(o + d, a0), _mm256_storeu_ps(o + d + 8, a1);                                         \
      _mm256_storeu_ps(o + d + 16, a2), _mm256_storeu_ps(o + d + 24, a3);                                   \
    }                                                                                                       \
    for (; d + 8 <= Dh; d += 8) {                                                                           \
      __m256 a = _mm256_setzero_ps();                                                                       \
      for (int64_t s = 0; s < S; s++) a = _mm256_fmadd_ps(_mm256_set1_ps(p[s]), LD8(v + s * Dh + d), a);   \
      _mm256_storeu_ps(o + d, a);                                                                           \
    }                                                                                                       \
    for (; d < Dh; d++) {                                                                                   \
      float a = 0.0f;                                                                                       \
      for (int64_t s = 0; s < S; s++) a += p[s] * LD1(v[s * Dh + d]);                                       \
      o[d] = a;                                                                                             \
    }                                                                                                       \
    const float inv = 1.0f / sum;                                                                           \
    for (int64_t i = 0; i < Dh; i++) o[i] *= inv;                                                           \
  }

#define F32_LD1(e) (e)
ATTEND(attend_f32, float, load8_f32, F32_LD1)
ATTEND(attend_bf16, uint16_t, load8_bf16, from_bf16)

/* Element i of a gain or bias that is fp32, or bf16 in a bf16 layer. */
static inline float elem(const void *t, int64_t i, int bf16) {
  return bf16 ? from_bf16(((const uint16_t *)t)[i]) : ((const float *)t)[i];
}

/* y = norm(x) over B rows of D. bf16 (x holding bf16 values): RMSNorm as rows.c's bf16 form (x * inv rounded,
 * times the gain rounded); LayerNorm computed in fp32 and rounded once, as torch's bf16 layer_norm. s16: scratch of
 * 2 B D uint16. */
static void norm(const layer_t *L, const float *x, const void *w, const void *b, float eps, float *y, int64_t B,
                 uint16_t *s16) {
  const int64_t D = L->D;
  if (L->norm == RMS_NORM_KIND && L->bf16) {
    for (int64_t i = 0; i < B * D; i++) s16[i] = to_bf16(x[i]);
    llmarch_rms_norm_bf16(s16, (const uint16_t *)w, s16 + B * D, B, D, eps);
    for (int64_t i = 0; i < B * D; i++) y[i] = from_bf16(s16[B * D + i]);
    return;
  }
  if (L->norm == RMS_NORM_KIND) {
    llmarch_rms_norm(x, (const float *)w, y, B, D, eps);
    return;
  }
  for (int64_t r = 0; r < B; r++) {
    const float *xr = x + r * D;
    float *yr = y + r * D;
    double s = 0.0, ss = 0.0;
    for (int64_t i = 0; i < D; i++) s += xr[i];
    const float mean = (float)(s / (double)D);
    for (int64_t i = 0; i < D; i++) ss += ((double)xr[i] - mean) * ((double)xr[i] - mean);
    const float rstd = (float)(1.0 / sqrt(ss / (double)D + (double)eps));
    for (int64_t i = 0; i < D; i++)
      yr[i] = ((xr[i] - mean) * rstd) * elem(w, i, L->bf16) + (b ? elem(b, i, L->bf16) : 0.0f);
  }
  if (L->bf16) round_bf16(y, B * D);
}

/* x[i] += y[i] over n, rounded to bf16 in a bf16 layer (torch's bf16 add). */
static void residual(float *x, const float *y, int64_t n, int bf16) {
  for (int64_t i = 0; i < n; i++) x[i] = x[i] + y[i];
  if (bf16) round_bf16(x, n);
}

/* The layer (see the file's comment). In a bf16 layer (L->bf16) x, the caches, cos / sin and the norms' gains and
 * biases are bf16 (uint16_t bits; the products' biases stay fp32); every step is computed in fp32 and rounded to
 * bf16 where torch's bf16 ops round: each product's output (its bias added first), the norms (above), each
 * operation of the rotation (rows.c's bf16 form), the attention's output (computed over the widened cache, as
 * llmarch.nn.kernels runs bf16 attention), the activation and the gate product, and each residual sum. */
void llmarch_decode_layer(const layer_t *L, void *x_io, int64_t B, void *kbuf, void *vbuf, int64_t cap,
                          int64_t first, int64_t slot, const void *cos, const void *sin, int64_t cos_stride,
                          const uint8_t *valid, int64_t valid_stride, const float *alibi) {
  const int64_t D = L->D, H = L->H, G = L->G, Dh = L->Dh, F = L->F, W = (H + 2 * G) * Dh, S = slot + 1 - first;
  const int bf16 = (int)L->bf16;
  float *h = malloc(sizeof(float) * B * (D > F ? D : F)), *qkv = malloc(sizeof(float) * B * W);
  float *rot = malloc(sizeof(float) * B * (H + G) * Dh), *att = malloc(sizeof(float) * B * H * Dh);
  float *gu = malloc(sizeof(float) * B * 2 * F), *y = malloc(sizeof(float) * B * D);
  float *x = bf16 ? malloc(sizeof(float) * B * D) : (float *)x_io;
  uint16_t *s16 = bf16 ? malloc(sizeof(uint16_t) * 2 * B * (D > W ? D : W)) : NULL;
  if (bf16)
    for (int64_t i = 0; i < B * D; i++) x[i] = from_bf16(((const uint16_t *)x_io)[i]);
  norm(L, x, L->norm1, L->norm1_bias, L->eps1, h, B, s16);
  product(&L->qkv, h, qkv, B, W, D);
  if (bf16) round_bf16(qkv, B * W);
  const int64_t n_rot = B * (H + G) * Dh;
  if (cos != NULL && bf16) { /* rows.c's bf16 rotation over the q and k heads, [B, H+G, 1, Dh] */
    for (int64_t b = 0; b < B; b++)
      for (int64_t i = 0; i < (H + G) * Dh; i++) s16[b * (H + G) * Dh + i] = to_bf16(qkv[b * W + i]);
    llmarch_rotate_half_bf16(s16, cos, sin, s16 + n_rot, B, H + G, 1, Dh, (H + G) * Dh, Dh, Dh, cos_stride,
                             cos_stride);
    for (int64_t i = 0; i < n_rot; i++) rot[i] = from_bf16(s16[n_rot + i]);
  } else if (cos != NULL) { /* q and k heads of each row: [B, H+G, 1, Dh] with row stride W */
    llmarch_rotate_half(qkv, cos, sin, rot, B, H + G, 1, Dh, W, Dh, Dh, cos_stride, cos_stride);
  } else {
    for (int64_t b = 0; b < B; b++) memcpy(rot + b * (H + G) * Dh, qkv + b * W, sizeof(float) * (H + G) * Dh);
  }
  for (int64_t b = 0; b < B; b++)
    for (int64_t g = 0; g < G; g++) {
      const int64_t at = ((b * G + g) * cap + slot) * Dh;
      const float *k = rot + (b * (H + G) + H + g) * Dh, *v = qkv + b * W + (H + g) * Dh + G * Dh;
      if (bf16) {
        for (int64_t i = 0; i < Dh; i++) ((uint16_t *)kbuf)[at + i] = to_bf16(k[i]);
        for (int64_t i = 0; i < Dh; i++) ((uint16_t *)vbuf)[at + i] = to_bf16(v[i]);
      } else {
        memcpy((float *)kbuf + at, k, sizeof(float) * Dh);
        memcpy((float *)vbuf + at, v, sizeof(float) * Dh);
      }
    }
  _Pragma("omp parallel for schedule(static) if (B * H * S * Dh >= (1 << 18))")
  for (int64_t bh = 0; bh < B * H; bh++) {
    const int64_t b = bh / H, hd = bh % H, g = hd / (H / G), base = ((b * G + g) * cap + first) * Dh;
    float *p = malloc(sizeof(float) * (S + 8));
    const float *q = rot + (b * (H + G) + hd) * Dh;
    const uint8_t *vb = valid ? valid + b * valid_stride : NULL;
    const float *sl = alibi ? alibi + hd : NULL;
    if (bf16)
      attend_bf16(q, (const uint16_t *)kbuf + base, (const uint16_t *)vbuf + base, vb, S, Dh, L->scale, sl, p,
                  att + bh * Dh);
    else
      attend_f32(q, (const float *)kbuf + base, (const float *)vbuf + base, vb, S, Dh, L->scale, sl, p,
                 att + bh * Dh);
    free(p);
  }
  if (bf16) round_bf16(att, B * H * Dh);
  product(&L->out, att, y, B, D, H * Dh);
  if (bf16) round_bf16(y, B * D);
  residual(x, y, B * D, bf16);
  norm(L, x, L->norm2, L->norm2_bias, L->eps2, h, B, s16);
  if (L->moe != NULL) {
    moe_ffn(L->moe, h, y, B, D, NULL, NULL, NULL);
  } else {
    product(&L->up, h, gu, B, L->gated ? 2 * F : F, D);
    if (bf16) round_bf16(gu, B * (L->gated ? 2 * F : F));
    activate(L->act, L->gated, F, gu, h, B, bf16);
    product(&L->down, h, y, B, D, F);
    if (bf16) round_bf16(y, B * D);
  }
  residual(x, y, B * D, bf16);
  if (bf16) {
    for (int64_t i = 0; i < B * D; i++) ((uint16_t *)x_io)[i] = to_bf16(x[i]);
    free(x), free(s16);
  }
  free(h), free(qkv), free(rot), free(att), free(gu), free(y);
}

/* The mixture-of-experts FFN alone over B rows (ffn.c's moe_ffn): y [B, D] from h [B, D], and the routing. */
void llmarch_moe_ffn(const moe_t *M, const float *h, float *y, int64_t B, int64_t D, float *logits,
                     int64_t *experts, float *weights) {
  moe_ffn(M, h, y, B, D, logits, experts, weights);
}
