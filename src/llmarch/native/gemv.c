/* llmarch: products of few rows (decoding) with a weight in a blocked layout, fp32 arithmetic, AVX-512 or AVX2.
 *
 * y[M, N] = (x[M, K] @ W[N, K]^T) * scale[N] + bias[N], where W is read as w[ceil(N/16)][K][16] (N zero-padded
 * to a multiple of 16): one block of 16 outputs is one contiguous run of 16 * K weights. Three weight types:
 *   - fp32 (llmarch_f32_gemv): scale is NULL; the plain fp32 product, summation order aside.
 *   - bf16 (llmarch_bf16_gemv): each weight widened to fp32 (exact: a 16-bit shift) and multiplied by the fp32
 *     activations; the fp32 product of the bf16 weights, half the bytes of fp32 to stream.
 *   - int8 (llmarch_int8_gemv): each weight is widened to fp32 once per block and row tile and multiplied by the
 *     fp32 activations, then by its row's scale: the dequantized fp32 product, no bf16 rounding of activations.
 * scale (padded to the blocks) and bias ([N]) may be NULL. x, y: fp32 row-major [M, K] and [M, N] (y fully
 * written). Groups of blocks are split across OpenMP threads. Built by llmarch.native with -O3 -march=native
 * -fopenmp; the widest vector unit the CPU has is used, each tuned on the machine it was measured on
 * (benchmarks/decode.py --kernels):
 *   - AVX-512F: one 16-lane zmm per block, up to 8 rows per tile, one block at a time (2 or 4 partial sums per
 *     row) with a software prefetch 2 KiB ahead; past 8 rows, where every row tile after the first reads the
 *     group's blocks again from cache, a tile of 2-4 rows reads 4 blocks at once and of 5-8 rows 2, one sum per row
 *     and block (10-16 registers of sums), each block prefetched (a Zen 5 EPYC: 1.1-1.2x at 16-64 rows, weights
 *     from memory or cache; at 1-8 rows, reading one sequential stream per tile stayed ahead: several blocks at
 *     once ran 0.89-1.0x there from memory);
 *   - AVX2 + FMA: two 8-lane ymm per block; 6-row tiles with named registers while 6 or more rows remain (1.05-1.45x
 *     the 4-row tile at 6-32 rows in fp32, 1.0-1.23x in int8 and bf16), then up to 4 rows per tile; one or two
 *     rows read 4 or 2 blocks at once, as that many concurrent streams, without software prefetch (an AMD EPYC
 *     without AVX-512: one row read one stream at ~14 GB/s and four at ~24); tiles that read one block at a time
 *     prefetch the next block's lines as a second stream (1.09-1.27x at 3-12 rows there).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>

#define NB 16           /* outputs per block */
#define GROUP 4         /* blocks per unit of OpenMP work: the most streams a tile reads */

#if defined(__AVX512F__)
typedef __m512 vec;
#define VL 16
#define MAXR 8          /* activation rows per tile */
#define STREAMS(R, MANY) ((MANY) ? ((R) >= 5 ? 2 : (R) >= 2 ? 4 : 1) : 1)  /* MANY: 10-16 sums from 2 rows */
#define PARTIALS(S, R) ((S) > 1 ? 1 : (R) > 4 ? 2 : 4)  /* one block: 8 rows x 2 = 16 of the 32 registers */
#define PREFETCH 2048   /* bytes ahead of the weight being read */
#define WIDE 0          /* no 6-row tile: 8-row tiles of zmm */
#define V(op) _mm512_##op
static inline vec load_i8(const int8_t *w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
}
static inline vec load_bf16(const uint16_t *w) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)w)), 16));
}
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
#define VL 8
#define MAXR 4          /* 4 rows x 2 vectors = 8 of the 16 registers (6 rows measured no faster) */
#define STREAMS(R, MANY) ((R) == 1 ? 4 : (R) == 2 ? 2 : 1)
#define PARTIALS(S, R) ((S) * (R) >= 4 ? 1 : 4 / ((S) * (R)))  /* 8 accumulators where rows x streams allow */
#define PREFETCH 0
#define WIDE 6          /* from 6 rows on, 6-row tiles with named registers (wide_*) */
#define V(op) _mm256_##op
static inline vec load_i8(const int8_t *w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w)));
}
static inline vec load_bf16(const uint16_t *w) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w)), 16));
}
#else
#error "llmarch gemv needs AVX-512F or AVX2 with FMA"
#endif

