/* llmarch: exp of softmax arguments (x <= 0), shared by the native decode layer (vec.c: 8 lanes, AVX2) and the
 * many-query attention (flash.c: 16 lanes, AVX-512): x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for e^r
 * (Cephes' coefficients) and 2^n through the exponent bits, within 2 ulp of expf; below -87 the result is 0, a
 * NaN stays NaN. Both widths run the same steps, written once over each width's set1 / add / sub / mul. */
#include <immintrin.h>

/* r = x - n ln2 in two parts (ln2's first part exact in few bits), then p = e^r */
#define EXP_NEG_STEPS(SET, ADD, SUB, MUL, x, n, r, p)                                                        \
  do {                                                                                                       \
    r = SUB(x, MUL(n, SET(0.693359375f)));                                                                   \
    r = SUB(r, MUL(n, SET(-2.12194440e-4f)));                                                                \
    p = SET(1.9875691500e-4f);                                                                               \
    p = ADD(MUL(p, r), SET(1.3981999507e-3f));                                                               \
    p = ADD(MUL(p, r), SET(8.3334519073e-3f));                                                               \
    p = ADD(MUL(p, r), SET(4.1665795894e-2f));                                                               \
    p = ADD(MUL(p, r), SET(1.6666665459e-1f));                                                               \
    p = ADD(MUL(p, r), SET(5.0000001201e-1f));                                                               \
    p = ADD(MUL(MUL(p, r), r), ADD(r, SET(1.0f)));                                                           \
  } while (0)

static inline __m256 exp_neg(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ), r, p;
  x = _mm256_max_ps(lo, x);  /* a NaN (the second operand) stays NaN */
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  EXP_NEG_STEPS(_mm256_set1_ps, _mm256_add_ps, _mm256_sub_ps, _mm256_mul_ps, x, n, r, p);
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

#ifdef __AVX512F__
static inline __m512 exp_neg16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  __m512 r, p;
  x = _mm512_max_ps(lo, x);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  EXP_NEG_STEPS(_mm512_set1_ps, _mm512_add_ps, _mm512_sub_ps, _mm512_mul_ps, x, n, r, p);
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps((__mmask16)~under, p, _mm512_castsi512_ps(e));
}
#endif
