// The body of every kernel, written once against a small vector interface `V`.
// Each kernels_<isa>.cpp defines V for its instruction set (or as one float
// for the portable variant) and includes this file inside its own namespace,
// so the same loops compile to AVX-512, AVX2+FMA or scalar code.
//
// V provides: type R; int W (lanes); zero(); load(const float*); loadw(const T*)
// for T in float, F16, BF16; fma(a, b, acc); sum(R); set1(float); mul(a, b); store(float*, R).

// Standard headers are included by kernels_common.h before the namespace opens.

static inline float to_f32(float v) { return v; }
static inline float to_f32(F16 v) { return f16_to_f32(v.bits); }
static inline float to_f32(BF16 v) { return bf16_to_f32(v.bits); }

// R rows of w times C vectors of x, all K columns: the register tile of the product.
template <class T, int R, int C>
static inline void micro_tile(const T* w, size_t ldw, const float* x, size_t ldx, int K,
                              float* y, size_t ldy) {
  typename V::R acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = V::zero();
  int k = 0;
  for (; k + V::W <= K; k += V::W) {
    typename V::R xv[C];
    for (int c = 0; c < C; ++c) xv[c] = V::load(x + c * ldx + k);
    for (int r = 0; r < R; ++r) {
      typename V::R wv = V::loadw(w + r * ldw + k);
      for (int c = 0; c < C; ++c) acc[r][c] = V::fma(wv, xv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = V::sum(acc[r][c]);
      for (int kk = k; kk < K; ++kk) s += to_f32(w[r * ldw + kk]) * x[c * ldx + kk];
      y[c * ldy + r] = s;
    }
}

// Rows are split among threads in blocks that stay in cache while every
// token tile of x passes over them: each weight is read from memory once.
template <class T>
static void matmul_typed(const WeightView& wv, const float* x, int n, float* y, const float* bias) {
  const T* w = static_cast<const T*>(wv.data);
  const size_t ldw = wv.row_bytes / sizeof(T);
  const int rows = int(wv.rows), K = int(wv.cols);
  constexpr int R = V::TILE_ROWS, C = V::TILE_COLS;
  constexpr int ROW_BLOCK = 64;
  const int n_blocks = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
  const double work = double(rows) * K * n;
#pragma omp parallel for schedule(static) if (work > 200000.0)
  for (int b = 0; b < n_blocks; ++b) {
    const int r0 = b * ROW_BLOCK, r1 = std::min(rows, r0 + ROW_BLOCK);
    int t = 0;
    for (; t + C <= n; t += C) {
      int r = r0;
      for (; r + R <= r1; r += R) micro_tile<T, R, C>(w + r * ldw, ldw, x + size_t(t) * K, K, K, y + size_t(t) * rows + r, rows);
      for (; r < r1; ++r) micro_tile<T, 1, C>(w + r * ldw, ldw, x + size_t(t) * K, K, K, y + size_t(t) * rows + r, rows);
    }
    for (; t < n; ++t) {
      int r = r0;
      for (; r + R <= r1; r += R) micro_tile<T, R, 1>(w + r * ldw, ldw, x + size_t(t) * K, K, K, y + size_t(t) * rows + r, rows);
      for (; r < r1; ++r) micro_tile<T, 1, 1>(w + r * ldw, ldw, x + size_t(t) * K, K, K, y + size_t(t) * rows + r, rows);
    }
  }
  if (bias)
    for (int t = 0; t < n; ++t)
      for (int r = 0; r < rows; ++r) y[size_t(t) * rows + r] += bias[r];
}

static void matmul(const WeightView& w, const float* x, int n, float* y, const float* bias) {
  switch (w.type) {
    case DType::F32: return matmul_typed<float>(w, x, n, y, bias);
    case DType::F16: return matmul_typed<F16>(w, x, n, y, bias);
    case DType::BF16: return matmul_typed<BF16>(w, x, n, y, bias);
    default: throw std::invalid_argument("float matmul called with a block-quantized weight");
  }
}

static inline float dot(const float* a, const float* b, int n) {
  typename V::R acc = V::zero();
  int i = 0;
  for (; i + V::W <= n; i += V::W) acc = V::fma(V::load(a + i), V::load(b + i), acc);
  float s = V::sum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += a * x
static inline void axpy(float a, const float* x, float* y, int n) {
  typename V::R av = V::set1(a);
  int i = 0;
  for (; i + V::W <= n; i += V::W) V::store(y + i, V::fma(av, V::load(x + i), V::load(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// Softmax of one row; the max is subtracted first so exp never overflows,
// and the division by T happens before it, so any T > 0 stays exact.
static inline void softmax_row(float* x, int n, float temperature) {
  if (n <= 0) return;
  const float inv_t = 1.0f / temperature;
  float m = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < n; ++i) m = std::max(m, x[i]);
  if (m == -std::numeric_limits<float>::infinity()) {  // every entry masked: uniform is the only sane answer
    for (int i = 0; i < n; ++i) x[i] = 1.0f / n;
    return;
  }
  double s = 0.0;
  for (int i = 0; i < n; ++i) {
    x[i] = std::exp((x[i] - m) * inv_t);
    s += x[i];
  }
  const float inv = float(1.0 / s);
  for (int i = 0; i < n; ++i) x[i] *= inv;
}

static void softmax(float* x, int rows, int n, float temperature) {
  for (int r = 0; r < rows; ++r) softmax_row(x + size_t(r) * n, n, temperature);
}

static void rmsnorm(const float* x, const float* w, int rows, int n, float eps, float* y) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + size_t(r) * n;
    float* yr = y + size_t(r) * n;
    double ss = 0.0;
    for (int i = 0; i < n; ++i) ss += double(xr[i]) * xr[i];
    const float scale = float(1.0 / std::sqrt(ss / n + eps));
    for (int i = 0; i < n; ++i) yr[i] = xr[i] * scale * w[i];
  }
}

static void layernorm(const float* x, const float* w, const float* b, int rows, int n, float eps, float* y) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + size_t(r) * n;
    float* yr = y + size_t(r) * n;
    double mean = 0.0;
    for (int i = 0; i < n; ++i) mean += xr[i];
    mean /= n;
    double var = 0.0;
    for (int i = 0; i < n; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    var /= n;
    const float scale = float(1.0 / std::sqrt(var + eps));
    const float mu = float(mean);
    for (int i = 0; i < n; ++i) yr[i] = (xr[i] - mu) * scale * w[i] + (b ? b[i] : 0.0f);
  }
}

static void rope(float* x, int n, int heads, int head_dim, const int* positions, float theta, bool adjacent) {
  const int half = head_dim / 2;
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; ++i) inv_freq[i] = float(std::pow(double(theta), -2.0 * i / head_dim));
  std::vector<float> cs(half), sn(half);
  for (int t = 0; t < n; ++t) {
    for (int i = 0; i < half; ++i) {
      const double a = double(positions[t]) * inv_freq[i];
      cs[i] = float(std::cos(a));
      sn[i] = float(std::sin(a));
    }
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

static void gelu_tanh(float* x, size_t n) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  for (size_t i = 0; i < n; ++i) {
    const float v = x[i];
    x[i] = 0.5f * v * (1.0f + std::tanh(k * (v + 0.044715f * v * v * v)));
  }
}

static void gelu_erf(float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.7071067811865476f));
}

static void silu(float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] = x[i] / (1.0f + std::exp(-x[i]));
}

