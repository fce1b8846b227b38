// Weight unpacking for the x86 int8 variants (AVX2 instructions; the AVX-512
// variant uses them as well): nibbles and fifth bits to int8 bytes, byte sums.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace tokentrail {

struct Int8UnpackX86 {
  // 16 bytes of nibbles to 32 int8 values (low nibbles first, then high ones) minus `offset`.
  static void nibbles(const uint8_t* q, int8_t* out, int offset) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)), m = _mm_set1_epi8(0x0F);
    const __m256i both = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_sub_epi8(both, _mm256_set1_epi8(char(offset))));
  }
  // IQ4_NL: each nibble looked up in a 16-entry table.
  static void nibbles_lookup(const uint8_t* q, int8_t* out, const int8_t* table) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)), m = _mm_set1_epi8(0x0F);
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(table));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_shuffle_epi8(t, _mm_and_si128(v, m)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm_shuffle_epi8(t, _mm_and_si128(_mm_srli_epi16(v, 4), m)));
  }
  // out[j] += 16 * (bit j of `bits`) - offset, for 32 values.
  static void fifth_bits(uint32_t bits, int8_t* out, int offset) {
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(int(bits)),
                                               _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL,
                                                                  0x0303030303030303LL));
    const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201ULL));
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    const __m256i add = _mm256_sub_epi8(_mm256_and_si256(set, _mm256_set1_epi8(16)), _mm256_set1_epi8(char(offset)));
    __m256i* p = reinterpret_cast<__m256i*>(out);
    _mm256_storeu_si256(p, _mm256_add_epi8(_mm256_loadu_si256(p), add));
  }
  // Sum of n int8 values, n a multiple of 16.
  static int32_t sum_bytes(const int8_t* p, int n) {
    __m128i acc = _mm_setzero_si128();
    for (int i = 0; i < n; i += 16) {  // sad of (w + 128) against 0: sums of 8 bytes
      const __m128i v = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)), _mm_set1_epi8(char(0x80)));
      acc = _mm_add_epi64(acc, _mm_sad_epu8(v, _mm_setzero_si128()));
    }
    return int32_t(_mm_cvtsi128_si64(acc) + _mm_extract_epi64(acc, 1)) - 128 * n;
  }
};

}  // namespace tokentrail
