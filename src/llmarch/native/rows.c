/* llmarch: decode-sized row operations in one call each, fp32 and bf16 (torch runs each as 5-10 small ops, ~30-60
 * us on a slow host at one token). Built by llmarch.native with -ffp-contract=off, so no product is fused into a sum.
 *
 * llmarch_rms_norm: y[r] = (x[r] * rsqrt(mean(x[r]^2) + eps)) * w for rows r of D contiguous floats; the mean
 *   is summed in double and the reciprocal root rounded to fp32 once. Each row's result depends on that row
 *   alone (whatever the batch); many rows are split across OpenMP threads.
 * llmarch_rotate_half: rotary embedding, half-split form: for x[b, n, t, :R] (strides xb, xn, xt; the last dim
 *   contiguous) and cos/sin[b, t, :R] (strides cb, ct), with h = R / 2,
 *   y[.., :h] = x1 * c1 - x2 * s1 and y[.., h:] = x2 * c2 + x1 * s2, y contiguous [B, N, T, R]: the products
 *   and sums of llmarch.nn.rope's torch form, in its order, so the same bits.
 * The _bf16 variants take and give bf16 (uint16_t bits) and follow torch's bf16 forms: every bf16 operation
 *   computed in fp32 and rounded to bf16 (to nearest, ties to even) before the next, as torch's CPU kernels do.
 *   RMSNorm: h = x * inv in fp32, rounded, times the bf16 gain, rounded (llmarch.nn.norm's bf16 path); the
 *   rotation: x * c, x2 * s1, their difference, ... each rounded (the same bits as the torch form).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays a (quiet) NaN */
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline uint16_t mul16(uint16_t a, uint16_t b) { return to_bf16(from_bf16(a) * from_bf16(b)); }

/* One template per operation, instantiated for fp32 and bf16: T the element type, and per type how an element
 * reads as fp32 (IN), the gain applied to x * inv (GAIN), and the rotation's difference and sum (SUB, ADD). */
#define RMS_NORM(NAME, T, IN, GAIN)                                                                          \
  void NAME(const T *x, const T *w, T *y, int64_t rows, int64_t D, float eps) {                             \
    _Pragma("omp parallel for schedule(static) if (rows * D >= (1 << 16))")                                  \
    for (int64_t r = 0; r < rows; r++) {                                                                    \
      const T *xr = x + r * D;                                                                              \
      T *yr = y + r * D;                                                                                    \
      double ss = 0.0;                                                                                      \
      for (int64_t i = 0; i < D; i++) ss += (double)IN(xr[i]) * (double)IN(xr[i]);                          \
      const float inv = (float)(1.0 / sqrt((double)(float)(ss / (double)D) + (double)eps));                 \
      for (int64_t i = 0; i < D; i++) yr[i] = GAIN(xr[i], inv, w[i]);                                       \
    }                                                                                                       \
  }

#define ROTATE_HALF(NAME, T, SUB, ADD)                                                                       \
  void NAME(const T *x, const T *c, const T *s, T *y, int64_t B, int64_t N, int64_t T_, int64_t R,          \
            int64_t xb, int64_t xn, int64_t xt, int64_t cb, int64_t ct) {                                   \
    const int64_t h = R / 2;                                                                                \
    for (int64_t b = 0; b < B; b++)                                                                         \
      for (int64_t n = 0; n < N; n++)                                                                       \
        for (int64_t t = 0; t < T_; t++) {                                                                  \
          const T *xi = x + b * xb + n * xn + t * xt, *ci = c + b * cb + t * ct, *si = s + b * cb + t * ct; \
          T *yi = y + ((b * N + n) * T_ + t) * R;                                                           \
          for (int64_t i = 0; i < h; i++) yi[i] = SUB(xi[i], ci[i], xi[h + i], si[i]);                      \
          for (int64_t i = h; i < R; i++) yi[i] = ADD(xi[i], ci[i], xi[i - h], si[i]);                      \
        }                                                                                                   \
  }

#define F32_IN(v) (v)
#define F32_GAIN(v, inv, g) (((v) * (inv)) * (g))
#define F32_SUB(a, c, b, s) ((a) * (c) - (b) * (s))
#define F32_ADD(a, c, b, s) ((a) * (c) + (b) * (s))
#define BF16_GAIN(v, inv, g) mul16((g), to_bf16(from_bf16(v) * (inv)))
#define BF16_SUB(a, c, b, s) to_bf16(from_bf16(mul16((a), (c))) - from_bf16(mul16((b), (s))))
#define BF16_ADD(a, c, b, s) to_bf16(from_bf16(mul16((a), (c))) + from_bf16(mul16((b), (s))))

RMS_NORM(llmarch_rms_norm, float, F32_IN, F32_GAIN)
RMS_NORM(llmarch_rms_norm_bf16, uint16_t, from_bf16, BF16_GAIN)
ROTATE_HALF(llmarch_rotate_half, float, F32_SUB, F32_ADD)
ROTATE_HALF(llmarch_rotate_half_bf16, uint16_t, BF16_SUB, BF16_ADD)
