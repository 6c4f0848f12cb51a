/* llmarch: products of few rows (decoding) with a weight in a blocked layout, AVX-512, fp32 arithmetic.
 *
 * y[M, N] = (x[M, K] @ W[N, K]^T) * scale[N] + bias[N], where W is read as w[ceil(N/16)][K][16] (N zero-padded
 * to a multiple of 16): one block of 16 outputs is one contiguous run of 16 * K weights that the hardware
 * prefetcher streams (and a software prefetch 2 KiB ahead helps it). Two weight types:
 *   - fp32 (llmarch_f32_gemv): scale is NULL; the plain fp32 product, summation order aside.
 *   - int8 (llmarch_int8_gemv): each weight is widened to fp32 once per block and row tile and multiplied by the
 *     fp32 activations, then by its row's scale: the dequantized fp32 product, no bf16 rounding of activations.
 * scale and bias may be NULL. x, y: fp32 row-major [M, K] and [M, N] (y fully written). Blocks are split across
 * OpenMP threads. Built by llmarch.native with -O3 -march=native -fopenmp.
 */
#include <stdint.h>
#include <immintrin.h>

#if !defined(__AVX512F__)
#error "llmarch gemv needs AVX-512F"
#endif

#define NB 16           /* outputs per block: one zmm of fp32 lanes */
#define MAXR 8          /* activation rows per tile */
#define PREFETCH 2048   /* bytes ahead of the weight being read */

static inline __m512 load_f32(const float *w) { return _mm512_loadu_ps(w); }
static inline __m512 load_i8(const int8_t *w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
}

/* One block of 16 outputs for R activation rows (R is a compile-time constant at each call site). U partial
 * sums per row hide the FMA latency: 4 when R <= 4, 2 above (8 rows x 2 = 16 accumulators). */
#define TILE(NAME, T, LOAD)                                                                                    \
  static inline __attribute__((always_inline)) void NAME(const float *x, int64_t K, const T *w,             \
                                                         const float *scale, const float *bias, float *y,   \
                                                         int64_t ldy, const int R, int64_t ncols) {         \
    const int U = R > 4 ? 2 : 4;                                                                            \
    __m512 acc[MAXR][4];                                                                                    \
    for (int r = 0; r < MAXR; r++)                                                                          \
      for (int u = 0; u < 4; u++) acc[r][u] = _mm512_setzero_ps();                                          \
    int64_t k = 0;                                                                                          \
    for (; k + 4 <= K; k += 4) {                                                                            \
      for (int line = 0; line < (int)(4 * NB * sizeof(T)); line += 64)                                      \
        _mm_prefetch((const char *)(w + k * NB) + PREFETCH + line, _MM_HINT_T0);                            \
      for (int u = 0; u < 4; u++) {                                                                         \
        __m512 wf = LOAD(w + (k + u) * NB);                                                                 \
        for (int r = 0; r < R; r++)                                                                         \
          acc[r][u % U] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k + u]), wf, acc[r][u % U]);             \
      }                                                                                                     \
    }                                                                                                       \
    for (; k < K; k++) {                                                                                    \
      __m512 wf = LOAD(w + k * NB);                                                                         \
      for (int r = 0; r < R; r++) acc[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k]), wf, acc[r][0]); \
    }                                                                                                       \
    const __mmask16 mask = (__mmask16)((1u << ncols) - 1u);                                                 \
    const __m512 sv = scale ? _mm512_maskz_loadu_ps(mask, scale) : _mm512_set1_ps(1.0f);                    \
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();                       \
    for (int r = 0; r < R; r++) {                                                                           \
      __m512 t = _mm512_add_ps(acc[r][0], acc[r][1]);                                                       \
      if (U == 4) t = _mm512_add_ps(t, _mm512_add_ps(acc[r][2], acc[r][3]));                                \
      _mm512_mask_storeu_ps(y + r * ldy, mask, _mm512_fmadd_ps(t, sv, bv));                                 \
    }                                                                                                       \
  }

/* The product over all blocks; each OpenMP thread takes a run of blocks. */
#define GEMV(NAME, TILE_NAME, T)                                                                               \
  void NAME(const float *x, const T *w, const float *scale, const float *bias, float *y, int64_t M,           \
            int64_t N, int64_t K) {                                                                           \
    const int64_t nb = (N + NB - 1) / NB;                                                                     \
    _Pragma("omp parallel for schedule(static)")                                                              \
    for (int64_t b = 0; b < nb; b++) {                                                                        \
      const int64_t ncols = N - b * NB < NB ? N - b * NB : NB;                                                \
      const T *wb = w + b * K * NB;                                                                           \
      const float *sb = scale ? scale + b * NB : 0, *bb = bias ? bias + b * NB : 0;                          \
      for (int64_t m = 0; m < M; m += MAXR) {                                                                 \
        const float *xm = x + m * K;                                                                          \
        float *ym = y + m * N + b * NB;                                                                       \
        switch (M - m < MAXR ? M - m : MAXR) {                                                                \
          case 1: TILE_NAME(xm, K, wb, sb, bb, ym, N, 1, ncols); break;                                       \
          case 2: TILE_NAME(xm, K, wb, sb, bb, ym, N, 2, ncols); break;                                       \
          case 3: TILE_NAME(xm, K, wb, sb, bb, ym, N, 3, ncols); break;                                       \
          case 4: TILE_NAME(xm, K, wb, sb, bb, ym, N, 4, ncols); break;                                       \
          case 5: TILE_NAME(xm, K, wb, sb, bb, ym, N, 5, ncols); break;                                       \
          case 6: TILE_NAME(xm, K, wb, sb, bb, ym, N, 6, ncols); break;                                       \
          case 7: TILE_NAME(xm, K, wb, sb, bb, ym, N, 7, ncols); break;                                       \
          default: TILE_NAME(xm, K, wb, sb, bb, ym, N, 8, ncols); break;                                      \
        }                                                                                                     \
      }                                                                                                       \
    }                                                                                                         \
  }

TILE(tile_f32, float, load_f32)
TILE(tile_i8, int8_t, load_i8)
GEMV(llmarch_f32_gemv, tile_f32, float)
GEMV(llmarch_int8_gemv, tile_i8, int8_t)
