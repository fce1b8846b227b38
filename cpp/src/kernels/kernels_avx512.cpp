// AVX-512 (F, BW, VL, DQ) variant: sixteen floats per vector.
#include <immintrin.h>

#include "avx512_transpose.h"
#include "kernels_common.h"

namespace tokentrail {
namespace isa_avx512 {

struct V {
  using R = __m512;
  // 4 weight rows x 4 tokens: 16 accumulators of the 32 registers.
  static constexpr int W = 16, TILE_ROWS = 4, GEMM_MR = 8, TILE_COLS = 4;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float a) { return _mm512_set1_ps(a); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static R loadw(const float* p) { return _mm512_loadu_ps(p); }
  static R loadw(const F16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static R loadw(const BF16* p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R cvt_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // W bytes to floats of (byte >> shift) & mask.
  static R cvt_bits(const uint8_t* p, int shift, int mask) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srl_epi32(b, _mm_cvtsi32_si128(shift)), _mm512_set1_epi32(mask)));
  }
  static R cvt_nibble(const uint8_t* p, int shift) { return cvt_bits(p, shift, 0xF); }
  // Lane i: table[(p[i] >> shift) & 0xF] (a byte shuffle, then widened).
  static R lookup_nibbles(const uint8_t* p, int shift, const int8_t* table) {
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(table));
    const __m128i b = _mm_and_si128(_mm_srl_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), _mm_cvtsi32_si128(shift)),
                                    _mm_set1_epi8(0x0F));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_shuffle_epi8(t, b)));
  }
  static float half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return _cvtsh_ss(h); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R div(R a, R b) { return _mm512_div_ps(a, b); }
  static R abs(R a) { return _mm512_abs_ps(a); }
  static R copysign(R mag, R sign) {
    const R m = _mm512_set1_ps(-0.0f);
    return _mm512_or_ps(_mm512_andnot_ps(m, mag), _mm512_and_ps(m, sign));
  }
  static R clamp(R x, float lo, float hi) { return _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(lo)), _mm512_set1_ps(hi)); }
  static R round(R x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static R fnma(R a, R b, R c) { return _mm512_fnmadd_ps(a, b, c); }
  // p * 2^k for whole-number k, in two halves so k = 128 does not overflow the exponent field.
  static R times_pow2(R p, R k) {
    const __m512i ki = _mm512_cvtps_epi32(k);
    const __m512i k1 = _mm512_srai_epi32(ki, 1), k2 = _mm512_sub_epi32(ki, k1);
    const __m512i bias = _mm512_set1_epi32(127);
    return _mm512_mul_ps(_mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(k1, bias), 23))),
                        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(k2, bias), 23)));
  }
  static void nibbles_minus8(const uint8_t* p, R& lo, R& hi) {
    const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm512_permutexvar_ps(b, table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
  }
  // Q5_0 / Q5_1: lanes i of lo and hi are nibbles i of p (low, high) with bits i and 16 + i of qh
  // as their fifth bit (a masked or), minus 16 for Q5_0: the 5-bit index picks the float from a
  // 32-entry table, as nibbles_minus8 does for 4 bits.
  template <bool MINUS16>
  static void nibbles_fifth_bit(const uint8_t* p, uint32_t qh, R& lo, R& hi) {
    const float o = MINUS16 ? -16.0f : 0.0f;
    const __m512 t0 = _mm512_add_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_ps(o));
    const __m512 t1 = _mm512_add_ps(t0, _mm512_set1_ps(16.0f));
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m512i sixteen = _mm512_set1_epi32(16), nlo = _mm512_and_si512(b, _mm512_set1_epi32(0xF)),
                  nhi = _mm512_srli_epi32(b, 4);
    lo = _mm512_permutex2var_ps(t0, _mm512_mask_or_epi32(nlo, __mmask16(qh), nlo, sixteen), t1);
    hi = _mm512_permutex2var_ps(t0, _mm512_mask_or_epi32(nhi, __mmask16(qh >> 16), nhi, sixteen), t1);
  }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(R a) { return _mm512_reduce_add_ps(a); }
  // In place: r[i] lane j becomes r[j] lane i (a 16 x 16 block of floats).
  static void transpose(R* r) { transpose_16x16(r); }
  // Lane j of the result: the sum of v[j]'s lanes, for W vectors (a transpose and add, not W reductions).
  static R sum_lanes(const R* v) {
    __m512 u[4];  // u[g]: in each 128-bit block, partial sums of v[4g..4g+3]
    for (int g = 0; g < 4; ++g) {
      const __m512* w = v + 4 * g;
      const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
      const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
      u[g] = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xEE));
    }
    const __m512 g01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
    const __m512 g23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(g01, g23, 0x88), _mm512_shuffle_f32x4(g01, g23, 0xDD));
  }
};

#include "kernels_impl.h"

const KernelTable table = make_table("avx512");

}  // namespace isa_avx512
}  // namespace tokentrail
