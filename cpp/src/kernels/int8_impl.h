// Products of block-quantized weights with int8 activations, written once
// against a small integer-vector interface `IV` and compiled per instruction
// set (int8_scalar.cpp, int8_avx2.cpp, int8_avx512vnni.cpp include this file
// inside their own namespace).
//
// Activations are rounded to int8 exactly as llama.cpp rounds them, so that
// the two engines agree: per 32-value block with a half-precision scale
// (Q8_0) for the 32-value weight types, per 256-value block with a float
// scale (Q8_K) for the k-quants (quantize_block_32 / _256). Weights keep their own blocks: each
// sub-block (32 values, 16 for Q6_K) is unpacked to int8 w with a float scale
// and, for the types with an offset, a float min. Then
//
//   y[t][r] = sum over sub-blocks s of  fma(float(sum_k w*q), scale_r(s) * da_t(s), .)
//                                       (+ fma(min_r(s), da_t(s) * sum_k q, .) for Q4_1, Q5_1, Q4_K, Q5_K)
//
// the integer sums being exact; tests/int8_reference.py is the same in numpy.
//
// Vector lanes run over tokens, not over k: a 4-byte group of one weight row
// is broadcast and multiplied with the same 4 k-positions of IV::LANES tokens
// (vpdpbusd, or maddubs + madd), so every per-sub-block scale is one float
// per row and one vector per token tile, and weights are read in their own
// layout with no packing. One operand of these instructions is unsigned:
// - IV::UNSIGNED_WEIGHTS (VNNI): weights are stored as w + 128 and the
//   activations stay signed; the 128 * sum(q) this adds is one vector per
//   token tile and 16 values (QuantizedActs::corr), shared by every row, so a
//   row is unpacked with one xor and no sums.
// - otherwise (maddubs, whose int16 pairs must not saturate): the activation
//   bytes are stored as q + 128 and the 128 * sum(w) this adds is taken off
//   through each weight sub-block's starting value.
//
// IV provides: LANES (tokens per vector), ROWS x TILES (register tile: weight
// rows x token vectors); types I (int32 lanes) and F (float lanes); izero,
// iset1, load_a (LANES*4 bytes), dot4<WIDE>(acc, a, w4) (acc + per lane the sum
// of 4 u8*s8 products; WIDE: any s8 weight, else |w| <= 64), cvt, fzero,
// fset1, fload, fmul, ffma, fstore; half(const uint8_t*) (an f16 to float);
// and the weight unpacking helpers nibbles, nibbles_lookup, fifth_bits and
// sum_bytes (int8_x86.h says what each does).

// Activations of n tokens, quantized and laid out in tiles of IV::LANES tokens:
// bytes [tile][K/4][LANES][4] (q, or q + 128 without UNSIGNED_WEIGHTS), scales
// [tile][K/32][LANES], the block sums times the scale, da * sum(q), [tile][K/32][LANES]
// (for the offset types), and with UNSIGNED_WEIGHTS the corrections -128 * sum(q)
// over each 16 values, [tile][K/16][LANES].
constexpr int ACT_OFFSET = IV::UNSIGNED_WEIGHTS ? 0 : 128;

// Q8_0 products in whole blocks of 16 rows stream through the row-lane kernel (below), which
// holds this many tokens' sums in its accumulators and takes more tokens in groups of as many:
// fewer operations per token than unpacking the rows for the token-lane one, and no half-empty
// tiles. Measured on SmolLM2-135M-shaped products (1536 x 576, 576 x 1536), one thread, AMD
// Zen 5: 1.45x the token-lane kernel at 32 and 40 tokens, 1.25x at 48, 1.16x at 64, 1.1-1.35x
// from 96 to 256 (the 49152-row unembedding, read from memory: 0.9x).
constexpr int ROW_LANE_TOKENS = 64;

// Weight rows are unpacked (or streamed) and multiplied in blocks of this many.
constexpr int INT8_ROW_BLOCK = 16;

// How far ahead (bytes) the row-lane kernel asks for its copy's next lines: 8 blocks of 16 rows.
constexpr int ROW_LANE_PREFETCH = 4096;

// The float step of one sub-block, shared by every kernel so that they agree bit for bit: its
// exact integer sum, times the weight row's scale times the token's activation scale (in that
// order), added to the accumulator in one rounding.
static inline typename IV::F block_step(typename IV::F acc, typename IV::I sum, typename IV::F row_scale,
                                        typename IV::F act_scale) {
  return IV::ffma(IV::cvt(sum), IV::fmul(row_scale, act_scale), acc);
}

struct QuantizedActs {
  int n = 0, K = 0, tiles = 0;
  bool has_tiles = false;  // whether q, scale, scaled_sum and corr hold these activations
  bool has_flat = false;   // whether flat, flat_corr and flat_scale do
  std::vector<uint8_t> q;
  std::vector<float> scale, scaled_sum;
  std::vector<int32_t> corr;
  // For the row-lane kernel, per 32-value block b and token t in
  // the order the kernel walks them: the quants at flat[(b * n + t) * 32], the block's
  // correction -128 * sum(q) at flat_corr[b * n + t] and its scale at flat_scale[b * n + t].
  std::vector<int8_t> flat;
  std::vector<int32_t> flat_corr;
  std::vector<float> flat_scale;
  const uint8_t* group(int tile, int g) const { return q.data() + (size_t(tile) * (K / 4) + g) * IV::LANES * 4; }
  const float* block_scale(int tile, int b) const { return scale.data() + (size_t(tile) * (K / 32) + b) * IV::LANES; }
  const float* block_sum(int tile, int b) const { return scaled_sum.data() + (size_t(tile) * (K / 32) + b) * IV::LANES; }
  const int32_t* correction(int tile, int j) const { return corr.data() + (size_t(tile) * (K / 16) + j) * IV::LANES; }
};

