/* llmarch: one decoder layer of a decode step (one new token per row) in one call, fp32 or bf16 activations, where
 * the eager step runs ~40 torch ops and 4 kernel calls per layer (llmarch.nn.fused_decode says which layers
 * qualify).
 *
 * llmarch_decode_stack(table, n, x, B, ...): every layer of the step in turn (see below), one call per step.
 *
 * llmarch_decode_layer(L, x, B, kbuf, vbuf, cap, first, slot, cos, sin, cos_stride, valid, valid_stride, alibi): a
 * pre-norm block of grouped-query attention and an FFN, x [B, D] the residual stream (updated in place):
 *   h = norm1(x); qkv = h W_qkv^T + b; q, k rotated (half-split RoPE over the whole head, when cos is not NULL);
 *   k, v written to slot `slot` of each row's cache (kbuf / vbuf [B, G, cap, Dh]); each query head attends to
 *   slots [first, slot] of its kv head (head h reads kv head h / (H / G)), those of row b whose byte in
 *   valid[b * valid_stride + j - first] is nonzero (valid NULL: all; none nonzero: all), each score q.k * scale
 *   plus -(alibi[h] * (slot - j)) where alibi (ALiBi's per-head slopes) is not NULL; x += attn W_out^T + b;
 *   h = norm2(x); x += act(h W_up^T + b) W_down^T + b, or for a gated FFN (act(gate) * up) W_down^T + b with
 *   [gate | up] = h W_up^T + b; or, where L->moe is set, x += the mixture of experts over h (ffn.c). Where
 *   L->mla is set, the attention is multi-head latent attention (latent.c) over the latent and rope-key caches.
 * Norms: RMSNorm (rows.c's, the mean of squares summed in double) or LayerNorm (mean and variance in double, then
 * (x - mean) * rstd * w + b in fp32). Products: gemv.c's (fp32, int8 or bf16 weights in its blocked layout), or
 * w8a8.c's (int8 weights and activations). The
 * rotation: rows.c's (the bits of llmarch.nn.rope's torch form); the FFN half: ffn.c; attention: attention.c,
 * latent.c.
 * Activations (ffn.c): silu(g) = g / (1 +
 * exp(-g)), the tanh GELU through exp(-2|u|), relu, the erf GELU with erff. Summation order and exp's last bits
 * aside, torch's values (the tests hold logits to the eager step's at 1e-5). A bf16 layer rounds where torch's
 * bf16 ops round (see llmarch_decode_layer), so its values are the eager bf16 step's up to the rare rounding that
 * summation order flips.
 */
#include "gemv.c"
#include "w8a8.c"
#include "rows.c"
#include "vec.c"
#include "ffn.c"
#include "attention.c"
#include "latent.c"

#include <math.h>
#include <stdlib.h>

enum { RMS_NORM_KIND = 0, LAYER_NORM_KIND = 1 };

typedef struct {
  int64_t D, H, G, Dh, F;
  int64_t norm, act, gated;     /* norm kind, activation, whether the FFN is gated (up has 2F outputs) */
  float eps1, eps2, scale;
  const void *norm1, *norm2, *norm1_bias, *norm2_bias;  /* fp32 (bf16 in a bf16 layer); LayerNorm biases may be NULL */
  product_t qkv, out, up, down;  /* up and down unused where moe is set */
  const moe_t *moe;              /* a mixture-of-experts FFN, or NULL */
  int64_t bf16;                  /* a bf16 layer (see llmarch_decode_layer) */
  const mla_t *mla;              /* latent attention (latent.c), or NULL: qkv unused, G 1, Dh the
                                  * value width, the caches hold the latent and the rope key */
} layer_t;

/* Element i of a gain or bias that is fp32, or bf16 in a bf16 layer. */
static inline float elem(const void *t, int64_t i, int bf16) {
  return bf16 ? from_bf16(((const uint16_t *)t)[i]) : ((const float *)t)[i];
}

/* y = norm(x) over B rows of D. bf16 (x holding bf16 values): RMSNorm as rows.c's bf16 form (x * inv rounded,
 * times the gain rounded); LayerNorm computed in fp32 and rounded once, as torch's bf16 layer_norm. */