#define NV (NB / VL)    /* vectors per block */
#define vzero V(setzero_ps)
#define vset1 V(set1_ps)
#define vadd V(add_ps)
#define vfma V(fmadd_ps)
#define vload V(loadu_ps)
#define vstore V(storeu_ps)
static inline vec load_f32(const float *w) { return vload(w); }

/* 8-lane loads of each weight type, for the 6-row tile (AVX2 instructions, which AVX-512 CPUs have too). */
static inline __m256 load8_f32(const float *w) { return _mm256_loadu_ps(w); }
static inline __m256 load8_i8(const int8_t *w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w)));
}
static inline __m256 load8_bf16(const uint16_t *w) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w)), 16));
}

/* 6 activation rows x one block of 16 outputs with its 12 sums in named registers (2 weight vectors and a
 * broadcast make 15 of the 16 ymm registers): each weight is loaded once for 6 rows. The generic tile keeps its sums
 * in an array, which the compiler spilled at 3-4 rows; this one ran 1.2-2.2x faster at 6-32 rows on an AVX2 EPYC
 * (one thread, weights from memory, 512-8192 outputs). Same sums in the same order per output as TILE (k ascending,
 * one partial sum), epilogue fma(sum, scale, bias) likewise. It prefetches the next block's line at each k: one
 * block read front to back is one stream, which left the tile waiting on memory (on that EPYC, 6-12 rows from
 * memory ran at 35-52 GFLOP/s against ~76 with the weights in cache; with the prefetch 43-88). */
#define ROW6(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define WIDE_TILE(NAME, T, LOAD8)                                                                              \
  static inline __attribute__((always_inline)) void NAME(const float *x, int64_t K, const T *w,             \
                                                         const float *scale, const float *bias, float *y,   \
                                                         int64_t N, int64_t n0) {                           \
    const __m256 z = _mm256_setzero_ps();                                                                   \
    __m256 a0 = z, b0 = z, a1 = z, b1 = z, a2 = z, b2 = z, a3 = z, b3 = z, a4 = z, b4 = z, a5 = z, b5 = z;  \
    for (int64_t k = 0; k < K; k++) {                                                                       \
      if (!(k % (64 / (NB * (int)sizeof(T))))) /* the next block's line at this k: a second stream */       \
        _mm_prefetch((const char *)(w + (K + k) * NB), _MM_HINT_T0);                                        \
      const __m256 w0 = LOAD8(w + k * NB), w1 = LOAD8(w + k * NB + 8);                                      \
      __m256 t;                                                                                             \
      ROW6(WIDE_FMA)                                                                                        \
    }                                                                                                       \
    const __m256 sums[6][2] = {{a0, b0}, {a1, b1}, {a2, b2}, {a3, b3}, {a4, b4}, {a5, b5}};                \
    const int64_t ncols = N - n0 < NB ? N - n0 : NB;                                                        \
    float sbuf[NB], bbuf[NB], ybuf[NB];                                                                     \
    for (int j = 0; j < NB; j++) {                                                                          \
      sbuf[j] = scale ? scale[j] : 1.0f;                                                                    \
      bbuf[j] = bias && j < ncols ? bias[j] : 0.0f;                                                         \
    }                                                                                                       \
    for (int r = 0; r < 6; r++) {                                                                           \
      float *out = ncols == NB ? y + r * N : ybuf;                                                          \
      for (int v = 0; v < 2; v++)                                                                           \
        _mm256_storeu_ps(out + 8 * v, _mm256_fmadd_ps(sums[r][v], _mm256_loadu_ps(sbuf + 8 * v),            \
                                                      _mm256_loadu_ps(bbuf + 8 * v)));                      \
      if (ncols < NB) memcpy(y + r * N, ybuf, (size_t)ncols * sizeof(float));                               \
    }                                                                                                       \
  }
#define WIDE_FMA(r)                                                                                            \
  t = _mm256_broadcast_ss(x + (r) * K + k);                                                                 \
  a##r = _mm256_fmadd_ps(t, w0, a##r);                                                                      \
  b##r = _mm256_fmadd_ps(t, w1, b##r);

