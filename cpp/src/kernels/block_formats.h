// Facts of the block formats that both the float kernels (kernels_impl.h) and
// the int8-activation kernels (int8_impl.h) read.
#pragma once
#include <cstdint>

namespace tokentrail {

// IQ4_NL: the nibbles index a fixed non-uniform table of levels; x = d * level.
alignas(16) inline constexpr int8_t IQ4_NL_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                                         1,    13,   25,  38,  53,  69,  89,  113};

// Q4_K / Q5_K: the 6-bit scale and min of sub-block j, packed into 12 bytes.
inline void scale_min_k4(int j, const uint8_t* s, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

}  // namespace tokentrail
