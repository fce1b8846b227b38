#include <algorithm>
#include <stdexcept>
#include <string>

#include "tokentrail/model.h"

namespace tokentrail {

KVCache::KVCache(const Config& cfg, int limit)
    : n_layers_(cfg.n_layers), n_kv_(cfg.n_kv_heads), head_dim_(cfg.head_dim), limit_(limit) {
  if (limit < 1) throw std::invalid_argument("KV cache limit must be at least 1 position");
}

void KVCache::reserve(int positions) {
  if (positions <= capacity_) return;
  if (positions > limit_)
    throw std::length_error("KV cache is full: " + std::to_string(positions) + " positions needed, limit is " +
                            std::to_string(limit_));
  // Geometric growth keeps one-token appends amortised O(1).
  int cap = std::max(positions, std::min(limit_, std::max(64, capacity_ * 2)));
  const size_t per_layer = size_t(n_kv_) * cap * head_dim_;
  std::vector<float> k(per_layer * n_layers_), v(per_layer * n_layers_);
  for (int l = 0; l < n_layers_; ++l)
    for (int h = 0; h < n_kv_; ++h) {
      const size_t src = (size_t(l) * n_kv_ + h) * capacity_ * head_dim_;
      const size_t dst = (size_t(l) * n_kv_ + h) * cap * head_dim_;
      std::copy(k_.begin() + src, k_.begin() + src + size_t(length_) * head_dim_, k.begin() + dst);
      std::copy(v_.begin() + src, v_.begin() + src + size_t(length_) * head_dim_, v.begin() + dst);
    }
  k_.swap(k);
  v_.swap(v);
  capacity_ = cap;
}

void KVCache::truncate(int positions) {
  if (positions < 0 || positions > length_)
    throw std::out_of_range("cannot truncate a KV cache of " + std::to_string(length_) + " positions to " +
                            std::to_string(positions));
  length_ = positions;
}

std::unique_ptr<KVCache> KVCache::clone() const {
  // Copy only what is filled: a fork costs the history, not the capacity.
  Config c;
  c.n_layers = n_layers_;
  c.n_kv_heads = n_kv_;
  c.head_dim = head_dim_;
  auto out = std::make_unique<KVCache>(c, limit_);
  if (length_ == 0) return out;
  out->reserve(length_);
  for (int l = 0; l < n_layers_; ++l)
    for (int h = 0; h < n_kv_; ++h) {
      const size_t src = (size_t(l) * n_kv_ + h) * capacity_ * head_dim_;
      const size_t dst = (size_t(l) * n_kv_ + h) * out->capacity_ * head_dim_;
      std::copy(k_.begin() + src, k_.begin() + src + size_t(length_) * head_dim_, out->k_.begin() + dst);
      std::copy(v_.begin() + src, v_.begin() + src + size_t(length_) * head_dim_, out->v_.begin() + dst);
    }
  out->length_ = length_;
  return out;
}

}  // namespace tokentrail