/* S consecutive blocks (the first at w; scale, bias and y at its first output) for R activation rows, both
 * compile-time constants at each call site; PARTIALS partial sums per row, block and vector hide the FMA latency.
 * A block of fewer than 16 outputs (the last of the weight) is stored through a buffer. */
#define TILE(NAME, T, LOAD)                                                                                    \
  static inline __attribute__((always_inline)) void NAME(const float *x, int64_t K, const T *w,             \
                                                         const float *scale, const float *bias, float *y,   \
                                                         int64_t N, int64_t n0, const int S, const int R) { \
    const int U = PARTIALS(S, R);                                                                           \
    vec acc[GROUP][8][NV][4];                                                                               \
    for (int s = 0; s < S; s++)                                                                             \
      for (int r = 0; r < R; r++)                                                                           \
        for (int v = 0; v < NV; v++)                                                                        \
          for (int u = 0; u < U; u++) acc[s][r][v][u] = vzero();                                            \
    int64_t k = 0;                                                                                          \
    for (; k + 4 <= K; k += 4) {                                                                            \
      if (PREFETCH)                                                                                         \
        for (int s = 0; s < S; s++)                                                                         \
          for (int line = 0; line < (int)(4 * NB * sizeof(T)); line += 64)                                  \
            _mm_prefetch((const char *)(w + s * K * NB + k * NB) + PREFETCH + line, _MM_HINT_T0);           \
      else if (S == 1) /* one block: the next block's lines at these k as a second stream (as WIDE_TILE) */ \
        for (int line = 0; line < (int)(4 * NB * sizeof(T)); line += 64)                                    \
          _mm_prefetch((const char *)(w + (K + k) * NB) + line, _MM_HINT_T0);                               \
      for (int u = 0; u < 4; u++)                                                                           \
        for (int s = 0; s < S; s++)                                                                         \
          for (int v = 0; v < NV; v++) {                                                                    \
            vec wf = LOAD(w + s * K * NB + (k + u) * NB + v * VL);                                          \
            for (int r = 0; r < R; r++)                                                                     \
              acc[s][r][v][u % U] = vfma(vset1(x[r * K + k + u]), wf, acc[s][r][v][u % U]);                 \
          }                                                                                                 \
    }                                                                                                       \
    for (; k < K; k++)                                                                                      \
      for (int s = 0; s < S; s++)                                                                           \
        for (int v = 0; v < NV; v++) {                                                                      \
          vec wf = LOAD(w + s * K * NB + k * NB + v * VL);                                                  \
          for (int r = 0; r < R; r++) acc[s][r][v][0] = vfma(vset1(x[r * K + k]), wf, acc[s][r][v][0]);     \
        }                                                                                                   \
    for (int s = 0; s < S; s++) {                                                                           \
      const int64_t ncols = N - n0 - s * NB < NB ? N - n0 - s * NB : NB;                                    \
      float sbuf[NB], bbuf[NB], ybuf[NB];                                                                   \
      for (int j = 0; j < NB; j++) {                                                                        \
        sbuf[j] = scale ? scale[s * NB + j] : 1.0f;                                                         \
        bbuf[j] = bias && j < ncols ? bias[s * NB + j] : 0.0f;                                              \
      }                                                                                                     \
      for (int r = 0; r < R; r++) {                                                                         \
        float *out = ncols == NB ? y + r * N + s * NB : ybuf;                                               \
        for (int v = 0; v < NV; v++) {                                                                      \
          vec t = acc[s][r][v][0];                                                                          \
          for (int u = 1; u < U; u++) t = vadd(t, acc[s][r][v][u]);                                         \
          vstore(out + v * VL, vfma(t, vload(sbuf + v * VL), vload(bbuf + v * VL)));                        \
        }                                                                                                   \
        if (ncols < NB) memcpy(y + r * N + s * NB, ybuf, (size_t)ncols * sizeof(float));                    \
      }                                                                                                     \
    }                                                                                                       \
  }

/* Blocks [b0, b1) for R rows (R and MANY compile-time constants): STREAMS(R, MANY) blocks at a time, then one at a
 * time. MANY: the product has more than MAXR rows, so that the other row tiles read the group's blocks again from
 * cache. */
