// The table of capture points and the mechanics of capturing and intervening.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "hooks_apply.h"

namespace tokentrail {

namespace {
// Order matches enum Point. Shapes are per position (one row of the record).
const PointInfo kPoints[P_COUNT] = {
    {"embed", false, "[d_model]", "token embedding row of each input token"},
    {"pos_embed", false, "[d_model]", "learned position embedding (models with learned positions)"},
    {"resid_pre", true, "[d_model]", "residual stream entering the block"},
    {"attn_norm", true, "[d_model]", "normalized input of attention"},
    {"q", true, "[n_heads, head_dim]", "queries per head, after rotary embedding where applied"},
    {"k", true, "[n_kv_heads, head_dim]", "keys per key/value head, after rotary embedding where applied"},
    {"v", true, "[n_kv_heads, head_dim]", "values per key/value head"},
    {"attn_scores", true, "[n_heads, ctx]", "scaled q.k before softmax; -inf above the causal diagonal"},
    {"attn_pattern", true, "[n_heads, ctx]", "attention probabilities over earlier positions"},
    {"attn_z", true, "[n_heads, head_dim]", "per-head probability-weighted mix of values"},
    {"attn_out", true, "[d_model]", "attention output after the output projection"},
    {"resid_mid", true, "[d_model]", "residual stream between attention and MLP"},
    {"mlp_norm", true, "[d_model]", "normalized input of the MLP"},
    {"mlp_pre", true, "[d_ffn]", "MLP pre-activation (the gate projection in gated MLPs)"},
    {"mlp_pre_linear", true, "[d_ffn]", "up projection of gated MLPs (multiplies the activation)"},
    {"mlp_post", true, "[d_ffn]", "MLP hidden activation, the input of the down projection"},
    {"mlp_out", true, "[d_model]", "MLP output after the down projection"},
    {"resid_post", true, "[d_model]", "residual stream leaving the block"},
    {"final_norm", false, "[d_model]", "final normalization, the input of the unembedding"},
    {"logits", false, "[vocab]", "next-token logits"},
    {"router", true, "[n_experts]", "router probabilities over the experts (mixture-of-experts models)"},
};
}  // namespace

const PointInfo& point_info(int p) {
  if (p < 0 || p >= P_COUNT) throw std::out_of_range("capture point id out of range");
  return kPoints[p];
}

bool Site::wants(int pos) const {
  return capture && (positions.empty() || std::find(positions.begin(), positions.end(), pos) != positions.end());
}

size_t Hooks::index(int point, int layer) const {
  if (point < 0 || point >= P_COUNT) throw std::out_of_range("capture point id out of range");
  const bool per_layer = kPoints[point].per_layer;
  if (per_layer ? (layer < 0 || layer >= n_layers_) : layer != -1)
    throw std::out_of_range(std::string("layer ") + std::to_string(layer) + " is not valid for capture point '" +
                            kPoints[point].name + "'");
  return size_t(point) * (n_layers_ + 1) + size_t(layer + 1);
}

Site& Hooks::at(int point, int layer) {
  auto& s = sites_[index(point, layer)];
  if (!s) s = std::make_unique<Site>();
  return *s;
}

void apply_site(Hooks* hooks, int point, int layer, float* data, int n, int width, int pos0, int heads) {
  if (!hooks) return;
  Site* site = hooks->find(point, layer);
  if (!site) return;
  if (!site->replace.empty()) {
    for (int i = 0; i < n; ++i) {
      auto it = site->replace.find(pos0 + i);
      if (it == site->replace.end()) continue;
      if (int(it->second.size()) != width)
        throw std::invalid_argument(std::string("replacement for '") + point_info(point).name + "' has " +
                                    std::to_string(it->second.size()) + " values, expected " + std::to_string(width));
      std::copy(it->second.begin(), it->second.end(), data + size_t(i) * width);
    }
  }
  if (!site->head_scale.empty()) {
    if (heads <= 0 || int(site->head_scale.size()) != heads)
      throw std::invalid_argument(std::string("head scaling at '") + point_info(point).name + "' needs " +
                                  std::to_string(heads) + " factors");
    const int hd = width / heads;
    for (int i = 0; i < n; ++i)
      for (int h = 0; h < heads; ++h) {
        float* seg = data + size_t(i) * width + size_t(h) * hd;
        for (int j = 0; j < hd; ++j) seg[j] *= site->head_scale[h];
      }
  }
  if (!site->add.empty()) {
    if (int(site->add.size()) != width)
      throw std::invalid_argument(std::string("vector added at '") + point_info(point).name + "' has " +
                                  std::to_string(site->add.size()) + " values, expected " + std::to_string(width));
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < width; ++j) data[size_t(i) * width + j] += site->add[j];
  }
  capture_rows(site, data, n, width, pos0, {width});
}

void capture_rows(Site* site, const float* data, int n, int row_size, int pos0, std::vector<int64_t> row_shape) {
  if (!site || !site->capture) return;
  Captured c;
  int wanted = 0;
  for (int i = 0; i < n; ++i) wanted += site->wants(pos0 + i);
  c.data.reserve(size_t(wanted) * row_size);  // one allocation, no regrowth copies
  for (int i = 0; i < n; ++i) {
    if (!site->wants(pos0 + i)) continue;
    c.positions.push_back(pos0 + i);
    c.data.insert(c.data.end(), data + size_t(i) * row_size, data + size_t(i + 1) * row_size);
  }
  if (c.positions.empty()) return;
  c.shape.push_back(int64_t(c.positions.size()));
  c.shape.insert(c.shape.end(), row_shape.begin(), row_shape.end());
  site->captured.push_back(std::move(c));
}

}  // namespace tokentrail
