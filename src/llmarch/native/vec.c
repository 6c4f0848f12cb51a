/* llmarch: helpers of the native decode layer (decode.c #includes this file after gemv.c and rows.c): exp.c's
 * exp of softmax arguments, horizontal sums and dot products, rounding to bf16; rows.c's RMSNorm and rotation over
 * fp32 rows holding fp32 or (bf16 layers) bf16 values.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "exp.c"

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float dot(const float *a, const float *b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

/* v rounded to the nearest bf16 (ties to even), as fp32; a NaN stays a NaN. */
static inline __m256 round8_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)),
                                     _mm256_set1_epi32((int)0xffff0000u));
  return _mm256_blendv_ps(_mm256_castsi256_ps(r), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

/* a[0..n) rounded to bf16 in place (the values a bf16 tensor would hold). */
static void round_bf16(float *a, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(a + i, round8_bf16(_mm256_loadu_ps(a + i)));
  for (; i < n; i++) a[i] = from_bf16(to_bf16(a[i]));
}

/* y = RMSNorm(x) for rows of n (contiguous), gain w; bf16: rows.c's bf16 form over the (bf16-valued) rows. */
static void rms_rows(int bf16, const float *x, const void *w, float *y, int64_t rows, int64_t n, float eps) {
  if (!bf16) {
    llmarch_rms_norm(x, (const float *)w, y, rows, n, eps);
    return;
  }
  uint16_t *s = malloc(sizeof(uint16_t) * 2 * rows * n);
  for (int64_t i = 0; i < rows * n; i++) s[i] = to_bf16(x[i]);
  llmarch_rms_norm_bf16(s, (const uint16_t *)w, s + rows * n, rows, n, eps);
  for (int64_t i = 0; i < rows * n; i++) y[i] = from_bf16(s[rows * n + i]);
  free(s);
}

/* The rotation of x[b, n, :Dr] (strides xb, xn) into y [B, N, Dr]; bf16: rows.c's bf16 form. */
static void rotate_rows(int bf16, const float *x, const void *cos, const void *sin, float *y, int64_t B, int64_t N,
                        int64_t Dr, int64_t xb, int64_t xn, int64_t cos_stride) {
  if (!bf16) {
    llmarch_rotate_half(x, cos, sin, y, B, N, 1, Dr, xb, xn, 0, cos_stride, cos_stride);
    return;
  }
  uint16_t *s = malloc(sizeof(uint16_t) * 2 * B * N * Dr);
  for (int64_t b = 0; b < B; b++)
    for (int64_t n = 0; n < N; n++)
      for (int64_t i = 0; i < Dr; i++) s[(b * N + n) * Dr + i] = to_bf16(x[b * xb + n * xn + i]);
  llmarch_rotate_half_bf16(s, cos, sin, s + B * N * Dr, B, N, 1, Dr, N * Dr, Dr, 0, cos_stride, cos_stride);
  for (int64_t i = 0; i < B * N * Dr; i++) y[i] = from_bf16(s[B * N * Dr + i]);
  free(s);
}
