// Chooses the kernel variant at run time.
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "tokentrail/kernels.h"
#include "tokentrail/thread_pool.h"
#include "block_formats.h"

#if defined(TOKENTRAIL_AMX) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace tokentrail {

DType dtype_from_name(const std::string& name) {
  for (const WeightTypeInfo& t : WEIGHT_TYPES)
    if (name == t.name) return t.type;
  std::string known;
  for (const WeightTypeInfo& t : WEIGHT_TYPES) known += std::string(known.empty() ? "" : ", ") + t.name;
  throw std::invalid_argument("unknown weight dtype '" + name + "' (known: " + known + ")");
}

namespace {

// AMX tiles with int8 products, usable by this process: the CPU has them (CPUID leaf 7: AMX-TILE,
// AMX-INT8), the OS saves their state (XCR0 bits 17 and 18), and Linux grants this process the
// tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, once). Never with TOKENTRAIL_AMX=0.
bool amx_usable() {
#if defined(TOKENTRAIL_AMX) && defined(__linux__)
  static const bool usable = [] {
    const char* env = std::getenv("TOKENTRAIL_AMX");
    if (env && !std::strcmp(env, "0")) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!(d & (1u << 24)) || !(d & (1u << 25))) return false;  // AMX-TILE, AMX-INT8
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;  // XTILECFG, XTILEDATA
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

bool cpu_has(const char* isa) {
#ifdef TOKENTRAIL_X86
  __builtin_cpu_init();
  if (!std::strcmp(isa, "avx2"))
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (!std::strcmp(isa, "avx512"))
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (!std::strcmp(isa, "avx512vnni")) return cpu_has("avx512") && __builtin_cpu_supports("avx512vnni");
  if (!std::strcmp(isa, "avx512amx")) return cpu_has("avx512vnni") && amx_usable();
#endif
  return !std::strcmp(isa, "scalar");
}

const KernelTable* table_for(const std::string& name) {
  if (name == "scalar") return &isa_scalar::table;
#ifdef TOKENTRAIL_X86
  if (name == "avx2") return &isa_avx2::table;
  if (name == "avx512") return &isa_avx512::table;
#endif
  return nullptr;
}

const KernelTable* choose_default() {
  if (const char* forced = std::getenv("TOKENTRAIL_ISA")) {
    if (*forced) {
      const KernelTable* t = table_for(forced);
      if (t && cpu_has(forced)) return t;
      // A wrong setting must not crash at import; fall through to detection.
    }
  }
  for (const char* isa : {"avx512", "avx2"})
    if (cpu_has(isa) && table_for(isa)) return table_for(isa);
  return &isa_scalar::table;
}

const KernelTable* g_table = nullptr;
const Int8KernelTable* g_int8 = nullptr;

// The int8 variants a kernel variant can go with on this CPU, the default (the fastest) first:
// the same instruction set, VNNI when present, and AMX tiles before it where usable.
std::vector<const Int8KernelTable*> int8_choices(const KernelTable* t) {
  std::vector<const Int8KernelTable*> out;
#ifdef TOKENTRAIL_X86
#ifdef TOKENTRAIL_AMX
  if (t == &isa_avx512::table && cpu_has("avx512amx")) out.push_back(&int8_avx512amx::table);
#endif
  if (t == &isa_avx512::table && cpu_has("avx512vnni"))
    out.push_back(&int8_avx512vnni::table);
  else if (t == &isa_avx512::table || t == &isa_avx2::table)
    out.push_back(&int8_avx2::table);
#endif
  if (out.empty()) out.push_back(&int8_scalar::table);
  return out;
}

const Int8KernelTable* int8_for(const KernelTable* t) { return int8_choices(t).front(); }

}  // namespace

const KernelTable& kernels() {
  if (!g_table) g_table = choose_default();
  return *g_table;
}

const Int8KernelTable& int8_kernels() {
  const KernelTable& t = kernels();
  if (!g_int8) g_int8 = int8_for(&t);
  return *g_int8;
}

bool int8_supported(DType t) {
  switch (t) {
    case DType::Q8_0: case DType::Q4_0: case DType::Q4_1: case DType::Q5_0: case DType::Q5_1:
    case DType::IQ4_NL: case DType::Q4_K: case DType::Q5_K: case DType::Q6_K: return true;
    default: return false;
  }
}

static size_t q8_0_row_lane_bytes(const WeightView& w) {
  if (w.type != DType::Q8_0 || w.rows % 16 != 0 || w.cols % 32 != 0 || !int8_kernels().every_row_count(DType::Q8_0))
    return 0;
  return size_t(w.rows) * size_t(w.cols) / 32 * 34;
}

// Runs pack_group(g) for every group of 16 rows of w, spread over the threads for large matrices;
// `bytes`: the layout's size for w, 0 where w has none (refused).
template <class F>
static void pack_groups(const WeightView& w, size_t bytes, F pack_group) {
  if (!bytes) throw std::invalid_argument("these weights have no row-lane layout");
  parallel_for_if(w.rows * w.cols > (int64_t(1) << 20), w.rows / 16, 1, Split::Even, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) pack_group(g);
  });
}

