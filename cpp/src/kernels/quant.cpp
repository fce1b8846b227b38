// Block-quantized weights in the GGML layouts: dequantize one row at a time
// into a small buffer and take dot products from it, so a matrix is never
// widened as a whole and each block is read from memory once per product.
#include <algorithm>
#include <cstring>
#include <vector>

#include "tokentrail/kernels.h"

namespace tokentrail {
namespace {

inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}

void dequant_q8_0(const uint8_t* b, float* y) {  // d:f16, qs:int8[32]
  const float d = half(b);
  const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
  for (int i = 0; i < 32; ++i) y[i] = d * q[i];
}

void dequant_q4_0(const uint8_t* b, float* y) {  // d:f16, qs:u8[16], low nibbles first
  const float d = half(b);
  const uint8_t* q = b + 2;
  for (int i = 0; i < 16; ++i) {
    y[i] = d * (int(q[i] & 0xF) - 8);
    y[i + 16] = d * (int(q[i] >> 4) - 8);
  }
}

// 6-bit scale and min of sub-block j, packed into 12 bytes.
inline void scale_min_k4(int j, const uint8_t* s, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

void dequant_q4_k(const uint8_t* b, float* y) {  // d, dmin: f16; scales[12]; qs[128]
  const float d = half(b), dmin = half(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
    int sc, m;
    scale_min_k4(is, scales, sc, m);
    const float d1 = d * sc, m1 = dmin * m;
    scale_min_k4(is + 1, scales, sc, m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) y[j + l] = d1 * (q[l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) y[j + 32 + l] = d2 * (q[l] >> 4) - m2;
  }
}

void dequant_q6_k(const uint8_t* b, float* y) {  // ql[128], qh[64], scales:int8[16], d:f16
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half(b + 208);
  for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = int((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = int((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = int((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = int((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[n + l] = d * sc[is] * q1;
      y[n + l + 32] = d * sc[is + 2] * q2;
      y[n + l + 64] = d * sc[is + 4] * q3;
      y[n + l + 96] = d * sc[is + 6] * q4;
    }
  }
}

using DequantFn = void (*)(const uint8_t*, float*);

DequantFn dequant_fn(DType t) {
  switch (t) {
    case DType::Q8_0: return dequant_q8_0;
    case DType::Q4_0: return dequant_q4_0;
    case DType::Q4_K: return dequant_q4_k;
    case DType::Q6_K: return dequant_q6_k;
    default: return nullptr;
  }
}

}  // namespace

void row_to_f32(const WeightView& w, int64_t row, float* out) {
  const uint8_t* r = w.row(row);
  switch (w.type) {
    case DType::F32: std::memcpy(out, r, size_t(w.cols) * 4); return;
    case DType::F16:
      for (int64_t i = 0; i < w.cols; ++i) { uint16_t h; std::memcpy(&h, r + 2 * i, 2); out[i] = f16_to_f32(h); }
      return;
    case DType::BF16:
      for (int64_t i = 0; i < w.cols; ++i) { uint16_t h; std::memcpy(&h, r + 2 * i, 2); out[i] = bf16_to_f32(h); }
      return;
    default: {
      const BlockLayout bl = block_layout(w.type);
      const DequantFn f = dequant_fn(w.type);
      for (int64_t b = 0; b < w.cols / bl.values; ++b) f(r + b * bl.bytes, out + b * bl.values);
    }
  }
}

void matmul_quant(const WeightView& w, const float* x, int n, float* y, const float* bias) {
  const BlockLayout bl = block_layout(w.type);
  if (w.cols % bl.values) throw std::invalid_argument("quantized weight columns must be a multiple of the block size");
  const int rows = int(w.rows), K = int(w.cols);
  const KernelTable& kt = kernels();
#pragma omp parallel if (double(rows) * K * n > 200000.0)
  {
    std::vector<float> buf(K);
    const WeightView one{buf.data(), DType::F32, 1, K, size_t(K) * 4};
    std::vector<float> out(n);
#pragma omp for schedule(static)
    for (int r = 0; r < rows; ++r) {
      row_to_f32(w, r, buf.data());
      // The dequantized row is one f32 weight row: reuse the float kernel for its dot products.
      for (int t = 0; t < n; ++t) out[t] = 0.0f;
      kt.matmul(one, x, n, out.data(), nullptr);
      for (int t = 0; t < n; ++t) y[size_t(t) * rows + r] = out[t] + (bias ? bias[r] : 0.0f);
    }
  }
}

}  // namespace tokentrail
