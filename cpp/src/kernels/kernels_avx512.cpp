// AVX-512 (F, BW, VL, DQ) variant: sixteen floats per vector.
#include <immintrin.h>

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
  static R cvt_nibble(const uint8_t* p, int shift) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srl_epi32(b, _mm_cvtsi32_si128(shift)), _mm512_set1_epi32(0xF)));
  }
  static float half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return _cvtsh_ss(h); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(R a) { return _mm512_reduce_add_ps(a); }
};

#include "kernels_impl.h"

const KernelTable table = make_table("avx512");

}  // namespace isa_avx512
}  // namespace tokentrail
