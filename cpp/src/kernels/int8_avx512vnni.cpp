// Int8-activation products with AVX-512 VNNI: vpdpbusd multiplies four u8
// activation bytes by four s8 weights and adds them into each int32 lane.
#include <immintrin.h>

#include "int8_x86.h"
#include "kernels_common.h"

namespace tokentrail {
namespace int8_avx512vnni {

// A 32-bit load that may alias other types and sit at any address.
typedef int32_t unaligned_i32 __attribute__((may_alias, aligned(1)));

struct IV : Int8UnpackX86 {
  using I = __m512i;
  using F = __m512;
  // 4 weight rows x 2 tiles of 16 tokens: 8 int and 8 float accumulators (one tile: 8 rows).
  static constexpr int LANES = 16, ROWS = 4, TILES = 2, ROWS_ONE_TILE = 8;
  // vpdpbusd never saturates: the weights take the unsigned side (see int8_impl.h).
  static constexpr bool UNSIGNED_WEIGHTS = true;
  static I iset1(int32_t v) { return _mm512_set1_epi32(v); }
  static I iload(const int32_t* p) { return _mm512_loadu_si512(p); }
  static I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static I load_a(const uint8_t* p) { return _mm512_loadu_si512(p); }
  // acc + per lane the sum of 4 products u8 w[j] * s8 a[j]; the weight bytes are broadcast
  // straight from memory (one load folded into vpdpbusd).
  template <bool WIDE>
  static I dot4(I acc, I a, const uint8_t* w4) {
    return _mm512_dpbusd_epi32(acc, _mm512_set1_epi32(*reinterpret_cast<const unaligned_i32*>(w4)), a);
  }
  // w + 128 for n bytes (n a multiple of 32): signed weights to vpdpbusd's unsigned operand.
  static void add_128(int8_t* w, int n) {
    int i = 0;
    for (; i + 64 <= n; i += 64) {
      __m512i* p = reinterpret_cast<__m512i*>(w + i);
      _mm512_storeu_si512(p, _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_set1_epi8(char(0x80))));
    }
    for (; i < n; i += 32) {
      __m256i* p = reinterpret_cast<__m256i*>(w + i);
      _mm256_storeu_si256(p, _mm256_xor_si256(_mm256_loadu_si256(p), _mm256_set1_epi8(char(0x80))));
    }
  }
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
