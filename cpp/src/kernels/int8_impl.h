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
// layout with no packing. The activation bytes are stored as q + 128 (the
// unsigned operand of vpdpbusd / maddubs); the 128 * sum(w) this adds is
// taken off through each sub-block's starting value.
//
// IV provides: LANES (tokens per vector), ROWS x TILES (register tile: weight
// rows x token vectors); types I (int32 lanes) and F (float lanes); izero,
// iset1, load_a (LANES*4 bytes), dot4<WIDE>(acc, a, w4) (acc + per lane the sum
// of 4 u8*s8 products; WIDE: any s8 weight, else |w| <= 64), cvt, fzero,
// fset1, fload, fmul, ffma, fstore; half(const uint8_t*) (an f16 to float);
// and the weight unpacking helpers nibbles, nibbles_lookup, fifth_bits and
// sum_bytes (int8_x86.h says what each does).

// Activations of n tokens, quantized and laid out in tiles of IV::LANES tokens:
// bytes [tile][K/4][LANES][4] (q + 128), scales [tile][K/32][LANES], and the
// block sums times the scale, da * sum(q), [tile][K/32][LANES] (for the offset types).
struct QuantizedActs {
  int n = 0, K = 0, tiles = 0;
  std::vector<uint8_t> q;
  std::vector<float> scale, scaled_sum;
  const uint8_t* group(int tile, int g) const { return q.data() + (size_t(tile) * (K / 4) + g) * IV::LANES * 4; }
  const float* block_scale(int tile, int b) const { return scale.data() + (size_t(tile) * (K / 32) + b) * IV::LANES; }
  const float* block_sum(int tile, int b) const { return scaled_sum.data() + (size_t(tile) * (K / 32) + b) * IV::LANES; }
};

// One 32-value block to int8 as llama.cpp rounds Q8_0 inputs: q = round-half-even(x * 127 / amax),
// the scale amax / 127 rounded to half precision. `sum` receives the sum of q.
static inline float quantize_block_32(const float* x, int8_t* q, int& sum) {
  float amax = 0.0f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
  int s = 0;
  for (int i = 0; i < 32; ++i) {
    // Adding and taking off 1.5 * 2^23 rounds to the nearest integer, ties to even (|v| <= 127).
    float v = std::min(127.0f, std::max(-127.0f, x[i] * id));
    v = (v + 12582912.0f) - 12582912.0f;
    q[i] = int8_t(int(v));
    s += q[i];
  }
  sum = s;
  return f16_to_f32(f32_to_f16(amax / 127.0f));
}

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

