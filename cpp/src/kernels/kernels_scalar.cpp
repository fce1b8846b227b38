// Portable variant: one float per "vector". Builds on every architecture.
#include "kernels_common.h"

namespace tokentrail {
namespace isa_scalar {

struct V {
  using R = float;
  static constexpr int W = 1, TILE_ROWS = 4, GEMM_MR = 4, TILE_COLS = 2;
  static R zero() { return 0.0f; }
  static R set1(float a) { return a; }
  static R load(const float* p) { return *p; }
  static void store(float* p, R v) { *p = v; }
  static R loadw(const float* p) { return *p; }
  static R loadw(const F16* p) { return f16_to_f32(p->bits); }
  static R loadw(const BF16* p) { return bf16_to_f32(p->bits); }
  static R sub(R a, R b) { return a - b; }
  static R cvt_i8(const int8_t* p) { return float(*p); }
  static R cvt_bits(const uint8_t* p, int shift, int mask) { return float((*p >> shift) & mask); }
  static R cvt_nibble(const uint8_t* p, int shift) { return cvt_bits(p, shift, 0xF); }
  static R lookup_nibbles(const uint8_t* p, int shift, const int8_t* table) { return float(table[(*p >> shift) & 0xF]); }
  static float half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return f16_to_f32(h); }
  static R add(R a, R b) { return a + b; }
  static R mul(R a, R b) { return a * b; }
  static R div(R a, R b) { return a / b; }
  static R abs(R a) { return std::fabs(a); }
  static R copysign(R mag, R sign) { return std::copysign(mag, sign); }
  static void nibbles_minus8(const uint8_t* p, R& lo, R& hi) {
    lo = float(int(*p & 0xF) - 8);
    hi = float(int(*p >> 4) - 8);
  }
  template <bool MINUS16>
  static void nibbles_fifth_bit(const uint8_t* p, uint32_t qh, R& lo, R& hi) {
    lo = float(int((*p & 0xF) | ((qh & 1) << 4)) - (MINUS16 ? 16 : 0));
    hi = float(int((*p >> 4) | (((qh >> 16) & 1) << 4)) - (MINUS16 ? 16 : 0));
  }
  static R fma(R a, R b, R c) { return a * b + c; }
  static float sum(R a) { return a; }
  static R sum_lanes(const R* v) { return v[0]; }
  static void transpose(R*) {}  // a 1 x 1 block
};

#include "kernels_impl.h"

const KernelTable table = make_table("scalar");

}  // namespace isa_scalar
}  // namespace tokentrail
