// Int8-activation products with AVX-512 VNNI: vpdpbusd multiplies four u8
// activation bytes by four s8 weights and adds them into each int32 lane.
#include <immintrin.h>

#include "int8_x86.h"
#include "kernels_common.h"

namespace tokentrail {
namespace int8_avx512vnni {

struct IV : Int8UnpackX86 {
  using I = __m512i;
  using F = __m512;
  // 4 weight rows x 2 tiles of 16 tokens: 8 int and 8 float accumulators.
  static constexpr int LANES = 16, ROWS = 4, TILES = 2;
  static I iset1(int32_t v) { return _mm512_set1_epi32(v); }
  static I load_a(const uint8_t* p) { return _mm512_loadu_si512(p); }
  template <bool WIDE>
  static I dot4(I acc, I a, int32_t w4) { return _mm512_dpbusd_epi32(acc, a, _mm512_set1_epi32(w4)); }
  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static F fzero() { return _mm512_setzero_ps(); }
  static F fset1(float v) { return _mm512_set1_ps(v); }
  static F fload(const float* p) { return _mm512_loadu_ps(p); }
  static F fmul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F ffma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void fstore(float* p, F v) { _mm512_storeu_ps(p, v); }
  static float half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return _cvtsh_ss(h); }
};

#include "int8_impl.h"

const Int8KernelTable table = make_int8_table("avx512vnni");

}  // namespace int8_avx512vnni
}  // namespace tokentrail
