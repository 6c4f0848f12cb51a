/* llmarch: the FFN half of a native decode layer (decode.c #includes this file): the products over gemv.c's
 * blocked weights, the activations, and a mixture-of-experts FFN.
 *
 * moe_ffn(M, h, y, B, D): y [B, D] = sum over the K experts each row of h [B, D] is routed to of weight * expert(h)
 * (+ the shared experts, scaled by sigmoid(h . gate) when gated), as llmarch.nn.moe.MoE computes it in eval mode
 * with every assignment served (no capacity limit). Routing (llmarch.nn.router), in fp32: logits = h Wr^T + b
 * (Wr [E, D] row-major), probs = softmax(logits); with groups, experts outside the row's topk_groups best groups
 * (by their highest probability) get probability 0; then topk_softmax: the K largest logits, softmax over them;
 * softmax_topk: the K largest probabilities; softmax_topk_norm: those divided by their sum; switch: the largest
 * probability (K = 1); the weights times scale. Ties go to the lower expert index. Each expert runs once per call
 * over the rows routed to it, so a step streams each chosen expert's weights once. In a bf16 layer (M->bf16; h
 * holding bf16 values, bf16 expert weights, the router's and gate's weights widened to fp32) it rounds where the
 * eager bf16 MoE rounds: each product's output, the activation and gate product, the routing weight, each weighted
 * expert output, their sum (accumulated in fp32 in ascending expert index, as the sorted dispatch's index_add
 * does), the shared gate's logit and sigmoid, the gated shared output and its sum. Needs gemv.c, rows.c and vec.c
 * (and w8a8.c) included before it.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  const void *w;        /* blocked weight: float, int8_t, uint16_t (bf16), or w8a8.c's uint8_t */
  const float *scale;   /* int8: per-output scales padded to the blocks; else NULL */
  const float *bias;    /* [N] or NULL */
  int64_t kind;         /* 0 fp32, 1 int8, 2 bf16, 3 int8 with int8 activations (w8a8.c) */
} product_t;

enum { SILU = 0, GELU_TANH = 1, GELU_ERF = 2, RELU = 3 };

static void product(const product_t *p, const float *x, float *y, int64_t M, int64_t N, int64_t K) {
  if (p->kind == 1)
    llmarch_int8_gemv(x, (const int8_t *)p->w, p->scale, p->bias, y, M, N, K);
  else if (p->kind == 3)  /* without memory for the quantized rows, y is NaN */
    llmarch_w8a8_gemm(x, (const uint8_t *)p->w, p->scale, p->bias, y, M, N, K);
  else if (p->kind == 2) {  /* a bf16 layer's activations hold bf16 values: VDPBF16PS where the CPU has it */
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    if (!llmarch_bf16_gemv_dp(x, (const uint16_t *)p->w, p->bias, y, M, N, K)) return;
#endif
    llmarch_bf16_gemv(x, (const uint16_t *)p->w, NULL, p->bias, y, M, N, K);
  }
  else
    llmarch_f32_gemv(x, (const float *)p->w, NULL, p->bias, y, M, N, K);
}

/* act(g) (times up, when up is not NULL) for 8 lanes. */
static inline __m256 act8(int64_t act, __m256 g) {
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  if (act == SILU) {  /* e = exp(-|g|): g / (1 + e) for g >= 0, g e / (1 + e) below */
    __m256 e = exp_neg(_mm256_or_ps(g, sign)), neg = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
    return _mm256_div_ps(_mm256_blendv_ps(g, _mm256_mul_ps(g, e), neg), _mm256_add_ps(one, e));
  }
  if (act == GELU_TANH) {  /* 0.5 g (1 + tanh u), tanh |u| = (1 - e) / (1 + e) with e = exp(-2|u|) */
    __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                             _mm256_add_ps(g, _mm256_mul_ps(_mm256_set1_ps(0.044715f),
                                                            _mm256_mul_ps(_mm256_mul_ps(g, g), g))));
    __m256 au = _mm256_andnot_ps(sign, u), e = exp_neg(_mm256_mul_ps(_mm256_set1_ps(-2.0f), au));
    __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    t = _mm256_or_ps(t, _mm256_and_ps(u, sign));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), g), _mm256_add_ps(one, t));
  }
  if (act == RELU) return _mm256_max_ps(g, _mm256_setzero_ps());
  float v[8];
  _mm256_storeu_ps(v, g);
  for (int i = 0; i < 8; i++) v[i] = 0.5f * v[i] * (1.0f + erff(v[i] * 0.70710678118654752f));
  return _mm256_loadu_ps(v);
}

