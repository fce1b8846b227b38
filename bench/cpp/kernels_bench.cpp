// Microbenchmarks of tokentrail's kernel table: every kernel in the sizes real
// models use, once per kernel variant (scalar, AVX2, AVX-512) this CPU runs.
//
// Names read <variant>/<kernel>/<type or shape>/<size>, e.g. avx2/gemv/q8_0/2048x2048,
// so `--benchmark_filter=^avx2/` picks one variant and `gemv/q4_k` one weight type.
// Threads: TOKENTRAIL_BENCH_THREADS (default 2); recorded in the output's context.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "tokentrail/kernels.h"
#include "tokentrail/tensor.h"

namespace tt = tokentrail;

namespace {

// ---- Deterministic random data ---------------------------------------------
// A fixed-seed generator so every run (and every variant) sees the same bytes.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {  // splitmix64
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform() { return float(next() >> 40) * (2.0f / 16777216.0f) - 1.0f; }  // [-1, 1)
};

// A normal (never subnormal, inf or NaN) half with magnitude in [2^-10, 2^-4):
// the size of a real quantization scale, so dequantized weights stay finite.
uint16_t random_scale_f16(Rng& r) {
  const uint64_t b = r.next();
  const uint16_t exponent = uint16_t(5 + b % 6);  // biased: 2^(e-15)
  return uint16_t(exponent << 10 | ((b >> 8) & 0x3FF));
}

// 64-byte aligned storage: weights reach the engine page-aligned from mmap,
// and misaligned buffers would time something users never run.
struct Buffer {
  std::unique_ptr<uint8_t, decltype(&std::free)> p{nullptr, &std::free};
  size_t size = 0;
  explicit Buffer(size_t bytes) : size(bytes) {
    const size_t rounded = (bytes + 63) / 64 * 64;
    p.reset(static_cast<uint8_t*>(std::aligned_alloc(64, rounded)));
    if (!p) throw std::bad_alloc();
  }
  uint8_t* data() { return p.get(); }
  float* f() { return reinterpret_cast<float*>(p.get()); }
};

Buffer random_floats(size_t count, uint64_t seed) {
  Buffer b(count * sizeof(float));
  Rng r(seed);
  for (size_t i = 0; i < count; ++i) b.f()[i] = r.uniform();
  return b;
}

// Fills one block of a block-quantized type: valid f16 scales, random quants.
// Offsets follow the GGML block layouts the kernels read.
void fill_block(tt::DType t, uint8_t* b, Rng& r) {
  auto put_half = [](uint8_t* p, uint16_t h) { std::memcpy(p, &h, 2); };
  const tt::BlockLayout bl = tt::block_layout(t);
  for (int i = 0; i < bl.bytes; ++i) b[i] = uint8_t(r.next());
  switch (t) {
    case tt::DType::Q8_0:  // d, int8[32]
    case tt::DType::Q4_0:  // d, nibbles[16]
      put_half(b, random_scale_f16(r));
      break;
    case tt::DType::Q4_K:  // d, dmin, 6-bit scales[12], nibbles[128]
      put_half(b, random_scale_f16(r));
      put_half(b + 2, random_scale_f16(r));
      break;
    case tt::DType::Q6_K:  // ql[128], qh[64], int8 scales[16], d
      put_half(b + 208, random_scale_f16(r));
      break;
    default:
      throw std::logic_error("fill_block: not a block-quantized type");
  }
}

// A weight matrix of any type, built once per (type, shape) and shared by
// every variant's benchmark so generation time never lands in a run.
struct Matrix {
  Buffer storage;
  tt::WeightView view;
};

const Matrix& weights(tt::DType t, int rows, int cols) {
  static std::map<std::tuple<int, int, int>, std::unique_ptr<Matrix>> cache;
  auto& slot = cache[{int(t), rows, cols}];
  if (slot) return *slot;

  const tt::BlockLayout bl = tt::block_layout(t);
  if (cols % bl.values) throw std::invalid_argument("columns must be a whole number of blocks");
  const size_t row_bytes = size_t(cols / bl.values) * bl.bytes;
  Buffer buf(row_bytes * rows);
  Rng r(uint64_t(t) * 1000003u + uint64_t(rows) * 7919u + cols);
  const size_t count = size_t(rows) * cols;
  switch (t) {
    case tt::DType::F32:
      for (size_t i = 0; i < count; ++i) buf.f()[i] = r.uniform();
      break;
    case tt::DType::F16:
      // Random sign and a normal magnitude below 1: always a finite half.
      for (size_t i = 0; i < count; ++i) {
        const uint64_t b = r.next();
        const uint16_t h = uint16_t((b & 1) << 15 | (5 + (b >> 1) % 10) << 10 | ((b >> 8) & 0x3FF));
        std::memcpy(buf.data() + 2 * i, &h, 2);
      }
      break;
    case tt::DType::BF16:
      // The upper half of a float in [-1, 1) is a valid bfloat16.
      for (size_t i = 0; i < count; ++i) {
        const float v = r.uniform();
        uint32_t bits;
        std::memcpy(&bits, &v, 4);
        const uint16_t h = uint16_t(bits >> 16);
        std::memcpy(buf.data() + 2 * i, &h, 2);
      }
      break;
    default:
      for (size_t blk = 0; blk < count / bl.values; ++blk) fill_block(t, buf.data() + blk * bl.bytes, r);
  }
  slot = std::make_unique<Matrix>(Matrix{std::move(buf), {}});
  slot->view.data = slot->storage.data();
  slot->view.type = t;
  slot->view.rows = rows;
  slot->view.cols = cols;
  slot->view.row_bytes = row_bytes;
  return *slot;
}