static void pack_q8_0_row_lanes(const WeightView& w, uint8_t* out) {
  const int64_t nb = w.cols / 32;
  pack_groups(w, q8_0_row_lane_bytes(w), [&](int64_t g) {
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* q = const_cast<uint8_t*>(row_lane_quants(w, out, g, b));
      uint16_t* scales = const_cast<uint16_t*>(row_lane_scales(w, out, g, b));
      for (int r = 0; r < 16; ++r) {
        const uint8_t* blk = w.row(g * 16 + r) + b * 34;  // half scale, then 32 quants
        std::memcpy(scales + r, blk, 2);
        for (int j = 0; j < 8; ++j) {  // 4 bytes at a time, each + 128
          uint32_t four;
          std::memcpy(&four, blk + 2 + 4 * j, 4);
          four ^= 0x80808080u;
          std::memcpy(q + j * 64 + r * 4, &four, 4);
        }
      }
    }
  });
}

// The copy of a 32-value block type: per group of 16 rows and block, 64 * bits bytes of quants and
// `halves` sets of 16 half scales (0 bytes: no copy for w).
static size_t q32_row_lane_bytes(const WeightView& w, DType type, int bits, int halves) {
  if (w.type != type || w.rows % 16 != 0 || w.cols % 32 != 0 || !kernels().float_row_lanes) return 0;
  return size_t(w.rows / 16) * size_t(w.cols / 32) * (64 * size_t(bits) + 32 * size_t(halves));
}

// Q4_0 and IQ4_NL: blocks of a half scale and 16 bytes of nibbles, laid out alike.
static size_t q4_0_row_lane_bytes(const WeightView& w) {
  return w.type == DType::IQ4_NL ? q32_row_lane_bytes(w, DType::IQ4_NL, 4, 1) : q32_row_lane_bytes(w, DType::Q4_0, 4, 1);
}

static void pack_q4_0_row_lanes(const WeightView& w, uint8_t* out) {
  const int64_t nb = w.cols / 32;
  pack_groups(w, q4_0_row_lane_bytes(w), [&](int64_t g) {
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* q = const_cast<uint8_t*>(lane_block(w, out, 4, g, b));
      uint16_t* scales = const_cast<uint16_t*>(block_lane_scales(w, out, 4, 1, g, b));
      for (int r = 0; r < 16; ++r) {
        const uint8_t* blk = w.row(g * 16 + r) + b * 18;  // half scale, then 16 bytes of nibbles
        std::memcpy(scales + r, blk, 2);
        for (int j = 0; j < 4; ++j) std::memcpy(q + j * 64 + r * 4, blk + 2 + 4 * j, 4);
      }
    }
  });
}

