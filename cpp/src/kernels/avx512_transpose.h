// A 16 x 16 transpose of 32-bit elements in AVX-512 registers, for the AVX-512 kernel files
// (the float GEMM's packing and the int8 row-lane kernel's weight groups).
#pragma once
#include <immintrin.h>

namespace tokentrail {

// In place: lane j of r[i] becomes lane i of r[j].
static inline void transpose_16x16(__m512* r) {
  __m512 a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // b[4g + c], 128-bit block L: rows 4g..4g+3 at column 4L + c
    b[4 * g + 0] = _mm512_shuffle_ps(a[4 * g + 0], a[4 * g + 2], 0x44);
    b[4 * g + 1] = _mm512_shuffle_ps(a[4 * g + 0], a[4 * g + 2], 0xEE);
    b[4 * g + 2] = _mm512_shuffle_ps(a[4 * g + 1], a[4 * g + 3], 0x44);
    b[4 * g + 3] = _mm512_shuffle_ps(a[4 * g + 1], a[4 * g + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 d = _mm512_shuffle_f32x4(b[c], b[4 + c], 0x88), e = _mm512_shuffle_f32x4(b[c], b[4 + c], 0xDD);
    const __m512 d2 = _mm512_shuffle_f32x4(b[8 + c], b[12 + c], 0x88), e2 = _mm512_shuffle_f32x4(b[8 + c], b[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(d, d2, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(d, d2, 0xDD);
    r[4 + c] = _mm512_shuffle_f32x4(e, e2, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(e, e2, 0xDD);
  }
}

}  // namespace tokentrail