static void relu(float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

static void attention(const float* q, const float* k, const float* v, int cap, int n, int pos0,
                      int n_heads, int n_kv, int head_dim, float scale, float* z,
                      const AttentionCapture* capture) {
  const int ctx = pos0 + n;
  const int group = n_heads / n_kv;
  const size_t qstride = size_t(n_heads) * head_dim;
  const float neg_inf = -std::numeric_limits<float>::infinity();
#pragma omp parallel if (double(n) * n_heads * ctx * head_dim > 100000.0)
  {
    std::vector<float> s(ctx);
#pragma omp for collapse(2) schedule(static)
    for (int i = 0; i < n; ++i)
      for (int h = 0; h < n_heads; ++h) {
        const int len = pos0 + i + 1;  // causal: keys up to and including this position
        const float* qv = q + i * qstride + size_t(h) * head_dim;
        const float* kh = k + size_t(h / group) * cap * head_dim;
        const float* vh = v + size_t(h / group) * cap * head_dim;
        for (int j = 0; j < len; ++j) s[j] = dot(qv, kh + size_t(j) * head_dim, head_dim) * scale;
        const size_t crow = (size_t(i) * n_heads + h) * ctx;
        if (capture && capture->scores) {
          std::copy(s.begin(), s.begin() + len, capture->scores + crow);
          std::fill(capture->scores + crow + len, capture->scores + crow + ctx, neg_inf);
        }
        softmax_row(s.data(), len, 1.0f);
        if (capture && capture->pattern) {
          std::copy(s.begin(), s.begin() + len, capture->pattern + crow);
          std::fill(capture->pattern + crow + len, capture->pattern + crow + ctx, 0.0f);
        }
        float* zv = z + i * qstride + size_t(h) * head_dim;
        std::fill(zv, zv + head_dim, 0.0f);
        for (int j = 0; j < len; ++j) axpy(s[j], vh + size_t(j) * head_dim, zv, head_dim);
      }
  }
}

static const KernelTable make_table(const char* name) {
  return KernelTable{name, matmul, softmax, rmsnorm, layernorm, rope,
                     gelu_tanh, gelu_erf, silu, relu, attention};
}
