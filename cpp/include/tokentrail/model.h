// One forward pass for every decoder-only family; families differ only by Config.
#pragma once
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "tokentrail/kernels.h"

namespace tokentrail {

enum class Norm { RMS, Layer };
enum class Activation { SiLU, GeluTanh, GeluErf, ReLU };
// RMSNorm of queries and keys before rotary embedding: none, per head (Qwen3, Gemma 3),
// or over the whole projection (OLMo 2).
enum class QKNorm { None, Head, Full };

struct Config {
  int vocab = 0, dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, ffn = 0, max_seq = 0;
  Norm norm = Norm::RMS;
  float norm_eps = 1e-5f;
  Activation act = Activation::SiLU;
  bool gated_mlp = true;
  bool learned_positions = false;  // else rotary
  bool rope_adjacent = false;      // pairs (2i, 2i+1) instead of (i, i + rotary_dim/2)
  int rotary_dim = 0;              // leading elements of each head that rotate (partial rotary)
  // Rotary frequencies, rotary_dim / 2 of them, for full-attention layers and for
  // sliding-window layers (which may have their own base); cos and sin scaled by the factor.
  std::vector<float> inv_freq, inv_freq_local;
  float rope_attn_factor = 1.0f;
  // LongRoPE: calls that reach past `rope_long_after` positions rotate with the long table.
  std::vector<float> inv_freq_long;
  int rope_long_after = 0;
  QKNorm qk_norm = QKNorm::None;
  bool pre_norms = true;           // normalise the input of attention and MLP
  bool post_norms = false;         // normalise the output of attention and MLP before the residual add
  bool parallel_residual = false;  // x + attn(norm1(x)) + mlp(norm2(x)), one residual add
  std::vector<uint8_t> sliding;    // per layer: 1 = sliding-window attention
  int sliding_window = 0;
  float attn_scale = 0.0f;         // multiplies q.k; from 1 / sqrt(head_dim) when 0
  float attn_softcap = 0.0f, final_softcap = 0.0f;  // > 0: c * tanh(x / c) on scores / logits
  float embed_scale = 1.0f;        // multiplies the embedding rows
  int n_experts = 0, n_experts_used = 0;  // mixture of experts in every MLP when n_experts > 0
  bool renormalize_experts = true;        // chosen experts' weights rescaled to sum to 1
};

// Small vectors (norm weights, biases) are always float32; absent ones are null.
struct LayerWeights {
  const float *attn_norm_w = nullptr, *attn_norm_b = nullptr;
  WeightView q, k, v, o;
  const float *q_b = nullptr, *k_b = nullptr, *v_b = nullptr, *o_b = nullptr;
  const float *q_norm_w = nullptr, *k_norm_w = nullptr;
  const float *attn_post_norm_w = nullptr, *attn_post_norm_b = nullptr;
  const float *mlp_norm_w = nullptr, *mlp_norm_b = nullptr;
  const float *mlp_post_norm_w = nullptr, *mlp_post_norm_b = nullptr;
  WeightView gate, up, down;
  const float *gate_b = nullptr, *up_b = nullptr, *down_b = nullptr;
  // Mixture of experts: the router and each expert's gated MLP.
  WeightView router;
  std::vector<WeightView> expert_gate, expert_up, expert_down;
};

struct Weights {
  WeightView embed, pos_embed, unembed;
  const float *final_norm_w = nullptr, *final_norm_b = nullptr;
  std::vector<LayerWeights> layers;
};

// The working buffers of a forward step (activations of every row, logits), kept with the
// KV cache that ran it so that the next decode step reuses them instead of allocating.
struct ForwardBuffers {
  std::vector<float> x, h, m, out, q, k, v, z, a, u, normed, unembed_in, logits;
  std::vector<int> positions;
};

// Keys and values of every layer, laid out [layer][kv_head][position][head_dim]
// so attention reads each head's history contiguously. Grows on demand up to
// `limit`. Elements are float32 (exact) or f16 (half the memory and the bytes
// attention reads per token; keys and values rounded to half precision).
class KVCache {
 public:
  // `owner` names the model whose keys and values this cache holds (forward refuses any other's).
  KVCache(const Config& cfg, int limit, DType type = DType::F32, const void* owner = nullptr);
  const void* owner() const { return owner_; }
  int length() const { return length_; }
  int capacity() const { return capacity_; }
  int limit() const { return limit_; }
  DType type() const { return type_; }
  void reserve(int positions);
  void truncate(int positions);
  // A copy of the first `positions` positions (all that are filled when negative).
  std::unique_ptr<KVCache> clone(int positions = -1) const;
  uint8_t* k(int layer) { return k_[layer].data(); }
  uint8_t* v(int layer) { return v_[layer].data(); }
  // Rows [n][n_kv * head_dim] of float32 stored at positions pos0.. of a layer.
  void store(int layer, int pos0, int n, const float* k, const float* v);
  void advance(int n) { length_ += n; }
  // Scratch for the forward pass; never part of the cache's contents (a clone starts without).
  ForwardBuffers& buffers() { return buffers_; }
  // Bytes the scratch holds (a batch's, when this cache led it), and letting them go: a cache kept
  // for later (a prompt cache's) should hold its keys and values, not a past step's activations.
  size_t scratch_bytes() const;
  void release_scratch() { buffers_ = ForwardBuffers{}; }

