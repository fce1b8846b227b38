// The integer-vector interface of the AVX-512 VNNI int8 variant (int8_impl.h says what IV
// provides), included inside the namespace of each variant built on it: int8_avx512vnni.cpp,
// and int8_avx512amx.cpp, which multiplies the Q8_0 row lanes in AMX tiles and everything
// else exactly as VNNI does. Needs <immintrin.h>, avx512_transpose.h, int8_x86.h and
// kernels_common.h included before the namespace.

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
  // Q8_0 rows streamed with the lanes over 16 rows (int8_impl.h, int8_q8_0_row_lanes).
  static constexpr bool HAS_ROW_LANES = true;
  // Quants of 16 Q8_0 rows (row r at p + r * stride), blocks b and b + 1, as 16 vectors of
  // 16 groups of 4 bytes, transposed: vector j holds group j (of the 16 in the two blocks) of
  // every row, each byte flipped to w + 128.
  static void q8_0_pair_by_rows(const uint8_t* p, size_t stride, I* w) {
    for (int r = 0; r < 16; ++r) {
      const uint8_t* blk = p + r * stride;
      const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
      const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 36));
      w[r] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
    transpose16(w);
    for (int j = 0; j < 16; ++j) w[j] = _mm512_xor_si512(w[j], _mm512_set1_epi8(char(0x80)));
  }
  // The same for a single block: vectors 0..7 (its 8 groups).
  static void q8_0_one_by_rows(const uint8_t* p, size_t stride, I* w) {
    for (int r = 0; r < 16; ++r)
      w[r] = _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + r * stride + 2)));
    transpose16(w);
    for (int j = 0; j < 8; ++j) w[j] = _mm512_xor_si512(w[j], _mm512_set1_epi8(char(0x80)));
  }
  // The half-precision scales at p + r * stride, r < 16, as floats.
  static F halves_by_rows(const uint8_t* p, size_t stride) {
    alignas(32) uint16_t h[16];
    for (int r = 0; r < 16; ++r) std::memcpy(h + r, p + r * stride, 2);
    return _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(h)));
  }
  // 16 half-precision values at p as floats.
  static F halves(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  // acc + per lane the sum of 4 products u8 w[lane][j] * s8 q4[j] (q4 broadcast).
  static I dot4_rows(I acc, I w, const int8_t* q4) {
    return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(*reinterpret_cast<const unaligned_i32*>(q4)));
  }
  // In place: 32-bit element j of r[i] becomes element i of r[j] (a 16 x 16 block).
  static void transpose16(I* r) {
    __m512 f[16];
    for (int i = 0; i < 16; ++i) f[i] = _mm512_castsi512_ps(r[i]);
    transpose_16x16(f);
    for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(f[i]);
  }
  // 32 bytes from p to w, each + 128.
  static void copy_add_128(const uint8_t* p, int8_t* w) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w),
                        _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), _mm256_set1_epi8(char(0x80))));
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
