// Views of weight storage. The engine never owns weights: Python keeps the
// (usually memory-mapped) arrays alive and hands the core pointers into them.
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace tokentrail {

// Every weight type the engine computes with, one row each: enumerator, name,
// GGML type id (its number in GGUF files), values per block, bytes per block
// (1 and sizeof(element) for the float types), and where a block keeps its
// half-precision scales: the byte offset of the first and how many follow it
// (0, 0 for the float types; a NaN or an infinity there is what makes a block
// non-finite). Everything else about the types (enum, names, layouts, the
// table Python reads) is generated from these rows; a new type is one row
// here plus its kernels in kernels_impl.h.
#define TOKENTRAIL_WEIGHT_TYPES(X)             \
  X(F32, "f32", 0, 1, 4, 0, 0)                 \
  X(F16, "f16", 1, 1, 2, 0, 0)                 \
  X(BF16, "bf16", 30, 1, 2, 0, 0)              \
  X(Q8_0, "q8_0", 8, 32, 34, 0, 1)             \
  X(Q4_0, "q4_0", 2, 32, 18, 0, 1)             \
  X(Q4_1, "q4_1", 3, 32, 20, 0, 2)             \
  X(Q5_0, "q5_0", 6, 32, 22, 0, 1)             \
  X(Q5_1, "q5_1", 7, 32, 24, 0, 2)             \
  X(IQ4_NL, "iq4_nl", 20, 32, 18, 0, 1)        \
  X(Q4_K, "q4_k", 12, 256, 144, 0, 2)          \
  X(Q5_K, "q5_k", 13, 256, 176, 0, 2)          \
  X(Q6_K, "q6_k", 14, 256, 210, 208, 1)

#define TOKENTRAIL_ENUMERATOR(e, name, ggml, values, bytes, scales_at, scales) e,
enum class DType : int { TOKENTRAIL_WEIGHT_TYPES(TOKENTRAIL_ENUMERATOR) };
#undef TOKENTRAIL_ENUMERATOR

// One row of the table above.
struct WeightTypeInfo {
  DType type;
  const char* name;
  int ggml_id;
  int values;  // per block
  int bytes;   // per block
  int half_scales_at;  // byte offset of a block's first half-precision scale
  int half_scales;     // how many follow one another there (0: a float type)
};
#define TOKENTRAIL_TYPE_ROW(e, name, ggml, values, bytes, scales_at, scales) \
  WeightTypeInfo{DType::e, name, ggml, values, bytes, scales_at, scales},
inline constexpr WeightTypeInfo WEIGHT_TYPES[] = {TOKENTRAIL_WEIGHT_TYPES(TOKENTRAIL_TYPE_ROW)};
#undef TOKENTRAIL_TYPE_ROW
inline constexpr int N_WEIGHT_TYPES = int(sizeof(WEIGHT_TYPES) / sizeof(WEIGHT_TYPES[0]));

constexpr const WeightTypeInfo& weight_type(DType t) { return WEIGHT_TYPES[int(t)]; }
DType dtype_from_name(const std::string& name);
inline const char* dtype_name(DType t) { return weight_type(t).name; }

// Values per block and bytes per block (1 and sizeof(element) for float types).
struct BlockLayout { int values; int bytes; };
inline BlockLayout block_layout(DType t) { return {weight_type(t).values, weight_type(t).bytes}; }

// A row-major matrix [rows, cols] of any weight type; rows are row_bytes apart.
struct WeightView {
  const void* data = nullptr;
  DType type = DType::F32;
  int64_t rows = 0;
  int64_t cols = 0;
  size_t row_bytes = 0;
  // Products over several tokens round the activations to int8 per block and
  // multiply in integers (block-quantized types only; see Int8KernelTable).
  bool int8_activations = false;
  // The same rows laid out for the row-lane kernels (pack_row_lanes), when the model made that
  // copy; the kernels that do not stream row lanes read `data`.
  const uint8_t* row_lanes = nullptr;
  bool empty() const { return data == nullptr; }
  const uint8_t* row(int64_t r) const { return static_cast<const uint8_t*>(data) + r * row_bytes; }
};

// Element types of half-precision weights (bit patterns).
struct F16 { uint16_t bits; };
struct BF16 { uint16_t bits; };

// Half-precision conversions used by the portable paths.

// float32 to IEEE half, rounding to nearest even (as numpy's astype(float16)).
inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  __builtin_memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return uint16_t(sign | 0x7c00 | (x > 0x7f800000u ? 0x200 : 0));  // inf, nan
  if (x >= 0x477ff000u) return uint16_t(sign | 0x7c00);  // 65520 and up round to infinity
  if (x < 0x38800000u) {                                   // below 2^-14: a subnormal half, or zero
    if (x < 0x33000000u) return uint16_t(sign);            // at most 2^-25: rounds to zero
    const uint32_t e = x >> 23, m = (x & 0x7fffff) | 0x800000;
    const int shift = int(126 - e);                        // to units of 2^-24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = (x - 0x38000000u) >> 13;  // exponent rebiased from 127 to 15
  const uint32_t rem = x & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) ++r;  // a carry into the exponent is still right
  return uint16_t(sign | r);
}
inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { mant <<= 1; ++e; } while ((mant & 0x400) == 0);
      bits = sign | uint32_t(127 - 15 - e) << 23 | (mant & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

}  // namespace tokentrail
