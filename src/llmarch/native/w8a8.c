/* llmarch: products of int8 weights with int8 activations (dynamic W8A8), integer dot products, AVX-512 or AVX2.
 *
 * y[M, N] = sum over blocks b of 32 inputs of sx[m, b] * (qx[m, b] . qw[n, b]), times scale[n], plus bias[n]:
 *   - the activations are quantized here, per row and block of A8_KB = 32 inputs (x zero-padded to Kp, a multiple
 *     of 32): amax = max |x|, inv = 127 / amax, qx = rint(x * inv) clamped to [-127, 127] (rint: nearest, ties to
 *     even), sx = amax / 127; a block of zeros gets qx 0 and sx 0; a block holding a NaN or an infinity gets sx NaN,
 *     so the outputs it reaches are NaN (llmarch.native.w8a8.quantize_rows is the same in torch);
 *   - the weight is per-output-channel int8 (llmarch.infer.quantize.Int8Linear: qw in [-127, 127], scale[n]),
 *     stored offset by 128 as unsigned bytes in [ceil(N/16)][Kp/4][16][4]: per block of 16 outputs, four
 *     consecutive inputs of each output in one 32-bit lane, one 64-byte line per four inputs (padding: qw 0);
 *   - each block's integer dot product is exact (|sum| <= 32 * 255 * 127 < 2^24, so its float is too): where the
 *     CPU has AVX-512 VNNI / AVX-VNNI, the lane starts at -128 * sum(qx[m, b]) and adds (qw + 128) * qx, four
 *     products per lane per instruction (VPDPBUSD); elsewhere it adds qw * qx from 8-bit multiply-adds into 16
 *     bits (VPMADDUBSW over |qx| and qw with qx's sign) and 16-bit ones into 32 (see a8_dot); the blocks' terms
 *     are summed in fp32 in ascending order, then y = fma(sum, scale, bias).
 * x, y: fp32 row-major [M, K] and [M, N] (y fully written); scale: padded to the blocks as gemv.c's; bias: [N] or
 * NULL. Groups of output blocks are split across OpenMP threads; each group's weights are read once per tile of up
 * to A8_MAXR rows. llmarch_w8a8_gemm returns 0, or -1 when it could not allocate the quantized activations (y is
 * then all NaN). Built by llmarch.native (-O3 -march=native -fopenmp -ffp-contract=off); decode.c #includes it
 * for the native decode layers' products of this kind.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>

#define A8_NB 16        /* outputs per block */
#define A8_KB 32        /* inputs per activation scale */
#define A8_GROUP 4      /* output blocks per unit of OpenMP work */

#if defined(__AVX512F__) && defined(__AVX512BW__)
typedef __m512i a8_ivec;
typedef __m512 a8_fvec;
#define A8_VL 16
#define A8_MAXR 8       /* rows per tile: 8 integer and 8 float sums, a weight line, a broadcast: 18 of 32 zmm */
#define A8_PREFETCH 2048
#define A8(op) _mm512_##op
#define A8I(op) _mm512_##op##_si512
#if defined(__AVX512VNNI__)
#define A8_DPBUSD _mm512_dpbusd_epi32
#endif
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256i a8_ivec;
typedef __m256 a8_fvec;
#define A8_VL 8
#define A8_MAXR 2       /* 2 rows x 2 vectors of integer and float sums: 8 of the 16 ymm */
#define A8_PREFETCH 0
#define A8(op) _mm256_##op
#define A8I(op) _mm256_##op##_si256
#if defined(__AVXVNNI__)
#define A8_DPBUSD _mm256_dpbusd_avx_epi32
#endif
#else
#error "llmarch w8a8 needs AVX-512BW or AVX2 with FMA"
#endif

/* One broadcast of four activation codes, prepared for a8_dot, and acc + the sums of four products per 32-bit lane
 * (w: the weights' unsigned offset bytes). With VPDPBUSD the lane adds (w_u8) * x, and A8_OFFSET says the integer
 * sums start at the offset's correction. Without it, the lane adds w_s8 * x exactly (w_s8 = w_u8 ^ 0x80): the
 * weight's sign is flipped where x is negative and VPMADDUBSW multiplies it by |x| (each pair's sum within
 * 2 * 127 * 127, below int16's limit: the weights are in [-127, 127]), VPMADDWD adds the pairs into the lane. */
