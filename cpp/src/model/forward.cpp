// The forward pass, read top to bottom as the journey of the tokens:
// embed -> [norm -> attention -> residual -> norm -> MLP -> residual] x L -> norm -> unembed.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "hooks_apply.h"
#include "tokentrail/model.h"

namespace tokentrail {

namespace {

void normalize(const Config& c, const float* x, const float* w, const float* b, int rows, float* y) {
  if (c.norm == Norm::RMS)
    kernels().rmsnorm(x, w, rows, c.dim, c.norm_eps, y);
  else
    kernels().layernorm(x, w, b, rows, c.dim, c.norm_eps, y);
}

void activate(Activation a, float* x, size_t n) {
  const KernelTable& k = kernels();
  switch (a) {
    case Activation::SiLU: return k.silu(x, n);
    case Activation::GeluTanh: return k.gelu_tanh(x, n);
    case Activation::GeluErf: return k.gelu_erf(x, n);
    case Activation::ReLU: return k.relu(x, n);
  }
}

void add_into(float* x, const float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] += y[i];
}

// c * tanh(x / c): bounds logits smoothly to (-c, c).
void softcap(float* x, size_t n, float c) {
  for (size_t i = 0; i < n; ++i) x[i] = c * std::tanh(x[i] / c);
}

// y = down(act(gate(h)) * up(h)) (or down(act(up(h))) without a gate), hooks at mlp_pre/pre_linear/post.
struct MlpWeights {
  const WeightView *gate, *up, *down;
  const float *gate_b, *up_b, *down_b;
};

void dense_mlp(const Config& c, const MlpWeights& W, const float* h, int n, int ffn, float* a, float* u, float* y,
               Hooks* hooks, int l, int pos0) {
  const size_t nf = size_t(n) * ffn;
  if (c.gated_mlp) {
    kernels().matmul(*W.gate, h, n, a, W.gate_b);
    kernels().matmul(*W.up, h, n, u, W.up_b);
    apply_site(hooks, P_MLP_PRE, l, a, n, ffn, pos0, 0);
    apply_site(hooks, P_MLP_PRE_LINEAR, l, u, n, ffn, pos0, 0);
    activate(c.act, a, nf);
    for (size_t i = 0; i < nf; ++i) a[i] *= u[i];
  } else {
    kernels().matmul(*W.up, h, n, a, W.up_b);
    apply_site(hooks, P_MLP_PRE, l, a, n, ffn, pos0, 0);
    activate(c.act, a, nf);
  }
  apply_site(hooks, P_MLP_POST, l, a, n, ffn, pos0, 0);
  kernels().matmul(*W.down, a, n, y, W.down_b);
}

// Mixture of experts: the router's softmax picks the top experts of each token; each expert
// runs once over the rows of the tokens routed to it, and its output joins theirs weighted.
void moe_mlp(const Config& c, const LayerWeights& L, const float* h, int n, float* y, Hooks* hooks, int l, int pos0) {
  const int E = c.n_experts, top = c.n_experts_used, d = c.dim;
  std::vector<float> probs(size_t(n) * E);
  kernels().matmul(L.router, h, n, probs.data(), nullptr);
  kernels().softmax(probs.data(), n, E, 1.0f);
  apply_site(hooks, P_ROUTER, l, probs.data(), n, E, pos0, 0);
  // Per expert: the tokens it serves and their weights.
  std::vector<std::vector<int>> rows(E);
  std::vector<std::vector<float>> weights(E);
  std::vector<int> order(E);
  for (int i = 0; i < n; ++i) {
    const float* p = probs.data() + size_t(i) * E;
    for (int e = 0; e < E; ++e) order[e] = e;
    // Highest probability first; ties to the lower index, as a stable top-k does.
    std::partial_sort(order.begin(), order.begin() + top, order.end(),
                      [p](int a, int b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    float total = 0.0f;
    for (int t = 0; t < top; ++t) total += p[order[t]];
    for (int t = 0; t < top; ++t) {
      rows[order[t]].push_back(i);
      weights[order[t]].push_back(c.renormalize_experts ? p[order[t]] / total : p[order[t]]);
    }
  }
  std::fill(y, y + size_t(n) * d, 0.0f);
  std::vector<float> xin, a, u, out;
  for (int e = 0; e < E; ++e) {
    const int m = int(rows[e].size());
    if (!m) continue;
    xin.resize(size_t(m) * d);
    a.resize(size_t(m) * c.ffn);
    u.resize(size_t(m) * c.ffn);
    out.resize(size_t(m) * d);
    for (int r = 0; r < m; ++r) std::copy(h + size_t(rows[e][r]) * d, h + size_t(rows[e][r] + 1) * d, xin.data() + size_t(r) * d);
    const MlpWeights W{&L.expert_gate[e], &L.expert_up[e], &L.expert_down[e], nullptr, nullptr, nullptr};
    // Per-expert activations are not capture points; only the router and the summed output are.
    dense_mlp(c, W, xin.data(), m, c.ffn, a.data(), u.data(), out.data(), nullptr, l, pos0);
    for (int r = 0; r < m; ++r) {
      float* yr = y + size_t(rows[e][r]) * d;
      const float* o = out.data() + size_t(r) * d;
      const float w = weights[e][r];
      for (int j = 0; j < d; ++j) yr[j] += w * o[j];
    }
  }
}

}  // namespace

void Model::forward(KVCache& cache, const int* tokens, int n, LogitsMode mode, Hooks* hooks,
                    std::vector<float>& logits) const {
  const Config& c = cfg_;
  if (n <= 0) throw std::invalid_argument("forward needs at least one token");
  const int pos0 = cache.length();
  if (pos0 + n > cache.limit())
    throw std::length_error("context is full: " + std::to_string(pos0) + " positions cached + " + std::to_string(n) +
                            " new exceed the limit of " + std::to_string(cache.limit()));
  for (int i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= c.vocab)
      throw std::out_of_range("token id " + std::to_string(tokens[i]) + " is outside the vocabulary (size " +
                              std::to_string(c.vocab) + ")");
  cache.reserve(pos0 + n);
  const KernelTable& K = kernels();
  const int d = c.dim, qs = c.n_heads * c.head_dim, kvs = c.n_kv_heads * c.head_dim;
  const size_t nd = size_t(n) * d;

  // x: the residual stream; h: a block's input or output; m: the MLP's input in parallel blocks.
  std::vector<float> x(nd), h(nd), m(c.parallel_residual ? nd : 0), out(nd), q(size_t(n) * qs),
      k(size_t(n) * kvs), v(size_t(n) * kvs), z(size_t(n) * qs);
  std::vector<float> a(size_t(n) * c.ffn), u(c.gated_mlp ? size_t(n) * c.ffn : 0);
  std::vector<int> positions(n);
  for (int i = 0; i < n; ++i) positions[i] = pos0 + i;

  // Embedding (scaled, in families that scale it), then learned positions.
  for (int i = 0; i < n; ++i) row_to_f32(w_.embed, tokens[i], x.data() + size_t(i) * d);
  if (c.embed_scale != 1.0f)
    for (float& e : x) e *= c.embed_scale;
  apply_site(hooks, P_EMBED, -1, x.data(), n, d, pos0, 0);
  if (c.learned_positions) {
    for (int i = 0; i < n; ++i) row_to_f32(w_.pos_embed, pos0 + i, h.data() + size_t(i) * d);
    apply_site(hooks, P_POS_EMBED, -1, h.data(), n, d, pos0, 0);
    add_into(x.data(), h.data(), nd);
  }

  AttentionShape shape;
  shape.n = n;
  shape.pos0 = pos0;
  shape.n_heads = c.n_heads;
  shape.n_kv = c.n_kv_heads;
  shape.head_dim = c.head_dim;
  shape.scale = c.attn_scale > 0.0f ? c.attn_scale : 1.0f / std::sqrt(float(c.head_dim));
  shape.softcap = c.attn_softcap;
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = w_.layers[l];
    const bool sliding = !c.sliding.empty() && c.sliding[l];
    apply_site(hooks, P_RESID_PRE, l, x.data(), n, d, pos0, 0);

    // Attention.
    if (c.pre_norms)
      normalize(c, x.data(), L.attn_norm_w, L.attn_norm_b, n, h.data());
    else
      h = x;
    apply_site(hooks, P_ATTN_NORM, l, h.data(), n, d, pos0, 0);
    kernels().matmul(L.q, h.data(), n, q.data(), L.q_b);
    kernels().matmul(L.k, h.data(), n, k.data(), L.k_b);
    kernels().matmul(L.v, h.data(), n, v.data(), L.v_b);
    if (c.qk_norm == QKNorm::Head) {
      K.rmsnorm(q.data(), L.q_norm_w, n * c.n_heads, c.head_dim, c.norm_eps, q.data());
      K.rmsnorm(k.data(), L.k_norm_w, n * c.n_kv_heads, c.head_dim, c.norm_eps, k.data());
    } else if (c.qk_norm == QKNorm::Full) {
      K.rmsnorm(q.data(), L.q_norm_w, n, qs, c.norm_eps, q.data());
      K.rmsnorm(k.data(), L.k_norm_w, n, kvs, c.norm_eps, k.data());
    }
    if (!c.learned_positions) {
      const bool local = sliding && !c.inv_freq_local.empty();
      const bool long_table = !c.inv_freq_long.empty() && pos0 + n > c.rope_long_after;
      const float* freq = local ? c.inv_freq_local.data() : long_table ? c.inv_freq_long.data() : c.inv_freq.data();
      const float factor = local ? 1.0f : c.rope_attn_factor;
      K.rope(q.data(), n, c.n_heads, c.head_dim, c.rotary_dim, positions.data(), freq, factor, c.rope_adjacent);
      K.rope(k.data(), n, c.n_kv_heads, c.head_dim, c.rotary_dim, positions.data(), freq, factor, c.rope_adjacent);
    }
    apply_site(hooks, P_Q, l, q.data(), n, qs, pos0, c.n_heads);
    apply_site(hooks, P_K, l, k.data(), n, kvs, pos0, c.n_kv_heads);
    apply_site(hooks, P_V, l, v.data(), n, kvs, pos0, c.n_kv_heads);
    cache.store(l, pos0, n, k.data(), v.data());
    shape.cap = cache.capacity();
    shape.window = sliding ? c.sliding_window : 0;
    AttentionCapture cap_buf;
    std::vector<float> scores_buf, pattern_buf;
    Site* s_site = hooks ? hooks->find(P_ATTN_SCORES, l) : nullptr;
    Site* p_site = hooks ? hooks->find(P_ATTN_PATTERN, l) : nullptr;
    const int ctx = pos0 + n;
    const size_t table = size_t(n) * c.n_heads * ctx;
    if (s_site && s_site->capture) { scores_buf.resize(table); cap_buf.scores = scores_buf.data(); }
    if (p_site && p_site->capture) { pattern_buf.resize(table); cap_buf.pattern = pattern_buf.data(); }
    K.attention(q.data(), cache.k(l), cache.v(l), cache.type(), shape, z.data(),
                (cap_buf.scores || cap_buf.pattern) ? &cap_buf : nullptr);
    const int row = c.n_heads * ctx;
    if (cap_buf.scores) capture_rows(s_site, scores_buf.data(), n, row, pos0, {c.n_heads, ctx});
    if (cap_buf.pattern) capture_rows(p_site, pattern_buf.data(), n, row, pos0, {c.n_heads, ctx});
    apply_site(hooks, P_ATTN_Z, l, z.data(), n, qs, pos0, c.n_heads);
    // The MLP of a parallel block reads the same input as attention: normalise it before x changes.
    if (c.parallel_residual) normalize(c, x.data(), L.mlp_norm_w, L.mlp_norm_b, n, m.data());
    kernels().matmul(L.o, z.data(), n, h.data(), L.o_b);
    if (c.post_norms) normalize(c, h.data(), L.attn_post_norm_w, L.attn_post_norm_b, n, h.data());
    apply_site(hooks, P_ATTN_OUT, l, h.data(), n, d, pos0, 0);
    add_into(x.data(), h.data(), nd);
    apply_site(hooks, P_RESID_MID, l, x.data(), n, d, pos0, 0);

    // MLP.
    if (c.parallel_residual)
      h.swap(m);
    else if (c.pre_norms)
      normalize(c, x.data(), L.mlp_norm_w, L.mlp_norm_b, n, h.data());
    else
      h = x;
    apply_site(hooks, P_MLP_NORM, l, h.data(), n, d, pos0, 0);
    if (c.n_experts > 0) {
      moe_mlp(c, L, h.data(), n, out.data(), hooks, l, pos0);
    } else {
      const MlpWeights W{&L.gate, &L.up, &L.down, L.gate_b, L.up_b, L.down_b};
      dense_mlp(c, W, h.data(), n, c.ffn, a.data(), u.data(), out.data(), hooks, l, pos0);
    }
    if (c.post_norms) normalize(c, out.data(), L.mlp_post_norm_w, L.mlp_post_norm_b, n, out.data());
    apply_site(hooks, P_MLP_OUT, l, out.data(), n, d, pos0, 0);
    add_into(x.data(), out.data(), nd);
    apply_site(hooks, P_RESID_POST, l, x.data(), n, d, pos0, 0);
  }
  cache.advance(n);

  // Final norm and unembedding, for the rows someone needs.
  Site* fn_site = hooks ? hooks->find(P_FINAL_NORM, -1) : nullptr;
  Site* lg_site = hooks ? hooks->find(P_LOGITS, -1) : nullptr;
  const bool all_rows = mode == LogitsMode::All || (fn_site != nullptr) || (lg_site != nullptr);
  const int first = all_rows ? 0 : n - 1, rows = n - first;
  normalize(c, x.data() + size_t(first) * d, w_.final_norm_w, w_.final_norm_b, rows, h.data());
  apply_site(hooks, P_FINAL_NORM, -1, h.data(), rows, d, pos0 + first, 0);
  if (mode == LogitsMode::None && !lg_site) {
    logits.clear();
    return;
  }
  out.resize(size_t(rows) * c.vocab);
  const WeightView& un = w_.unembed.empty() ? w_.embed : w_.unembed;
  kernels().matmul(un, h.data(), rows, out.data(), nullptr);
  if (c.final_softcap > 0.0f) softcap(out.data(), out.size(), c.final_softcap);
  apply_site(hooks, P_LOGITS, -1, out.data(), rows, c.vocab, pos0 + first, 0);
  if (mode == LogitsMode::All) {
    logits.swap(out);
  } else if (mode == LogitsMode::Last) {
    logits.assign(out.end() - c.vocab, out.end());
  } else {
    logits.clear();
  }
}

}  // namespace tokentrail