 private:
  size_t elem() const { return type_ == DType::F16 ? 2 : 4; }
  size_t layer_bytes() const { return size_t(n_kv_) * capacity_ * head_dim_ * elem(); }
  // One layer's filled positions, from buffers laid out for capacity `cap_from` into `to` (laid out for capacity_).
  void copy_layer(const std::vector<uint8_t>& from, int cap_from, std::vector<uint8_t>& to) const;
  int n_layers_, n_kv_, head_dim_, limit_, capacity_ = 0, length_ = 0;
  DType type_;
  const void* owner_;
  // One buffer per layer and kind: growing replaces them one at a time, so a
  // resize holds the new cache plus a single old layer, not two whole caches.
  std::vector<std::vector<uint8_t>> k_, v_;
  ForwardBuffers buffers_;
};

// Capture points: named places on the journey where a tensor can be copied out
// or changed. The table in hooks.cpp is the one list of them.
enum Point : int {
  P_EMBED, P_POS_EMBED, P_RESID_PRE, P_ATTN_NORM, P_Q, P_K, P_V, P_ATTN_SCORES, P_ATTN_PATTERN,
  P_ATTN_Z, P_ATTN_OUT, P_RESID_MID, P_MLP_NORM, P_MLP_PRE, P_MLP_PRE_LINEAR, P_MLP_POST,
  P_MLP_OUT, P_RESID_POST, P_FINAL_NORM, P_LOGITS, P_ROUTER, P_COUNT
};

struct PointInfo {
  const char* name;
  bool per_layer;
  const char* shape;  // per captured position
  const char* doc;
};
const PointInfo& point_info(int p);

// A tensor copied out during one forward call: rows for the selected positions.
struct Captured {
  std::vector<float> data;
  std::vector<int64_t> shape;     // [n_selected, ...]
  std::vector<int> positions;     // absolute position of each row
};

// What happens at one (point, layer): interventions first (replace, scale
// heads, add), then the capture, so the record is the value the model used.
struct Site {
  bool capture = false;
  std::vector<int> positions;                          // capture these only; empty = all
  std::unordered_map<int, std::vector<float>> replace;  // absolute position -> row
  std::vector<float> head_scale;                       // one factor per head
  std::vector<float> add;                              // added to every row
  std::vector<Captured> captured;
  bool wants(int pos) const;
};

class Hooks {
 public:
  explicit Hooks(int n_layers) : n_layers_(n_layers), sites_(size_t(P_COUNT) * (n_layers + 1)) {}
  Site& at(int point, int layer);                // creates
  Site* find(int point, int layer) const {      // null when nothing is asked there
    return sites_[index(point, layer)].get();
  }
  void clear() { for (auto& s : sites_) s.reset(); }
  void clear_captures() { for (auto& s : sites_) if (s) s->captured.clear(); }
  int n_layers() const { return n_layers_; }
  size_t index(int point, int layer) const;

 private:
  int n_layers_;
  std::vector<std::unique_ptr<Site>> sites_;
};

enum class LogitsMode { None, Last, All };

// One sequence's part of a step: tokens to run at the next positions of its own
// cache, with its own hooks (or none) and its own choice of logits.
struct SequenceStep {
  KVCache* cache = nullptr;
  const int* tokens = nullptr;
  int n = 0;
  LogitsMode mode = LogitsMode::Last;
  Hooks* hooks = nullptr;
  std::vector<float>* logits = nullptr;  // receives [1 or n][vocab] per mode (empty for None)
};

class Model {
 public:
  Model(Config cfg, Weights w) : cfg_(std::move(cfg)), w_(std::move(w)) {}
  const Config& config() const { return cfg_; }
  // Advances every sequence of the batch by its tokens: the rows of all of them
  // go through each weight matrix together (each weight is read once per step),
  // while rotary positions, the cache store and attention run per sequence.
  // Every argument is checked before any cache changes.
  void forward(const SequenceStep* batch, int count) const;
  // The batch of one: runs tokens at the cache's next positions, appends their
  // keys and values, and writes logits ([1 or n][vocab], per mode) into `logits`.
  void forward(KVCache& cache, const int* tokens, int n, LogitsMode mode, Hooks* hooks,
               std::vector<float>& logits) const;

 private:
  Config cfg_;
  Weights w_;
};

}  // namespace tokentrail