// Helpers of the copies made from unpacked values (Q4_1, Q5_0, Q5_1 and the k-quants), for row r
// of a group of 16: lay_nibbles puts 32 values' low nibbles in a
// block as the Q4_0 copy has them (value i low, 16 + i high, in byte i of the row's 16);
// lay_high_bits their higher bits (`bits` of them, from bit 4), unit u's (values 4u..4u+3) at bit
// bits * (u % per) of vector u / per, per = 8 / bits units sharing a vector. Both first gather a
// row's bytes, then store them 4 at a time: loops the compiler turns into vector code, where a
// store per value (each to another vector of the copy) kept loading a large model for seconds.
static void lay_nibbles(uint8_t* block, int r, const uint8_t* v) {
  uint8_t bytes[16];  // byte i: value i in the low nibble, value 16 + i in the high one
  for (int i = 0; i < 16; ++i) bytes[i] = uint8_t((v[i] & 0xF) | (v[16 + i] & 0xF) << 4);
  for (int j = 0; j < 4; ++j) std::memcpy(block + j * 64 + r * 4, bytes + 4 * j, 4);
}
template <int BITS>
static void lay_high_bits(uint8_t* vectors, int r, const uint8_t* v) {
  constexpr int PER = 8 / BITS;
  for (int k = 0; k < 8 / PER; ++k) {  // vector k holds units k * PER .. k * PER + PER - 1
    uint8_t bytes[4] = {};
    for (int unit = 0; unit < PER; ++unit)
      for (int c = 0; c < 4; ++c) bytes[c] |= uint8_t((v[4 * (k * PER + unit) + c] >> 4) << (BITS * unit));
    std::memcpy(vectors + k * 64 + r * 4, bytes, 4);
  }
}
// Q4_K and Q5_K: a row's d, dmin, 8 scales and 8 mins (the file's 12 packed bytes unpacked) in a
// super-block's Q4_K_LANE_SCALE_BYTES.
static void lay_k4_scales(uint8_t* s, int r, const uint8_t* d_dmin_scales) {
  std::memcpy(s + 2 * r, d_dmin_scales, 2);
  std::memcpy(s + 32 + 2 * r, d_dmin_scales + 2, 2);
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    scale_min_k4(j, d_dmin_scales + 4, sc, m);
    s[64 + 16 * j + r] = uint8_t(sc);
    s[192 + 16 * j + r] = uint8_t(m);
  }
}


// Every block of every row of a Q4_1, Q5_0 or Q5_1 matrix: unpack(file block, values[32]), the
// half scales (d, and m where halves = 2) at the block's start.
template <class Unpack>
static void pack_q32(const WeightView& w, uint8_t* out, int bits, int halves, size_t file_block, Unpack unpack) {
  const int64_t nb = w.cols / 32;
  pack_groups(w, q32_row_lane_bytes(w, w.type, bits, halves), [&](int64_t g) {
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* block = const_cast<uint8_t*>(lane_block(w, out, bits, g, b));
      uint16_t* scales = const_cast<uint16_t*>(block_lane_scales(w, out, bits, halves, g, b));
      for (int r = 0; r < 16; ++r) {
        const uint8_t* blk = w.row(g * 16 + r) + b * int64_t(file_block);
        for (int h = 0; h < halves; ++h) std::memcpy(scales + 16 * h + r, blk + 2 * h, 2);
        uint8_t v[32];
        unpack(blk, v);
        lay_nibbles(block, r, v);
        if (bits == 5) lay_high_bits<1>(block + 256, r, v);
      }
    }
  });
}

// FIFTH_BITS[b]: 8 bytes, byte j holding bit j of b at bit 4 (GGML's files are little-endian, as
// x86 is, so byte j of the word is value j of eight).
static constexpr std::array<uint64_t, 256> fifth_bits_table() {
  std::array<uint64_t, 256> t{};
  for (int b = 0; b < 256; ++b)
    for (int j = 0; j < 8; ++j) t[b] |= uint64_t((b >> j) & 1) << (8 * j + 4);
  return t;
}
static constexpr std::array<uint64_t, 256> FIFTH_BITS = fifth_bits_table();

// The 32 values of a block whose 16 nibble bytes lie at qs (value i low, 16 + i high) and, with
// qh, whose fifth bits are the bits of the little-endian 32-bit word there (bit i: value i), eight
// values' at a time from byte i / 8 of qh.
static void nibbles_and_fifth_bits(const uint8_t* qs, const uint8_t* qh, uint8_t* v) {
  for (int i = 0; i < 16; ++i) {
    v[i] = qs[i] & 0xF;
    v[16 + i] = qs[i] >> 4;
  }
  if (qh)
    for (int j = 0; j < 4; ++j) {
      uint64_t eight;
      std::memcpy(&eight, v + 8 * j, 8);
      eight |= FIFTH_BITS[qh[j]];
      std::memcpy(v + 8 * j, &eight, 8);
    }
}

