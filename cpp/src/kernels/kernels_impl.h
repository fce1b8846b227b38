// The body of every kernel, written once against a small vector interface `V`.
// Each kernels_<isa>.cpp defines V for its instruction set (or as one float
// for the portable variant) and includes this file inside its own namespace,
// so the same loops compile to AVX-512, AVX2+FMA or scalar code.
//
// V provides: type R; int W (lanes); zero(); load(const float*); loadw(const T*)
// for T in float, F16, BF16; fma(a, b, acc); sum(R); set1(float); mul(a, b); store(float*, R);
// and the widening of packed quants: cvt_i8, cvt_bits, cvt_nibble,
// lookup_nibbles, nibbles_minus8, nibbles_fifth_bit (see kernels_avx2.cpp for what each returns).

// Standard headers are included by kernels_common.h before the namespace opens.

static inline float to_f32(float v) { return v; }
static inline float to_f32(F16 v) { return f16_to_f32(v.bits); }
static inline float to_f32(BF16 v) { return bf16_to_f32(v.bits); }

// a * b + c in one rounding where the variant has FMA, else two: written out, because the
// compiler would otherwise fuse `c += a * b` in some register tiles and not in others, and a
// row's result would then depend on how many tokens shared its tile.
static inline float mul_add(float a, float b, float c) {
#ifdef __FMA__
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// Working memory of the calling thread that keeps its size between calls, so that a
// product or an attention call allocates nothing once warm. One buffer per use:
enum ScratchSlot { SCRATCH_PACKED, SCRATCH_WIDENED, SCRATCH_SCORES, SCRATCH_XSUM, SCRATCH_SLOTS };
static inline float* thread_scratch(ScratchSlot slot, size_t count) {
  static thread_local std::vector<float> buffers[SCRATCH_SLOTS];
  std::vector<float>& b = buffers[slot];
  if (b.size() < count) b.resize(count);
  return b.data();
}

// Decode-sized products ask for weight rows this far ahead: the hardware
// prefetchers alone leave too few loads in flight to fill DRAM's pipe.
// At least this many bytes ahead, too: short quantized rows need more rows in
// flight (12 KiB measured best for Q4_0 rows of 768 values, 1.3x faster decode
// than 8 rows ahead; 32 KiB was slower).
constexpr int PREFETCH_ROWS = 8;
constexpr size_t PREFETCH_BYTES = 12288;
static inline size_t prefetch_ahead(size_t row_bytes) {
  return std::max<size_t>(PREFETCH_ROWS * row_bytes, PREFETCH_BYTES);
}

// R rows of w times C vectors of x, all K columns: the register tile of the product.
template <class T, int R, int C>
static inline void micro_tile(const T* w, size_t ldw, const float* x, size_t ldx, int K,
                              float* y, size_t ldy) {
  typename V::R acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = V::zero();
  const size_t ahead = prefetch_ahead(ldw * sizeof(T)) / sizeof(T);
  int k = 0;
  for (; k + V::W <= K; k += V::W) {
    typename V::R xv[C];
    for (int c = 0; c < C; ++c) xv[c] = V::load(x + c * ldx + k);
    for (int r = 0; r < R; ++r) {
      // Half-precision rows: prefetching ahead measured faster; f32 rows measured slower with it.
      if constexpr (C == 1 && sizeof(T) == 2) __builtin_prefetch(w + r * ldw + ahead + k);
      typename V::R wv = V::loadw(w + r * ldw + k);
      for (int c = 0; c < C; ++c) acc[r][c] = V::fma(wv, xv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = V::sum(acc[r][c]);
      for (int kk = k; kk < K; ++kk) s = mul_add(to_f32(w[r * ldw + kk]), x[c * ldx + kk], s);
      y[c * ldy + r] = s;
    }
}

// ---- Matrix-vector products (decode: a few tokens) ---------------------------
// One block of weight rows [r0, r1) for all n tokens, streaming its weights once while
// the few token vectors stay in L1: register tiles of R rows x C tokens, smaller at the
// edges. `tile(Rows, Cols, r, t)` computes rows r.. for tokens t.., with Rows/Cols as
// std::integral_constant so the tile sizes stay compile-time. gemv_group (below) shares
// the blocks among the threads.
template <int R, class Tile>
static inline void gemv_block(int r0, int r1, int n, Tile tile) {
  constexpr int C = V::TILE_COLS;
  using RT = std::integral_constant<int, R>;
  using CT = std::integral_constant<int, C>;
  using One = std::integral_constant<int, 1>;
  int t = 0;
  for (; t + C <= n; t += C) {
    int r = r0;
    for (; r + R <= r1; r += R) tile(RT{}, CT{}, r, t);
    for (; r < r1; ++r) tile(One{}, CT{}, r, t);
  }
  for (; t < n; ++t) {
    int r = r0;
    for (; r + R <= r1; r += R) tile(RT{}, One{}, r, t);
    for (; r < r1; ++r) tile(One{}, One{}, r, t);
  }
}

constexpr int GEMV_ROW_BLOCK = 16;

template <class T>
static void gemv_typed(const WeightView& wv, const float* x, int n, float* y, int r0, int r1) {
  const T* w = static_cast<const T*>(wv.data);
  const size_t ldw = wv.row_bytes / sizeof(T);
  const int rows = int(wv.rows), K = int(wv.cols);
  gemv_block<V::TILE_ROWS>(r0, r1, n, [&](auto Rt, auto Ct, int r, int t) {
    micro_tile<T, decltype(Rt)::value, decltype(Ct)::value>(w + r * ldw, ldw, x + size_t(t) * K, K, K,
                                                            y + size_t(t) * rows + r, rows);
  });
}

// ---- Matrix-matrix products (prefill) ----------------------------------------
// Outer-product form: a panel of NR weight rows is widened to float32 and
// packed k-major ([K][NR]), then MR tokens at a time multiply it: per k, two
// vector loads of the panel, MR broadcasts of x, 2*MR FMAs into registers.
// Packing widens any weight type (f16, bf16, quantized blocks), so one
// microkernel serves them all, and each panel is reused by every token tile.
constexpr int NR = 2 * V::W;

template <int MR>
static inline void gemm_micro(const float* x, size_t ldx, const float* p, int K, float* out /*[MR][NR]*/) {
  typename V::R c0[MR], c1[MR];
  for (int m = 0; m < MR; ++m) c0[m] = c1[m] = V::zero();
  for (int k = 0; k < K; ++k) {
    const typename V::R b0 = V::load(p + size_t(k) * NR), b1 = V::load(p + size_t(k) * NR + V::W);
    for (int m = 0; m < MR; ++m) {
      const typename V::R a = V::set1(x[m * ldx + k]);
      c0[m] = V::fma(a, b0, c0[m]);
      c1[m] = V::fma(a, b1, c1[m]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    V::store(out + m * NR, c0[m]);
    V::store(out + m * NR + V::W, c1[m]);
  }
}

template <int MR>
static void gemm_rows(const float* x, int K, const float* p, int m_count, float* out) {
  // m_count <= MR tokens; smaller tails use smaller instantiations.
  if (m_count == MR) return gemm_micro<MR>(x, K, p, K, out);
  if constexpr (MR > 1) return gemm_rows<MR - 1>(x, K, p, m_count, out);
}

static void widen_row(const WeightView& w, int64_t r, float* out);

// Widen and transpose NR weight rows [n0, n0 + NR) into a k-major panel
// (the transpose in registers made prefill 10-35% faster than one float at a time).
static bool panel_from_row_lanes(const WeightView& wv, int n0, float* panel);

static void pack_panel(const WeightView& wv, int n0, float* panel, float* scratch) {
  // Q8_0 or Q4_0 with its row-lane copy: widened from the copy (the same floats), so that a model that has
  // handed the file's pages back never reads them again.
  if (panel_from_row_lanes(wv, n0, panel)) return;
  const int rows = int(wv.rows), K = int(wv.cols), nr = std::min(NR, rows - n0);
  // Rows as float32 (views for f32 weights, widened otherwise), then written
  // k-major with sequential stores: NR read streams, one write stream.
  const float* src[NR];
  for (int j = 0; j < NR; ++j) {
    float* row = scratch + size_t(j) * K;
    if (j >= nr) {
      std::fill(row, row + K, 0.0f);
      src[j] = row;
    } else if (wv.type == DType::F32) {
      src[j] = reinterpret_cast<const float*>(wv.row(n0 + j));
    } else {
      widen_row(wv, n0 + j, row);
      src[j] = row;
    }
  }
  // W x W blocks transposed in registers (V::transpose), the tail one k at a time.
  int k = 0;
  for (; k + V::W <= K; k += V::W)
    for (int h = 0; h < NR / V::W; ++h) {
      typename V::R r[V::W];
      for (int i = 0; i < V::W; ++i) r[i] = V::load(src[h * V::W + i] + k);
      V::transpose(r);
      for (int i = 0; i < V::W; ++i) V::store(panel + size_t(k + i) * NR + h * V::W, r[i]);
    }
  for (; k < K; ++k) {
    float* dst = panel + size_t(k) * NR;
    for (int j = 0; j < NR; ++j) dst[j] = src[j][k];
  }
}

static void gemm(const WeightView& wv, const float* x, int n, float* y) {
  const int rows = int(wv.rows), K = int(wv.cols);
  constexpr int MR = V::GEMM_MR;
  const int panels = (rows + NR - 1) / NR;
  // A group of panels shares each pass over the tokens, so x is read from
  // the outer caches once per group instead of once per panel; the group is
  // sized to stay in L2 (about 512 KiB of packed weights).
  // At least four groups per thread, so that whoever is free takes the next and the load evens out.
  const int by_cache = std::max(1, std::min(8, int((512 * 1024) / (size_t(K) * NR * 4))));
  const int group = std::max(1, std::min(by_cache, panels / (4 * get_threads())));
  const int groups = (panels + group - 1) / group;
  parallel_for(groups, 1, Split::Even, get_threads(), [&](int64_t g0, int64_t g1) {
    float* packed = thread_scratch(SCRATCH_PACKED, size_t(group) * K * NR);
    float* scratch = thread_scratch(SCRATCH_WIDENED, size_t(NR) * K);
    alignas(64) float out[MR * NR];
    for (int gi = int(g0); gi < int(g1); ++gi) {
      const int p0 = gi * group, pc = std::min(group, panels - p0);
      for (int p = 0; p < pc; ++p) pack_panel(wv, (p0 + p) * NR, packed + size_t(p) * K * NR, scratch);
      for (int t = 0; t < n; t += MR) {
        const int mc = std::min(MR, n - t);
        for (int p = 0; p < pc; ++p) {
          const int n0 = (p0 + p) * NR, nr = std::min(NR, rows - n0);
          gemm_rows<MR>(x + size_t(t) * K, K, packed + size_t(p) * K * NR, mc, out);
          for (int m = 0; m < mc; ++m)
            std::copy(out + m * NR, out + m * NR + nr, y + size_t(t + m) * rows + n0);
        }
      }
    }
  });
}

static void add_bias(const float* bias, int rows, int n, float* y) {
  if (bias)
    for (int t = 0; t < n; ++t)
      for (int r = 0; r < rows; ++r) y[size_t(t) * rows + r] += bias[r];
}

// a . b, with b's elements float32 or half precision.
template <class T>
static inline float dot(const float* a, const T* b, int n) {
  typename V::R acc = V::zero();
  int i = 0;
  for (; i + V::W <= n; i += V::W) acc = V::fma(V::load(a + i), V::loadw(b + i), acc);
  float s = V::sum(acc);
  for (; i < n; ++i) s = mul_add(a[i], to_f32(b[i]), s);
  return s;
}

// exp(x) = 2^k e^r with |r| <= ln2/2: Cephes' degree-5 polynomial for e^r, and
// k put into the exponent bits (V::clamp, V::round, V::fnma, V::times_pow2).
// The portable variant calls std::exp.
// A template so that `if constexpr` drops the branch a variant cannot compile.
template <class Vec = V>
static inline typename Vec::R vexp(typename Vec::R x) {
  if constexpr (Vec::W == 1) {
    return std::exp(x);
  } else {
    x = Vec::clamp(x, -87.33654f, 88.37626f);
    const typename Vec::R k = Vec::round(Vec::mul(x, Vec::set1(1.44269504088896341f)));
    typename Vec::R r = Vec::fnma(k, Vec::set1(0.693359375f), x);
    r = Vec::fnma(k, Vec::set1(-2.12194440e-4f), r);
    typename Vec::R p = Vec::set1(1.9875691500e-4f);
    p = Vec::fma(p, r, Vec::set1(1.3981999507e-3f));
    p = Vec::fma(p, r, Vec::set1(8.3334519073e-3f));
    p = Vec::fma(p, r, Vec::set1(4.1665795894e-2f));
    p = Vec::fma(p, r, Vec::set1(1.6666665459e-1f));
    p = Vec::fma(p, r, Vec::set1(5.0000001201e-1f));
    p = Vec::fma(p, Vec::mul(r, r), Vec::add(r, Vec::set1(1.0f)));
    return Vec::times_pow2(p, k);
  }
}

// Softmax of one row; the max is subtracted first so exp never overflows,
// and the division by T happens before it, so any T > 0 stays exact.
static inline void softmax_row(float* x, int n, float temperature) {
  if (n <= 0) return;
  const float inv_t = 1.0f / temperature;
  // Eight running maxima, not one: a single chain waits out the latency of every max in turn,
  // which made finding the maximum half the time of a decode step's attention softmax.
  constexpr int LANES = 8;
  float lane_max[LANES];
  std::fill(lane_max, lane_max + LANES, -std::numeric_limits<float>::infinity());
  int k = 0;
  for (; k + LANES <= n; k += LANES)
    for (int u = 0; u < LANES; ++u) lane_max[u] = std::max(lane_max[u], x[k + u]);
  for (; k < n; ++k) lane_max[0] = std::max(lane_max[0], x[k]);
  float m = lane_max[0];
  for (int u = 1; u < LANES; ++u) m = std::max(m, lane_max[u]);
  if (m == -std::numeric_limits<float>::infinity()) {  // every entry masked: uniform is the only sane answer
    for (int i = 0; i < n; ++i) x[i] = 1.0f / n;
    return;
  }
  const typename V::R mv = V::set1(m), iv = V::set1(inv_t);
  typename V::R acc = V::zero();
  int i = 0;
  for (; i + V::W <= n; i += V::W) {
    const typename V::R e = vexp(V::mul(V::sub(V::load(x + i), mv), iv));
    V::store(x + i, e);
    acc = V::add(acc, e);
  }
  double s = V::sum(acc);
  for (; i < n; ++i) {
    x[i] = std::exp((x[i] - m) * inv_t);
    s += x[i];
  }
  const typename V::R inv = V::set1(float(1.0 / s));
  i = 0;
  for (; i + V::W <= n; i += V::W) V::store(x + i, V::mul(V::load(x + i), inv));
  for (; i < n; ++i) x[i] *= float(1.0 / s);
}

static void softmax(float* x, int rows, int n, float temperature) {
  for (int r = 0; r < rows; ++r) softmax_row(x + size_t(r) * n, n, temperature);
}

// Row-wise loops (norms) spread their rows over the threads when the tensor is large (prefill).
template <class F>
static inline void for_rows(int rows, int n, F row) {
  parallel_for_if(double(rows) * n > 65536.0, rows, 1, Split::Even, [&](int64_t r0, int64_t r1) {
    for (int r = int(r0); r < int(r1); ++r) row(r);
  });
}

// Sums of f(x[i]) in double over 8 interleaved partial sums: a vector of doubles instead of
// one chain of dependent additions (their latency was the norms' whole cost).
template <class F>
static inline double double_sum(const float* x, int n, F f) {
  double part[8] = {};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += f(double(x[i + j]));
  for (; i < n; ++i) part[0] += f(double(x[i]));
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

static void rmsnorm(const float* x, const float* w, int rows, int n, float eps, float* y) {
  for_rows(rows, n, [&](int r) {
    const float* xr = x + size_t(r) * n;
    float* yr = y + size_t(r) * n;
    const double ss = double_sum(xr, n, [](double v) { return v * v; });
    const float scale = float(1.0 / std::sqrt(ss / n + eps));
    for (int i = 0; i < n; ++i) yr[i] = xr[i] * scale * w[i];
  });
}

static void layernorm(const float* x, const float* w, const float* b, int rows, int n, float eps, float* y) {
  for_rows(rows, n, [&](int r) {
    const float* xr = x + size_t(r) * n;
    float* yr = y + size_t(r) * n;
    const double mean = double_sum(xr, n, [](double v) { return v; }) / n;
    const double var = double_sum(xr, n, [mean](double v) { return (v - mean) * (v - mean); }) / n;
    const float scale = float(1.0 / std::sqrt(var + eps));
    const float mu = float(mean);
    for (int i = 0; i < n; ++i) yr[i] = (xr[i] - mu) * scale * w[i] + (b ? b[i] : 0.0f);
  });
}

// The cos and sin of every (position, frequency) of a call, remembered by the calling thread:
// the next calls of a step (k after q, then every layer) rotate by the same angles, so the
// table is computed once per step instead of twice per layer.
struct RopeAngles {
  std::vector<int> positions;
  std::vector<float> inv_freq, cs, sn;  // cs, sn: [n][half]
  float factor = 0.0f;

  bool same(int n, const int* pos, int half, const float* freq, float f) const {
    return factor == f && int(positions.size()) == n && int(inv_freq.size()) == half &&
           std::equal(pos, pos + n, positions.begin()) && std::equal(freq, freq + half, inv_freq.begin());
  }
};

static void rope(float* x, int n, int heads, int head_dim, int rotary_dim, const int* positions,
                 const float* inv_freq, float attn_factor, bool adjacent) {
  const int half = rotary_dim / 2;
  static thread_local RopeAngles angles;
  if (!angles.same(n, positions, half, inv_freq, attn_factor)) {
    angles.positions.assign(positions, positions + n);
    angles.inv_freq.assign(inv_freq, inv_freq + half);
    angles.factor = attn_factor;
    angles.cs.resize(size_t(n) * half);
    angles.sn.resize(size_t(n) * half);
    for (int t = 0; t < n; ++t)
      for (int i = 0; i < half; ++i) {
        const double a = double(positions[t]) * inv_freq[i];
        angles.cs[size_t(t) * half + i] = float(std::cos(a)) * attn_factor;
        angles.sn[size_t(t) * half + i] = float(std::sin(a)) * attn_factor;
      }
  }
  for (int t = 0; t < n; ++t) {
    const float* cs = angles.cs.data() + size_t(t) * half;
    const float* sn = angles.sn.data() + size_t(t) * half;
    for (int h = 0; h < heads; ++h) {
      float* v = x + (size_t(t) * heads + h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const int a = adjacent ? 2 * i : i, b = adjacent ? 2 * i + 1 : i + half;
        const float x0 = v[a], x1 = v[b];
        v[a] = x0 * cs[i] - x1 * sn[i];
        v[b] = x0 * sn[i] + x1 * cs[i];
      }
    }
  }
}

// Elementwise activations: vector exp (V::exp, accurate to about an ulp) over
// full vectors, the tail padded into one more vector; chunks spread over
// threads when the tensor is large (prefill).
template <class F>
static inline void map_vectors(float* x, size_t n, F f) {
  const long long chunks = (long long)((n + 4095) / 4096);
  parallel_for_if(n > 65536, chunks, 1, Split::Even, [&](int64_t c0, int64_t c1) {
   for (int64_t c = c0; c < c1; ++c) {
    const size_t begin = size_t(c) * 4096, end = std::min(n, begin + 4096);
    size_t i = begin;
    for (; i + V::W <= end; i += V::W) V::store(x + i, f(V::load(x + i)));
    if (i < end) {
      alignas(64) float tail[V::W] = {};
      std::copy(x + i, x + end, tail);
      V::store(tail, f(V::load(tail)));
      std::copy(tail, tail + (end - i), x + i);
    }
   }
  });
}

static void gelu_tanh(float* x, size_t n) {
  // 0.5 x (1 + tanh(u)), tanh(u) = 1 - 2 / (exp(2u) + 1), u = sqrt(2/pi) (x + 0.044715 x^3)
  map_vectors(x, n, [](typename V::R v) {
    const typename V::R u = V::mul(V::set1(0.7978845608028654f),
                                   V::fma(V::mul(V::set1(0.044715f), V::mul(v, v)), v, v));
    const typename V::R e = vexp(V::add(u, u));
    const typename V::R t = V::sub(V::set1(1.0f), V::div(V::set1(2.0f), V::add(e, V::set1(1.0f))));
    return V::mul(V::mul(V::set1(0.5f), v), V::add(V::set1(1.0f), t));
  });
}

static void gelu_erf(float* x, size_t n) {
  // erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), sign restored after.
  map_vectors(x, n, [](typename V::R v) {
    const typename V::R z = V::mul(v, V::set1(0.7071067811865476f));
    const typename V::R a = V::abs(z);
    const typename V::R t = V::div(V::set1(1.0f), V::fma(V::set1(0.3275911f), a, V::set1(1.0f)));
    typename V::R p = V::set1(1.061405429f);
    p = V::fma(p, t, V::set1(-1.453152027f));
    p = V::fma(p, t, V::set1(1.421413741f));
    p = V::fma(p, t, V::set1(-0.284496736f));
    p = V::fma(p, t, V::set1(0.254829592f));
    p = V::mul(p, t);
    const typename V::R erf_abs = V::sub(V::set1(1.0f), V::mul(p, vexp(V::sub(V::zero(), V::mul(a, a)))));
    const typename V::R erf = V::copysign(erf_abs, z);
    return V::mul(V::mul(V::set1(0.5f), v), V::add(V::set1(1.0f), erf));
  });
}

static void silu(float* x, size_t n) {
  map_vectors(x, n, [](typename V::R v) {
    return V::div(v, V::add(V::set1(1.0f), vexp(V::sub(V::zero(), v))));
  });
}

static void relu(float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

// Query heads that share a KV head (grouped-query attention) are taken ATTENTION_HEADS
// at a time: every block of keys and every value row is read once for all of them, while
// the arithmetic of each head stays that of the head alone (the same operations in the
// same order), so results do not depend on how heads are grouped. Two heads keep the
// value sums of both in registers (16 accumulators of the 32 AVX-512 registers).
constexpr int ATTENTION_HEADS = 2;

// s[h][j] = q[h] . k_j * scale for keys j < len (rows of D elements, float32 or f16), for
// H heads. W keys at a time: their partial sums stay in registers and are reduced
// together (V::sum_lanes), not one horizontal sum per key.
template <class T>
static inline void attention_scores(const float* const* q, int H, const T* k, int len, int D, float scale,
                                    float* const* s, const T* values = nullptr) {
  int j = 0;
  if (D % V::W == 0)
    for (; j + V::W <= len; j += V::W) {
      if (values) {
        const char* rows = reinterpret_cast<const char*>(values + size_t(j) * D);
        for (size_t o = 0; o < size_t(V::W) * D * sizeof(T); o += 64) __builtin_prefetch(rows + o, 0, 2);
      }
      for (int h = 0; h < H; ++h) {  // the block of keys stays in L1 for the next head
        typename V::R part[V::W];
        for (int u = 0; u < V::W; ++u) part[u] = V::zero();
        for (int d = 0; d < D; d += V::W) {
          const typename V::R qv = V::load(q[h] + d);
          for (int u = 0; u < V::W; ++u) part[u] = V::fma(qv, V::loadw(k + size_t(j + u) * D + d), part[u]);
        }
        V::store(s[h] + j, V::mul(V::sum_lanes(part), V::set1(scale)));
      }
    }
  for (; j < len; ++j)
    for (int h = 0; h < H; ++h) s[h][j] = dot(q[h], k + size_t(j) * D, D) * scale;
}

// z[h][d .. d + CH * W) = sum_j p[h][j] v_j[d ..] for H heads: CH vectors of each z stay in
// registers across all keys, with even and odd keys in separate chains, and each value vector is
// loaded once for all the heads. CH is a compile-time count, so the key loop carries no tests of it.
template <int H, int CH, class T>
static inline void attention_mix_columns(const float* const* p, const T* v, int len, int D, int d, float* const* z,
                                         const T* ahead, int ahead_rows) {
  typename V::R a[H][CH], b[H][CH];
  for (int h = 0; h < H; ++h)
    for (int c = 0; c < CH; ++c) a[h][c] = b[h][c] = V::zero();
  int j = 0;
  for (; j + 2 <= len; j += 2) {
    if (j + 2 <= ahead_rows) {  // two rows of the keys asked for ahead per two values read
      const char* rows = reinterpret_cast<const char*>(ahead + size_t(j) * D);
      for (size_t o = 0; o < 2 * size_t(D) * sizeof(T); o += 64) __builtin_prefetch(rows + o, 0, 2);
    }
    typename V::R p0[H], p1[H];
    for (int h = 0; h < H; ++h) {
      p0[h] = V::set1(p[h][j]);
      p1[h] = V::set1(p[h][j + 1]);
    }
    const T* v0 = v + size_t(j) * D + d;
    for (int c = 0; c < CH; ++c) {
      const typename V::R w0 = V::loadw(v0 + c * V::W), w1 = V::loadw(v0 + D + c * V::W);
      for (int h = 0; h < H; ++h) {
        a[h][c] = V::fma(p0[h], w0, a[h][c]);
        b[h][c] = V::fma(p1[h], w1, b[h][c]);
      }
    }
  }
  if (j < len)
    for (int c = 0; c < CH; ++c) {
      const typename V::R w0 = V::loadw(v + size_t(j) * D + d + c * V::W);
      for (int h = 0; h < H; ++h) a[h][c] = V::fma(V::set1(p[h][j]), w0, a[h][c]);
    }
  for (int h = 0; h < H; ++h)
    for (int c = 0; c < CH; ++c) V::store(z[h] + d + c * V::W, V::add(a[h][c], b[h][c]));
}

// z[h] = sum_j p[h][j] v_j over rows of D elements, for H heads: up to 4 vectors of each z at a
// time (16 accumulators for two heads, of the 32 AVX-512 registers), the rest one element at a time.
template <int H, class T>
static inline void attention_mix(const float* const* p, const T* v, int len, int D, float* const* z,
                                 const T* ahead = nullptr, int ahead_rows = 0) {
  constexpr int CH = 4;
  const int vec_end = D - D % V::W;
  for (int d = 0; d < vec_end; d += CH * V::W) {
    const int a = d == 0 ? ahead_rows : 0;  // (once per key)
    switch (std::min(CH, (vec_end - d) / V::W)) {
      case 4: attention_mix_columns<H, 4>(p, v, len, D, d, z, ahead, a); break;
      case 3: attention_mix_columns<H, 3>(p, v, len, D, d, z, ahead, a); break;
      case 2: attention_mix_columns<H, 2>(p, v, len, D, d, z, ahead, a); break;
      default: attention_mix_columns<H, 1>(p, v, len, D, d, z, ahead, a); break;
    }
  }
  for (int h = 0; h < H; ++h)
    for (int d = vec_end; d < D; ++d) {
      float acc = 0.0f;
      for (int j = 0; j < len; ++j) acc = mul_add(p[h][j], to_f32(v[size_t(j) * D + d]), acc);
      z[h][d] = acc;
    }
}

template <class T>
static void attention_typed(const float* q, const T* k, const T* v, const AttentionShape& a, float* z,
                            const AttentionCapture* capture) {
  const int n = a.n, pos0 = a.pos0, n_heads = a.n_heads, head_dim = a.head_dim, cap = a.cap;
  const int ctx = pos0 + n;
  const int group = n_heads / a.n_kv;
  const int chunks = (group + ATTENTION_HEADS - 1) / ATTENTION_HEADS;  // per KV head
  const size_t qstride = size_t(n_heads) * head_dim;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // One item per (query, KV head, chunk of its query heads), the last queries (the longest
  // causal rows) handed out first, so that the short ones even out the finish; the chunks of
  // one KV head are consecutive items. Each item's arithmetic is the same whatever the order.
  const bool parallel = attention_work(n, n_heads, ctx, head_dim) > ATTENTION_PARALLEL_WORK;
  const int64_t per_query = int64_t(a.n_kv) * chunks;
  // One query (decode): one contiguous run of items per thread, so that the chunks of a KV head
  // mostly run on one thread and its keys and values come from memory once, not once per thread
  // that claimed one of its chunks (decode at 1024 positions 1.14-1.17x, SmolLM2 shape, 2 threads).
  const int threads = get_threads();
  const int64_t grain = n == 1 ? (per_query + threads - 1) / threads : 1;
  // Several queries (a prompt): items go in blocks of up to 128 queries, and within a block KV head
  // by KV head, so that a thread's run of items reads one head's keys and values for many queries
  // while they are still in its cache (prefill of 2000 tokens 1.03-1.08x; no change at 128-512).
  const int qb = n == 1 ? 1 : 128;
  parallel_for_if(parallel, int64_t(n) * per_query, grain, Split::Even, [&](int64_t item0, int64_t item1) {
    float* scores = thread_scratch(SCRATCH_SCORES, size_t(ATTENTION_HEADS) * ctx);
    for (int64_t item = item0; item < item1; ++item) {
      int i, g, chunk;
      if (qb > 1) {
        const int64_t block = item / (int64_t(qb) * per_query), r = item % (int64_t(qb) * per_query);
        const int size = int(std::min<int64_t>(qb, n - block * qb));
        g = int(r / (int64_t(chunks) * size));
        chunk = int(r / size % chunks);
        i = n - 1 - int(block * qb + r % size);
      } else {
        i = n - 1 - int(item / per_query);
        g = int(item % per_query / chunks);
        chunk = int(item % chunks);
      }
      const int h0 = g * group + chunk * ATTENTION_HEADS;
      const int H = std::min(ATTENTION_HEADS, (g + 1) * group - h0);
      const int end = pos0 + i + 1;  // causal: keys up to and including this position
      const int first = a.window > 0 ? std::max(0, end - a.window) : 0;
      const int len = end - first;
      const float* qv[ATTENTION_HEADS];
      float* s[ATTENTION_HEADS];
      float* zv[ATTENTION_HEADS];
      for (int h = 0; h < H; ++h) {
        qv[h] = q + i * qstride + size_t(h0 + h) * head_dim;
        s[h] = scores + size_t(h) * ctx;
        zv[h] = z + i * qstride + size_t(h0 + h) * head_dim;
      }
      const T* kh = k + (size_t(g) * cap + first) * head_dim;
      const T* vh = v + (size_t(g) * cap + first) * head_dim;
      // Decode (one query): the first chunk of a KV head asks for its values while it reads the keys,
      // and then, one row per value row it reads, for the keys this thread reads next: the next KV
      // head's if the same thread takes it, or after the last one the keys of the caller's next call.
      // Memory stays busy while the thread computes (a 16-sequence decode step at 200-600 positions
      // 1.04-1.07x faster on an Intel Xeon). Prompts read each key for many queries from cache.
      const bool streams = n == 1 && chunk == 0;
      attention_scores(qv, H, kh, len, head_dim, a.scale, s, streams ? vh : nullptr);
      for (int h = 0; h < H; ++h) {
        float* sh = s[h];
        if (a.softcap > 0.0f)
          for (int j = 0; j < len; ++j) sh[j] = a.softcap * std::tanh(sh[j] / a.softcap);
        const size_t crow = (size_t(i) * n_heads + h0 + h) * ctx;
        if (capture && capture->scores) {
          std::fill(capture->scores + crow, capture->scores + crow + first, neg_inf);
          std::copy(sh, sh + len, capture->scores + crow + first);
          std::fill(capture->scores + crow + end, capture->scores + crow + ctx, neg_inf);
        }
        softmax_row(sh, len, 1.0f);
        if (capture && capture->pattern) {
          std::fill(capture->pattern + crow, capture->pattern + crow + first, 0.0f);
          std::copy(sh, sh + len, capture->pattern + crow + first);
          std::fill(capture->pattern + crow + end, capture->pattern + crow + ctx, 0.0f);
        }
      }
      static_assert(ATTENTION_HEADS == 2, "the mix below is instantiated for one and two heads");
      const T* ahead = nullptr;
      int ahead_rows = 0;
      if (streams && g + 1 < a.n_kv && int64_t(g + 1) * chunks < item1) {
        ahead = k + (size_t(g + 1) * cap + first) * head_dim;
        ahead_rows = len;
      } else if (streams && g + 1 == a.n_kv && item1 == per_query && a.next_keys) {
        ahead = static_cast<const T*>(a.next_keys);
        ahead_rows = a.next_rows;
      }
      if (H == 2)
        attention_mix<2>(s, vh, len, head_dim, zv, ahead, ahead_rows);
      else
        attention_mix<1>(s, vh, len, head_dim, zv, ahead, ahead_rows);
    }
  });
}

static void attention(const float* q, const void* k, const void* v, DType kv_type, const AttentionShape& a, float* z,
                      const AttentionCapture* capture) {
  if (kv_type == DType::F16)
    return attention_typed(q, static_cast<const F16*>(k), static_cast<const F16*>(v), a, z, capture);
  if (kv_type != DType::F32) throw std::invalid_argument("attention reads a float32 or f16 cache");
  attention_typed(q, static_cast<const float*>(k), static_cast<const float*>(v), a, z, capture);
}

// ---- Block-quantized weights (GGML layouts) ---------------------------------
// Decode products widen each block's quants in registers (below, per type) and
// never widen a matrix as a whole; every block is read from memory once per
// product. The deq_* routines widen whole rows, for GEMM panels and lookups.

static inline float half_at(const uint8_t* p) { return V::half(p); }

static inline void deq_q8_0(const uint8_t* __restrict b, float* __restrict y) {  // d:f16, qs:int8[32]
  const float d = half_at(b);
  const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
  for (int i = 0; i < 32; ++i) y[i] = d * float(q[i]);
}

static inline void deq_q4_0(const uint8_t* __restrict b, float* __restrict y) {  // d:f16, qs:u8[16], low nibbles first
  const float d = half_at(b);
  const uint8_t* q = b + 2;
  for (int i = 0; i < 16; ++i) {
    y[i] = d * float(int(q[i] & 0xF) - 8);
    y[i + 16] = d * float(int(q[i] >> 4) - 8);
  }
}

static inline uint32_t u32_at(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

static inline void deq_q4_1(const uint8_t* __restrict b, float* __restrict y) {  // d, m: f16; qs[16]; x = d*q + m
  const float d = half_at(b), m = half_at(b + 2);
  const uint8_t* q = b + 4;
  for (int i = 0; i < 16; ++i) {
    y[i] = d * float(q[i] & 0xF) + m;
    y[i + 16] = d * float(q[i] >> 4) + m;
  }
}

// Q5_0 / Q5_1: a nibble plus one high bit per value (bit i of the 32-bit qh for value i);
// Q5_0 is d * (q - 16), Q5_1 is d * q + m.
template <bool WITH_MIN>
static inline void deq_q5(const uint8_t* __restrict b, float* __restrict y) {
  constexpr int QH = WITH_MIN ? 4 : 2;
  const float d = half_at(b), m = WITH_MIN ? half_at(b + 2) : 0.0f;
  const uint32_t qh = u32_at(b + QH);
  const uint8_t* q = b + QH + 4;
  constexpr int offset = WITH_MIN ? 0 : 16;
  for (int i = 0; i < 16; ++i) {
    const int q0 = int((q[i] & 0xF) | (((qh >> i) & 1) << 4)) - offset;
    const int q1 = int((q[i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) - offset;
    y[i] = d * float(q0) + m;
    y[i + 16] = d * float(q1) + m;
  }
}

// IQ4_NL: x = d * IQ4_NL_LEVELS[nibble] (block_formats.h).
static inline void deq_iq4_nl(const uint8_t* __restrict b, float* __restrict y) {  // d: f16; qs[16]
  const float d = half_at(b);
  const uint8_t* q = b + 2;
  for (int i = 0; i < 16; ++i) {
    y[i] = d * float(IQ4_NL_LEVELS[q[i] & 0xF]);
    y[i + 16] = d * float(IQ4_NL_LEVELS[q[i] >> 4]);
  }
}

// Q4_K: d, dmin (f16), scales[12], qs[128]. Q5_K: the same with qh[32] before
// qs, whose byte l holds the fifth bit of value l of each of the eight 32-value
// sub-blocks (bit s for sub-block s).
template <bool Q5>
static inline void deq_k_quant(const uint8_t* __restrict b, float* __restrict y) {
  const float d = half_at(b), dmin = half_at(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* q = b + (Q5 ? 48 : 16);
  for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
    int sc, m;
    scale_min_k4(is, scales, sc, m);
    const float d1 = d * sc, m1 = dmin * m;
    scale_min_k4(is + 1, scales, sc, m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) {
      const int fifth = Q5 ? ((qh[l] >> is) & 1) << 4 : 0;
      y[j + l] = d1 * float((q[l] & 0xF) | fifth) - m1;
    }
    for (int l = 0; l < 32; ++l) {
      const int fifth = Q5 ? ((qh[l] >> (is + 1)) & 1) << 4 : 0;
      y[j + 32 + l] = d2 * float((q[l] >> 4) | fifth) - m2;
    }
  }
}

static inline void deq_q6_k(const uint8_t* __restrict b, float* __restrict y) {  // ql[128], qh[64], scales:int8[16], d:f16
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half_at(b + 208);
  // Each run of 16 outputs shares one scale: four separate loops keep them vectorizable.
  for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8)
    for (int h = 0; h < 2; ++h) {
      const int o = h * 16;
      const float s0 = d * sc[h], s1 = d * sc[h + 2], s2 = d * sc[h + 4], s3 = d * sc[h + 6];
      for (int l = o; l < o + 16; ++l) y[n + l] = s0 * float(int((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32);
      for (int l = o; l < o + 16; ++l) y[n + 32 + l] = s1 * float(int((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
      for (int l = o; l < o + 16; ++l) y[n + 64 + l] = s2 * float(int((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
      for (int l = o; l < o + 16; ++l) y[n + 96 + l] = s3 * float(int((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
    }
}


// Sums of x over each 32-value run, per token: the part of a product that a
// block's offset (Q4_1, Q5_1 min; Q4_K, Q5_K dmin * min) multiplies. Computed
// once per product and shared by every row.
static const float* sums_of_32(const float* x, int n, int K) {
  const int nsub = K / 32;
  float* xsum = thread_scratch(SCRATCH_XSUM, size_t(n) * nsub);
  for (int t = 0; t < n; ++t)
    for (int sb = 0; sb < nsub; ++sb) {
      float acc = 0.0f;
      for (int i = 0; i < 32; ++i) acc += x[size_t(t) * K + size_t(sb) * 32 + i];
      xsum[size_t(t) * nsub + sb] = acc;
    }
  return xsum;
}

// Values k..k+W-1 (lo) and 16+k..16+k+W-1 (hi), k < 16, of a 32-value block
// whose byte j holds value j in its low nibble and j + 16 in its high one,
// before the block's scale (and offset) apply.
template <DType T>
static inline void widen_halves(const uint8_t* blk, int k, typename V::R& lo, typename V::R& hi) {
  if constexpr (T == DType::Q4_0) {
    V::nibbles_minus8(blk + 2 + k, lo, hi);
  } else if constexpr (T == DType::Q4_1) {
    lo = V::cvt_nibble(blk + 4 + k, 0);
    hi = V::cvt_nibble(blk + 4 + k, 4);
  } else if constexpr (T == DType::Q5_0 || T == DType::Q5_1) {
    constexpr int QH = T == DType::Q5_1 ? 4 : 2;
    V::template nibbles_fifth_bit<T == DType::Q5_0>(blk + QH + 4 + k, u32_at(blk + QH) >> k, lo, hi);
  } else {
    static_assert(T == DType::IQ4_NL, "not a 32-value nibble type");
    lo = V::lookup_nibbles(blk + 2 + k, 0, IQ4_NL_LEVELS);
    hi = V::lookup_nibbles(blk + 2 + k, 4, IQ4_NL_LEVELS);
  }
}

// The 32-value block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL) skip any
// buffer: quants are widened in registers (Q8_0's scaled by their block's d
// once for all C tokens and multiplied by x straight into the accumulators;
// the nibble types' summed per block and scaled per token), and the offset of
// the types that have one needs only the block's sum of x. R rows
// at a time give R * C independent accumulation chains and share each x load
// through L1. A token's arithmetic does not depend on C or R, so a row's result
// is the same whether it is computed alone or beside others.
template <DType T, int R, int C>
static inline void q_block_tile(const uint8_t* row0, size_t row_bytes, int K, const float* x, size_t ldx,
                                const float* xsum, size_t lds, float* y, size_t ldy) {
  constexpr int BYTES = weight_type(T).bytes;
  constexpr bool WITH_MIN = T == DType::Q4_1 || T == DType::Q5_1;
  typename V::R acc[R][C];
  float offset[R][C] = {};
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = V::zero();
  const size_t ahead = prefetch_ahead(row_bytes);
  for (int b = 0; b < K / 32; ++b) {
    const float* xb = x + size_t(b) * 32;
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = row0 + r * row_bytes + size_t(b) * BYTES;
      __builtin_prefetch(blk + ahead);
      __builtin_prefetch(blk + ahead + 64);
      const typename V::R d = V::set1(V::half(blk));
      if constexpr (T == DType::Q8_0) {
        const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
        for (int k = 0; k < 32; k += V::W) {
          const typename V::R w = V::mul(V::cvt_i8(q + k), d);
          for (int c = 0; c < C; ++c) acc[r][c] = V::fma(w, V::load(xb + c * ldx + k), acc[r][c]);
        }
      } else {
        // Nibble types keep one sum per block, scaled once per token: their single-token decode
        // is bound by the widening, which the extra multiplications above would slow (4 %).
        typename V::R part[C];
        for (int c = 0; c < C; ++c) part[c] = V::zero();
        for (int k = 0; k < 16; k += V::W) {
          typename V::R lo, hi;
          widen_halves<T>(blk, k, lo, hi);
          for (int c = 0; c < C; ++c) {
            part[c] = V::fma(lo, V::load(xb + c * ldx + k), part[c]);
            part[c] = V::fma(hi, V::load(xb + c * ldx + 16 + k), part[c]);
          }
        }
        for (int c = 0; c < C; ++c) acc[r][c] = V::fma(d, part[c], acc[r][c]);
      }
      if constexpr (WITH_MIN) {
        const float m = V::half(blk + 2);
        for (int c = 0; c < C; ++c) offset[r][c] = mul_add(m, xsum[c * lds + b], offset[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[c * ldy + r] = V::sum(acc[r][c]) + offset[r][c];
}

template <DType T>
static void gemv_q_blocks(const WeightView& wv, const float* x, const float* xsum, int n, float* y, int r0, int r1) {
  const int rows = int(wv.rows), K = int(wv.cols), nsub = K / 32;
  constexpr bool WITH_MIN = T == DType::Q4_1 || T == DType::Q5_1;
  gemv_block<4>(r0, r1, n, [&](auto Rt, auto Ct, int r, int t) {
    q_block_tile<T, decltype(Rt)::value, decltype(Ct)::value>(wv.row(r), wv.row_bytes, K, x + size_t(t) * K, K,
                                                              WITH_MIN ? xsum + size_t(t) * nsub : nullptr, nsub,
                                                              y + size_t(t) * rows + r, rows);
  });
}

// Q4_K and Q5_K (the bodies of the common Q4_K_M and Q5_K_M files): each
// 32-value sub-block is d*sc*q - dmin*m. The q part is multiplied in
// registers (Q5_K adding its fifth bit); the min part needs only the
// sub-block's sum of x (sums_of_32).
template <DType T, int R, int C>
static inline void k_quant_tile(const uint8_t* row0, size_t row_bytes, int K, const float* x, size_t ldx,
                             const float* xsum, size_t lds, float* y, size_t ldy) {
  constexpr bool Q5 = T == DType::Q5_K;
  constexpr int BYTES = weight_type(T).bytes;
  const typename V::R sixteen = V::set1(16.0f);
  typename V::R acc[R][C];
  float corr[R][C] = {};
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = V::zero();
  const size_t ahead = prefetch_ahead(row_bytes);
  for (int b = 0; b < K / 256; ++b) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = row0 + r * row_bytes + size_t(b) * BYTES;
      for (int o = 0; o < BYTES; o += 64) __builtin_prefetch(blk + ahead + o);
      const float d = V::half(blk), dmin = V::half(blk + 2);
      const uint8_t* scales = blk + 4;
      const uint8_t* qh = blk + 16;
      const uint8_t* q = blk + (Q5 ? 48 : 16);
      for (int j = 0; j < 4; ++j) {  // 64 values: low nibbles are sub-block 2j, high ones 2j + 1
        int sc1, m1, sc2, m2;
        scale_min_k4(2 * j, scales, sc1, m1);
        scale_min_k4(2 * j + 1, scales, sc2, m2);
        const float* xb = x + size_t(b) * 256 + j * 64;
        typename V::R p1[C], p2[C];
        for (int c = 0; c < C; ++c) p1[c] = p2[c] = V::zero();
        for (int k = 0; k < 32; k += V::W) {
          typename V::R lo = V::cvt_nibble(q + j * 32 + k, 0), hi = V::cvt_nibble(q + j * 32 + k, 4);
          if constexpr (Q5) {
            lo = V::fma(V::cvt_bits(qh + k, 2 * j, 1), sixteen, lo);
            hi = V::fma(V::cvt_bits(qh + k, 2 * j + 1, 1), sixteen, hi);
          }
          for (int c = 0; c < C; ++c) {
            p1[c] = V::fma(lo, V::load(xb + c * ldx + k), p1[c]);
            p2[c] = V::fma(hi, V::load(xb + c * ldx + 32 + k), p2[c]);
          }
        }
        const typename V::R d1 = V::set1(d * sc1), d2 = V::set1(d * sc2);
        const size_t sb = size_t(b) * 8 + 2 * j;
        for (int c = 0; c < C; ++c) {
          acc[r][c] = V::fma(d2, p2[c], V::fma(d1, p1[c], acc[r][c]));
          const float mins = mul_add(float(m1), xsum[c * lds + sb], float(m2) * xsum[c * lds + sb + 1]);
          corr[r][c] = mul_add(dmin, mins, corr[r][c]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[c * ldy + r] = V::sum(acc[r][c]) - corr[r][c];
}

// Q6_K: q = low nibble | two high bits << 4, value = d * sc * (q - 32), one
// int8 scale per 16 values. Widened and scaled in registers, 16 values (or a
// vector, if shorter) at a time, so each vector sees a single scale.
template <int R, int C>
static inline void q6_k_tile(const uint8_t* row0, size_t row_bytes, int K, const float* x, size_t ldx,
                             float* y, size_t ldy) {
  typename V::R acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = V::zero();
  const typename V::R sixteen = V::set1(16.0f), thirty_two = V::set1(32.0f);
  const size_t ahead = prefetch_ahead(row_bytes);
  for (int b = 0; b < K / 256; ++b) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = row0 + r * row_bytes + size_t(b) * 210;
      for (int o = 0; o < 210; o += 64) __builtin_prefetch(blk + ahead + o);
      const float d = V::half(blk + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
      for (int h = 0; h < 2; ++h) {  // two halves of 128 values
        const uint8_t* ql = blk + h * 64;
        const uint8_t* qh = blk + 128 + h * 32;
        const float* xb = x + size_t(b) * 256 + h * 128;
        for (int l = 0; l < 32; l += V::W) {
          const int is = h * 8 + l / 16;
          // (ql byte, its shift, qh shift, output offset, scale index) for the four groups
          const typename V::R q0 = V::fma(V::cvt_bits(qh + l, 0, 3), sixteen, V::cvt_bits(ql + l, 0, 0xF));
          const typename V::R q1 = V::fma(V::cvt_bits(qh + l, 2, 3), sixteen, V::cvt_bits(ql + 32 + l, 0, 0xF));
          const typename V::R q2 = V::fma(V::cvt_bits(qh + l, 4, 3), sixteen, V::cvt_bits(ql + l, 4, 0xF));
          const typename V::R q3 = V::fma(V::cvt_bits(qh + l, 6, 3), sixteen, V::cvt_bits(ql + 32 + l, 4, 0xF));
          const typename V::R w0 = V::mul(V::sub(q0, thirty_two), V::set1(d * sc[is]));
          const typename V::R w1 = V::mul(V::sub(q1, thirty_two), V::set1(d * sc[is + 2]));
          const typename V::R w2 = V::mul(V::sub(q2, thirty_two), V::set1(d * sc[is + 4]));
          const typename V::R w3 = V::mul(V::sub(q3, thirty_two), V::set1(d * sc[is + 6]));
          for (int c = 0; c < C; ++c) {
            const float* xc = xb + c * ldx + l;
            acc[r][c] = V::fma(w0, V::load(xc), acc[r][c]);
            acc[r][c] = V::fma(w1, V::load(xc + 32), acc[r][c]);
            acc[r][c] = V::fma(w2, V::load(xc + 64), acc[r][c]);
            acc[r][c] = V::fma(w3, V::load(xc + 96), acc[r][c]);
          }
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[c * ldy + r] = V::sum(acc[r][c]);
}

static void gemv_q6_k(const WeightView& wv, const float* x, int n, float* y, int r0, int r1) {
  const int rows = int(wv.rows), K = int(wv.cols);
  gemv_block<2>(r0, r1, n, [&](auto Rt, auto Ct, int r, int t) {
    q6_k_tile<decltype(Rt)::value, decltype(Ct)::value>(wv.row(r), wv.row_bytes, K, x + size_t(t) * K, K,
                                                        y + size_t(t) * rows + r, rows);
  });
}

template <DType T>
static void gemv_k_quant(const WeightView& wv, const float* x, const float* xsum, int n, float* y, int r0, int r1) {
  const int rows = int(wv.rows), K = int(wv.cols), nsub = K / 32;
  gemv_block<2>(r0, r1, n, [&](auto Rt, auto Ct, int r, int t) {
    k_quant_tile<T, decltype(Rt)::value, decltype(Ct)::value>(wv.row(r), wv.row_bytes, K, x + size_t(t) * K, K,
                                                              xsum + size_t(t) * nsub, nsub,
                                                              y + size_t(t) * rows + r, rows);
  });
}

// ---- Q8_0 through the row-lane copy, float activations --------------------------
// The copy the int8 row-lane kernel reads (pack_q8_0_row_lanes: per 16 rows and block, 8
// vectors of [16 rows][4 bytes], each byte w + 128, and the rows' half scales) also serves
// float products of several tokens: lanes run over the 16 rows, so each widened weight vector
// (one k of every row) meets C tokens' broadcast x[t][k] with no horizontal sums, and the
// widening is shared by all C tokens instead of the 4 of a GEMV tile. A token's sum runs over k
// in order in one lane, the same for any C: a row's result does not depend on its batch here.
#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr bool HAS_FLOAT_ROW_LANES = true;

// Widening from the copy, shared by the kernel and the GEMM panels: pick(i) is the vpshufb
// control (indices within each 128-bit lane) that moves byte i of every 32-bit lane to the lane's
// low byte and zeroes the rest; row_lane_floats turns those bytes into weights, (w + 128) * d -
// 128 * d in one rounding, i.e. w * d exactly rounded, as a dequantized row has them.
static inline __m512i row_lane_pick(int i) {
  const int p = int(0x80808000u) | i;
  return _mm512_set4_epi32(p + 12, p + 8, p + 4, p);
}
static inline __m512 row_lane_floats(__m512i v, __m512i pick, __m512 d, __m512 minus_128d) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_shuffle_epi8(v, pick)), d, minus_128d);
}
static inline __m512 row_lane_scale(const uint16_t* halves) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(halves)));
}

// How far ahead the float row lanes ask for their lines: 2 KB of each group's quants (4 blocks
// of Q8_0) measured best on an Intel Xeon (1 and 4 KB were 3-10 % slower).
constexpr size_t ROW_LANE_AHEAD_BYTES = 2048;
// MAX_TOKENS of a layout whose products take the row-lane kernel at any number of tokens (in
// blocks: row_lane_token_block).
constexpr int ANY_TOKENS = std::numeric_limits<int>::max();

// What the float row-lane kernel needs of a type's copy: the bytes of a group's block,
// block_scales: the rows' d and bias of a block; SCALE_PARTS: 1, or 2 for a type whose scales change
// after 16 values (units 0-3 take part 0's, units 4-7 part 1's); FACTORED (below): factors<u>, and
// HAS_BIAS; otherwise weights<u>(block, d, bias, w): the 16 rows' weights q * d + bias for
// k = 4u + i (u = 0..7) in w[i], i = 0..3; MAX_TOKENS: up to how many tokens products take this
// kernel (above, the packed GEMM, its panels widened from the copy by weights<u>, so that results
// still do not depend on the batch). Measured with 2 threads on an Intel Xeon, bench/row_lane_copy.py: Q8_0 1.1x the GEMM
// at 48-64 tokens and even at 128 (SmolLM2-135M shapes, one thread); Q4_K and Q6_K (TinyLlama-1.1B
// shapes), while both made dequantized weights, 0.93-1.44x at 64, 0.92-1.19x at 96, 0.83-0.99x at
// 128. The FACTORED layouts (below) take every product: ANY_TOKENS.
// Unit u of a block of a copy with `BITS` bits per value (kernels.h: lane_block): Q8_0's 8
// vectors are loaded as they lie (each byte w + 128); the other types' low nibbles come from 4
// vectors, each byte holding values 4j+i (low nibble) and 16+4j+i (high nibble): one `and` gives
// units 0-3, a shift and an `and` units 4-7, so that the block's values come in order; their
// higher bits (BITS - 4 per value, unit u's at bit (BITS - 4) * (u % per) of vector u / per) are
// shifted to bit 4 and merged in one ternary-logic op.
// CLEAN = false leaves whatever the bytes held above the value's bits (one `and` less), for readers
// that look at the low BITS bits only (the permutes of table_floats).
template <int BITS, bool CLEAN = true>
static inline __m512i lane_unit(const uint8_t* block, int u) {
  if constexpr (BITS == 8) {
    return _mm512_load_si512(block + 64 * u);
  } else {
    const __m512i v = _mm512_load_si512(block + 64 * (u % 4));
    const __m512i nibble = u < 4 ? v : _mm512_srli_epi16(v, 4);
    const __m512i low = CLEAN ? _mm512_and_si512(nibble, _mm512_set1_epi8(0x0F)) : nibble;
    if constexpr (BITS == 4) {
      return low;
    } else {
      constexpr int HIGH = BITS - 4, PER = 8 / HIGH;
      const __m512i h = _mm512_load_si512(block + 256 + 64 * (u / PER));
      const int shift = 4 - HIGH * (u % PER);  // to bit 4; within each byte, as the mask keeps it
      const __m512i at4 = shift > 0 ? _mm512_slli_epi16(h, unsigned(shift))
                          : shift < 0 ? _mm512_srli_epi16(h, unsigned(-shift)) : h;
      const __m512i mask = _mm512_set1_epi8(char(((1 << HIGH) - 1) << 4));
      return _mm512_ternarylogic_epi32(at4, low, mask, 0xE4);  // the mask's bits from at4, the rest from low
    }
  }
}

// A unit's four weight vectors (k = 4u + i, i = 0..3, in w[i]) from a vector holding in byte i of
// each row's lane that row's quant, or its byte (Q8_0: w + 128): pick, convert, q * d + bias.
static inline void picked_weights(__m512i v, __m512 d, __m512 bias, __m512 (&w)[4]) {
  for (int i = 0; i < 4; ++i) w[i] = row_lane_floats(v, row_lane_pick(i), d, bias);
}

// 4- and 5-bit quants become floats by a permute from a table of 16 or 32 floats instead: vpermps
// and vpermt2ps read only the low 4 or 5 bits of each index lane, so shifting the whole lane
// brings byte i's quant down and no mask or pick is needed. That is one shift and one permute per
// 16 weights where the pick takes a shuffle and a conversion; on an Intel core all of these share
// the two ports of the FMAs, which bound the decode of these types. The tables hold the small
// integers (IQ4_NL: its levels) that a conversion would give.
struct FloatTable {
  alignas(64) float v[32];
};
constexpr FloatTable quant_floats(int offset) {  // q + offset for q = 0..31
  FloatTable t{};
  for (int q = 0; q < 32; ++q) t.v[q] = float(q + offset);
  return t;
}
inline constexpr FloatTable QUANT_FLOATS = quant_floats(0);
template <unsigned SHIFT>
static inline __m512i lanes_shifted(__m512i v) {
  if constexpr (SHIFT == 0) return v; else return _mm512_srli_epi32(v, SHIFT);
}

// 4 bits: unit U's quants are the low nibbles (U < 4) or the high nibbles (U >= 4) of vector U % 4
// (lane_unit), so byte i's quant sits at bit 8i or 8i + 4 of the lane. f[i]: table[quant].
template <int U>
static inline void nibble_floats(const uint8_t* block, __m512 table, __m512 (&f)[4]) {
  const __m512i v = _mm512_load_si512(block + 64 * (U % 4));
  constexpr unsigned BASE = U < 4 ? 0 : 4;
  f[0] = _mm512_permutexvar_ps(lanes_shifted<BASE>(v), table);
  f[1] = _mm512_permutexvar_ps(lanes_shifted<BASE + 8>(v), table);
  f[2] = _mm512_permutexvar_ps(lanes_shifted<BASE + 16>(v), table);
  f[3] = _mm512_permutexvar_ps(lanes_shifted<BASE + 24>(v), table);
}

// 5 bits: lane_unit's byte of each value, its bits 5-7 left as they come (the permute never reads
// them).
template <int U>
static inline void five_bit_floats(const uint8_t* block, __m512 low, __m512 high, __m512 (&f)[4]) {
  const __m512i q = lane_unit<5, false>(block, U);
  f[0] = _mm512_permutex2var_ps(low, q, high);
  f[1] = _mm512_permutex2var_ps(low, lanes_shifted<8>(q), high);
  f[2] = _mm512_permutex2var_ps(low, lanes_shifted<16>(q), high);
  f[3] = _mm512_permutex2var_ps(low, lanes_shifted<24>(q), high);
}

// Unit U's quants of a 4- or 5-bit copy as table[quant] (a table of 16 or 32 floats).
template <int BITS, int U>
static inline void table_floats(const uint8_t* block, const FloatTable& table, __m512 (&f)[4]) {
  static_assert(BITS == 4 || BITS == 5, "table lookups take 4 or 5 bits");
  if constexpr (BITS == 4)
    nibble_floats<U>(block, _mm512_load_ps(table.v), f);
  else
    five_bit_floats<U>(block, _mm512_load_ps(table.v), _mm512_load_ps(table.v + 16), f);
}

// The weights of unit U of a block of a copy with BITS bits per value (the 4- and 5-bit copies are
// FACTORED: the kernel never makes their weights).
template <int BITS, int U>
static inline void lane_weights(const uint8_t* block, __m512 d, __m512 bias, __m512 (&w)[4]) {
  static_assert(BITS == 6 || BITS == 8, "weights of the 6- and 8-bit copies only");
  picked_weights(lane_unit<BITS>(block, U), d, bias, w);
}

// Calls f(std::integral_constant<int, U>{}) for U = FIRST .. END - 1 in order: the units of a block
// as compile-time numbers, so that their shifts are immediates.
template <int FIRST, int END, class F>
static inline void each_unit(F&& f) {
  if constexpr (FIRST < END) {
    f(std::integral_constant<int, FIRST>{});
    each_unit<FIRST + 1, END>(f);
  }
}

// The 32-value block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; pack_q8_0_row_lanes, pack_q4_0_row_lanes,
// pack_q32): per block the rows' d and either their m (Q4_1, Q5_1: weight q * d + m) or a fixed
// OFFSET. Q8_0's weight is q * d + OFFSET * d (q * d exact), one FMA and one rounding: the
// dequantized weight, as the row widening has it.
// FACTORED (the 4- and 5-bit types; IQ4_NL and the k-quants below): the weight is d * factor (+ m
// where the type has one, HAS_BIAS), factor = q + OFFSET (or a level: factors<u>), so the kernel
// sums factor * x over the block and multiplies by d once per block (and adds m times the block's
// sum of x): per 16 weights a shift, a permute and the FMA with x, against a further FMA per
// weight for the dequantized weight, which bounded the decode of these types. Their sums differ
// from those of dequantized rows (the GEMM's panels) by rounding; so that a row's result still
// does not depend on its batch, their copies take every product (MAX_TOKENS = ANY_TOKENS, passes
// of up to 12 tokens, blocks of tokens beyond: row_lane_token_block). Q8_0 (bound by the bytes it
// reads) keeps the dequantized weight.
template <int BITS, int HALVES, int OFFSET>
struct BlockLanes {
  static constexpr size_t BLOCK_BYTES = 64 * BITS;
  static constexpr int SCALE_PARTS = 1;
  static constexpr bool FACTORED = BITS == 4 || BITS == 5;
  static constexpr bool HAS_BIAS = HALVES == 2;
  static constexpr int MAX_TOKENS = FACTORED ? ANY_TOKENS : 128;
  template <int U>
  static void weights(const uint8_t* block, __m512 d, __m512 bias, __m512 (&w)[4]) {
    lane_weights<BITS, U>(block, d, bias, w);
  }
  static constexpr FloatTable FACTORS = quant_floats(OFFSET);
  template <int U>
  static void factors(const uint8_t* block, __m512 (&f)[4]) {
    table_floats<BITS, U>(block, FACTORS, f);
  }
  static const uint8_t* quants(const WeightView& w, int64_t g) { return lane_block(w, w.row_lanes, BITS, g, 0); }
  static const uint8_t* scales(const WeightView& w, int64_t g) {
    return reinterpret_cast<const uint8_t*>(block_lane_scales(w, w.row_lanes, BITS, HALVES, g, 0));
  }
  static size_t scale_stride(const WeightView& w) { return size_t(w.cols / 32) * 32 * HALVES; }
  static void block_scales(const uint8_t* scales, int b, int /*part*/, __m512& d, __m512& bias) {
    const uint16_t* halves = reinterpret_cast<const uint16_t*>(scales) + size_t(b) * 16 * HALVES;
    d = row_lane_scale(halves);
    bias = HALVES == 2 ? row_lane_scale(halves + 16) : _mm512_mul_ps(d, _mm512_set1_ps(float(OFFSET)));
  }
  static void prefetch_scales(const uint8_t* scales, int b) {  // a line per block (d and m) or per two
    if (HALVES == 2 || b % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(scales) + size_t(b) * 32 * HALVES, _MM_HINT_T0);
  }
};
using Q8_0Lanes = BlockLanes<8, 1, -128>;
using Q4_0Lanes = BlockLanes<4, 1, -8>;
using Q4_1Lanes = BlockLanes<4, 2, 0>;
using Q5_0Lanes = BlockLanes<5, 1, -16>;
using Q5_1Lanes = BlockLanes<5, 2, 0>;
// IQ4_NL (pack_q4_0_row_lanes, as Q4_0): each nibble picks its level, the kernel's factor, from a
// table of 16 floats.
constexpr FloatTable iq4_nl_levels() {
  FloatTable t{};
  for (int q = 0; q < 16; ++q) t.v[q] = float(IQ4_NL_LEVELS[q]);
  return t;
}
inline constexpr FloatTable IQ4_NL_LEVEL_FLOATS = iq4_nl_levels();
struct IQ4_NLLanes : BlockLanes<4, 1, 0> {
  template <int U>
  static void factors(const uint8_t* block, __m512 (&f)[4]) {
    nibble_floats<U>(block, _mm512_load_ps(IQ4_NL_LEVEL_FLOATS.v), f);
  }
};

// Q4_K and Q5_K (pack_k_quant): each 32-value sub-block laid out as a Q4_0 (or, with 5 bits, Q5_0)
// block; per group and super-block of 256 values, the rows' d and dmin (halves) and their 8
// sub-blocks' 6-bit scales and mins as bytes (Q4_K_LANE_SCALE_BYTES). d * sc and dmin * m are exact
// in float; the kernel's products are factored: (d * sc) * sum(q * x) - (dmin * m) * sum(x) per
// sub-block.
template <int BITS>
struct K4Lanes {
  static constexpr size_t BLOCK_BYTES = 64 * BITS;
  static constexpr int SCALE_PARTS = 1;
  static constexpr bool FACTORED = true, HAS_BIAS = true;
  static constexpr int MAX_TOKENS = ANY_TOKENS;
  template <int U>
  static void factors(const uint8_t* block, __m512 (&f)[4]) {
    table_floats<BITS, U>(block, QUANT_FLOATS, f);
  }
  static const uint8_t* quants(const WeightView& w, int64_t g) { return lane_block(w, w.row_lanes, BITS, g, 0); }
  static const uint8_t* scales(const WeightView& w, int64_t g) {
    return k_quant_lane_scales(w, w.row_lanes, BITS, Q4_K_LANE_SCALE_BYTES, g, 0);
  }
  static size_t scale_stride(const WeightView& w) { return size_t(w.cols / 256) * Q4_K_LANE_SCALE_BYTES; }
  static void block_scales(const uint8_t* scales, int b, int /*part*/, __m512& d, __m512& bias) {
    const uint8_t* s = scales + size_t(b / 8) * Q4_K_LANE_SCALE_BYTES;
    const int j = b % 8;
    const __m512 dsup = row_lane_scale(reinterpret_cast<const uint16_t*>(s));
    const __m512 dmin = row_lane_scale(reinterpret_cast<const uint16_t*>(s + 32));
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 64 + 16 * j))));
    const __m512 mn = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 192 + 16 * j))));
    d = _mm512_mul_ps(dsup, sc);
    bias = _mm512_mul_ps(_mm512_mul_ps(dmin, mn), _mm512_set1_ps(-1.0f));
  }
  static void prefetch_scales(const uint8_t* scales, int b) {
    if (b % 8 < 5) _mm_prefetch(reinterpret_cast<const char*>(scales) + size_t(b / 8) * Q4_K_LANE_SCALE_BYTES + 64 * (b % 8), _MM_HINT_T0);
  }
};
using Q4_KLanes = K4Lanes<4>;
using Q5_KLanes = K4Lanes<5>;

// Q6_K (pack_k_quant): the 6-bit values laid out as lane_unit<6> reads them. Scales change every 16
// values (two parts per block); d * sc is exact in float, and the weight
// q * (d * sc) - 32 * (d * sc) = (q - 32) * d * sc is exact too (24 significant bits at most).
struct Q6_KLanes {
  static constexpr size_t BLOCK_BYTES = 384;
  static constexpr int SCALE_PARTS = 2;
  static constexpr bool FACTORED = false, HAS_BIAS = false;
  static constexpr int MAX_TOKENS = 64;
  template <int U>
  static void weights(const uint8_t* block, __m512 d, __m512 bias, __m512 (&w)[4]) {
    lane_weights<6, U>(block, d, bias, w);
  }
  static const uint8_t* quants(const WeightView& w, int64_t g) { return lane_block(w, w.row_lanes, 6, g, 0); }
  static const uint8_t* scales(const WeightView& w, int64_t g) {
    return k_quant_lane_scales(w, w.row_lanes, 6, Q6_K_LANE_SCALE_BYTES, g, 0);
  }
  static size_t scale_stride(const WeightView& w) { return size_t(w.cols / 256) * Q6_K_LANE_SCALE_BYTES; }
  static void block_scales(const uint8_t* scales, int b, int part, __m512& d, __m512& bias) {
    const uint8_t* s = scales + size_t(b / 8) * Q6_K_LANE_SCALE_BYTES;
    const int j = 2 * (b % 8) + part;
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 32 + 16 * j))));
    d = _mm512_mul_ps(row_lane_scale(reinterpret_cast<const uint16_t*>(s)), sc);
    bias = _mm512_mul_ps(d, _mm512_set1_ps(-32.0f));
  }
  static void prefetch_scales(const uint8_t* scales, int b) {
    if (b % 8 < 5) _mm_prefetch(reinterpret_cast<const char*>(scales) + size_t(b / 8) * Q6_K_LANE_SCALE_BYTES + 64 * (b % 8), _MM_HINT_T0);
  }
};

// R groups of 16 rows (the copy's group g at lanes + g * gstride bytes, its scales at
// scales + g * sstride) times C tokens: R * C chains of dependent FMAs, enough to cover their
// latency (decode: 4 groups x 1 token; batches: 1 group x up to 16 tokens). Each unit's
// widening (pick and convert, then (q + offset) * d in one FMA: the
// dequantized weight rounded once) is shared by the C tokens, and a token's sum runs over k in
// order in its lane. A FACTORED layout's token instead sums factor * x over each block, in order,
// and adds d times that sum to its total.
template <class L, int R, int C>
static inline void float_lanes_pass(const uint8_t* lanes, size_t gstride, const uint8_t* scales, size_t sstride,
                                    int nb, const float* x, size_t ldx, const float* xsum, float* y, size_t ldy) {
  constexpr int AHEAD = int(ROW_LANE_AHEAD_BYTES / L::BLOCK_BYTES);
  __m512 acc[R][C];
  for (int g = 0; g < R; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  // Each group's stream asks for its lines AHEAD blocks on; near the end of its rows it asks for
  // the start of the same group of the next pass (R groups on in the copy), so that no stream
  // starts cold (short rows make short streams: 18 blocks at 576 columns). Asking instead for
  // the whole next pass while reading this one ran 1.3x (576 columns) to 1.9x (2048) slower on
  // an Intel Xeon, whose cores keep few lines in flight each: most of those lines arrived too
  // early and left L1 before use.
  const auto* quant_bytes = reinterpret_cast<const char*>(lanes);
  for (int b = 0; b < nb; ++b) {
    const int ab = b + AHEAD;
    const size_t q_off = ab < nb ? size_t(ab) * L::BLOCK_BYTES : R * gstride + size_t(ab - nb) * L::BLOCK_BYTES;
    for (int g = 0; g < R; ++g) {
      for (size_t l = 0; l < L::BLOCK_BYTES; l += 64) _mm_prefetch(quant_bytes + g * gstride + q_off + l, _MM_HINT_T0);
      L::prefetch_scales(scales + (ab < nb ? g : g + R) * sstride, ab < nb ? ab : ab - nb);
    }
    const float* xb = x + size_t(b) * 32;
    if constexpr (L::FACTORED) {
      // The block's sum of factor * x for each row and token, then one FMA with the rows' d (and,
      // HAS_BIAS, one with their m and the block's sum of x: sums_of_32, xsum[token * nb + block]).
      __m512 block_sum[R][C];
      each_unit<0, 8>([&](auto unit) {
        constexpr int u = decltype(unit)::value;
        for (int g = 0; g < R; ++g) {
          __m512 f[4];
          L::template factors<u>(lanes + g * gstride + size_t(b) * L::BLOCK_BYTES, f);
          const float* xk = xb + 4 * u;
          for (int c = 0; c < C; ++c) {
            const float* xc = xk + c * ldx;
            __m512& sum = block_sum[g][c];
            sum = u == 0 ? _mm512_mul_ps(f[0], _mm512_set1_ps(xc[0]))
                         : _mm512_fmadd_ps(f[0], _mm512_set1_ps(xc[0]), sum);
            sum = _mm512_fmadd_ps(f[1], _mm512_set1_ps(xc[1]), sum);
            sum = _mm512_fmadd_ps(f[2], _mm512_set1_ps(xc[2]), sum);
            sum = _mm512_fmadd_ps(f[3], _mm512_set1_ps(xc[3]), sum);
          }
        }
      });
      for (int g = 0; g < R; ++g) {
        __m512 d, bias;
        L::block_scales(scales + g * sstride, b, 0, d, bias);
        for (int c = 0; c < C; ++c) {
          acc[g][c] = _mm512_fmadd_ps(d, block_sum[g][c], acc[g][c]);
          if constexpr (L::HAS_BIAS)  // + m * (the block's sum of x)
            acc[g][c] = _mm512_fmadd_ps(bias, _mm512_set1_ps(xsum[size_t(c) * nb + b]), acc[g][c]);
        }
      }
    } else {
      __m512 d[R], m[R];
      each_unit<0, 8>([&](auto unit) {
        constexpr int u = decltype(unit)::value;
        if constexpr (u % (8 / L::SCALE_PARTS) == 0)  // a block's scales, or a part's
          for (int g = 0; g < R; ++g) L::block_scales(scales + g * sstride, b, u * L::SCALE_PARTS / 8, d[g], m[g]);
        for (int g = 0; g < R; ++g) {
          __m512 w[4];
          L::template weights<u>(lanes + g * gstride + size_t(b) * L::BLOCK_BYTES, d[g], m[g], w);
          const float* xk = xb + 4 * u;
          for (int c = 0; c < C; ++c) {
            const float* xc = xk + c * ldx;
            acc[g][c] = _mm512_fmadd_ps(w[0], _mm512_set1_ps(xc[0]), acc[g][c]);
            acc[g][c] = _mm512_fmadd_ps(w[1], _mm512_set1_ps(xc[1]), acc[g][c]);
            acc[g][c] = _mm512_fmadd_ps(w[2], _mm512_set1_ps(xc[2]), acc[g][c]);
            acc[g][c] = _mm512_fmadd_ps(w[3], _mm512_set1_ps(xc[3]), acc[g][c]);
          }
        }
      });
    }
  }
  for (int g = 0; g < R; ++g)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(y + c * ldy + 16 * g, acc[g][c]);
}

// Tokens per pass of one group: 16, or 12 where each token also keeps a block sum (FACTORED: 24
// accumulators, within the 32 registers with the factors, the table and d).
template <class L>
constexpr int max_pass_tokens() {
  return L::FACTORED ? 12 : 16;
}

using LanesPass = void (*)(const uint8_t*, size_t, const uint8_t*, size_t, int, const float*, size_t, const float*,
                           float*, size_t);
// One group's pass of C tokens, or none past the layout's max_pass_tokens (never called).
template <class L, int C>
constexpr LanesPass pass_of() {
  if constexpr (C <= max_pass_tokens<L>()) return float_lanes_pass<L, 1, C>; else return nullptr;
}

// R groups of rows for all n tokens, in passes.
template <class L, int R>
static void float_lanes_groups(const uint8_t* lanes, size_t gstride, const uint8_t* scales, size_t sstride,
                               int nb, const float* x, const float* xsum, int K, int n, float* y, size_t ldy) {
  int t = 0;
  auto sums_at = [&](int token) { return xsum ? xsum + size_t(token) * nb : nullptr; };
  if constexpr (R == 1) {
    // Passes of at most 16 (or 12: max_pass_tokens) tokens, as even as they come (33 tokens:
    // 11 + 11 + 11, not 16 + 16 + 1), so that every pass has 8 or more chains to cover the FMA latency.
    static constexpr LanesPass by_tokens[17] = {
        nullptr, pass_of<L, 1>(), pass_of<L, 2>(), pass_of<L, 3>(), pass_of<L, 4>(), pass_of<L, 5>(),
        pass_of<L, 6>(), pass_of<L, 7>(), pass_of<L, 8>(), pass_of<L, 9>(), pass_of<L, 10>(), pass_of<L, 11>(),
        pass_of<L, 12>(), pass_of<L, 13>(), pass_of<L, 14>(), pass_of<L, 15>(), pass_of<L, 16>()};
    const int passes = (n + max_pass_tokens<L>() - 1) / max_pass_tokens<L>();
    for (int p = 0; p < passes; ++p) {
      const int c = (n - t) / (passes - p);  // the rest shared evenly by the passes left
      by_tokens[c](lanes, gstride, scales, sstride, nb, x + size_t(t) * K, K, sums_at(t), y + t * ldy, ldy);
      t += c;
    }
  } else {
    if constexpr (R <= 2)
      for (; t + 4 <= n; t += 4)
        float_lanes_pass<L, R, 4>(lanes, gstride, scales, sstride, nb, x + size_t(t) * K, K, sums_at(t), y + t * ldy,
                                  ldy);
    for (; t + 2 <= n; t += 2)
      float_lanes_pass<L, R, 2>(lanes, gstride, scales, sstride, nb, x + size_t(t) * K, K, sums_at(t), y + t * ldy,
                                ldy);
  }
  for (; t < n; ++t)
    float_lanes_pass<L, R, 1>(lanes, gstride, scales, sstride, nb, x + size_t(t) * K, K, sums_at(t), y + t * ldy, ldy);
}

// Rows [r0, r1) of w (whole groups of 16; w has its row-lane copy) for n tokens: a few tokens
// take up to 4 groups at a time (2 from 4 tokens), 8 tokens or more one group at a time.
template <class L>
static void float_row_lanes(const WeightView& w, const float* x, const float* xsum, int n, float* y, int r0, int r1) {
  const int K = int(w.cols), nb = K / 32;
  const size_t gstride = size_t(nb) * L::BLOCK_BYTES, sstride = L::scale_stride(w), ldy = size_t(w.rows);
  for (int r = r0; r < r1;) {
    const int left = (r1 - r) / 16, g = r / 16;
    const uint8_t* lanes = L::quants(w, g);
    const uint8_t* scales = L::scales(w, g);
    const int R = n >= 8 ? 1 : std::min(left, n >= 4 ? 2 : 4);
    switch (R) {
      case 4: float_lanes_groups<L, 4>(lanes, gstride, scales, sstride, nb, x, xsum, K, n, y + r, ldy); break;
      case 3: float_lanes_groups<L, 3>(lanes, gstride, scales, sstride, nb, x, xsum, K, n, y + r, ldy); break;
      case 2: float_lanes_groups<L, 2>(lanes, gstride, scales, sstride, nb, x, xsum, K, n, y + r, ldy); break;
      default: float_lanes_groups<L, 1>(lanes, gstride, scales, sstride, nb, x, xsum, K, n, y + r, ldy); break;
    }
    r += 16 * R;
  }
}

// The layout struct of each type with a row-lane copy (row_lane_bytes), handed to f as a value;
// false for other types.
template <class F>
static bool with_row_lane_layout(DType t, F&& f) {
  switch (t) {
    case DType::Q8_0: f(Q8_0Lanes{}); return true;
    case DType::Q4_0: f(Q4_0Lanes{}); return true;
    case DType::Q4_1: f(Q4_1Lanes{}); return true;
    case DType::Q5_0: f(Q5_0Lanes{}); return true;
    case DType::Q5_1: f(Q5_1Lanes{}); return true;
    case DType::IQ4_NL: f(IQ4_NLLanes{}); return true;
    case DType::Q4_K: f(Q4_KLanes{}); return true;
    case DType::Q5_K: f(Q5_KLanes{}); return true;
    case DType::Q6_K: f(Q6_KLanes{}); return true;
    default: return false;
  }
}

static void float_row_lanes_of(const WeightView& w, const float* x, const float* xsum, int n, float* y, int r0,
                               int r1) {
  with_row_lane_layout(w.type, [&](auto layout) { float_row_lanes<decltype(layout)>(w, x, xsum, n, y, r0, r1); });
}

// A GEMM panel (NR = 32 rows from n0, k-major) widened from the row-lane copy: per block and
// 4-byte group, the k-positions of 16 rows come out as the float kernels make them (the
// dequantized weight rounded once).
template <class L>
static void panel_from_lanes(const WeightView& wv, int n0, float* panel) {
  const int nb = int(wv.cols) / 32;
  for (int h = 0; h < 2; ++h) {
    const int g = n0 / 16 + h;
    const uint8_t* lanes = L::quants(wv, g);
    const uint8_t* scales = L::scales(wv, g);
    for (int b = 0; b < nb; ++b) {
      __m512 d, m;
      each_unit<0, 8>([&](auto unit) {
        constexpr int u = decltype(unit)::value;
        if constexpr (u % (8 / L::SCALE_PARTS) == 0) L::block_scales(scales, b, u * L::SCALE_PARTS / 8, d, m);
        __m512 w[4];
        L::template weights<u>(lanes + size_t(b) * L::BLOCK_BYTES, d, m, w);
        for (int i = 0; i < 4; ++i) _mm512_storeu_ps(panel + size_t(b * 32 + 4 * u + i) * NR + 16 * h, w[i]);
      });
    }
  }
}

static bool panel_from_row_lanes(const WeightView& wv, int n0, float* panel) {
  static_assert(NR == 32, "a panel is two groups of 16 rows");
  if (!wv.row_lanes || n0 % 16 != 0 || n0 + NR > wv.rows) return false;
  bool made = false;
  with_row_lane_layout(wv.type, [&](auto layout) {
    using L = decltype(layout);
    if constexpr (!L::FACTORED) {  // FACTORED copies take every product: never the GEMM's
      panel_from_lanes<L>(wv, n0, panel);
      made = true;
    }
  });
  return made;
}

// Whether products of w with n tokens take the float row-lane kernel: w has a copy (each has its
// kernel) and n is at most its type's MAX_TOKENS.
static bool takes_float_row_lanes(const WeightView& w, int n) {
  if (!w.row_lanes) return false;
  int most = 0;
  with_row_lane_layout(w.type, [&](auto layout) { most = decltype(layout)::MAX_TOKENS; });
  return n <= most;
}
#else
constexpr bool HAS_FLOAT_ROW_LANES = false;
static bool panel_from_row_lanes(const WeightView&, int, float*) { return false; }
static void float_row_lanes_of(const WeightView&, const float*, const float*, int, float*, int, int) {}
static bool takes_float_row_lanes(const WeightView&, int) { return false; }
#endif

// Rows [r0, r1) of one weight's GEMV, for every token. xsum: sums_of_32(x), for the types with offsets.
static void gemv_rows_of(const WeightView& w, const float* x, const float* xsum, int n, float* y, int r0, int r1) {
  if (takes_float_row_lanes(w, n)) return float_row_lanes_of(w, x, xsum, n, y, r0, r1);
  switch (w.type) {
    case DType::F32: return gemv_typed<float>(w, x, n, y, r0, r1);
    case DType::F16: return gemv_typed<F16>(w, x, n, y, r0, r1);
    case DType::BF16: return gemv_typed<BF16>(w, x, n, y, r0, r1);
    case DType::Q8_0: return gemv_q_blocks<DType::Q8_0>(w, x, xsum, n, y, r0, r1);
    case DType::Q4_0: return gemv_q_blocks<DType::Q4_0>(w, x, xsum, n, y, r0, r1);
    case DType::Q4_1: return gemv_q_blocks<DType::Q4_1>(w, x, xsum, n, y, r0, r1);
    case DType::Q5_0: return gemv_q_blocks<DType::Q5_0>(w, x, xsum, n, y, r0, r1);
    case DType::Q5_1: return gemv_q_blocks<DType::Q5_1>(w, x, xsum, n, y, r0, r1);
    case DType::IQ4_NL: return gemv_q_blocks<DType::IQ4_NL>(w, x, xsum, n, y, r0, r1);
    case DType::Q4_K: return gemv_k_quant<DType::Q4_K>(w, x, xsum, n, y, r0, r1);
    case DType::Q5_K: return gemv_k_quant<DType::Q5_K>(w, x, xsum, n, y, r0, r1);
    case DType::Q6_K: return gemv_q6_k(w, x, n, y, r0, r1);
  }
}

static bool needs_sums_of_32(DType t) {
  return t == DType::Q4_1 || t == DType::Q5_1 || t == DType::Q4_K || t == DType::Q5_K;
}

// Tokens per block of a product through the row-lane copies: whole passes of 12, about 512 KB of
// activations (half of L2 or less on the cores measured), at most 96.
static inline int row_lane_token_block(int K) { return std::clamp((1 << 19) / (4 * K) / 12 * 12, 12, 96); }

// The GEMV of several weights sharing x: rows split among threads in blocks of 16, the
// blocks of all the weights in one guided split (each thread first takes a long contiguous
// run: one sequential stream, prefetched within itself; shrinking chunks even out the end,
// and whichever thread is free takes the next one). One block at a time measured 1.2-2x
// slower decode: a shared counter bounced between cores per block, and streams broken every
// 16 rows. Inside a block, register tiles of R rows x C tokens, smaller at the edges.
static void gemv_group(const MatmulJob* jobs, int count, const float* x, int n) {
  // Row-lane Q8_0 at a few tokens runs 4 groups of 16 rows at a time: blocks of 64 rows.
  bool lanes = true;
  for (int j = 0; j < count; ++j) lanes = lanes && takes_float_row_lanes(*jobs[j].w, n);
  const ProductGroup group(jobs, count, lanes && n < 8 ? 4 * GEMV_ROW_BLOCK : GEMV_ROW_BLOCK, n);
  bool sums = false;
  for (int j = 0; j < count; ++j) sums = sums || needs_sums_of_32(jobs[j].w->type);
  const float* xsum = sums ? sums_of_32(x, n, group.K()) : nullptr;
  parallel_for_if(group.work() > 200000.0, group.blocks(), 1, Split::Guided, [&](int64_t b0, int64_t b1) {
    // The kernels prefetch ahead of where they read; the first bytes of a chunk nobody asked for.
    if (!lanes) {
      size_t budget = PREFETCH_BYTES;
      group.for_blocks(b0, b1, [&](const MatmulJob& job, int r0, int r1) {
        const size_t bytes = std::min(budget, size_t(r1 - r0) * job.w->row_bytes);
        for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(job.w->row(r0) + o);
        budget -= bytes;
        return budget > 0;  // no further blocks once the bytes are asked for
      });
    }
    // Through the row-lane copies, a block of tokens at a time (row_lane_token_block) over all the
    // chunk's rows, so that the block's activations stay in L2 while the rows stream past them
    // (a token's sums do not depend on the others).
    const int tokens = lanes ? std::min(n, row_lane_token_block(group.K())) : n;
    for (int t = 0; t < n; t += tokens)
      group.for_blocks(b0, b1, [&](const MatmulJob& job, int r0, int r1) {
        const size_t rows = size_t(job.w->rows);
        gemv_rows_of(*job.w, x + size_t(t) * group.K(), xsum ? xsum + size_t(t) * (group.K() / 32) : nullptr,
                     std::min(tokens, n - t), job.y + t * rows, r0, r1);
      });
  });
}

// One entry for every weight type and every group of products sharing an input:
// int8 activations where the weights ask for them (INT8_MIN_ROWS tokens or more),
// prefill-sized products (GEMM_MIN_ROWS tokens or more, see kernels.h) through the
// packed GEMM, decode-sized ones through the GEMV of each weight's type.
static void matmul_group(const MatmulJob* jobs, int count, const float* x, int n) {
  if (count < 1 || count > MAX_PRODUCT_GROUP) throw std::invalid_argument("product group of 1..8 weights");
  // Int8 activations for a weight that asks for them, from INT8_MIN_ROWS tokens (at any number where
  // the int8 variant gives batch-independent results for its type).
  auto rounds = [n](const WeightView& w) {
    return w.int8_activations && int8_supported(w.type) &&
           (n >= INT8_MIN_ROWS || int8_kernels().every_row_count(w.type));
  };
  bool int8 = true;
  for (int j = 0; j < count; ++j) int8 = int8 && rounds(*jobs[j].w);
  if (int8) {
    int8_kernels().matmul_group(jobs, count, x, n);
  } else if (n >= GEMM_MIN_ROWS) {
    // A weight whose copy takes these tokens goes through it even beside weights that do not:
    // its results must be those of any other batch size.
    MatmulJob through_lanes[MAX_PRODUCT_GROUP];
    int nl = 0;
    for (int j = 0; j < count; ++j) {
      const WeightView& w = *jobs[j].w;
      if (rounds(w))
        int8_kernels().matmul(w, x, n, jobs[j].y);
      else if (takes_float_row_lanes(w, n))
        through_lanes[nl++] = jobs[j];
      else
        gemm(w, x, n, jobs[j].y);
    }
    if (nl) gemv_group(through_lanes, nl, x, n);
  } else {
    // Below GEMM_MIN_ROWS: the int8 ones alone, the float ones (each through its copy or its GEMV) together.
    MatmulJob floats[MAX_PRODUCT_GROUP];
    int nf = 0;
    for (int j = 0; j < count; ++j) {
      const WeightView& w = *jobs[j].w;
      if (rounds(w))
        int8_kernels().matmul(w, x, n, jobs[j].y);
      else
        floats[nf++] = jobs[j];
    }
    if (nf) gemv_group(floats, nf, x, n);
  }
  for (int j = 0; j < count; ++j) add_bias(jobs[j].bias, int(jobs[j].w->rows), n, jobs[j].y);
}

static void matmul(const WeightView& w, const float* x, int n, float* y, const float* bias) {
  const MatmulJob job{&w, y, bias};
  matmul_group(&job, 1, x, n);
}

// Every block of a row through its type's row dequantizer.
template <DType T>
static inline void dequant_blocks(const uint8_t* row, int K, float* out, void (*deq)(const uint8_t*, float*)) {
  constexpr int VALUES = weight_type(T).values, BYTES = weight_type(T).bytes;
  for (int b = 0; b < K / VALUES; ++b) deq(row + size_t(b) * BYTES, out + size_t(b) * VALUES);
}

static void dequant_row(const WeightView& w, int64_t r, float* out) {
  const uint8_t* row = w.row(r);
  const int K = int(w.cols);
  switch (w.type) {
    case DType::Q8_0: return dequant_blocks<DType::Q8_0>(row, K, out, deq_q8_0);
    case DType::Q4_0: return dequant_blocks<DType::Q4_0>(row, K, out, deq_q4_0);
    case DType::Q4_1: return dequant_blocks<DType::Q4_1>(row, K, out, deq_q4_1);
    case DType::Q5_0: return dequant_blocks<DType::Q5_0>(row, K, out, deq_q5<false>);
    case DType::Q5_1: return dequant_blocks<DType::Q5_1>(row, K, out, deq_q5<true>);
    case DType::IQ4_NL: return dequant_blocks<DType::IQ4_NL>(row, K, out, deq_iq4_nl);
    case DType::Q4_K: return dequant_blocks<DType::Q4_K>(row, K, out, deq_k_quant<false>);
    case DType::Q5_K: return dequant_blocks<DType::Q5_K>(row, K, out, deq_k_quant<true>);
    case DType::Q6_K: return dequant_blocks<DType::Q6_K>(row, K, out, deq_q6_k);
    default: throw std::invalid_argument("dequant_row called with a float weight");
  }
}

template <class T>
static inline void widen_half(const T* p, int K, float* out) {
  int k = 0;
  for (; k + V::W <= K; k += V::W) V::store(out + k, V::loadw(p + k));  // vector conversion
  for (; k < K; ++k) out[k] = to_f32(p[k]);
}

// Any weight row widened to float32 (used when packing GEMM panels).
static void widen_row(const WeightView& w, int64_t r, float* out) {
  const int K = int(w.cols);
  switch (w.type) {
    case DType::F32: std::memcpy(out, w.row(r), size_t(K) * 4); return;
    case DType::F16: return widen_half(reinterpret_cast<const F16*>(w.row(r)), K, out);
    case DType::BF16: return widen_half(reinterpret_cast<const BF16*>(w.row(r)), K, out);
    default: dequant_row(w, r, out);
  }
}

// ---- Roofline probes -----------------------------------------------------------
// A read-only sweep (the shape of a decode step: every weight read once) and
// an FMA loop on registers only (the shape of a GEMM's inner loop).
static double probe_read(const float* p, size_t n) {
  double total = 0.0;
  std::mutex total_mutex;
  parallel_for(int64_t(n / (4 * V::W)), 4096, Split::Even, get_threads(), [&](int64_t i0, int64_t i1) {
    typename V::R a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
    for (int64_t i = i0; i < i1; ++i) {
      const float* q = p + size_t(i) * 4 * V::W;
      a0 = V::fma(V::load(q), V::set1(1.0f), a0);
      a1 = V::fma(V::load(q + V::W), V::set1(1.0f), a1);
      a2 = V::fma(V::load(q + 2 * V::W), V::set1(1.0f), a2);
      a3 = V::fma(V::load(q + 3 * V::W), V::set1(1.0f), a3);
    }
    std::lock_guard<std::mutex> lock(total_mutex);
    total += V::sum(a0) + V::sum(a1) + V::sum(a2) + V::sum(a3);
  });
  return total;
}

static double probe_fma(long long iters) {
  // One item per thread, each the whole loop.
  double total = 0.0;
  std::mutex total_mutex;
  const int threads = get_threads();
  parallel_for(threads, 1, Split::Even, threads, [&](int64_t item0, int64_t item1) {
    constexpr int A = 12;  // independent chains hide the FMA latency on two ports
    typename V::R acc[A];
    for (int j = 0; j < A; ++j) acc[j] = V::set1(float(j) * 1e-3f);
    const typename V::R m = V::set1(0.999999f), c = V::set1(1e-7f);
    for (long long i = 0; i < iters * (item1 - item0); ++i)
      for (int j = 0; j < A; ++j) acc[j] = V::fma(acc[j], m, c);
    std::lock_guard<std::mutex> lock(total_mutex);
    for (int j = 0; j < A; ++j) total += V::sum(acc[j]);
  });
  return total;
}

static const KernelTable make_table(const char* name) {
  return KernelTable{name, matmul, matmul_group, dequant_row, softmax, rmsnorm, layernorm, rope,
                     gelu_tanh, gelu_erf, silu, relu, attention, probe_read, probe_fma, V::W,
                     HAS_FLOAT_ROW_LANES};
}