static void norm(const layer_t *L, const float *x, const void *w, const void *b, float eps, float *y, int64_t B) {
  const int64_t D = L->D;
  if (L->norm == RMS_NORM_KIND) {
    rms_rows((int)L->bf16, x, w, y, B, D, eps);
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

/* att [B, H Dh] = grouped-query attention of rows h [B, D] (normed), writing this step's keys and values to slot
 * `slot` of kbuf / vbuf (fp32, or bf16 in a bf16 layer); see llmarch_decode_layer. */
static void gqa_attention(const layer_t *L, const float *h, int64_t B, void *kbuf, void *vbuf, int64_t cap,
                          int64_t first, int64_t slot, const void *cos, const void *sin, int64_t cos_stride,
                          const uint8_t *valid, int64_t valid_stride, const float *alibi, float *att) {
  const int64_t D = L->D, H = L->H, G = L->G, Dh = L->Dh, W = (H + 2 * G) * Dh, S = slot + 1 - first;
  const int bf16 = (int)L->bf16;
  float *qkv = malloc(sizeof(float) * B * W), *rot = malloc(sizeof(float) * B * (H + G) * Dh);
  product(&L->qkv, h, qkv, B, W, D);
  if (bf16) round_bf16(qkv, B * W);
  if (cos != NULL) /* q and k heads of each row: [B, H+G, Dh] with row stride W */
    rotate_rows(bf16, qkv, cos, sin, rot, B, H + G, Dh, W, Dh, cos_stride);
  else
    for (int64_t b = 0; b < B; b++) memcpy(rot + b * (H + G) * Dh, qkv + b * W, sizeof(float) * (H + G) * Dh);
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
  free(qkv), free(rot);
}

/* The layer (see the file's comment). In a bf16 layer (L->bf16) x, the caches, cos / sin and the norms' gains and
 * biases are bf16 (uint16_t bits; the products' biases stay fp32); every step is computed in fp32 and rounded to
 * bf16 where torch's bf16 ops round: each product's output (its bias added first), the norms (above), each
 * operation of the rotation (rows.c's bf16 form), the attention's output (computed over the widened cache, as
 * llmarch.nn.kernels runs bf16 attention), the activation and the gate product, and each residual sum. With
 * L->mla, the attention half is latent.c's latent attention, over the latent and rope-key caches. */
void llmarch_decode_layer(const layer_t *L, void *x_io, int64_t B, void *kbuf, void *vbuf, int64_t cap,
                          int64_t first, int64_t slot, const void *cos, const void *sin, int64_t cos_stride,
                          const uint8_t *valid, int64_t valid_stride, const float *alibi) {
  const int64_t D = L->D, H = L->H, Dh = L->Dh, F = L->F;
  const int bf16 = (int)L->bf16;
  float *h = malloc(sizeof(float) * B * (D > F ? D : F)), *att = malloc(sizeof(float) * B * H * Dh);
  float *gu = malloc(sizeof(float) * B * 2 * F), *y = malloc(sizeof(float) * B * D);
  float *x = bf16 ? malloc(sizeof(float) * B * D) : (float *)x_io;
  if (bf16)
    for (int64_t i = 0; i < B * D; i++) x[i] = from_bf16(((const uint16_t *)x_io)[i]);
  norm(L, x, L->norm1, L->norm1_bias, L->eps1, h, B);
  if (L->mla != NULL)
    mla_attention(L->mla, bf16, h, B, D, kbuf, vbuf, cap, first, slot, cos, sin, cos_stride, valid, valid_stride,
                  L->scale, att);
  else
    gqa_attention(L, h, B, kbuf, vbuf, cap, first, slot, cos, sin, cos_stride, valid, valid_stride, alibi, att);
  product(&L->out, att, y, B, D, H * Dh);
  if (bf16) round_bf16(y, B * D);
  residual(x, y, B * D, bf16);
  norm(L, x, L->norm2, L->norm2_bias, L->eps2, h, B);
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
    free(x);
  }
  free(h), free(att), free(gu), free(y);
}

/* The mixture-of-experts FFN alone over B rows (ffn.c's moe_ffn): y [B, D] from h [B, D], and the routing. */
void llmarch_moe_ffn(const moe_t *M, const float *h, float *y, int64_t B, int64_t D, float *logits,
                     int64_t *experts, float *weights) {
  moe_ffn(M, h, y, B, D, logits, experts, weights);
}

/* Layer i of a stack's step: table[i * 8 ..] = {layer, kbuf, vbuf, cap, first, slot, lookback, delta} (the first
 * three addresses; delta: the absolute slot of buffer slot 0, where valid's flags start). Each layer runs
 * llmarch_decode_layer at its own slots; then its row moves on: slot + 1, and first to slot + 1 - lookback where a
 * sliding window keeps only lookback keys (lookback < 0: all). The caller checks that slot < cap for every row. */
void llmarch_decode_stack(int64_t *table, int64_t n, void *x, int64_t B, const void *cos, const void *sin,
                          int64_t cos_stride, const uint8_t *valid, int64_t valid_stride, const float *alibi) {
  for (int64_t i = 0; i < n; i++) {
    int64_t *r = table + 8 * i;
    const int64_t first = r[4], slot = r[5], lookback = r[6];
    llmarch_decode_layer((const layer_t *)r[0], x, B, (void *)r[1], (void *)r[2], r[3], first, slot, cos, sin,
                         cos_stride, valid == NULL ? NULL : valid + r[7] + first, valid_stride, alibi);
    r[5] = slot + 1;
    if (lookback >= 0 && slot + 1 - first > lookback) r[4] = slot + 1 - lookback;
  }
}