static size_t q4_1_row_lane_bytes(const WeightView& w) { return q32_row_lane_bytes(w, DType::Q4_1, 4, 2); }
static void pack_q4_1_row_lanes(const WeightView& w, uint8_t* out) {  // d, m, qs[16]
  pack_q32(w, out, 4, 2, 20, [](const uint8_t* blk, uint8_t* v) { nibbles_and_fifth_bits(blk + 4, nullptr, v); });
}
static size_t q5_0_row_lane_bytes(const WeightView& w) { return q32_row_lane_bytes(w, DType::Q5_0, 5, 1); }
static void pack_q5_0_row_lanes(const WeightView& w, uint8_t* out) {  // d, qh[4], qs[16]
  pack_q32(w, out, 5, 1, 22, [](const uint8_t* blk, uint8_t* v) { nibbles_and_fifth_bits(blk + 6, blk + 2, v); });
}
static size_t q5_1_row_lane_bytes(const WeightView& w) { return q32_row_lane_bytes(w, DType::Q5_1, 5, 2); }
static void pack_q5_1_row_lanes(const WeightView& w, uint8_t* out) {  // d, m, qh[4], qs[16]
  pack_q32(w, out, 5, 2, 24, [](const uint8_t* blk, uint8_t* v) { nibbles_and_fifth_bits(blk + 8, blk + 4, v); });
}

static size_t k_quant_row_lane_bytes(const WeightView& w, DType type, int bits, size_t scale_bytes) {
  if (w.type != type || w.rows % 16 != 0 || w.cols % 256 != 0 || !kernels().float_row_lanes) return 0;
  return size_t(w.rows) * size_t(w.cols) / 8 * bits + size_t(w.rows / 16) * size_t(w.cols / 256) * scale_bytes;
}

// Every super-block of every row of w: unpack(file block, values[256], scale bytes, r) and the
// values' bits laid out in the blocks of the copy.
template <int BITS, class Unpack>
static void pack_k_quant(const WeightView& w, uint8_t* out, size_t scale_bytes, size_t file_block, Unpack unpack) {
  const int64_t supers = w.cols / 256;
  pack_groups(w, k_quant_row_lane_bytes(w, w.type, BITS, scale_bytes), [&](int64_t g) {
    for (int64_t sb = 0; sb < supers; ++sb)
      for (int r = 0; r < 16; ++r) {
        uint8_t v[256];
        unpack(w.row(g * 16 + r) + sb * file_block, v,
               const_cast<uint8_t*>(k_quant_lane_scales(w, out, BITS, scale_bytes, g, sb)), r);
        for (int b = 0; b < 8; ++b) {
          uint8_t* block = const_cast<uint8_t*>(lane_block(w, out, BITS, g, sb * 8 + b));
          lay_nibbles(block, r, v + 32 * b);
          if constexpr (BITS > 4) lay_high_bits<BITS - 4>(block + 256, r, v + 32 * b);
        }
      }
  });
}

// Q4_K and Q5_K: d, dmin, scales[12], (Q5_K: qh[32],) qs[128]. Sub-block j's values are the low
// (even j) or high (odd j) nibbles of qs[32 (j / 2) ..][0..31]; Q5_K's value l of sub-block j has
// its fifth bit at bit j of qh[l].
static void unpack_k4(const uint8_t* blk, const uint8_t* qh, const uint8_t* qs, uint8_t* v, uint8_t* s, int r) {
  lay_k4_scales(s, r, blk);
  for (int j = 0; j < 8; j += 2)  // sub-blocks j and j + 1: the low and high nibbles of the same 32 bytes
    for (int l = 0; l < 32; ++l) {
      const uint8_t q = qs[16 * j + l];
      v[32 * j + l] = q & 0xF;
      v[32 * j + 32 + l] = q >> 4;
    }
  if (qh)
    for (int j = 0; j < 8; ++j)
      for (int l = 0; l < 32; ++l) v[32 * j + l] |= uint8_t(((qh[l] >> j) & 1) << 4);
}

static size_t q4_k_row_lane_bytes(const WeightView& w) {
  return k_quant_row_lane_bytes(w, DType::Q4_K, 4, Q4_K_LANE_SCALE_BYTES);
}
static void pack_q4_k_row_lanes(const WeightView& w, uint8_t* out) {
  pack_k_quant<4>(w, out, Q4_K_LANE_SCALE_BYTES, 144, [](const uint8_t* blk, uint8_t* v, uint8_t* s, int r) {
    unpack_k4(blk, nullptr, blk + 16, v, s, r);
  });
}

