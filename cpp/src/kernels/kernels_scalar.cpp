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
  static R fma(R a, R b, R c) { return a * b + c; }
  static float sum(R a) { return a; }
};

#include "kernels_impl.h"

const KernelTable table = make_table("scalar");

}  // namespace isa_scalar
}  // namespace tokentrail
