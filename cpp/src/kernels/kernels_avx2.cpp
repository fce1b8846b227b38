// AVX2 + FMA + F16C variant: eight floats per vector.
#include <immintrin.h>

#include "kernels_common.h"

namespace tokentrail {
namespace isa_avx2 {

struct V {
  using R = __m256;
  // 4 weight rows x 2 tokens: 8 accumulators + operands fit the 16 registers.
  static constexpr int W = 8, TILE_ROWS = 4, GEMM_MR = 6, TILE_COLS = 2;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float a) { return _mm256_set1_ps(a); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R loadw(const float* p) { return _mm256_loadu_ps(p); }
  static R loadw(const F16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static R loadw(const BF16* p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R cvt_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  // W bytes to floats of (byte >> shift) & mask.
  static R cvt_bits(const uint8_t* p, int shift, int mask) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(b, _mm_cvtsi32_si128(shift)), _mm256_set1_epi32(mask)));
  }
  static R cvt_nibble(const uint8_t* p, int shift) { return cvt_bits(p, shift, 0xF); }
  // Lane i: table[(p[i] >> shift) & 0xF] (a byte shuffle, then widened).
  static R lookup_nibbles(const uint8_t* p, int shift, const int8_t* table) {
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(table));
    const __m128i b = _mm_and_si128(_mm_srl_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), _mm_cvtsi32_si128(shift)),
                                    _mm_set1_epi8(0x0F));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_shuffle_epi8(t, b)));
  }
  static float half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return _cvtsh_ss(h); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R div(R a, R b) { return _mm256_div_ps(a, b); }
  static R abs(R a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static R copysign(R mag, R sign) {
    const R m = _mm256_set1_ps(-0.0f);
    return _mm256_or_ps(_mm256_andnot_ps(m, mag), _mm256_and_ps(m, sign));
  }
  static R clamp(R x, float lo, float hi) { return _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(lo)), _mm256_set1_ps(hi)); }
  static R round(R x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static R fnma(R a, R b, R c) { return _mm256_fnmadd_ps(a, b, c); }
  // p * 2^k for whole-number k, in two halves so k = 128 does not overflow the exponent field.
  static R times_pow2(R p, R k) {
    const __m256i ki = _mm256_cvtps_epi32(k);
    const __m256i k1 = _mm256_srai_epi32(ki, 1), k2 = _mm256_sub_epi32(ki, k1);
    const __m256i bias = _mm256_set1_epi32(127);
    return _mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23))),
                        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23)));
  }
  static void nibbles_minus8(const uint8_t* p, R& lo, R& hi) {
    const R eight = _mm256_set1_ps(8.0f);
    lo = _mm256_sub_ps(cvt_nibble(p, 0), eight);
    hi = _mm256_sub_ps(cvt_nibble(p, 4), eight);
  }
  // Q5_0 / Q5_1: lanes i of lo and hi are nibbles i of p (low, high) with bits i and 16 + i of qh
  // as their fifth bit, minus 16 for Q5_0: integer work, one conversion each.
  template <bool MINUS16>
  static void nibbles_fifth_bit(const uint8_t* p, uint32_t qh, R& lo, R& hi) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), one = _mm256_set1_epi32(1);
    const __m256i blo = _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(qh)), lanes), one), 4);
    const __m256i bhi = _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(qh >> 16)), lanes), one), 4);
    __m256i ilo = _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi32(0xF)), blo);
    __m256i ihi = _mm256_or_si256(_mm256_srli_epi32(b, 4), bhi);
    if constexpr (MINUS16) {
      ilo = _mm256_sub_epi32(ilo, _mm256_set1_epi32(16));
      ihi = _mm256_sub_epi32(ihi, _mm256_set1_epi32(16));
    }
    lo = _mm256_cvtepi32_ps(ilo);
    hi = _mm256_cvtepi32_ps(ihi);
  }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(R a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // In place: r[i] lane j becomes r[j] lane i (an 8 x 8 block of floats).
  static void transpose(R* r) {
    R t[8], u[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 2; ++g) {
      u[4 * g + 0] = _mm256_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0x44);
      u[4 * g + 1] = _mm256_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0xEE);
      u[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
      u[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
      r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
    }
  }
  // Lane j of the result: the sum of v[j]'s lanes, for W vectors (a transpose and add, not W reductions).
  static R sum_lanes(const R* v) {
    __m256 u[2];
    for (int g = 0; g < 2; ++g) {
      const __m256* w = v + 4 * g;
      const __m256 s01 = _mm256_add_ps(_mm256_unpacklo_ps(w[0], w[1]), _mm256_unpackhi_ps(w[0], w[1]));
      const __m256 s23 = _mm256_add_ps(_mm256_unpacklo_ps(w[2], w[3]), _mm256_unpackhi_ps(w[2], w[3]));
      u[g] = _mm256_add_ps(_mm256_shuffle_ps(s01, s23, 0x44), _mm256_shuffle_ps(s01, s23, 0xEE));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
  }
};

#include "kernels_impl.h"

const KernelTable table = make_table("avx2");

}  // namespace isa_avx2
}  // namespace tokentrail