#if defined(__AVX512BW__)
// The steps of rounding a 32-value block, on two vectors of 16, shared by quantize_block_32 and
// quantize_16_blocks_32 so that the two agree bit for bit. block_magnitudes: per lane, the larger
// of the two halves' magnitudes as bit patterns without the sign (the same order as the values
// for every finite one); its maximum over the lanes is the block's amax.
static inline __m512i block_magnitudes(const float* x) {
  const __m512i no_sign = _mm512_set1_epi32(0x7FFFFFFF);
  return _mm512_max_epu32(_mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(x)), no_sign),
                          _mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(x + 16)), no_sign));
}
// q = round-half-even(clamp(x * id, +-127)) stored at q; returns the lanes' partial sums of q.
static inline __m512i round_block(const float* x, float id, int8_t* q) {
  const __m512 top = _mm512_set1_ps(127.0f), bottom = _mm512_set1_ps(-127.0f), scale = _mm512_set1_ps(id);
  const __m512i qlo = _mm512_cvt_roundps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(x), scale), bottom), top),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i qhi = _mm512_cvt_roundps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(x + 16), scale), bottom), top),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // One 32-byte store: two 16-byte halves read back as one would wait for both stores to retire.
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtepi32_epi8(qlo)),
                                              _mm512_cvtepi32_epi8(qhi), 1));
  return _mm512_add_epi32(qlo, qhi);
}
#endif