#if defined(A8_DPBUSD)
#define A8_OFFSET 1
typedef struct { a8_ivec x; } a8_xop;
static inline a8_xop a8_prep(a8_ivec x) { return (a8_xop){x}; }
static inline a8_ivec a8_dot(a8_ivec acc, a8_ivec w, a8_xop x) { return A8_DPBUSD(acc, w, x.x); }
#else
#define A8_OFFSET 0
#if A8_VL == 16  /* AVX-512BW: no VPSIGNB on zmm, the sign flip is a masked negation */
typedef struct { a8_ivec abs; __mmask64 neg; } a8_xop;
static inline a8_xop a8_prep(a8_ivec x) { return (a8_xop){_mm512_abs_epi8(x), _mm512_movepi8_mask(x)}; }
static inline a8_ivec a8_signed(a8_ivec ws, a8_xop x) {
  return _mm512_mask_sub_epi8(ws, x.neg, _mm512_setzero_si512(), ws);
}
#else
typedef struct { a8_ivec abs, x; } a8_xop;
static inline a8_xop a8_prep(a8_ivec x) { return (a8_xop){_mm256_abs_epi8(x), x}; }
static inline a8_ivec a8_signed(a8_ivec ws, a8_xop x) { return _mm256_sign_epi8(ws, x.x); }
#endif
static inline a8_ivec a8_dot(a8_ivec acc, a8_ivec w, a8_xop x) {
  const a8_ivec ws = a8_signed(A8I(xor)(w, A8(set1_epi8)((char)0x80)), x);
  return A8(add_epi32)(acc, A8(madd_epi16)(A8(maddubs_epi16)(x.abs, ws), A8(set1_epi16)(1)));
}
#endif

#define A8_NV (A8_NB / A8_VL)  /* vectors per block */

static inline int64_t a8_padded(int64_t K) { return (K + A8_KB - 1) / A8_KB * A8_KB; }

/* x [M, K] -> q [M, Kp] int8, s [M, Kp / 32] (sx), c [M, Kp / 32] (-128 * the block's sum of q). */
void llmarch_w8a8_quantize(const float *x, int8_t *q, float *s, int32_t *c, int64_t M, int64_t K) {
  const int64_t Kp = a8_padded(K), nk = Kp / A8_KB;
#pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
  for (int64_t m = 0; m < M; m++)
    for (int64_t b = 0; b < nk; b++) {
      const float *xb = x + m * K + b * A8_KB;
      const int64_t n = K - b * A8_KB < A8_KB ? K - b * A8_KB : A8_KB;
      float amax = 0.0f;
      int finite = 1;
      for (int64_t k = 0; k < n; k++) {
        const float a = fabsf(xb[k]);
        finite &= isfinite(a) != 0;
        amax = a > amax ? a : amax;
      }
      int8_t *qb = q + m * Kp + b * A8_KB;
      int32_t sum = 0;
      memset(qb, 0, A8_KB);
      if (finite && amax > 0.0f) {
        const float inv = 127.0f / amax;
        for (int64_t k = 0; k < n; k++) {
          float v = rintf(xb[k] * inv);
          v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
          qb[k] = (int8_t)v;
          sum += qb[k];
        }
      }
      s[m * nk + b] = !finite ? NAN : amax / 127.0f;
      c[m * nk + b] = -128 * sum;
    }
}

/* R rows (a compile-time constant at each call) x one block of 16 outputs over all Kp inputs. U: integer partial
 * sums per row and vector (two for one row: a second chain hides VPDPBUSD's latency). */
static inline __attribute__((always_inline)) void a8_tile(const int8_t *q, const float *s, const int32_t *c,
                                                          int64_t Kp, const uint8_t *w, const float *scale,
                                                          const float *bias, float *y, int64_t N, int64_t n0,
                                                          const int R) {
  const int U = R == 1 ? 2 : 1;
  const int64_t nk = Kp / A8_KB;
  a8_fvec f[A8_MAXR][A8_NV];
  for (int r = 0; r < R; r++)
    for (int v = 0; v < A8_NV; v++) f[r][v] = A8(setzero_ps)();
  for (int64_t b = 0; b < nk; b++) {
    const uint8_t *wb = w + b * A8_KB * A8_NB;  /* 8 lines: 4 inputs x 16 outputs each */
    if (A8_PREFETCH)
      for (int line = 0; line < A8_KB * A8_NB; line += 64)
        _mm_prefetch((const char *)wb + A8_PREFETCH + line, _MM_HINT_T0);
    a8_ivec acc[A8_MAXR][A8_NV][2];
    for (int r = 0; r < R; r++)
      for (int v = 0; v < A8_NV; v++) {
        acc[r][v][0] = A8_OFFSET ? A8(set1_epi32)(c[r * nk + b]) : A8I(setzero)();
        acc[r][v][1] = A8I(setzero)();
      }
    for (int j = 0; j < A8_KB / 4; j++) {
      a8_ivec wv[A8_NV];
      for (int v = 0; v < A8_NV; v++) wv[v] = A8I(loadu)((const void *)(wb + j * 64 + v * A8_VL * 4));
      for (int r = 0; r < R; r++) {
        int32_t x4;
        memcpy(&x4, q + r * Kp + b * A8_KB + 4 * j, 4);
        const a8_xop xv = a8_prep(A8(set1_epi32)(x4));
        for (int v = 0; v < A8_NV; v++) acc[r][v][j % U] = a8_dot(acc[r][v][j % U], wv[v], xv);
      }
    }
    for (int r = 0; r < R; r++) {
      const a8_fvec sx = A8(set1_ps)(s[r * nk + b]);
      for (int v = 0; v < A8_NV; v++) {
        a8_ivec t = U == 2 ? A8(add_epi32)(acc[r][v][0], acc[r][v][1]) : acc[r][v][0];
        f[r][v] = A8(fmadd_ps)(A8(cvtepi32_ps)(t), sx, f[r][v]);
      }
    }
  }
  const int64_t ncols = N - n0 < A8_NB ? N - n0 : A8_NB;
  float sbuf[A8_NB], bbuf[A8_NB], ybuf[A8_NB];
  for (int j = 0; j < A8_NB; j++) {
    sbuf[j] = scale[j];
    bbuf[j] = bias && j < ncols ? bias[j] : 0.0f;
  }
  for (int r = 0; r < R; r++) {
    float *out = ncols == A8_NB ? y + r * N : ybuf;
    for (int v = 0; v < A8_NV; v++)
      A8(storeu_ps)(out + v * A8_VL, A8(fmadd_ps)(f[r][v], A8(loadu_ps)(sbuf + v * A8_VL),
                                                A8(loadu_ps)(bbuf + v * A8_VL)));
    if (ncols < A8_NB) memcpy(y + r * N, ybuf, (size_t)ncols * sizeof(float));
  }
}

