// The kernel table: every hot loop, in one variant per instruction set.
// The variant is chosen once from the CPU's features (or forced by the
// TOKENTRAIL_ISA environment variable / set_isa) and called through here.
#pragma once
#include <string>
#include <vector>

#include "tokentrail/tensor.h"
#include "tokentrail/thread_pool.h"  // set_threads, get_threads, parallel_for

namespace tokentrail {

// Where attention writes its per-head tables when a caller asked for them.
// Layout of each: [n_queries][n_heads][ctx], ctx = pos0 + n_queries.
struct AttentionCapture {
  float* scores = nullptr;    // scaled q.k before softmax, -inf above the causal diagonal
  float* pattern = nullptr;   // softmax probabilities, 0 above the diagonal
};

// The sizes and the score transform of one attention call.
struct AttentionShape {
  int cap = 0;           // positions the cache buffers are laid out for
  int n = 0, pos0 = 0;   // queries, and the position of the first
  int n_heads = 0, n_kv = 0, head_dim = 0;
  float scale = 1.0f;    // multiplies q.k
  int window = 0;        // > 0: a query at position p reads keys p - window + 1 .. p only
  float softcap = 0.0f;  // > 0: scores become softcap * tanh(scores / softcap) before the softmax
  // Keys the same thread reads next (another sequence's first KV head, of the cache's element
  // type, `next_rows` rows of head_dim): asked for while this call works on its last KV head, so
  // that memory is busy while the thread computes (a hint; nullptr: none).
  const void* next_keys = nullptr;
  int next_rows = 0;
};

// Products over this many tokens or more use the packed GEMM, fewer the GEMV
// (token tiles, weights widened in registers, no packing). Measured crossover:
// from 48 tokens the GEMM wins for every weight type (TinyLlama-1.1B Q4_0 at 64
// tokens: 175 vs 153 tok/s); at 32 the GEMV still wins for f16 and quantized rows.
constexpr int GEMM_MIN_ROWS = 48;

// Attention calls with less work than this (queries x heads x keys x head_dim) run on one
// thread: spreading them would cost more than it saves. A batch of such calls (decode rows
// of several sequences) spreads the calls over the threads instead.
constexpr double ATTENTION_PARALLEL_WORK = 100000.0;
inline double attention_work(int n, int n_heads, int ctx, int head_dim) {
  return double(n) * n_heads * ctx * head_dim;
}

// One product of a group that shares its input: y[n][w->rows] = x . w^T (+ bias).
struct MatmulJob {
  const WeightView* w;
  float* y;
  const float* bias;  // may be null
};

struct KernelTable {
  const char* name;
  // y[n][w.rows] = x[n][w.cols] . w^T (+ bias), for every weight type.
  void (*matmul)(const WeightView& w, const float* x, int n, float* y, const float* bias);
  // Several products of the same x (q/k/v, gate/up) in one parallel region: the rows of all
  // the weights are shared among the threads together, and int8 activations are rounded once.
  void (*matmul_group)(const MatmulJob* jobs, int count, const float* x, int n);
  // One row of a block-quantized matrix widened to float32.
  void (*dequant_row)(const WeightView& w, int64_t row, float* out);
  // In place over `rows` rows of length `n`: softmax(x / temperature).
  void (*softmax)(float* x, int rows, int n, float temperature);
  void (*rmsnorm)(const float* x, const float* w, int rows, int n, float eps, float* y);
  void (*layernorm)(const float* x, const float* w, const float* b, int rows, int n, float eps, float* y);
  // x: [n][heads * head_dim]; positions[n]. The first rotary_dim elements of each head rotate, pair i
  // by the angle position * inv_freq[i] (rotary_dim / 2 frequencies), the pairs being adjacent
  // (2i, 2i+1) or split halves (i, i + rotary_dim/2); cos and sin are multiplied by attn_factor.
  void (*rope)(float* x, int n, int heads, int head_dim, int rotary_dim, const int* positions,
               const float* inv_freq, float attn_factor, bool adjacent);
  void (*gelu_tanh)(float* x, size_t n);
  void (*gelu_erf)(float* x, size_t n);
  void (*silu)(float* x, size_t n);
  void (*relu)(float* x, size_t n);
  // Causal attention of n queries at positions pos0..pos0+n-1 over keys 0..pos0+n-1 (the last
  // `window` keys only, for sliding-window layers).
  // q, z: [n][n_heads*head_dim]; k, v: [n_kv][cap][head_dim] (one layer of the cache), f32 or f16.
  void (*attention)(const float* q, const void* k, const void* v, DType kv_type, const AttentionShape& a,
                    float* z, const AttentionCapture* capture);
  // Roofline probes: sum of a read-only sweep; an FMA chain on registers (12 vectors per iteration per thread).
  double (*probe_read)(const float* p, size_t n);
  double (*probe_fma)(long long iters);
  int lanes;  // floats per vector
  // Whether products with float activations read a matrix's row-lane copy (AVX-512; row_lane_bytes).
  bool float_row_lanes;
};

// Products of block-quantized weights with activations rounded to int8 as
// llama.cpp rounds them: integer dot products, float scales per block.
// Used for matrices marked WeightView::int8_activations, from INT8_MIN_ROWS tokens.
struct Int8KernelTable {
  const char* name;
  // y[n][w.rows] = x[n][w.cols] . w^T, w of a type int8_supported() accepts.
  void (*matmul)(const WeightView& w, const float* x, int n, float* y);
  // The same for several weights sharing x (biases are the caller's): x is rounded once per
  // activation block size, and one parallel region covers the rows of every weight.
  void (*matmul_group)(const MatmulJob* jobs, int count, const float* x, int n);
  // Whether products of weights of type t take this kernel at every number of tokens (not only
  // from INT8_MIN_ROWS): true where a streaming kernel for a few tokens gives bit for bit the
  // results of the token-lane one, so that a row's product does not depend on its batch.
  bool (*every_row_count)(DType t);
  // The activation rounding alone: q[n][K], scales[n][K / block]; block 32 (Q8_0's) or 256 (Q8_K's).
  void (*quantize)(const float* x, int n, int K, int block, int8_t* q, float* scales);
  int lanes;  // tokens per vector
};

// Fewer tokens than this keep the float product even when int8 activations are
// asked for: the integer kernel's lanes run over tokens (16 with AVX-512), so a
// few tokens leave most lanes empty. Measured on 1536 x 576 rows, one thread
// (AMD EPYC, AVX-512 VNNI): int8 0.5x the float GEMV at 2-4 tokens, even at 8,
// 1.4x at 12, 1.9x at 16 (q4_0; q8_0 and q5_0 alike).
constexpr int INT8_MIN_ROWS = 8;
// (With AVX-512 VNNI, Q8_0 takes int8 activations at every number of tokens: see
// Int8KernelTable::every_row_count.)

bool int8_supported(DType t);

// Q8_0 rows laid out for the row-lane kernels (AVX-512 VNNI; int8 and float activations), made
// once at load (`repack`) so that the kernels load what they multiply instead of gathering and
// transposing 16 rows per block: per group g of 16 rows and block b, the rows' 32 quants as 8
// vectors of [16 rows][4 bytes] (values 4j..4j+3 of every row in vector j), each byte + 128
// (vpdpbusd's unsigned side); after all the quants (rows * cols bytes), the half-precision
// scales [g][b][16 rows]. As many bytes as Q8_0.
// Made where the current int8 variant has the row-lane kernel (rows in whole groups of 16).
// Where a copy at `lanes` for w keeps group g's block b: 32 values of 16 rows at `bits` bits each,
// 64 * bits bytes; every copy keeps all its quants first (rows * cols * bits / 8 bytes), then its
// scales.
inline size_t row_lane_index(const WeightView& w, int64_t g, int64_t b) { return size_t(g * (w.cols / 32) + b); }
inline const uint8_t* lane_block(const WeightView& w, const uint8_t* lanes, int bits, int64_t g, int64_t b) {
  return lanes + row_lane_index(w, g, b) * 64 * size_t(bits);
}
inline const uint8_t* lane_scales_start(const WeightView& w, const uint8_t* lanes, int bits) {
  return lanes + size_t(w.rows) * size_t(w.cols) / 8 * size_t(bits);
}
// The 32-value block types' scales: per group and block, the rows' halves, `halves` sets of 16
// (Q8_0's: 16 d at row_lane_scales).
inline const uint16_t* block_lane_scales(const WeightView& w, const uint8_t* lanes, int bits, int halves, int64_t g,
                                         int64_t b) {
  return reinterpret_cast<const uint16_t*>(lane_scales_start(w, lanes, bits)) + row_lane_index(w, g, b) * 16 * halves;
}
inline const uint8_t* row_lane_quants(const WeightView& w, const uint8_t* lanes, int64_t g, int64_t b) {
  return lane_block(w, lanes, 8, g, b);
}
inline const uint16_t* row_lane_scales(const WeightView& w, const uint8_t* lanes, int64_t g, int64_t b) {
  return block_lane_scales(w, lanes, 8, 1, g, b);
}
// The other block types' copies, for the float row-lane kernel (AVX-512), in the same shape: per
// group g of 16 rows and 32-value block b, the rows' low nibbles as 4 vectors of [16 rows][4 bytes]
// (bytes 4j..4j+3 of every row in vector j, each holding values 4j+i in its low nibble and 16+4j+i
// in its high one, as Q4_0 files have them), then the higher bits, `bits - 4` per value, in vectors
// of the same shape (unit u's, values 4u..4u+3 of every row, at bit (bits - 4) * (u % per) of
// vector u / per, per = 8 / (bits - 4)). The scales that follow all the quants:
// - Q4_0, IQ4_NL, Q5_0: the rows' d [16] per block (halves); Q4_1, Q5_1: d [16] and m [16];
// - Q4_K, Q5_K: per group and super-block of 256 values, Q4_K_LANE_SCALE_BYTES: the rows' d [16]
//   and dmin [16] (halves), their 8 sub-blocks' scales [8][16] and mins [8][16] (6-bit values as
//   bytes);
// - Q6_K: per group and super-block, Q6_K_LANE_SCALE_BYTES: the rows' d [16] (halves) and their 16
//   sub-blocks' int8 scales [16][16].
// The 32-value types take as many bytes as the file's rows; the k-quants 64 (Q4_K, Q5_K) or 8
// (Q6_K) more per 16 rows and super-block.
constexpr size_t Q4_K_LANE_SCALE_BYTES = 320;
constexpr size_t Q6_K_LANE_SCALE_BYTES = 288;
inline const uint8_t* k_quant_lane_scales(const WeightView& w, const uint8_t* lanes, int bits, size_t scale_bytes,
                                          int64_t g, int64_t s) {
  return lane_scales_start(w, lanes, bits) + size_t(g * (w.cols / 256) + s) * scale_bytes;
}
// The one rule for which weights get a row-lane copy (`repack`), and its bytes (0: none): Q8_0
// where the int8 variant has the row-lane kernel (its copy serves float and int8 products);
// every other block type where the float kernels have theirs (its copy serves float products:
// with int8 activations, those of fewer than INT8_MIN_ROWS tokens; int8 ones read the original
// rows); rows in whole groups of 16, the k-quants' in whole super-blocks.
size_t row_lane_bytes(const WeightView& w);
// Whether w's copy also serves its int8 products (Q8_0's).
bool row_lanes_serve_int8(const WeightView& w);
// Lays w out at `out` (row_lane_bytes(w) bytes); refused where w gets no copy.
void pack_row_lanes(const WeightView& w, uint8_t* out);
// Values per activation block in products with weights of type t: 256 for the k-quants, else 32.
inline int activation_block(DType t) { return t == DType::Q4_K || t == DType::Q5_K || t == DType::Q6_K ? 256 : 32; }

const KernelTable& kernels();
// The int8-activation variant that goes with kernels(): AVX-512 VNNI where the CPU has it, with
// AMX tiles where it also has those and the OS lets this process use them (TOKENTRAIL_AMX=0 in
// the environment keeps VNNI alone).
const Int8KernelTable& int8_kernels();
// The int8 variants that can go with kernels() on this CPU, and the choice of one of them
// (set_isa() goes back to the default one); throws for any other name.
std::vector<std::string> available_int8_isas();
void set_int8_isa(const std::string& name);
// Select a variant by name ("scalar", "avx2", "avx512"); throws if this CPU lacks it.
void set_isa(const std::string& name);
std::vector<std::string> available_isas();

// Weight rows of any type (float or block-quantized) widened to float32.
void row_to_f32(const WeightView& w, int64_t row, float* out);

// Whether `bytes` bytes of weights of type t hold a NaN or an infinity: a float element, or a
// block's half scale, whose exponent bits are all ones (a block's other bytes are integers, always
// finite). Spread over the threads for large tensors; bytes must be whole elements or blocks.
bool has_non_finite(const void* data, size_t bytes, DType t);

namespace isa_scalar { extern const KernelTable table; }
namespace int8_scalar { extern const Int8KernelTable table; }
#ifdef TOKENTRAIL_X86
namespace isa_avx2 { extern const KernelTable table; }
namespace isa_avx512 { extern const KernelTable table; }
namespace int8_avx2 { extern const Int8KernelTable table; }
namespace int8_avx512vnni { extern const Int8KernelTable table; }
#ifdef TOKENTRAIL_AMX
namespace int8_avx512amx { extern const Int8KernelTable table; }
#endif
#endif

}  // namespace tokentrail
