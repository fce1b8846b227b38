// Int8-activation products with AVX2: maddubs multiplies u8 activation bytes
// by s8 weights into int16 pair sums, madd adds the pairs into int32 lanes.
#include <immintrin.h>

#include "int8_x86.h"
#include "int8_signed.h"
#include "kernels_common.h"

namespace tokentrail {
namespace int8_avx2 {

struct IV : Int8UnpackX86, Int8SignedWeights<__m256i, __m256> {
  using I = __m256i;
  using F = __m256;
  // 2 weight rows x 2 tiles of 8 tokens fit the 16 registers.
  static constexpr int LANES = 8, ROWS = 2, TILES = 2, ROWS_ONE_TILE = 4;
  static I iload(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  static I iset1(int32_t v) { return _mm256_set1_epi32(v); }
  static I load_a(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  // Two u8 * s8 products fit int16 only for |w| <= 64; WIDE splits w into 2 * (w >> 1) + (w & 1).
  template <bool WIDE>
  static I dot4(I acc, I a, const uint8_t* w) {
    int32_t w4;
    std::memcpy(&w4, w, 4);
    const __m256i ones = _mm256_set1_epi16(1);
    if constexpr (!WIDE) {
      return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_set1_epi32(w4)), ones));
    } else {
      const uint32_t u = uint32_t(w4), low = u & 0x01010101u;
      const uint32_t high = (((u - low) >> 1) & 0x7F7F7F7Fu) | (u & 0x80808080u);  // per byte: w >> 1
      const __m256i h = _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_set1_epi32(int32_t(high))), _mm256_set1_epi16(2));
      const __m256i l = _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_set1_epi32(int32_t(low))), ones);
      return _mm256_add_epi32(acc, _mm256_add_epi32(h, l));
    }
  }
  static F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static F fzero() { return _mm256_setzero_ps(); }
  static F fset1(float v) { return _mm256_set1_ps(v); }
  static F fload(const float* p) { return _mm256_loadu_ps(p); }
  static F fmul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F ffma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static void fstore(float* p, F v) { _mm256_storeu_ps(p, v); }
  static float half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return _cvtsh_ss(h); }
};

#include "int8_impl.h"

const Int8KernelTable table = make_int8_table("avx2");

}  // namespace int8_avx2
}  // namespace tokentrail