// Every benchmark selects its variant first: the kernel table is global.
void use(const std::string& isa, benchmark::State& state) {
  try {
    tt::set_isa(isa);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// ---- Matrix products ---------------------------------------------------------

// Decode: one token against the whole matrix; the weights stream from memory
// (or cache, for the small shapes) once per call, so bytes/s is the figure.
void bm_gemv(benchmark::State& state, std::string isa, tt::DType t, int rows, int cols) {
  use(isa, state);
  const Matrix& m = weights(t, rows, cols);
  Buffer x = random_floats(cols, 1), y(size_t(rows) * sizeof(float));
  for (auto _ : state) {
    tt::kernels().matmul(m.view, x.f(), 1, y.f(), nullptr);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double bytes = double(m.view.row_bytes) * rows;
  state.counters["weight_bytes"] = benchmark::Counter(bytes * double(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["flops"] = benchmark::Counter(2.0 * rows * cols * double(state.iterations()), benchmark::Counter::kIsRate);
}

// Prefill: n tokens at once. matmul picks the packed GEMM from GEMM_MIN_ROWS
// tokens on (reported in the context), the multi-token GEMV below that.
void bm_gemm(benchmark::State& state, std::string isa, tt::DType t, int rows, int cols, int n) {
  use(isa, state);
  const Matrix& m = weights(t, rows, cols);
  Buffer x = random_floats(size_t(n) * cols, 2), y(size_t(n) * rows * sizeof(float));
  for (auto _ : state) {
    tt::kernels().matmul(m.view, x.f(), n, y.f(), nullptr);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["flops"] = benchmark::Counter(2.0 * rows * cols * n * double(state.iterations()), benchmark::Counter::kIsRate);
}

// ---- Row-wise kernels ----------------------------------------------------------

// In place: the output of a softmax is a valid input (finite, max subtracted),
// so repeating it on the same row times the same work every call.
void bm_softmax(benchmark::State& state, std::string isa, int n) {
  use(isa, state);
  Buffer x = random_floats(n, 3);
  for (float* p = x.f(); p < x.f() + n; ++p) *p *= 10.0f;  // logit-sized spread
  for (auto _ : state) {
    tt::kernels().softmax(x.f(), 1, n, 1.0f);
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * n);
}

void bm_rmsnorm(benchmark::State& state, std::string isa, int n) {
  use(isa, state);
  Buffer x = random_floats(n, 4), w = random_floats(n, 5), y(n * sizeof(float));
  for (auto _ : state) {
    tt::kernels().rmsnorm(x.f(), w.f(), 1, n, 1e-5f, y.f());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * n);
}

void bm_layernorm(benchmark::State& state, std::string isa, int n) {
  use(isa, state);
  Buffer x = random_floats(n, 6), w = random_floats(n, 7), b = random_floats(n, 8), y(n * sizeof(float));
  for (auto _ : state) {
    tt::kernels().layernorm(x.f(), w.f(), b.f(), 1, n, 1e-5f, y.f());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * n);
}

// One decode token's q (or k) rows; rotation keeps norms, so in place is fine.
void bm_rope(benchmark::State& state, std::string isa, int heads, int head_dim) {
  use(isa, state);
  Buffer x = random_floats(size_t(heads) * head_dim, 9);
  const int pos = 1000;
  std::vector<float> inv_freq(head_dim / 2);
  for (int i = 0; i < head_dim / 2; ++i) inv_freq[i] = std::pow(10000.0f, -2.0f * i / head_dim);
  for (auto _ : state) {
    tt::kernels().rope(x.f(), 1, heads, head_dim, head_dim, &pos, inv_freq.data(), 1.0f, false);
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * heads * head_dim);
}

// ---- Attention -------------------------------------------------------------------
// n queries whose last one sees `ctx` keys (pos0 = ctx - n), as in decode
// (n = 1) or the last chunk of a prefill (n = 128). GQA as in Llama-style
// models: 32 query heads share 4 KV heads, head_dim 64.
constexpr int ATT_HEADS = 32, ATT_KV = 4, ATT_HD = 64;

void bm_attention(benchmark::State& state, std::string isa, int ctx, int n) {
  use(isa, state);
  const int pos0 = ctx - n;
  const size_t qsize = size_t(n) * ATT_HEADS * ATT_HD, kvsize = size_t(ATT_KV) * ctx * ATT_HD;
  Buffer q = random_floats(qsize, 10), k = random_floats(kvsize, 11), v = random_floats(kvsize, 12);
  Buffer z(qsize * sizeof(float));
  tt::AttentionShape a;
  a.cap = ctx;
  a.n = n;
  a.pos0 = pos0;
  a.n_heads = ATT_HEADS;
  a.n_kv = ATT_KV;
  a.head_dim = ATT_HD;
  a.scale = 1.0f / std::sqrt(float(ATT_HD));
  for (auto _ : state) {
    tt::kernels().attention(q.f(), k.f(), v.f(), tt::DType::F32, a, z.f(), nullptr);
    benchmark::DoNotOptimize(z.data());
    benchmark::ClobberMemory();
  }
  // q.k and p.v: 2 * head_dim FLOPs each per (query, head, visible key).
  double keys = 0;
  for (int i = 0; i < n; ++i) keys += pos0 + i + 1;
  state.counters["flops"] = benchmark::Counter(4.0 * ATT_HD * ATT_HEADS * keys * double(state.iterations()),
                                               benchmark::Counter::kIsRate);
}

// ---- Registration ------------------------------------------------------------------

std::string shape(int rows, int cols) { return std::to_string(rows) + "x" + std::to_string(cols); }

// OpenMP threads do the work, so time and rates are wall-clock (UseRealTime);
// the main thread's CPU time would miss the other threads' work.
template <class F, class... A>
void add(const std::string& name, F fn, A... args) {
  benchmark::RegisterBenchmark(name.c_str(), fn, args...)->UseRealTime()->Unit(benchmark::kMicrosecond);
}

void register_all(const std::string& isa) {
  const std::string p = isa + "/";
  const tt::DType all_types[] = {tt::DType::F32, tt::DType::F16, tt::DType::BF16, tt::DType::Q8_0,
                                 tt::DType::Q4_0, tt::DType::Q4_K, tt::DType::Q6_K};
  // GPT-2 small (768, ffn 3072) and TinyLlama-1.1B (2048, ffn 5632) projections.
  const int gemv_shapes[][2] = {{768, 768}, {3072, 768}, {2048, 2048}, {5632, 2048}};
  for (tt::DType t : all_types)
    for (auto& s : gemv_shapes)
      add(p + "gemv/" + tt::dtype_name(t) + "/" + shape(s[0], s[1]), bm_gemv, isa, t, s[0], s[1]);

  for (tt::DType t : {tt::DType::F32, tt::DType::Q8_0})
    for (int d : {768, 2048})
      for (int n : {16, 128, 512})
        add(p + "gemm/" + tt::dtype_name(t) + "/" + shape(d, d) + "/n" + std::to_string(n), bm_gemm, isa, t, d, d, n);

  // Vocabularies: 32000 (Llama 2), 50257 (GPT-2); 512 is an attention row.
  for (int n : {512, 32000, 50257}) add(p + "softmax/" + std::to_string(n), bm_softmax, isa, n);
  for (int n : {768, 2048}) add(p + "rmsnorm/" + std::to_string(n), bm_rmsnorm, isa, n);
  for (int n : {768, 2048}) add(p + "layernorm/" + std::to_string(n), bm_layernorm, isa, n);
  for (int h : {12, 32}) add(p + "rope/" + shape(h, 64), bm_rope, isa, h, 64);

  for (int n : {1, 128})
    for (int ctx : {128, 512, 1024, 2048})
      add(p + (n == 1 ? "attention/decode/ctx" : "attention/prefill128/ctx") + std::to_string(ctx), bm_attention,
          isa, ctx, n);
}

int threads_from_env() {
  const char* s = std::getenv("TOKENTRAIL_BENCH_THREADS");
  if (!s || !*s) return 2;
  char* end = nullptr;
  const long n = std::strtol(s, &end, 10);
  if (*end || n < 1 || n > 1024) throw std::invalid_argument("TOKENTRAIL_BENCH_THREADS must be a positive integer");
  return int(n);
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = threads_from_env();
  tt::set_threads(threads);

  std::string isas;
  for (const std::string& isa : tt::available_isas()) {
    isas += (isas.empty() ? "" : ",") + isa;
    register_all(isa);
  }
  benchmark::AddCustomContext("tokentrail_threads",
                              std::to_string(threads) + " (TOKENTRAIL_BENCH_THREADS; default 2)");
  benchmark::AddCustomContext("tokentrail_threads_effective", std::to_string(tt::get_threads()));
  benchmark::AddCustomContext("tokentrail_variants", isas);
  benchmark::AddCustomContext("tokentrail_default_variant", tt::kernels().name);
  // Below this many tokens matmul takes the multi-token GEMV path, not the GEMM.
  benchmark::AddCustomContext("tokentrail_gemm_min_rows", std::to_string(tt::GEMM_MIN_ROWS));

  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
