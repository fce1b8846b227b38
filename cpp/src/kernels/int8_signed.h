// What int8_impl.h names in its branches for the AVX-512 VNNI layout (weights on the unsigned
// side, row lanes for a few tokens), for the variants that keep signed weights and unsigned
// activations (AVX2's maddubs, the scalar reference): compiled, never called.
#pragma once
#include <cstddef>
#include <cstdint>

namespace tokentrail {

template <class I, class F>
struct Int8SignedWeights {
  static constexpr bool UNSIGNED_WEIGHTS = false;
  static constexpr bool HAS_ROW_LANES = false;  // Q8_0 below INT8_MIN_ROWS keeps the float path
  static void q8_0_pair_by_rows(const uint8_t*, size_t, I*) {}
  static void q8_0_one_by_rows(const uint8_t*, size_t, I*) {}
  static F halves_by_rows(const uint8_t*, size_t) { return F{}; }
  static F halves(const uint16_t*) { return F{}; }
  static I dot4_rows(I acc, I, const int8_t*) { return acc; }
  static void add_128(int8_t*, int) {}
  static void copy_add_128(const uint8_t*, int8_t*) {}
};

}  // namespace tokentrail