// Rounds x [n][K] in blocks of `block` values (32: Q8_0's rounding; 256: Q8_K's) into `a`.
static void quantize_acts(const float* x, int n, int K, int block, QuantizedActs& a) {
  constexpr int L = IV::LANES;
  a.n = n;
  a.K = K;
  a.tiles = (n + L - 1) / L;
  const int nb = K / 32;
  a.q.assign(size_t(a.tiles) * K * L, 128);  // padding lanes: q = 0
  a.scale.assign(size_t(a.tiles) * nb * L, 0.0f);
  a.scaled_sum.assign(size_t(a.tiles) * nb * L, 0.0f);
  parallel_for_if(double(n) * K > 262144.0, n, 1, Split::Even, [&](int64_t t0, int64_t t1) {
  for (int t = int(t0); t < int(t1); ++t) {
    const int tile = t / L, lane = t % L;
    alignas(64) int8_t q[256];
    int sums[8];
    float d = 0.0f;
    for (int b = 0; b < nb; ++b) {
      const float* xb = x + size_t(t) * K + size_t(b) * 32;
      if (block == 32) {
        d = quantize_block_32(xb, q, sums[0]);
      } else if (b % 8 == 0) {
        d = quantize_block_256(xb, q, sums);
      }
      const int8_t* qb = block == 32 ? q : q + 32 * (b % 8);
      const int sum = block == 32 ? sums[0] : sums[b % 8];
      a.scale[(size_t(tile) * nb + b) * L + lane] = d;
      a.scaled_sum[(size_t(tile) * nb + b) * L + lane] = d * float(sum);
      for (int g = 0; g < 8; ++g) {
        uint8_t* dst = a.q.data() + ((size_t(tile) * (K / 4) + b * 8 + g) * L + lane) * 4;
        for (int j = 0; j < 4; ++j) dst[j] = uint8_t(qb[4 * g + j] + 128);
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
template <DType T>
static void unpack_row(const uint8_t* __restrict row, int K, const UnpackedRow& u) {
  constexpr int VALUES = weight_type(T).values, BYTES = weight_type(T).bytes;
  for (int b = 0; b < K / VALUES; ++b) {
    const uint8_t* __restrict blk = row + size_t(b) * BYTES;
    int8_t* __restrict w = u.w + size_t(b) * VALUES;
    if constexpr (VALUES == 32) {
      float d = IV::half(blk), m = 0.0f;
      if constexpr (T == DType::Q8_0) {
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
  constexpr int SUB = Int8Layout<T>::SUB;
  for (int s = 0; s < K / SUB; ++s) u.start[s] = -128 * IV::sum_bytes(u.w + s * SUB, SUB);
}

// R unpacked rows times C token tiles, every sub-block: out[r][c * LANES + lane].
template <DType T, int R, int C>
static inline void int8_tile(const UnpackedRow* rows, const QuantizedActs& a, int tile0, float* out) {
  using L8 = Int8Layout<T>;
  constexpr int SUB = L8::SUB, L = IV::LANES;
  const int K = a.K;
  typename IV::F acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = IV::fzero();
  for (int s = 0; s < K / SUB; ++s) {
    typename IV::I dot[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) dot[r][c] = IV::iset1(rows[r].start[s]);
    for (int g = 0; g < SUB / 4; ++g) {
      const int kg = s * (SUB / 4) + g;
      typename IV::I av[C];
      for (int c = 0; c < C; ++c) av[c] = IV::load_a(a.group(tile0 + c, kg));
      for (int r = 0; r < R; ++r) {
        const int32_t w4 = int32_t(u32_le(reinterpret_cast<const uint8_t*>(rows[r].w) + 4 * kg));
        for (int c = 0; c < C; ++c) dot[r][c] = IV::template dot4<L8::WIDE>(dot[r][c], av[c], w4);
      }
    }
    const int b = s * SUB / 32;
    for (int c = 0; c < C; ++c) {
      const typename IV::F da = IV::fload(a.block_scale(tile0 + c, b));
      for (int r = 0; r < R; ++r)
        acc[r][c] = IV::ffma(IV::cvt(dot[r][c]), IV::fmul(IV::fset1(rows[r].scale[s]), da), acc[r][c]);
      if constexpr (L8::WITH_MIN) {
        const typename IV::F sq = IV::fload(a.block_sum(tile0 + c, b));
        for (int r = 0; r < R; ++r) acc[r][c] = IV::ffma(IV::fset1(rows[r].min[s]), sq, acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) IV::fstore(out + size_t(r) * C * L + c * L, acc[r][c]);
}

// Rows [r0, r0 + R) against every token tile, written into y[n][rows].
template <DType T, int R>
static inline void int8_rows(const UnpackedRow* u, const QuantizedActs& a, int r0, int rows, float* y) {
  constexpr int C = IV::TILES, L = IV::LANES;
  alignas(64) float out[R * C * L];
  auto put = [&](int tile0, int cols) {
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < cols; ++c)
        for (int l = 0; l < L; ++l) {
          const int t = (tile0 + c) * L + l;
          if (t < a.n) y[size_t(t) * rows + r0 + r] = out[size_t(r) * cols * L + c * L + l];
        }
  };
  int tile = 0;
  for (; tile + C <= a.tiles; tile += C) {
    int8_tile<T, R, C>(u, a, tile, out);
    put(tile, C);
  }
  for (; tile < a.tiles; ++tile) {
    int8_tile<T, R, 1>(u, a, tile, out);
    put(tile, 1);
  }
}

// Blocks of 16 weight rows spread over threads (guided, as the float GEMV:
// long sequential runs first); each block is unpacked once and then meets
// every token tile, ROWS rows at a time.
template <DType T>
static void int8_matmul_typed(const WeightView& wv, const QuantizedActs& a, float* y) {
  constexpr int SUB = Int8Layout<T>::SUB, ROW_BLOCK = 16, R = IV::ROWS;
  const int rows = int(wv.rows), K = int(wv.cols), nsub = K / SUB;
  const int n_blocks = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
  parallel_for_if(double(rows) * K * a.n > 200000.0, n_blocks, 1, Split::Guided, [&](int64_t b0, int64_t b1) {
    // Unpacked rows of one block, kept by the calling thread between calls.
    static thread_local std::vector<int8_t> w;
    static thread_local std::vector<float> scale, mins;
    static thread_local std::vector<int32_t> start;
    if (w.size() < size_t(ROW_BLOCK) * K) w.resize(size_t(ROW_BLOCK) * K);
    if (scale.size() < size_t(ROW_BLOCK) * nsub) {
      scale.resize(size_t(ROW_BLOCK) * nsub);
      mins.resize(size_t(ROW_BLOCK) * nsub);
      start.resize(size_t(ROW_BLOCK) * nsub);
    }
    UnpackedRow u[ROW_BLOCK];
    for (int i = 0; i < ROW_BLOCK; ++i)
      u[i] = {w.data() + size_t(i) * K, scale.data() + size_t(i) * nsub, mins.data() + size_t(i) * nsub,
              start.data() + size_t(i) * nsub};
    for (int blk = int(b0); blk < int(b1); ++blk) {
      const int r0 = blk * ROW_BLOCK, r1 = std::min(rows, r0 + ROW_BLOCK);
      for (int r = r0; r < r1; ++r) unpack_row<T>(wv.row(r), K, u[r - r0]);
      int r = r0;
      for (; r + R <= r1; r += R) int8_rows<T, R>(u + (r - r0), a, r, rows, y);
      for (; r < r1; ++r) int8_rows<T, 1>(u + (r - r0), a, r, rows, y);
    }
  });
}

// y[n][w.rows] = x[n][w.cols] . w^T through int8 activations (w of a supported type).
static void int8_matmul(const WeightView& w, const float* x, int n, float* y) {
  QuantizedActs a;
  quantize_acts(x, n, int(w.cols), activation_block(w.type), a);
  switch (w.type) {
    case DType::Q8_0: return int8_matmul_typed<DType::Q8_0>(w, a, y);
    case DType::Q4_0: return int8_matmul_typed<DType::Q4_0>(w, a, y);
    case DType::Q4_1: return int8_matmul_typed<DType::Q4_1>(w, a, y);
    case DType::Q5_0: return int8_matmul_typed<DType::Q5_0>(w, a, y);
    case DType::Q5_1: return int8_matmul_typed<DType::Q5_1>(w, a, y);
    case DType::IQ4_NL: return int8_matmul_typed<DType::IQ4_NL>(w, a, y);
    case DType::Q4_K: return int8_matmul_typed<DType::Q4_K>(w, a, y);
    case DType::Q5_K: return int8_matmul_typed<DType::Q5_K>(w, a, y);
    case DType::Q6_K: return int8_matmul_typed<DType::Q6_K>(w, a, y);
    default: throw std::invalid_argument(std::string("no int8-activation product for ") + dtype_name(w.type));
  }
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

static const Int8KernelTable make_int8_table(const char* name) {
  return Int8KernelTable{name, int8_matmul, int8_quantize, IV::LANES};
}