#define ROWS(NAME, TILE_NAME, T)                                                                               \
  static inline __attribute__((always_inline)) void NAME(const float *x, const T *w, const float *scale,    \
                                                         const float *bias, float *y, int64_t N, int64_t K, \
                                                         int64_t b0, int64_t b1, const int R,               \
                                                         const int MANY) {                                  \
    const int S = STREAMS(R, MANY);                                                                         \
    int64_t b = b0;                                                                                         \
    for (; S > 1 && b + S <= b1; b += S)                                                                    \
      TILE_NAME(x, K, w + b * K * NB, scale ? scale + b * NB : 0, bias ? bias + b * NB : 0, y + b * NB, N,  \
                b * NB, S, R);                                                                              \
    for (; b < b1; b++)                                                                                     \
      TILE_NAME(x, K, w + b * K * NB, scale ? scale + b * NB : 0, bias ? bias + b * NB : 0, y + b * NB, N,  \
                b * NB, 1, R);                                                                              \
  }

/* F(args..., MANY): MANY the compile-time constant of the runtime flag `many` (the tiles compiled for each). */
#define MANY_CALL(F, ...)      \
  do {                         \
    if (many)                  \
      F(__VA_ARGS__, 1);       \
    else                       \
      F(__VA_ARGS__, 0);       \
  } while (0)

/* The product over all blocks; each OpenMP thread takes a run of groups of blocks, each group all row tiles. */
#define GEMV(NAME, ROWS_NAME, WIDE_NAME, T)                                                                    \
  void NAME(const float *x, const T *w, const float *scale, const float *bias, float *y, int64_t M,           \
            int64_t N, int64_t K) {                                                                           \
    const int64_t nb = (N + NB - 1) / NB, ng = (nb + GROUP - 1) / GROUP;                                      \
    const int many = M > MAXR;                                                                                \
    _Pragma("omp parallel for schedule(static)")                                                              \
    for (int64_t g = 0; g < ng; g++) {                                                                        \
      const int64_t b0 = g * GROUP, b1 = b0 + GROUP < nb ? b0 + GROUP : nb;                                   \
      int64_t m = 0;                                                                                          \
      for (; WIDE && M - m >= WIDE; m += WIDE)                                                                \
        for (int64_t b = b0; b < b1; b++)                                                                     \
          WIDE_NAME(x + m * K, K, w + b * K * NB, scale ? scale + b * NB : 0, bias ? bias + b * NB : 0,       \
                    y + m * N + b * NB, N, b * NB);                                                           \
      for (; m < M; m += MAXR) {                                                                              \
        const float *xm = x + m * K;                                                                          \
        float *ym = y + m * N;                                                                                \
        switch (M - m < MAXR ? M - m : MAXR) {                                                                \
          case 1: MANY_CALL(ROWS_NAME, xm, w, scale, bias, ym, N, K, b0, b1, 1); break;                       \
          case 2: MANY_CALL(ROWS_NAME, xm, w, scale, bias, ym, N, K, b0, b1, 2); break;                       \
          case 3: MANY_CALL(ROWS_NAME, xm, w, scale, bias, ym, N, K, b0, b1, 3); break;                       \
          case 4: MANY_CALL(ROWS_NAME, xm, w, scale, bias, ym, N, K, b0, b1, 4); break;                       \
          case 5: MANY_CALL(ROWS_NAME, xm, w, scale, bias, ym, N, K, b0, b1, 5); break;                       \
          case 6: MANY_CALL(ROWS_NAME, xm, w, scale, bias, ym, N, K, b0, b1, 6); break;                       \
          case 7: MANY_CALL(ROWS_NAME, xm, w, scale, bias, ym, N, K, b0, b1, 7); break;                       \
          default: MANY_CALL(ROWS_NAME, xm, w, scale, bias, ym, N, K, b0, b1, 8); break;                      \
        }                                                                                                     \
      }                                                                                                       \
    }                                                                                                         \
  }

