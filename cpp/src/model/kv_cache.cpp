#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "tokentrail/model.h"

namespace tokentrail {

KVCache::KVCache(const Config& cfg, int limit, DType type, const void* owner)
    : n_layers_(cfg.n_layers), n_kv_(cfg.n_kv_heads), head_dim_(cfg.head_dim), limit_(limit), type_(type),
      owner_(owner) {
  if (limit < 1) throw std::invalid_argument("KV cache limit must be at least 1 position");
  if (type != DType::F32 && type != DType::F16)
    throw std::invalid_argument(std::string("KV cache type must be f32 or f16, not ") + dtype_name(type));
}

void KVCache::copy_layer(const std::vector<uint8_t>& from, int cap_from, std::vector<uint8_t>& to) const {
  const size_t row = size_t(head_dim_) * elem(), filled = size_t(length_) * row;
  for (int h = 0; h < n_kv_; ++h)
    std::memcpy(to.data() + size_t(h) * capacity_ * row, from.data() + size_t(h) * cap_from * row, filled);
}

void KVCache::reserve(int positions) {
  if (positions <= capacity_) return;
  if (positions > limit_)
    throw std::length_error("KV cache is full: " + std::to_string(positions) + " positions needed, limit is " +
                            std::to_string(limit_));
  // Geometric growth keeps one-token appends amortised O(1).
  const int cap = std::max(positions, std::min(limit_, std::max(64, capacity_ * 2)));
  const int old_cap = capacity_;
  capacity_ = cap;
  k_.resize(n_layers_);
  v_.resize(n_layers_);
  for (auto* kind : {&k_, &v_})
    for (auto& layer : *kind) {
      std::vector<uint8_t> grown(layer_bytes(), 0);
      if (length_ > 0) copy_layer(layer, old_cap, grown);
      layer.swap(grown);  // the old layer is freed here, before the next one grows
    }
}

void KVCache::store(int layer, int pos0, int n, const float* k, const float* v) {
  const int kvs = n_kv_ * head_dim_;
  uint8_t* kc = this->k(layer);
  uint8_t* vc = this->v(layer);
  for (int i = 0; i < n; ++i)
    for (int g = 0; g < n_kv_; ++g) {
      const size_t dst = (size_t(g) * capacity_ + pos0 + i) * head_dim_, src = size_t(i) * kvs + size_t(g) * head_dim_;
      if (type_ == DType::F32) {
        std::memcpy(reinterpret_cast<float*>(kc) + dst, k + src, size_t(head_dim_) * 4);
        std::memcpy(reinterpret_cast<float*>(vc) + dst, v + src, size_t(head_dim_) * 4);
      } else {
        uint16_t* kh = reinterpret_cast<uint16_t*>(kc) + dst;
        uint16_t* vh = reinterpret_cast<uint16_t*>(vc) + dst;
        for (int d = 0; d < head_dim_; ++d) {
          kh[d] = f32_to_f16(k[src + d]);
          vh[d] = f32_to_f16(v[src + d]);
        }
      }
    }
}

void KVCache::truncate(int positions) {
  if (positions < 0 || positions > length_)
    throw std::out_of_range("cannot truncate a KV cache of " + std::to_string(length_) + " positions to " +
                            std::to_string(positions));
  length_ = positions;
}

size_t KVCache::scratch_bytes() const {
  const ForwardBuffers& b = buffers_;
  size_t n = b.positions.capacity() * sizeof(int);
  for (const auto* v : {&b.x, &b.h, &b.m, &b.out, &b.q, &b.k, &b.v, &b.z, &b.a, &b.u, &b.normed, &b.unembed_in,
                        &b.logits})
    n += v->capacity() * sizeof(float);
  return n;
}

std::unique_ptr<KVCache> KVCache::clone(int positions) const {
  // Copy only what is asked of the filled part: a fork costs the history, not the capacity.
  if (positions < 0) positions = length_;
  if (positions > length_)
    throw std::out_of_range("cannot copy " + std::to_string(positions) + " positions of a KV cache holding " +
                            std::to_string(length_));
  Config c;
  c.n_layers = n_layers_;
  c.n_kv_heads = n_kv_;
  c.head_dim = head_dim_;
  auto out = std::make_unique<KVCache>(c, limit_, type_, owner_);
  if (positions == 0) return out;
  out->reserve(positions);
  out->length_ = positions;  // copy_layer copies the copy's length
  for (int l = 0; l < n_layers_; ++l) {
    out->copy_layer(k_[l], capacity_, out->k_[l]);  // laid out for the copy's own capacity
    out->copy_layer(v_[l], capacity_, out->v_[l]);
  }
  return out;
}

}  // namespace tokentrail
