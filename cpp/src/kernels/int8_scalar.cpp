// Portable int8-activation products: one token per "vector", the reference
// the vector variants are tested against (the same operations in the same order).
#include "kernels_common.h"
#include "int8_signed.h"

namespace tokentrail {
namespace int8_scalar {

struct IV : Int8SignedWeights<int32_t, float> {
  using I = int32_t;
  using F = float;
  static constexpr int LANES = 1, ROWS = 4, TILES = 1, ROWS_ONE_TILE = 4;
  static I iload(const int32_t* p) { return *p; }
  static I iadd(I a, I b) { return a + b; }
  static I iset1(int32_t v) { return v; }
  static I load_a(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return int32_t(v); }
  template <bool WIDE>
  static I dot4(I acc, I a, const uint8_t* w) {
    int32_t w4;
    std::memcpy(&w4, w, 4);
    for (int j = 0; j < 4; ++j) acc += int((uint32_t(a) >> (8 * j)) & 0xFF) * int(int8_t(uint32_t(w4) >> (8 * j)));
    return acc;
  }
  static F cvt(I v) { return float(v); }
  static F fzero() { return 0.0f; }
  static F fset1(float v) { return v; }
  static F fload(const float* p) { return *p; }
  static F fmul(F a, F b) { return a * b; }
  static F ffma(F a, F b, F c) { return std::fma(a, b, c); }
  static void fstore(float* p, F v) { *p = v; }
  static float half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return f16_to_f32(h); }
  // Weight unpacking (int8_x86.h says what each does).
  static void nibbles(const uint8_t* q, int8_t* out, int offset) {
    for (int j = 0; j < 16; ++j) {
      out[j] = int8_t((q[j] & 0xF) - offset);
      out[j + 16] = int8_t((q[j] >> 4) - offset);
    }
  }
  static void nibbles_lookup(const uint8_t* q, int8_t* out, const int8_t* table) {
    for (int j = 0; j < 16; ++j) {
      out[j] = table[q[j] & 0xF];
      out[j + 16] = table[q[j] >> 4];
    }
  }
  static void fifth_bits(uint32_t bits, int8_t* out, int offset) {
    for (int j = 0; j < 32; ++j) out[j] = int8_t(out[j] + 16 * int((bits >> j) & 1) - offset);
  }
  static int32_t sum_bytes(const int8_t* p, int n) {
    int32_t s = 0;
    for (int i = 0; i < n; ++i) s += p[i];
    return s;
  }
};

#include "int8_impl.h"

const Int8KernelTable table = make_int8_table("scalar");

}  // namespace int8_scalar
}  // namespace tokentrail