TILE(tile_f32, float, load_f32)
TILE(tile_i8, int8_t, load_i8)
TILE(tile_bf16, uint16_t, load_bf16)
ROWS(rows_f32, tile_f32, float)
ROWS(rows_i8, tile_i8, int8_t)
ROWS(rows_bf16, tile_bf16, uint16_t)
WIDE_TILE(wide_f32, float, load8_f32)
WIDE_TILE(wide_i8, int8_t, load8_i8)
WIDE_TILE(wide_bf16, uint16_t, load8_bf16)
GEMV(llmarch_f32_gemv, rows_f32, wide_f32, float)
GEMV(llmarch_int8_gemv, rows_i8, wide_i8, int8_t)
GEMV(llmarch_bf16_gemv, rows_bf16, wide_bf16, uint16_t)

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
/* bf16 weights times bf16 activations on VDPBF16PS (CPUs with AVX-512 BF16), for the native bf16 decode layers,
 * whose activations hold bf16 values: x is read rounded to bf16 (exact for those), each lane adds two exact
 * bf16 x bf16 products per instruction into its fp32 sum (the instruction flushes denormals), so the result is the
 * fp32 product of the bf16 operands up to summation order and denormals, as llmarch_bf16_gemv's, with half its
 * arithmetic: a pair of consecutive k rows of a block (64 bytes) is interleaved by one permute into the
 * instruction's (k, k + 1) pairs. One sum per row and block, in k order. A tile is R rows (up to 8) by one block,
 * and past 8 rows (the group's blocks read again from cache by each row tile after the first) by DP_BLOCKS(R, 1):
 * up to 16 sums in registers, so that the instruction's latency is hidden and each weight load and each broadcast
 * of a row's pair feeds several instructions. On a Zen 5 EPYC (benchmarks/gemv_ab.py --kernel bf16-dp): 1.1-1.25x
 * the one-block tiles at 16-64 rows, from memory or cache, up to 1.6x on one expert's weights in L2 (~440 GFLOP/s,
 * oneDNN's rate); at 1-8 rows from memory several blocks at once ran 0.85-0.94x (one sequential stream per tile
 * reads faster), though 2x on a weight in cache. Each block is prefetched 2 KiB ahead. The rows' (k, k + 1) pairs
 * are packed once per call (the bf16 values in order, rounded 32 at a time by VCVTNE2PS2BF16). Returns 0, or -1
 * without memory for them (y untouched). */