static size_t q5_k_row_lane_bytes(const WeightView& w) {
  return k_quant_row_lane_bytes(w, DType::Q5_K, 5, Q4_K_LANE_SCALE_BYTES);
}
static void pack_q5_k_row_lanes(const WeightView& w, uint8_t* out) {
  pack_k_quant<5>(w, out, Q4_K_LANE_SCALE_BYTES, 176, [](const uint8_t* blk, uint8_t* v, uint8_t* s, int r) {
    unpack_k4(blk, blk + 16, blk + 48, v, s, r);
  });
}

static size_t q6_k_row_lane_bytes(const WeightView& w) {
  return k_quant_row_lane_bytes(w, DType::Q6_K, 6, Q6_K_LANE_SCALE_BYTES);
}
static void pack_q6_k_row_lanes(const WeightView& w, uint8_t* out) {
  // ql[128], qh[64], scales[16], d: value 128h + 32p + l (p = 0..3, l = 0..31) has its low nibble
  // in ql[64h + 32(p % 2) + l] (the low one for p < 2) and its two high bits at bit 2p of
  // qh[32h + l].
  pack_k_quant<6>(w, out, Q6_K_LANE_SCALE_BYTES, 210, [](const uint8_t* blk, uint8_t* v, uint8_t* s, int r) {
    std::memcpy(s + 2 * r, blk + 208, 2);
    for (int j = 0; j < 16; ++j) s[32 + 16 * j + r] = blk[192 + j];
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < 32; ++l) {  // p = 0..3 written out, so that the loop over l is vector code
        const uint8_t low0 = blk[64 * h + l], low1 = blk[64 * h + 32 + l], high = blk[128 + 32 * h + l];
        v[128 * h + l] = uint8_t((low0 & 0xF) | (high & 3) << 4);
        v[128 * h + 32 + l] = uint8_t((low1 & 0xF) | ((high >> 2) & 3) << 4);
        v[128 * h + 64 + l] = uint8_t((low0 >> 4) | ((high >> 4) & 3) << 4);
        v[128 * h + 96 + l] = uint8_t((low1 >> 4) | ((high >> 6) & 3) << 4);
      }
  });
}

// The row-lane layouts, one row per weight type: the bytes a copy of w takes (0: none for w), how
// it is made, and whether it serves only float products (int8 ones then read the original rows;
// a model with int8 activations still keeps the copy for its float products, those of fewer than
// INT8_MIN_ROWS tokens: decode).
struct RowLaneLayout {
  DType type;
  size_t (*bytes)(const WeightView&);
  void (*pack)(const WeightView&, uint8_t*);
  bool float_only;
};
static constexpr RowLaneLayout ROW_LANE_LAYOUTS[] = {
    {DType::Q8_0, q8_0_row_lane_bytes, pack_q8_0_row_lanes, false},
    {DType::Q4_0, q4_0_row_lane_bytes, pack_q4_0_row_lanes, true},
    {DType::IQ4_NL, q4_0_row_lane_bytes, pack_q4_0_row_lanes, true},
    {DType::Q4_1, q4_1_row_lane_bytes, pack_q4_1_row_lanes, true},
    {DType::Q5_0, q5_0_row_lane_bytes, pack_q5_0_row_lanes, true},
    {DType::Q5_1, q5_1_row_lane_bytes, pack_q5_1_row_lanes, true},
    {DType::Q4_K, q4_k_row_lane_bytes, pack_q4_k_row_lanes, true},
    {DType::Q5_K, q5_k_row_lane_bytes, pack_q5_k_row_lanes, true},
    {DType::Q6_K, q6_k_row_lane_bytes, pack_q6_k_row_lanes, true},
};

static const RowLaneLayout* row_lane_layout(const WeightView& w) {
  for (const RowLaneLayout& l : ROW_LANE_LAYOUTS)
    if (l.type == w.type) return &l;
  return nullptr;
}

bool row_lanes_serve_int8(const WeightView& w) {
  const RowLaneLayout* l = row_lane_layout(w);
  return l && !l->float_only && l->bytes(w) > 0;
}

size_t row_lane_bytes(const WeightView& w) {
  const RowLaneLayout* l = row_lane_layout(w);
  return l ? l->bytes(w) : 0;
}

void pack_row_lanes(const WeightView& w, uint8_t* out) {
  const RowLaneLayout* l = row_lane_layout(w);
  if (!l) throw std::invalid_argument("these weights have no row-lane layout");
  l->pack(w, out);
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const char* isa : {"scalar", "avx2", "avx512"})
    if (table_for(isa) && cpu_has(isa)) out.push_back(isa);
  return out;
}

