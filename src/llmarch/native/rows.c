/* llmarch: decode-sized row operations in one call each, fp32 (torch runs each as 5-10 small ops, ~30-60 us on a
 * slow host at one token). Built by llmarch.native with -ffp-contract=off, so no product is fused into a sum.
 *
 * llmarch_rms_norm: y[r] = (x[r] * rsqrt(mean(x[r]^2) + eps)) * w for rows r of D contiguous floats; the mean
 *   is summed in double and the reciprocal root rounded to fp32 once. Each row's result depends on that row
 *   alone (whatever the batch); many rows are split across OpenMP threads.
 * llmarch_rotate_half: rotary embedding, half-split form: for x[b, n, t, :R] (strides xb, xn, xt; the last dim
 *   contiguous) and cos/sin[b, t, :R] (strides cb, ct), with h = R / 2,
 *   y[.., :h] = x1 * c1 - x2 * s1 and y[.., h:] = x2 * c2 + x1 * s2, y contiguous [B, N, T, R]: the products
 *   and sums of llmarch.nn.rope's torch form, in its order, so the same bits.
 */
#include <math.h>
#include <stdint.h>

void llmarch_rms_norm(const float *x, const float *w, float *y, int64_t rows, int64_t D, float eps) {
#pragma omp parallel for schedule(static) if (rows * D >= (1 << 16))
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * D;
    float *yr = y + r * D;
    double ss = 0.0;
    for (int64_t i = 0; i < D; i++) ss += (double)xr[i] * (double)xr[i];
    const float inv = (float)(1.0 / sqrt((double)(float)(ss / (double)D) + (double)eps));
    for (int64_t i = 0; i < D; i++) yr[i] = (xr[i] * inv) * w[i];
  }
}

void llmarch_rotate_half(const float *x, const float *c, const float *s, float *y, int64_t B, int64_t N,
                         int64_t T, int64_t R, int64_t xb, int64_t xn, int64_t xt, int64_t cb, int64_t ct) {
  const int64_t h = R / 2;
  for (int64_t b = 0; b < B; b++)
    for (int64_t n = 0; n < N; n++)
      for (int64_t t = 0; t < T; t++) {
        const float *xi = x + b * xb + n * xn + t * xt, *ci = c + b * cb + t * ct, *si = s + b * cb + t * ct;
        float *yi = y + ((b * N + n) * T + t) * R;
        for (int64_t i = 0; i < h; i++) yi[i] = xi[i] * ci[i] - xi[h + i] * si[i];
        for (int64_t i = h; i < R; i++) yi[i] = xi[i] * ci[i] + xi[i - h] * si[i];
      }
}