#define DP_MAXR 8
#define DP_MAXS 4
#define DP_BLOCKS(R, MANY) ((MANY) ? ((R) >= 6 ? 2 : (R) == 5 ? 3 : 4) : 1)
static const uint16_t DP_PAIRS[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

static inline uint16_t dp_bf16(float f) {  /* round to nearest even (NaN kept quiet), as VCVTNE2PS2BF16 */
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  if ((u & 0x7f800000u) == 0) u &= 0x80000000u;  /* a denormal reads as zero */
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* S consecutive blocks (the first at w; bias and y at its first output) for R rows, both compile-time constants. */
static inline __attribute__((always_inline)) void dp_tile(const uint32_t *xp, int64_t K2, const uint16_t *w,
                                                          int64_t K, const float *bias, float *y, int64_t N,
                                                          int64_t n0, const int S, const int R) {
  const __m512i pairs = _mm512_loadu_si512((const void *)DP_PAIRS);
  __m512 acc[DP_MAXS][DP_MAXR];
  for (int s = 0; s < S; s++)
    for (int r = 0; r < R; r++) acc[s][r] = _mm512_setzero_ps();
  const int64_t full = K / 2;
  for (int64_t j = 0; j < full; j++) {
    __m512i wv[DP_MAXS];
    for (int s = 0; s < S; s++) {
      const uint16_t *ws = w + s * K * NB + 2 * j * NB;
      _mm_prefetch((const char *)ws + PREFETCH, _MM_HINT_T0);
      wv[s] = _mm512_permutexvar_epi16(pairs, _mm512_loadu_si512((const void *)ws));
    }
    for (int r = 0; r < R; r++) {
      const __m512bh xr = (__m512bh)_mm512_set1_epi32((int)xp[r * K2 + j]);
      for (int s = 0; s < S; s++) acc[s][r] = _mm512_dpbf16_ps(acc[s][r], (__m512bh)wv[s], xr);
    }
  }
  if (K % 2)  /* the last k alone, paired with zeros (its x pair's high half is zero too) */
    for (int s = 0; s < S; s++) {
      const __m256i last = _mm256_loadu_si256((const __m256i *)(w + s * K * NB + (K - 1) * NB));
      const __m512i wv = _mm512_permutexvar_epi16(pairs, _mm512_zextsi256_si512(last));
      for (int r = 0; r < R; r++)
        acc[s][r] = _mm512_dpbf16_ps(acc[s][r], (__m512bh)wv, (__m512bh)_mm512_set1_epi32((int)xp[r * K2 + full]));
    }
  for (int s = 0; s < S; s++) {
    const int64_t ncols = N - n0 - s * NB < NB ? N - n0 - s * NB : NB;
    float bbuf[NB], ybuf[NB];
    for (int j = 0; j < NB; j++) bbuf[j] = bias && j < ncols ? bias[s * NB + j] : 0.0f;
    for (int r = 0; r < R; r++) {
      float *out = ncols == NB ? y + r * N + s * NB : ybuf;
      _mm512_storeu_ps(out, _mm512_add_ps(acc[s][r], _mm512_loadu_ps(bbuf)));
      if (ncols < NB) memcpy(y + r * N + s * NB, ybuf, (size_t)ncols * sizeof(float));
    }
  }
}

/* Blocks [b0, b1) for R rows: DP_BLOCKS(R, MANY) blocks at a time, then one at a time (MANY as in ROWS). */
static inline __attribute__((always_inline)) void dp_rows(const uint32_t *xp, int64_t K2, const uint16_t *w,
                                                          int64_t K, const float *bias, float *y, int64_t N,
                                                          int64_t b0, int64_t b1, const int R, const int MANY) {
  const int S = DP_BLOCKS(R, MANY);
  int64_t b = b0;
  for (; S > 1 && b + S <= b1; b += S)
    dp_tile(xp, K2, w + b * K * NB, K, bias ? bias + b * NB : 0, y + b * NB, N, b * NB, S, R);
  for (; b < b1; b++)
    dp_tile(xp, K2, w + b * K * NB, K, bias ? bias + b * NB : 0, y + b * NB, N, b * NB, 1, R);
}

int llmarch_bf16_gemv_dp(const float *x, const uint16_t *w, const float *bias, float *y, int64_t M, int64_t N,
                         int64_t K) {
  const int64_t K2 = (K + 1) / 2, nb = (N + NB - 1) / NB, ng = (nb + GROUP - 1) / GROUP;
  const int many = M > DP_MAXR;
  if (M == 0) return 0;
  uint32_t *xp = malloc((size_t)(M * K2) * sizeof(uint32_t));
  if (!xp) return -1;
  for (int64_t m = 0; m < M; m++) {
    const float *xm = x + m * K;
    uint16_t *pm = (uint16_t *)(xp + m * K2);
    int64_t k = 0;
    for (; k + 32 <= K; k += 32)
      _mm512_storeu_si512((void *)(pm + k), (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xm + k + 16),
                                                                         _mm512_loadu_ps(xm + k)));
    for (; k < K; k++) pm[k] = dp_bf16(xm[k]);
    if (K % 2) pm[K] = 0;
  }
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < ng; g++) {
    const int64_t b0 = g * GROUP, b1 = b0 + GROUP < nb ? b0 + GROUP : nb;
    for (int64_t m = 0; m < M; m += DP_MAXR) {
      const uint32_t *xm = xp + m * K2;
      float *ym = y + m * N;
      switch (M - m < DP_MAXR ? M - m : DP_MAXR) {
        case 1: MANY_CALL(dp_rows, xm, K2, w, K, bias, ym, N, b0, b1, 1); break;
        case 2: MANY_CALL(dp_rows, xm, K2, w, K, bias, ym, N, b0, b1, 2); break;
        case 3: MANY_CALL(dp_rows, xm, K2, w, K, bias, ym, N, b0, b1, 3); break;
        case 4: MANY_CALL(dp_rows, xm, K2, w, K, bias, ym, N, b0, b1, 4); break;
        case 5: MANY_CALL(dp_rows, xm, K2, w, K, bias, ym, N, b0, b1, 5); break;
        case 6: MANY_CALL(dp_rows, xm, K2, w, K, bias, ym, N, b0, b1, 6); break;
        case 7: MANY_CALL(dp_rows, xm, K2, w, K, bias, ym, N, b0, b1, 7); break;
        default: MANY_CALL(dp_rows, xm, K2, w, K, bias, ym, N, b0, b1, 8); break;
      }
    }
  }
  free(xp);
  return 0;
}
#endif