/* act(g) (times u, when gated), each rounded to bf16 when bf16, for 8 lanes. */
static inline __attribute__((always_inline)) __m256 activate8(int64_t act, int64_t gated, __m256 g, __m256 u,
                                                               int bf16) {
  __m256 a = act8(act, g);
  if (bf16) a = round8_bf16(a);
  if (gated) {
    a = _mm256_mul_ps(a, u);
    if (bf16) a = round8_bf16(a);
  }
  return a;
}

/* y[r, :F] = act(h[r, :F]) (* h[r, F:2F] when gated) for rows r of h (row length F or 2F). bf16: the activation
 * and the product each rounded to bf16, as torch's bf16 ops round them. */
static void activate(int64_t act, int64_t gated, int64_t F, const float *h, float *y, int64_t B, int bf16) {
  const int64_t W = gated ? 2 * F : F;
  for (int64_t r = 0; r < B; r++) {
    const float *g = h + r * W, *u = g + F;
    float *o = y + r * F;
    int64_t f = 0;
    for (; f + 8 <= F; f += 8)
      _mm256_storeu_ps(o + f, activate8(act, gated, _mm256_loadu_ps(g + f),
                                        gated ? _mm256_loadu_ps(u + f) : _mm256_setzero_ps(), bf16));
    if (f < F) {  /* the last n < 8 through buffers */
      float gb[8] = {0}, ub[8] = {0}, ob[8];
      const int64_t n = F - f;
      memcpy(gb, g + f, sizeof(float) * n);
      if (gated) memcpy(ub, u + f, sizeof(float) * n);
      _mm256_storeu_ps(ob, activate8(act, gated, _mm256_loadu_ps(gb), _mm256_loadu_ps(ub), bf16));
      memcpy(o + f, ob, sizeof(float) * n);
    }
  }
}

enum { TOPK_SOFTMAX = 0, SOFTMAX_TOPK = 1, SOFTMAX_TOPK_NORM = 2, SWITCH = 3 };

typedef struct {
  int64_t E, K, F, gated, act;           /* experts, routed per row, expert width, gated (up has 2F), activation */
  int64_t router, groups, topk_groups;   /* router kind, expert groups (1: none), groups kept per row */
  float scale;                           /* routed weights' factor */
  const float *router_w, *router_b;      /* [E, D] row-major, [E] or NULL */
  const product_t *up, *down;            /* E each: [2F or F, D], [D, F] */
  int64_t shared_F, shared_gated;        /* shared experts' fused width (0: none), gated FFN */
  product_t shared_up, shared_down;
  const float *shared_gate;              /* [D]: sigmoid(h . gate) scales the shared output; NULL: not gated */
  int64_t bf16;                          /* round as torch's bf16 ops do (see moe_ffn) */
} moe_t;

/* idx[0..k) = the k largest of v[0..n), largest first; ties: the lower index. */
static void top(const float *v, int64_t n, int64_t k, int64_t *idx) {
  for (int64_t i = 0; i < k; i++) {
    int64_t best = -1;
    for (int64_t j = 0; j < n; j++) {
      int taken = 0;
      for (int64_t t = 0; t < i; t++) taken |= idx[t] == j;
      if (!taken && (best < 0 || v[j] > v[best])) best = j;
    }
    idx[i] = best;
  }
}

/* One row's routing: experts idx[K] and weights w[K]; scratch: logits and probs [E], group scores. */
static void route(const moe_t *M, const float *h, int64_t D, float *logits, float *probs, int64_t *idx, float *w) {
  const int64_t E = M->E, K = M->K;
  float mx = -INFINITY, sum = 0.0f;
  for (int64_t e = 0; e < E; e++) {
    logits[e] = dot(h, M->router_w + e * D, D) + (M->router_b ? M->router_b[e] : 0.0f);
    mx = logits[e] > mx ? logits[e] : mx;
  }
  for (int64_t e = 0; e < E; e++) sum += (probs[e] = expf(logits[e] - mx));
  for (int64_t e = 0; e < E; e++) probs[e] /= sum;
  if (M->groups > 1) {
    const int64_t G = M->groups, per = E / G;
    float best[G];
    int64_t keep[G];
    for (int64_t g = 0; g < G; g++) {
      best[g] = probs[g * per];
      for (int64_t j = 1; j < per; j++) best[g] = probs[g * per + j] > best[g] ? probs[g * per + j] : best[g];
    }
    top(best, G, M->topk_groups, keep);
    for (int64_t g = 0; g < G; g++) {
      int kept = 0;
      for (int64_t t = 0; t < M->topk_groups; t++) kept |= keep[t] == g;
      if (!kept) memset(probs + g * per, 0, sizeof(float) * per);
    }
  }
  if (M->router == TOPK_SOFTMAX) {
    top(logits, E, K, idx);
    float m = logits[idx[0]], s = 0.0f;
    for (int64_t k = 0; k < K; k++) s += (w[k] = expf(logits[idx[k]] - m));
    for (int64_t k = 0; k < K; k++) w[k] /= s;
  } else {
    top(probs, E, K, idx);
    float s = 0.0f;
    for (int64_t k = 0; k < K; k++) s += (w[k] = probs[idx[k]]);
    if (M->router == SOFTMAX_TOPK_NORM)
      for (int64_t k = 0; k < K; k++) w[k] /= s;
  }
  if (M->scale != 1.0f)
    for (int64_t k = 0; k < K; k++) w[k] *= M->scale;
}