void set_isa(const std::string& name) {
  const KernelTable* t = table_for(name);
  if (!t) throw std::invalid_argument("kernel variant '" + name + "' is not built into this binary");
  if (!cpu_has(name.c_str())) throw std::invalid_argument("this CPU does not support kernel variant '" + name + "'");
  g_table = t;
  g_int8 = int8_for(t);
}

std::vector<std::string> available_int8_isas() {
  std::vector<std::string> out;
  for (const Int8KernelTable* t : int8_choices(&kernels())) out.push_back(t->name);
  return out;
}

void set_int8_isa(const std::string& name) {
  for (const Int8KernelTable* t : int8_choices(&kernels()))
    if (name == t->name) {
      g_int8 = t;
      return;
    }
  std::string known;
  for (const std::string& n : available_int8_isas()) known += (known.empty() ? "" : ", ") + n;
  throw std::invalid_argument("int8 variant '" + name + "' does not go with kernel variant '" + kernels().name +
                              "' on this CPU (available: " + known + ")");
}

void row_to_f32(const WeightView& w, int64_t row, float* out) {
  const uint8_t* r = w.row(row);
  switch (w.type) {
    case DType::F32: std::memcpy(out, r, size_t(w.cols) * 4); return;
    case DType::F16:
    case DType::BF16:
      for (int64_t i = 0; i < w.cols; ++i) {
        uint16_t h;
        std::memcpy(&h, r + 2 * i, 2);
        out[i] = w.type == DType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
      }
      return;
    default: kernels().dequant_row(w, row, out);
  }
}

// Whether any of n elements (of U bits) at p has all of `exponent`'s bits set: written as a
// reduction the compiler makes vector code of, so that the scan runs at the memory's speed.
template <class U>
static bool exponent_all_ones(const uint8_t* p, int64_t n, U exponent) {
  unsigned found = 0;
  for (int64_t i = 0; i < n; ++i) {
    U x;
    std::memcpy(&x, p + i * int64_t(sizeof(U)), sizeof(U));
    found |= unsigned((x & exponent) == exponent);
  }
  return found != 0;
}

// Units [u0, u1) (elements, or blocks) of weights of type t at p.
static bool non_finite_in(const uint8_t* p, int64_t u0, int64_t u1, const WeightTypeInfo& t) {
  switch (t.type) {
    case DType::F32: return exponent_all_ones<uint32_t>(p + u0 * 4, u1 - u0, 0x7F800000u);
    case DType::F16: return exponent_all_ones<uint16_t>(p + u0 * 2, u1 - u0, 0x7C00);
    case DType::BF16: return exponent_all_ones<uint16_t>(p + u0 * 2, u1 - u0, 0x7F80);
    default: {
      unsigned found = 0;
      for (int64_t b = u0; b < u1; ++b)
        for (int j = 0; j < t.half_scales; ++j) {
          uint16_t h;
          std::memcpy(&h, p + b * t.bytes + t.half_scales_at + 2 * j, 2);
          found |= unsigned((h & 0x7C00) == 0x7C00);
        }
      return found != 0;
    }
  }
}

bool has_non_finite(const void* data, size_t bytes, DType type) {
  const WeightTypeInfo& t = weight_type(type);
  if (bytes % size_t(t.bytes))
    throw std::invalid_argument(std::string("a scan for non-finite ") + t.name + " weights needs whole " +
                                (t.values > 1 ? "blocks" : "elements") + " of " + std::to_string(t.bytes) + " bytes");
  const auto* p = static_cast<const uint8_t*>(data);
  const int64_t units = int64_t(bytes / size_t(t.bytes));
  constexpr int64_t CHUNK = 1 << 16;  // elements or blocks per piece of work: 128 KB - 2 MB
  std::atomic<bool> found{false};
  parallel_for_if(bytes > (size_t(1) << 22), (units + CHUNK - 1) / CHUNK, 1, Split::Even, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1 && !found.load(std::memory_order_relaxed); ++c)
      if (non_finite_in(p, c * CHUNK, std::min(units, (c + 1) * CHUNK), t)) found.store(true, std::memory_order_relaxed);
  });
  return found.load();
}

}  // namespace tokentrail