// One 32-value block to int8 as llama.cpp rounds Q8_0 inputs: q = round-half-even(x * 127 / amax),
// the scale amax / 127 rounded to half precision. `sum` receives the sum of q.
static inline float quantize_block_32(const float* x, int8_t* q, int& sum) {
#if defined(__AVX512BW__)
  const uint32_t amax_bits = _mm512_reduce_max_epu32(block_magnitudes(x));
  float amax;
  std::memcpy(&amax, &amax_bits, 4);
  const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
  sum = _mm512_reduce_add_epi32(round_block(x, id, q));
  return _cvtsh_ss(_cvtss_sh(amax / 127.0f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  // The largest magnitude as the largest bit pattern without the sign (the same order for
  // every finite value), which compiles to vector integer maxima; a NaN makes the scale NaN.
  uint32_t amax_bits = 0;
  for (int i = 0; i < 32; ++i) {
    uint32_t b;
    std::memcpy(&b, x + i, 4);
    b &= 0x7FFFFFFFu;
    amax_bits = b > amax_bits ? b : amax_bits;
  }
  float amax;
  std::memcpy(&amax, &amax_bits, 4);
  const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
  int32_t r[32];
  for (int i = 0; i < 32; ++i) {
    // Adding and taking off 1.5 * 2^23 rounds to the nearest integer, ties to even (|v| <= 127).
    float v = x[i] * id;
    v = v < -127.0f ? -127.0f : v;
    v = v > 127.0f ? 127.0f : v;
    v = (v + 12582912.0f) - 12582912.0f;
    r[i] = int32_t(v);
  }
  int s = 0;
  for (int i = 0; i < 32; ++i) {
    q[i] = int8_t(r[i]);
    s += r[i];
  }
  sum = s;
  return f16_to_f32(f32_to_f16(amax / 127.0f));
#endif
}

#if defined(__AVX512BW__)
// Sixteen vectors to one: lane j holds op (max or add, both associative and commutative) over the
// 16 lanes of v[j], in four rounds of pairs instead of sixteen horizontal reductions.
template <class Op>
static inline __m512i reduce_16_vectors(const __m512i* v, Op op) {
  __m512i a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit chunk: [v0 0+2, v1 0+2, v0 1+3, v1 1+3]
    a[i] = op(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per chunk: the chunk's four lanes of v[4i .. 4i + 3]
    b[i] = op(_mm512_unpacklo_epi64(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_epi64(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 2; ++i)  // chunks 0+1 and 2+3 of b[2i], then of b[2i + 1]
    c[i] = op(_mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return op(_mm512_shuffle_i32x4(c[0], c[1], 0x88), _mm512_shuffle_i32x4(c[0], c[1], 0xDD));
}

// Sixteen consecutive 32-value blocks of one token, each rounded exactly as quantize_block_32
// rounds it (the same operations on the same values; the maxima and sums, exact in integers,
// reduced for all sixteen blocks together): block j's quants to q + j * q_stride, its correction
// -128 * sum(q) to corr[j * stride] and its scale to scale[j * stride].
static inline void quantize_16_blocks_32(const float* x, int8_t* q, size_t q_stride, int32_t* corr, float* scale,
                                         size_t stride) {
  __m512i v[16];
  for (int j = 0; j < 16; ++j) v[j] = block_magnitudes(x + 32 * j);
  const __m512 amax = _mm512_castsi512_ps(reduce_16_vectors(v, [](__m512i a, __m512i b) { return _mm512_max_epu32(a, b); }));
  // 127 / amax, or 0 where amax is not above 0 (NaN included), and amax / 127 in half precision,
  // for the sixteen blocks at once: each division rounds as the scalar one does.
  alignas(64) float ids[16], ds[16];
  _mm512_store_ps(ids, _mm512_maskz_div_ps(_mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ),
                                           _mm512_set1_ps(127.0f), amax));
  _mm512_store_ps(ds, _mm512_cvtph_ps(_mm512_cvtps_ph(_mm512_div_ps(amax, _mm512_set1_ps(127.0f)),
                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
  for (int j = 0; j < 16; ++j) v[j] = round_block(x + 32 * j, ids[j], q + j * q_stride);
  alignas(64) int32_t sums[16];
  _mm512_store_si512(sums, reduce_16_vectors(v, [](__m512i a, __m512i b) { return _mm512_add_epi32(a, b); }));
  for (int j = 0; j < 16; ++j) {
    corr[j * stride] = -128 * sums[j];
    scale[j * stride] = ds[j];
  }
}
#endif

// One 256-value block as llama.cpp rounds the inputs of k-quant products (Q8_K): the value of
// largest magnitude (the first, on ties) becomes -127, iscale = -127 / that value,
// q = min(127, round-half-even(x * iscale)), scale 1 / iscale. `sums` receives the sum of q per 32.
static inline float quantize_block_256(const float* x, int8_t* q, int* sums) {
  float amax = 0.0f, extreme = 0.0f;
  for (int i = 0; i < 256; ++i)
    if (std::fabs(x[i]) > amax) {
      amax = std::fabs(x[i]);
      extreme = x[i];
    }
  if (amax == 0.0f) {
    std::fill(q, q + 256, int8_t(0));
    std::fill(sums, sums + 8, 0);
    return 0.0f;
  }
  const float iscale = -127.0f / extreme;
  for (int j = 0; j < 8; ++j) {
    int s = 0;
    for (int i = 32 * j; i < 32 * j + 32; ++i) {
      float v = std::min(127.0f, std::max(-128.0f, x[i] * iscale));
      v = (v + 12582912.0f) - 12582912.0f;
      q[i] = int8_t(int(std::min(127.0f, v)));
      s += q[i];
    }
    sums[j] = s;
  }
  return 1.0f / iscale;
}

// Whether products of `w` run entirely in the row-lane kernel (whole blocks of
// 16 rows), which reads the activations' flat layout only.
static bool streams_row_lanes(const WeightView& w) {
  return w.type == DType::Q8_0 && IV::HAS_ROW_LANES && IV::LANES == INT8_ROW_BLOCK &&
         w.rows % INT8_ROW_BLOCK == 0;
}

// Rounds x [n][K] in blocks of `block` values (32: Q8_0's rounding; 256: Q8_K's) into `a`:
// the token tiles if `tiles` (some product runs the token-lane kernel), the flat layout if
// `flat` (some product streams through the row lanes; 32-value blocks only).
static void quantize_acts(const float* x, int n, int K, int block, bool tiles, bool flat, QuantizedActs& a) {
  constexpr int L = IV::LANES;
  a.n = n;
  a.K = K;
  a.tiles = (n + L - 1) / L;
  a.has_tiles = tiles;
  a.has_flat = flat;
  const int nb = K / 32;
  if (tiles) {
    a.q.assign(size_t(a.tiles) * K * L, ACT_OFFSET);  // padding lanes: q = 0
    a.scale.assign(size_t(a.tiles) * nb * L, 0.0f);
    a.scaled_sum.assign(size_t(a.tiles) * nb * L, 0.0f);
    if (IV::UNSIGNED_WEIGHTS) a.corr.assign(size_t(a.tiles) * (K / 16) * L, 0);
  }
  if (flat) {
    // (Padded: the AMX variant reads a group of 16 tokens' quants, corrections and scales whole,
    // past the last token.)
    a.flat.resize(size_t(n) * K + 16 * 32);
    a.flat_corr.resize(size_t(n) * nb + 16);
    a.flat_scale.resize(size_t(n) * nb + 16);
  }
  // Split over the threads from a few rows up: a batched step's 16-64 rows took 10 % of its time
  // on one thread while the others waited (block by block, each block costs ~25 cycles; a dispatch a
  // few µs). Sixteen blocks at a time (quantize_16_blocks_32: the flat layout alone, AVX-512) a
  // step's rows take less than a dispatch: a 16-sequence int8 decode step (SmolLM2 shape, Q8_0, 2
  // threads, Intel Xeon) 1.16x faster with both changes, 1.08x with the sixteen-block rounding alone.
  bool sixteen_at_a_time = false;
#if defined(__AVX512BW__)
  sixteen_at_a_time = block == 32 && flat && !tiles;
#endif
  parallel_for_if(double(n) * K > (sixteen_at_a_time ? 65536.0 : 8192.0), n, 1, Split::Even, [&](int64_t t0, int64_t t1) {
  for (int t = int(t0); t < int(t1); ++t) {
    const int tile = t / L, lane = t % L;
    alignas(64) int8_t q[256];
    int sums[8];
    float d = 0.0f;
    int b = 0;
#if defined(__AVX512BW__)
    if (sixteen_at_a_time)  // straight into the flat layout
      for (; b + 16 <= nb; b += 16)
        quantize_16_blocks_32(x + size_t(t) * K + size_t(b) * 32, a.flat.data() + (size_t(b) * n + t) * 32,
                              size_t(n) * 32, a.flat_corr.data() + size_t(b) * n + t,
                              a.flat_scale.data() + size_t(b) * n + t, size_t(n));
#endif
    for (; b < nb; ++b) {
      const float* xb = x + size_t(t) * K + size_t(b) * 32;
      int8_t* flat_q = flat ? a.flat.data() + (size_t(b) * n + t) * 32 : nullptr;
      // Only the flat layout: a 32-value block is rounded straight into its place there.
      int8_t* const qb = block == 32 ? (flat_q && !tiles ? flat_q : q) : q + 32 * (b % 8);
      if (block == 32) {
        d = quantize_block_32(xb, qb, sums[0]);
      } else if (b % 8 == 0) {
        d = quantize_block_256(xb, q, sums);
      }
      const int sum = block == 32 ? sums[0] : sums[b % 8];
      if (flat) {
        if (qb != flat_q) std::memcpy(flat_q, qb, 32);
        a.flat_corr[size_t(b) * n + t] = -128 * sum;
        a.flat_scale[size_t(b) * n + t] = d;
      }
      if (!tiles) continue;
      a.scale[(size_t(tile) * nb + b) * L + lane] = d;
      a.scaled_sum[(size_t(tile) * nb + b) * L + lane] = d * float(sum);
      for (int g = 0; g < 8; ++g) {  // 4 bytes to each group's lane
        uint32_t four;
        std::memcpy(&four, qb + 4 * g, 4);
        four ^= ACT_OFFSET ? 0x80808080u : 0u;  // + 128 per byte, modulo 256
        std::memcpy(a.q.data() + ((size_t(tile) * (K / 4) + b * 8 + g) * L + lane) * 4, &four, 4);
      }
      if (IV::UNSIGNED_WEIGHTS)
        for (int h = 0; h < 2; ++h) {
          int s16 = 0;
          for (int j = 0; j < 16; ++j) s16 += qb[16 * h + j];
          a.corr[(size_t(tile) * (K / 16) + b * 2 + h) * L + lane] = -128 * s16;
        }
    }
  }
  });
}

// ---- Weight rows unpacked to int8 ----------------------------------------------
// One row: K int8 values, and per sub-block a float scale, a float min (0 for
// the types without one) and the int32 -128 * sum(w) that starts its dot product.
template <DType T>
struct Int8Layout {
  static constexpr int SUB = T == DType::Q6_K ? 16 : 32;
  static constexpr bool WITH_MIN = T == DType::Q4_1 || T == DType::Q5_1 || T == DType::Q4_K || T == DType::Q5_K;
  // maddubs sums two u8 * s8 products into int16: weights beyond +-64 need the wide form.
  static constexpr bool WIDE = T == DType::Q8_0 || T == DType::IQ4_NL;
};

struct UnpackedRow {
  int8_t* w;
  float* scale;
  float* min;
  int32_t* start;
};

static inline uint32_t u32_le(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }

// Row `row` of w: its values as int8 (before scales), with each sub-block's scale, min and starting value.
// How far ahead a row-streaming kernel asks for weights: at least 8 rows and 12 KiB, as the
// float GEMV does (kernels_impl.h, prefetch_ahead).
static inline size_t prefetch_distance(size_t row_bytes) { return std::max<size_t>(8 * row_bytes, 12288); }

// Unpacking reads the weights from memory, once per product: rows this far ahead are
// asked for while it works (the next block of rows), so that DRAM streams instead of
// answering one miss at a time.
constexpr int UNPACK_PREFETCH_ROWS = 16;

template <DType T>
static void unpack_row(const uint8_t* __restrict row, size_t row_bytes, int K, const UnpackedRow& u) {
  constexpr int VALUES = weight_type(T).values, BYTES = weight_type(T).bytes;
  const size_t ahead = UNPACK_PREFETCH_ROWS * row_bytes;
  for (int b = 0; b < K / VALUES; ++b) {
    const uint8_t* __restrict blk = row + size_t(b) * BYTES;
    // Spread over the row: a burst of misses would fill the miss buffers and stall the loop.
    if ((b * BYTES) % 64 < BYTES) __builtin_prefetch(blk + ahead);
    int8_t* __restrict w = u.w + size_t(b) * VALUES;
    if constexpr (VALUES == 32) {
      float d = IV::half(blk), m = 0.0f;
      if constexpr (T == DType::Q8_0 && IV::UNSIGNED_WEIGHTS) {
        IV::copy_add_128(blk + 2, w);  // copied straight to the unsigned side (no add_128 pass below)
      } else if constexpr (T == DType::Q8_0) {
        std::memcpy(w, blk + 2, 32);
      } else if constexpr (T == DType::Q4_0) {
        IV::nibbles(blk + 2, w, 8);
      } else if constexpr (T == DType::Q4_1) {
        IV::nibbles(blk + 4, w, 0);
        m = IV::half(blk + 2);
      } else if constexpr (T == DType::IQ4_NL) {
        IV::nibbles_lookup(blk + 2, w, IQ4_NL_LEVELS);
      } else {  // Q5_0, Q5_1: the fifth bits in a 32-bit word
        constexpr bool ONE = T == DType::Q5_1;
        IV::nibbles(blk + (ONE ? 8 : 6), w, 0);
        IV::fifth_bits(u32_le(blk + (ONE ? 4 : 2)), w, ONE ? 0 : 16);
        if constexpr (ONE) m = IV::half(blk + 2);
      }
      u.scale[b] = d;
      u.min[b] = m;
    } else if constexpr (T == DType::Q4_K || T == DType::Q5_K) {
      constexpr bool Q5 = T == DType::Q5_K;
      const float d = IV::half(blk), dmin = IV::half(blk + 2);
      const uint8_t* scales = blk + 4;
      const uint8_t* qh = blk + 16;
      const uint8_t* q = blk + (Q5 ? 48 : 16);
      for (int j = 0; j < 4; ++j) {  // 64 values: low nibbles are sub-block 2j, high ones 2j + 1
        for (int l = 0; l < 32; ++l) {
          int lo = q[32 * j + l] & 0xF, hi = q[32 * j + l] >> 4;
          if constexpr (Q5) {
            lo |= ((qh[l] >> (2 * j)) & 1) << 4;
            hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
          }
          w[64 * j + l] = int8_t(lo);
          w[64 * j + 32 + l] = int8_t(hi);
        }
        for (int h = 0; h < 2; ++h) {
          int sc, mn;
          scale_min_k4(2 * j + h, scales, sc, mn);
          u.scale[b * 8 + 2 * j + h] = d * float(sc);
          u.min[b * 8 + 2 * j + h] = -dmin * float(mn);
        }
      }
    } else {
      static_assert(T == DType::Q6_K, "no int8 unpacking for this type");
      const uint8_t* ql = blk;
      const uint8_t* qh = blk + 128;
      const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
      const float d = IV::half(blk + 208);
      for (int h = 0; h < 2; ++h)  // two halves of 128 values
        for (int l = 0; l < 32; ++l) {
          const uint8_t lq0 = ql[64 * h + l], lq1 = ql[64 * h + 32 + l], hq = qh[32 * h + l];
          int8_t* o = w + 128 * h + l;
          o[0] = int8_t(((lq0 & 0xF) | ((hq & 3) << 4)) - 32);
          o[32] = int8_t(((lq1 & 0xF) | (((hq >> 2) & 3) << 4)) - 32);
          o[64] = int8_t(((lq0 >> 4) | (((hq >> 4) & 3) << 4)) - 32);
          o[96] = int8_t(((lq1 >> 4) | (((hq >> 6) & 3) << 4)) - 32);
        }
      for (int s = 0; s < 16; ++s) {
        u.scale[b * 16 + s] = d * float(sc[s]);
        u.min[b * 16 + s] = 0.0f;
      }
    }
  }
  if constexpr (IV::UNSIGNED_WEIGHTS) {
    if constexpr (T != DType::Q8_0) IV::add_128(u.w, K);  // the corrections come with the activations
  } else {
    constexpr int SUB = Int8Layout<T>::SUB;
    for (int s = 0; s < K / SUB; ++s) u.start[s] = -128 * IV::sum_bytes(u.w + s * SUB, SUB);
  }
}

// R unpacked rows times C token tiles (from tile0), every sub-block: out[r * ld + tile * LANES + lane].
template <DType T, int R, int C>
static inline void int8_tile(const UnpackedRow* rows, const QuantizedActs& a, int tile0, float* out, size_t ld) {
  using L8 = Int8Layout<T>;
  constexpr int SUB = L8::SUB, L = IV::LANES;
  const int K = a.K;
  typename IV::F acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = IV::fzero();
  for (int s = 0; s < K / SUB; ++s) {
    typename IV::I dot[R][C];
    if constexpr (IV::UNSIGNED_WEIGHTS) {
      for (int c = 0; c < C; ++c) {
        typename IV::I start = IV::iload(a.correction(tile0 + c, s * SUB / 16));
        if constexpr (SUB == 32) start = IV::iadd(start, IV::iload(a.correction(tile0 + c, s * 2 + 1)));
        for (int r = 0; r < R; ++r) dot[r][c] = start;
      }
    } else {
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) dot[r][c] = IV::iset1(rows[r].start[s]);
    }
    for (int g = 0; g < SUB / 4; ++g) {
      const int kg = s * (SUB / 4) + g;
      typename IV::I av[C];
      for (int c = 0; c < C; ++c) av[c] = IV::load_a(a.group(tile0 + c, kg));
      for (int r = 0; r < R; ++r) {
        const uint8_t* w4 = reinterpret_cast<const uint8_t*>(rows[r].w) + 4 * kg;
        for (int c = 0; c < C; ++c) dot[r][c] = IV::template dot4<L8::WIDE>(dot[r][c], av[c], w4);
      }
    }
    const int b = s * SUB / 32;
    for (int c = 0; c < C; ++c) {
      const typename IV::F da = IV::fload(a.block_scale(tile0 + c, b));
      for (int r = 0; r < R; ++r)
        acc[r][c] = block_step(acc[r][c], dot[r][c], IV::fset1(rows[r].scale[s]), da);
      if constexpr (L8::WITH_MIN) {
        const typename IV::F sq = IV::fload(a.block_sum(tile0 + c, b));
        for (int r = 0; r < R; ++r) acc[r][c] = IV::ffma(IV::fset1(rows[r].min[s]), sq, acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) IV::fstore(out + size_t(r) * ld + size_t(tile0 + c) * L, acc[r][c]);
}

// `nr` unpacked rows against every token tile, into out[nr][tiles * LANES]. A single tile
// (up to LANES tokens, a batch of decode rows) takes more rows at once instead, so that
// enough independent dot-product chains are in flight.
template <DType T>
static inline void int8_block(const UnpackedRow* u, int nr, const QuantizedActs& a, float* out) {
  const size_t ld = size_t(a.tiles) * IV::LANES;
  int r = 0;
  if (a.tiles == 1) {
    constexpr int R1 = IV::ROWS_ONE_TILE;
    for (; r + R1 <= nr; r += R1) int8_tile<T, R1, 1>(u + r, a, 0, out + size_t(r) * ld, ld);
  } else {
    constexpr int R = IV::ROWS, C = IV::TILES;
    for (; r + R <= nr; r += R) {
      int t = 0;
      for (; t + C <= a.tiles; t += C) int8_tile<T, R, C>(u + r, a, t, out + size_t(r) * ld, ld);
      for (; t < a.tiles; ++t) int8_tile<T, R, 1>(u + r, a, t, out + size_t(r) * ld, ld);
    }
  }
  for (; r < nr; ++r)
    for (int t = 0; t < a.tiles; ++t) int8_tile<T, 1, 1>(u + r, a, t, out + size_t(r) * ld, ld);
}

// Working memory of one thread: a block of unpacked rows and its outputs, kept between calls.
struct Int8Scratch {
  std::vector<int8_t> w;
  std::vector<float> scale, mins, out;
  std::vector<int32_t> start;
  UnpackedRow rows[INT8_ROW_BLOCK];
};

static Int8Scratch& int8_scratch(int K, int nsub, size_t out_floats) {
  static thread_local Int8Scratch s;
  const size_t wn = size_t(INT8_ROW_BLOCK) * K, sn = size_t(INT8_ROW_BLOCK) * nsub;
  if (s.w.size() < wn || s.scale.size() < sn) {
    s.w.resize(std::max(s.w.size(), wn));
    s.scale.resize(std::max(s.scale.size(), sn));
    s.mins.resize(s.scale.size());
    s.start.resize(s.scale.size());
  }
  if (s.out.size() < out_floats) s.out.resize(out_floats);
  for (int i = 0; i < INT8_ROW_BLOCK; ++i)
    s.rows[i] = {s.w.data() + size_t(i) * K, s.scale.data() + size_t(i) * nsub, s.mins.data() + size_t(i) * nsub,
                 s.start.data() + size_t(i) * nsub};
  return s;
}

// Tokens [t0, t1) of the row lanes against one block b of 16 rows: wh holds its 8 groups of 4
// bytes by rows (w + 128), `scale` the rows' scales. Token t's quants, correction and scale for
// the block lie one after another in the flat layout.
static inline void row_lane_block(const typename IV::I* wh, typename IV::F scale, const QuantizedActs& a, int b,
                                  int t0, int t1, typename IV::F* acc) {
  const int n = a.n;
  const int8_t* q = a.flat.data() + (size_t(b) * n + t0) * 32;
  const int32_t* corr = a.flat_corr.data() + size_t(b) * n;
  const float* da = a.flat_scale.data() + size_t(b) * n;
  for (int t = t0; t < t1; ++t, q += 32) {
    // Two chains of four (integer sums: the order does not matter).
    typename IV::I even = IV::iset1(corr[t]);
    typename IV::I odd = IV::dot4_rows(IV::iset1(0), wh[1], q + 4);
    even = IV::dot4_rows(even, wh[0], q);
    for (int j = 2; j < 8; j += 2) {
      even = IV::dot4_rows(even, wh[j], q + 4 * j);
      odd = IV::dot4_rows(odd, wh[j + 1], q + 4 * j + 4);
    }
    acc[t - t0] = block_step(acc[t - t0], IV::iadd(even, odd), scale, IV::fset1(da[t]));
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
// ---- AMX tiles (the avx512amx variant) ----------------------------------------
// One tile product multiplies a block of 32 values of 16 tokens (the flat layout: 16 rows of 32
// bytes) by the same block of 16 weight rows (the row-lane copy: 8 rows of [16 rows][4 bytes],
// already the layout the tile unit wants) into 16 x 16 exact int32 sums of q * (w + 128), the
// sums vpdpbusd forms one token at a time in row_lane_block. The float steps after them are
// row_lane_block's, in the same order, so results equal the VNNI variant's bit for bit.
// Consecutive blocks alternate between two sets of tiles (sums 0-1 / 2-3 for two groups of 16
// tokens, quants 4 / 5, weights 6 / 7), so that one block's tile products need not wait for the
// block before to leave its tiles.
// Fewer tokens than this run through vpdpbusd: a tile product costs the same for 1 token as for 16.
constexpr int AMX_MIN_TOKENS = 4;

struct AmxTileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// A new value at every product call, so that each thread loads the tile configuration once per
// call: other code on the same thread (a library using AMX between our calls) may have loaded
// its own, and the configuration is per thread.
static std::atomic<uint32_t> amx_epoch{1};

static inline void amx_configure() {
  static thread_local uint32_t configured = 0;
  const uint32_t now = amx_epoch.load(std::memory_order_relaxed);
  if (configured == now) return;
  AmxTileConfig c;
  for (int i : {0, 1, 2, 3}) c.rows[i] = 16, c.colsb[i] = 64;  // int32 sums: 16 tokens x 16 rows
  for (int i : {4, 5}) c.rows[i] = 16, c.colsb[i] = 32;        // quants: 16 tokens x 32 values
  for (int i : {6, 7}) c.rows[i] = 8, c.colsb[i] = 64;         // weights: 8 groups of [16 rows][4]
  _tile_loadconfig(&c);
  configured = now;
}

// The float steps of row_lane_block for 16 tokens from t (acc[i]: token t + i) on the tile's sums.
// Always all 16 (the accumulators stay in registers); sums, corrections and scales past the last
// token are padding, and the caller keeps only the accumulators of real tokens.
static inline void amx_row_lane_block(const int32_t* sums, typename IV::F scale, const QuantizedActs& a, int b, int t,
                                      typename IV::F* acc) {
  const int32_t* corr = a.flat_corr.data() + size_t(b) * a.n + t;
  const float* da = a.flat_scale.data() + size_t(b) * a.n + t;
  for (int i = 0; i < 16; ++i) {
    const typename IV::I s = IV::iadd(IV::iload(sums + 16 * i), IV::iset1(corr[i]));
    acc[i] = block_step(acc[i], s, scale, IV::fset1(da[i]));
  }
}

// Q8_0 from the row-lane copy `lanes` (scales `lane_scales`) of the 16 rows from r0, tokens
// [t0, t1), 32 tokens (two tile products) per pass over the blocks: block b's weights are loaded
// into a tile once for both groups of 16 tokens.
static void amx_row_lanes(const uint8_t* lanes, const uint16_t* lane_scales, const QuantizedActs& a, int r0, int t0,
                          int t1, float* y, size_t ldy) {
  constexpr int L = IV::LANES;
  const int nb = a.K / 32, n = a.n;
  amx_configure();
  alignas(64) int32_t sums[2][32 * 16];
  const size_t q_step = size_t(n) * 32;
  for (int g = t0; g < t1; g += 32) {
    typename IV::F acc[32];
    for (int i = 0; i < 32; ++i) acc[i] = IV::fzero();
    const int8_t* q = a.flat.data() + size_t(g) * 32;  // block 0; block b at + b * n * 32
    const bool two = t1 - g > 16;
    const bool first_pass = g == t0;
#define TOKENTRAIL_AMX_ISSUE(C0, C1, A, B, b)                                               \
  do {                                                                                      \
    const uint8_t* blk_ = lanes + size_t(b) * 512;                                          \
    if (first_pass)                                                                         \
      for (int j = 0; j < 8; ++j) __builtin_prefetch(blk_ + ROW_LANE_PREFETCH + 64 * j);    \
    _tile_loadd(B, blk_, 64);                                                               \
    _tile_zero(C0);                                                                         \
    _tile_loadd(A, q + (b) * q_step, 32);                                                   \
    _tile_dpbsud(C0, A, B);                                                                 \
    if (two) {                                                                              \
      _tile_zero(C1);                                                                       \
      _tile_loadd(A, q + (b) * q_step + 512, 32);                                           \
      _tile_dpbsud(C1, A, B);                                                               \
    }                                                                                       \
  } while (0)
#define TOKENTRAIL_AMX_STORE(C0, C1, S)                                                     \
  do {                                                                                      \
    _tile_stored(C0, sums[S], 64);                                                          \
    if (two) _tile_stored(C1, sums[S] + 256, 64);                                           \
  } while (0)
    TOKENTRAIL_AMX_ISSUE(0, 1, 4, 6, 0);
    for (int b = 0; b < nb; b += 2) {
      if (b + 1 < nb) TOKENTRAIL_AMX_ISSUE(2, 3, 5, 7, b + 1);
      TOKENTRAIL_AMX_STORE(0, 1, 0);
      const typename IV::F s0 = IV::halves(lane_scales + size_t(b) * L);
      amx_row_lane_block(sums[0], s0, a, b, g, acc);
      if (two) amx_row_lane_block(sums[0] + 256, s0, a, b, g + 16, acc + 16);
      if (b + 1 < nb) {
        if (b + 2 < nb) TOKENTRAIL_AMX_ISSUE(0, 1, 4, 6, b + 2);
        TOKENTRAIL_AMX_STORE(2, 3, 1);
        const typename IV::F s1 = IV::halves(lane_scales + size_t(b + 1) * L);
        amx_row_lane_block(sums[1], s1, a, b + 1, g, acc);
        if (two) amx_row_lane_block(sums[1] + 256, s1, a, b + 1, g + 16, acc + 16);
      }
    }
#undef TOKENTRAIL_AMX_ISSUE
#undef TOKENTRAIL_AMX_STORE
    for (int t = g; t < std::min(t1, g + 32); ++t) IV::fstore(y + size_t(t) * ldy + r0, acc[t - g]);
  }
}
#endif

// Q8_0 for a whole block of 16 rows and ROW_LANE_TOKENS tokens at a time, streamed as the
// float GEMV streams (no unpacking pass), with the lanes over the 16 rows: a vector holds one
// 4-byte group of every row and each token's 4 bytes are broadcast against it. The rows come
// from the model's row-lane copy where it made one (pack_q8_0_row_lanes: loaded as they lie),
// else from the Q8_0 rows themselves, two blocks at a time, transposed in registers. The float
// steps per row and block are int8_tile's in the same order, so every result is bit for bit the
// token-lane kernel's: a row's product does not depend on how many tokens share the call.
static void int8_q8_0_row_lanes(const WeightView& wv, const QuantizedActs& a, int r0, float* y) {
  constexpr int L = IV::LANES, BYTES = 34;
  const int K = a.K, nb = K / 32, n = a.n;
  const size_t rb = wv.row_bytes, ahead = prefetch_distance(rb), ldy = wv.rows;
  const uint8_t* base = wv.row(r0);
  const uint8_t* lanes = wv.row_lanes ? row_lane_quants(wv, wv.row_lanes, r0 / L, 0) : nullptr;
  const uint16_t* lane_scales = wv.row_lanes ? row_lane_scales(wv, wv.row_lanes, r0 / L, 0) : nullptr;
  typename IV::F acc[ROW_LANE_TOKENS];
  // More tokens than accumulators: the rows again for each group of tokens (from L1 or L2 by then).
  for (int t0 = 0; t0 < n; t0 += ROW_LANE_TOKENS) {
    const int t1 = std::min(n, t0 + ROW_LANE_TOKENS);
    for (int t = t0; t < t1; ++t) acc[t - t0] = IV::fzero();
    typename IV::I w[16];
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
    if (lanes && t1 - t0 >= AMX_MIN_TOKENS) {
      amx_row_lanes(lanes, lane_scales, a, r0, t0, t1, y, ldy);
      continue;
    }
#endif
    if (lanes) {
      for (int b = 0; b < nb; ++b) {
        const uint8_t* blk = lanes + size_t(b) * 512;
        // One sequential stream: ask for the lines a few blocks on (and the scales' line every other block).
        for (int j = 0; j < 8; ++j) __builtin_prefetch(blk + ROW_LANE_PREFETCH + 64 * j);
        if (b % 2 == 0) __builtin_prefetch(lane_scales + size_t(b) * L + ROW_LANE_PREFETCH / 16);
        for (int j = 0; j < 8; ++j) w[j] = IV::load_a(blk + 64 * j);
        row_lane_block(w, IV::halves(lane_scales + size_t(b) * L), a, b, t0, t1, acc);
      }
    } else {
      for (int b = 0; b < nb; b += 2) {
        const int pair = std::min(2, nb - b);
        const uint8_t* blk = base + size_t(b) * BYTES;
        for (int r = 0; r < L; ++r) {  // the rows' lines two blocks on, a distance ahead
          __builtin_prefetch(blk + r * rb + ahead);
          __builtin_prefetch(blk + r * rb + ahead + 64);
        }
        if (pair == 2)
          IV::q8_0_pair_by_rows(blk, rb, w);
        else
          IV::q8_0_one_by_rows(blk, rb, w);
        for (int h = 0; h < pair; ++h)
          row_lane_block(w + 8 * h, IV::halves_by_rows(blk + h * BYTES, rb), a, b + h, t0, t1, acc);
      }
    }
    // Lanes are rows: each token's 16 results go straight to its row of y.
    for (int t = t0; t < t1; ++t) IV::fstore(y + size_t(t) * ldy + r0, acc[t - t0]);
  }
}

// Rows [r0, r1) of w (at most INT8_ROW_BLOCK) against every token: streamed through the row
// lanes where they can be, else unpacked once, multiplied into a [rows][tokens] block and
// written into y[n][w.rows] one token at a time.
template <DType T>
static void int8_rows(const WeightView& wv, const QuantizedActs& a, int r0, int r1, float* y) {
  if (streams_row_lanes(wv)) {
    if (!a.has_flat) throw std::logic_error("int8 product: activations rounded without their flat layout");
    return int8_q8_0_row_lanes(wv, a, r0, y);
  }
  if (!a.has_tiles) throw std::logic_error("int8 product: activations rounded without their token tiles");
  constexpr int SUB = Int8Layout<T>::SUB;
  const int K = int(wv.cols), nr = r1 - r0, rows = int(wv.rows);
  const size_t ld = size_t(a.tiles) * IV::LANES;
  Int8Scratch& s = int8_scratch(K, K / SUB, size_t(INT8_ROW_BLOCK) * ld);
  for (int r = 0; r < nr; ++r) unpack_row<T>(wv.row(r0 + r), wv.row_bytes, K, s.rows[r]);
  int8_block<T>(s.rows, nr, a, s.out.data());
  const float* out = s.out.data();
  for (int t = 0; t < a.n; ++t) {
    float* yt = y + size_t(t) * rows + r0;
    for (int r = 0; r < nr; ++r) yt[r] = out[size_t(r) * ld + t];
  }
}

static void int8_rows_of(const WeightView& w, const QuantizedActs& a, int r0, int r1, float* y) {
  switch (w.type) {
    case DType::Q8_0: return int8_rows<DType::Q8_0>(w, a, r0, r1, y);
    case DType::Q4_0: return int8_rows<DType::Q4_0>(w, a, r0, r1, y);
    case DType::Q4_1: return int8_rows<DType::Q4_1>(w, a, r0, r1, y);
    case DType::Q5_0: return int8_rows<DType::Q5_0>(w, a, r0, r1, y);
    case DType::Q5_1: return int8_rows<DType::Q5_1>(w, a, r0, r1, y);
    case DType::IQ4_NL: return int8_rows<DType::IQ4_NL>(w, a, r0, r1, y);
    case DType::Q4_K: return int8_rows<DType::Q4_K>(w, a, r0, r1, y);
    case DType::Q5_K: return int8_rows<DType::Q5_K>(w, a, r0, r1, y);
    case DType::Q6_K: return int8_rows<DType::Q6_K>(w, a, r0, r1, y);
    default: throw std::invalid_argument(std::string("no int8-activation product for ") + dtype_name(w.type));
  }
}

// y_j[n][w_j.rows] = x[n][K] . w_j^T for every job: x rounded once per activation block size,
// then blocks of INT8_ROW_BLOCK rows of all the weights spread over the threads together
// (guided, as the float GEMV: long sequential runs first).
static void int8_matmul_group(const MatmulJob* jobs, int count, const float* x, int n) {
  const ProductGroup group(jobs, count, INT8_ROW_BLOCK, n);
  bool need32 = false, need256 = false, tiles32 = false, flat32 = false;
  for (int j = 0; j < count; ++j) {
    const DType t = jobs[j].w->type;
    if (!int8_supported(t)) throw std::invalid_argument(std::string("no int8-activation product for ") + dtype_name(t));
    (activation_block(t) == 256 ? need256 : need32) = true;
    if (activation_block(t) == 32) (streams_row_lanes(*jobs[j].w) ? flat32 : tiles32) = true;
  }
  // The rounded activations live with the calling thread between calls (no allocation once warm).
  // (Named through references: inside the lambda a thread_local's own name would be the worker's.)
  static thread_local QuantizedActs caller32, caller256;
  QuantizedActs &acts32 = caller32, &acts256 = caller256;
  if (need32) quantize_acts(x, n, group.K(), 32, tiles32, flat32, acts32);
  if (need256) quantize_acts(x, n, group.K(), 256, true, false, acts256);
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
  if (flat32) amx_epoch.fetch_add(1, std::memory_order_relaxed);
#endif
  parallel_for_if(group.work() > 200000.0, group.blocks(), 1, Split::Guided, [&](int64_t b0, int64_t b1) {
    group.for_blocks(b0, b1, [&](const MatmulJob& job, int r0, int r1) {
      int8_rows_of(*job.w, activation_block(job.w->type) == 256 ? acts256 : acts32, r0, r1, job.y);
    });
  });
}

// y[n][w.rows] = x[n][w.cols] . w^T through int8 activations (w of a supported type).
static void int8_matmul(const WeightView& w, const float* x, int n, float* y) {
  const MatmulJob job{&w, y, nullptr};
  int8_matmul_group(&job, 1, x, n);
}

// The activation rounding alone, for tests: q[n][K] and scales[n][K / block].
static void int8_quantize(const float* x, int n, int K, int block, int8_t* q, float* scales) {
  for (int t = 0; t < n; ++t)
    for (int b = 0; b < K / block; ++b) {
      const float* xb = x + size_t(t) * K + size_t(b) * block;
      int8_t* qb = q + size_t(t) * K + size_t(b) * block;
      int sums[8];
      scales[size_t(t) * (K / block) + b] = block == 32 ? quantize_block_32(xb, qb, sums[0]) : quantize_block_256(xb, qb, sums);
    }
}

static bool every_row_count(DType t) { return IV::HAS_ROW_LANES && t == DType::Q8_0; }

static const Int8KernelTable make_int8_table(const char* name) {
  return Int8KernelTable{name, int8_matmul, int8_matmul_group, every_row_count, int8_quantize, IV::LANES};
}