/* y [B, D] = the mixture's output for h [B, D] (see the file's comment); where not NULL, each row's routing is
 * written out too: logits [B, E], experts [B, K] and their weights [B, K], in the router's order. */
static void moe_ffn(const moe_t *M, const float *h, float *y, int64_t B, int64_t D, float *logits_out,
                    int64_t *experts_out, float *weights_out) {
  const int64_t E = M->E, K = M->K, F = M->F, Fs = M->shared_F, Fm = F > Fs ? F : Fs;
  const int bf = (int)M->bf16;
  float *logits = malloc(sizeof(float) * 2 * E), *w = malloc(sizeof(float) * B * K), *wr = malloc(sizeof(float) * B);
  int64_t *idx = malloc(sizeof(int64_t) * B * K), *rows = malloc(sizeof(int64_t) * B);
  float *xe = malloc(sizeof(float) * B * D), *ye = malloc(sizeof(float) * B * D);
  float *gu = malloc(sizeof(float) * B * 2 * Fm), *mid = malloc(sizeof(float) * B * Fm);
  for (int64_t b = 0; b < B; b++) {
    route(M, h + b * D, D, logits, logits + E, idx + b * K, w + b * K);
    if (logits_out) memcpy(logits_out + b * E, logits, sizeof(float) * E);
  }
  if (experts_out) memcpy(experts_out, idx, sizeof(int64_t) * B * K);
  if (weights_out) memcpy(weights_out, w, sizeof(float) * B * K);
  memset(y, 0, sizeof(float) * B * D);
  for (int64_t e = 0; e < E; e++) {
    int64_t n = 0;
    for (int64_t b = 0; b < B; b++)
      for (int64_t k = 0; k < K; k++)
        if (idx[b * K + k] == e) {
          rows[n] = b, wr[n] = w[b * K + k];
          memcpy(xe + n++ * D, h + b * D, sizeof(float) * D);
        }
    if (n == 0) continue;
    product(&M->up[e], xe, gu, n, M->gated ? 2 * F : F, D);
    if (bf) round_bf16(gu, n * (M->gated ? 2 * F : F));
    activate(M->act, M->gated, F, gu, mid, n, bf);
    product(&M->down[e], mid, ye, n, D, F);
    if (bf) round_bf16(ye, n * D);
    for (int64_t i = 0; i < n; i++) {
      float *yr = y + rows[i] * D;
      if (bf) { /* torch's bf16: the weight rounded, the weighted output rounded; summed in fp32 (index_add) */
        const float w16 = from_bf16(to_bf16(wr[i]));
        for (int64_t d = 0; d < D; d++) yr[d] += from_bf16(to_bf16(ye[i * D + d] * w16));
      } else {
        for (int64_t d = 0; d < D; d++) yr[d] += ye[i * D + d] * wr[i];
      }
    }
  }
  if (bf) round_bf16(y, B * D);  /* the routed sum, rounded once */
  if (Fs > 0) {
    product(&M->shared_up, h, gu, B, M->shared_gated ? 2 * Fs : Fs, D);
    if (bf) round_bf16(gu, B * (M->shared_gated ? 2 * Fs : Fs));
    activate(M->act, M->shared_gated, Fs, gu, mid, B, bf);
    product(&M->shared_down, mid, ye, B, D, Fs);
    if (bf) round_bf16(ye, B * D);
    for (int64_t b = 0; b < B; b++) {
      float g = 1.0f;
      if (M->shared_gate) {
        const float z = dot(h + b * D, M->shared_gate, D);
        g = bf ? from_bf16(to_bf16(1.0f / (1.0f + expf(-from_bf16(to_bf16(z)))))) : 1.0f / (1.0f + expf(-z));
      }
      for (int64_t d = 0; d < D; d++) {
        const float s = M->shared_gate ? g * ye[b * D + d] : ye[b * D + d];
        y[b * D + d] += bf ? from_bf16(to_bf16(s)) : s;
      }
      if (bf) round_bf16(y + b * D, D);
    }
  }
  free(logits), free(w), free(wr), free(idx), free(rows), free(xe), free(ye), free(gu), free(mid);
}
