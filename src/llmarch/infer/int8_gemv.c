/* llmarch: int8 weight x fp32 activation products for few rows (decoding), AVX-512.
 *
 * y[M, N] = (x[M, K] @ q[N, K]^T) * s[N], with q int8 and x, s, y fp32. The weight is read in a blocked layout,
 * w[N/16][K][16] (N zero-padded to a multiple of 16), so one block of 16 outputs is one contiguous run of
 * 16 * K bytes that the hardware prefetcher streams; torch's row-major kernel reads 16 short rows at once and
 * streams int8 at about half the speed on the machines measured (benchmarks/decode.py --int8-kernels).
 * Each int8 weight is widened to fp32 once per block and row tile and multiplied by the fp32 activation, so the
 * product is the dequantized fp32 product up to summation order: no bf16 rounding of the activations.
 * Built by llmarch.infer.native with -O3 -march=native -fopenmp; blocks are split across OpenMP threads.
 */
#include <stdint.h>
#include <immintrin.h>

#if !defined(__AVX512F__)
#error "llmarch int8_gemv needs AVX-512F"
#endif

#define NB 16    /* outputs per block: one zmm of fp32 lanes */
#define MAXR 8   /* activation rows per tile */

/* One block of 16 outputs for R activation rows (R is a compile-time constant at each call site). U partial
 * sums per row hide the FMA latency: 4 when R <= 4, 2 above (8 rows x 2 = 16 accumulators). */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t K, const int8_t *w,
                                                        const float *s, float *y, int64_t ldy, const int R,
                                                        int64_t ncols) {
  const int U = R > 4 ? 2 : 4;
  __m512 acc[MAXR][4];
  for (int r = 0; r < MAXR; r++)
    for (int u = 0; u < 4; u++) acc[r][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    _mm_prefetch((const char *)(w + (k + 64) * NB), _MM_HINT_T0);
    for (int u = 0; u < 4; u++) {
      __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + (k + u) * NB))));
      for (int r = 0; r < R; r++)
        acc[r][u % U] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k + u]), wf, acc[r][u % U]);
    }
  }
  for (; k < K; k++) {
    __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k * NB))));
    for (int r = 0; r < R; r++) acc[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k]), wf, acc[r][0]);
  }
  const __m512 sv = _mm512_loadu_ps(s);
  const __mmask16 mask = (__mmask16)((1u << ncols) - 1u);
  for (int r = 0; r < R; r++) {
    __m512 t = _mm512_add_ps(acc[r][0], acc[r][1]);
    if (U == 4) t = _mm512_add_ps(t, _mm512_add_ps(acc[r][2], acc[r][3]));
    _mm512_mask_storeu_ps(y + r * ldy, mask, _mm512_mul_ps(t, sv));
  }
}

/* x [M, K] fp32 row-major; w the blocked weight (ceil(N/16) * K * 16 bytes); s [ceil(N/16) * 16] fp32 scales
 * (padding may hold anything); y [M, N] fp32 row-major, fully written. */
void llmarch_int8_gemv(const float *x, const int8_t *w, const float *s, float *y, int64_t M, int64_t N,
                       int64_t K) {
  const int64_t nb = (N + NB - 1) / NB;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nb; b++) {
    const int64_t ncols = N - b * NB < NB ? N - b * NB : NB;
    const int8_t *wb = w + b * K * NB;
    for (int64_t m = 0; m < M; m += MAXR) {
      const float *xm = x + m * K;
      float *ym = y + m * N + b * NB;
      switch (M - m < MAXR ? M - m : MAXR) {
        case 1: tile(xm, K, wb, s + b * NB, ym, N, 1, ncols); break;
        case 2: tile(xm, K, wb, s + b * NB, ym, N, 2, ncols); break;
        case 3: tile(xm, K, wb, s + b * NB, ym, N, 3, ncols); break;
        case 4: tile(xm, K, wb, s + b * NB, ym, N, 4, ncols); break;
        case 5: tile(xm, K, wb, s + b * NB, ym, N, 5, ncols); break;
        case 6: tile(xm, K, wb, s + b * NB, ym, N, 6, ncols); break;
        case 7: tile(xm, K, wb, s + b * NB, ym, N, 7, ncols); break;
        default: tile(xm, K, wb, s + b * NB, ym, N, 8, ncols); break;
      }
    }
  }
}