/* The product over quantized activations (q, s, c as llmarch_w8a8_quantize writes them). */
void llmarch_w8a8_gemm_q(const int8_t *q, const float *s, const int32_t *c, const uint8_t *w, const float *scale,
                         const float *bias, float *y, int64_t M, int64_t N, int64_t K) {
  const int64_t Kp = a8_padded(K), nk = Kp / A8_KB, nb = (N + A8_NB - 1) / A8_NB;
  const int64_t ng = (nb + A8_GROUP - 1) / A8_GROUP;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < ng; g++) {
    const int64_t b0 = g * A8_GROUP, b1 = b0 + A8_GROUP < nb ? b0 + A8_GROUP : nb;
    for (int64_t m = 0; m < M; m += A8_MAXR) {
      const int64_t rows = M - m < A8_MAXR ? M - m : A8_MAXR;
      for (int64_t b = b0; b < b1; b++) {
        const int8_t *qm = q + m * Kp;
        const float *sm = s + m * nk;
        const int32_t *cm = c + m * nk;
        const uint8_t *wb = w + b * Kp * A8_NB;
        const float *bb = bias ? bias + b * A8_NB : 0;
        float *ym = y + m * N + b * A8_NB;
        switch (rows) {
          case 1: a8_tile(qm, sm, cm, Kp, wb, scale + b * A8_NB, bb, ym, N, b * A8_NB, 1); break;
#if A8_MAXR > 2
          case 2: a8_tile(qm, sm, cm, Kp, wb, scale + b * A8_NB, bb, ym, N, b * A8_NB, 2); break;
          case 3: a8_tile(qm, sm, cm, Kp, wb, scale + b * A8_NB, bb, ym, N, b * A8_NB, 3); break;
          case 4: a8_tile(qm, sm, cm, Kp, wb, scale + b * A8_NB, bb, ym, N, b * A8_NB, 4); break;
          case 5: a8_tile(qm, sm, cm, Kp, wb, scale + b * A8_NB, bb, ym, N, b * A8_NB, 5); break;
          case 6: a8_tile(qm, sm, cm, Kp, wb, scale + b * A8_NB, bb, ym, N, b * A8_NB, 6); break;
          case 7: a8_tile(qm, sm, cm, Kp, wb, scale + b * A8_NB, bb, ym, N, b * A8_NB, 7); break;
#endif
          default: a8_tile(qm, sm, cm, Kp, wb, scale + b * A8_NB, bb, ym, N, b * A8_NB, A8_MAXR); break;
        }
      }
    }
  }
}

/* x [M, K] fp32 quantized per row and block of 32, then the product; 0, or -1 (y all NaN) without memory. */
int llmarch_w8a8_gemm(const float *x, const uint8_t *w, const float *scale, const float *bias, float *y, int64_t M,
                      int64_t N, int64_t K) {
  const int64_t Kp = a8_padded(K), nk = Kp / A8_KB;
  if (M == 0) return 0;
  char *buf = malloc((size_t)(M * Kp + M * nk * (int64_t)(sizeof(float) + sizeof(int32_t))));
  if (!buf) {
    for (int64_t i = 0; i < M * N; i++) y[i] = NAN;
    return -1;
  }
  float *s = (float *)buf;
  int32_t *c = (int32_t *)(s + M * nk);
  int8_t *q = (int8_t *)(c + M * nk);
  llmarch_w8a8_quantize(x, q, s, c, M, K);
  llmarch_w8a8_gemm_q(q, s, c, w, scale, bias, y, M, N, K);
  free(buf);
  return 0;
}
