// The forward pass, read top to bottom as the journey of the tokens:
// embed -> [norm -> attention -> residual -> norm -> MLP -> residual] x L -> norm -> unembed.
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

  std::vector<float> x(nd), h(nd), q(size_t(n) * qs), k(size_t(n) * kvs), v(size_t(n) * kvs), z(size_t(n) * qs);
  std::vector<float> a(size_t(n) * c.ffn), u(c.gated_mlp ? size_t(n) * c.ffn : 0);
  std::vector<int> positions(n);
  for (int i = 0; i < n; ++i) positions[i] = pos0 + i;

  // Embedding (and learned positions).
  for (int i = 0; i < n; ++i) row_to_f32(w_.embed, tokens[i], x.data() + size_t(i) * d);
  apply_site(hooks, P_EMBED, -1, x.data(), n, d, pos0, 0);
  if (c.learned_positions) {
    for (int i = 0; i < n; ++i) row_to_f32(w_.pos_embed, pos0 + i, h.data() + size_t(i) * d);
    apply_site(hooks, P_POS_EMBED, -1, h.data(), n, d, pos0, 0);
    add_into(x.data(), h.data(), nd);
  }

  const float scale = 1.0f / std::sqrt(float(c.head_dim));
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = w_.layers[l];
    apply_site(hooks, P_RESID_PRE, l, x.data(), n, d, pos0, 0);

    // Attention.
    normalize(c, x.data(), L.attn_norm_w, L.attn_norm_b, n, h.data());
    apply_site(hooks, P_ATTN_NORM, l, h.data(), n, d, pos0, 0);
    kernels().matmul(L.q, h.data(), n, q.data(), L.q_b);
    kernels().matmul(L.k, h.data(), n, k.data(), L.k_b);
    kernels().matmul(L.v, h.data(), n, v.data(), L.v_b);
    if (!c.learned_positions) {
      K.rope(q.data(), n, c.n_heads, c.head_dim, positions.data(), c.rope_theta, c.rope_adjacent);
      K.rope(k.data(), n, c.n_kv_heads, c.head_dim, positions.data(), c.rope_theta, c.rope_adjacent);
    }
    apply_site(hooks, P_Q, l, q.data(), n, qs, pos0, c.n_heads);
    apply_site(hooks, P_K, l, k.data(), n, kvs, pos0, c.n_kv_heads);
    apply_site(hooks, P_V, l, v.data(), n, kvs, pos0, c.n_kv_heads);
    cache.store(l, pos0, n, k.data(), v.data());
    const int cap = cache.capacity();
    AttentionCapture cap_buf;
    std::vector<float> scores_buf, pattern_buf;
    Site* s_site = hooks ? hooks->find(P_ATTN_SCORES, l) : nullptr;
    Site* p_site = hooks ? hooks->find(P_ATTN_PATTERN, l) : nullptr;
    const int ctx = pos0 + n;
    const size_t table = size_t(n) * c.n_heads * ctx;
    if (s_site && s_site->capture) { scores_buf.resize(table); cap_buf.scores = scores_buf.data(); }
    if (p_site && p_site->capture) { pattern_buf.resize(table); cap_buf.pattern = pattern_buf.data(); }
    K.attention(q.data(), cache.k(l), cache.v(l), cache.type(), cap, n, pos0, c.n_heads, c.n_kv_heads, c.head_dim,
                scale, z.data(),
                (cap_buf.scores || cap_buf.pattern) ? &cap_buf : nullptr);
    const int row = c.n_heads * ctx;
    if (cap_buf.scores) capture_rows(s_site, scores_buf.data(), n, row, pos0, {c.n_heads, ctx});
    if (cap_buf.pattern) capture_rows(p_site, pattern_buf.data(), n, row, pos0, {c.n_heads, ctx});
    apply_site(hooks, P_ATTN_Z, l, z.data(), n, qs, pos0, c.n_heads);
    kernels().matmul(L.o, z.data(), n, h.data(), L.o_b);
    apply_site(hooks, P_ATTN_OUT, l, h.data(), n, d, pos0, 0);
    add_into(x.data(), h.data(), nd);
    apply_site(hooks, P_RESID_MID, l, x.data(), n, d, pos0, 0);

    // MLP.
    normalize(c, x.data(), L.mlp_norm_w, L.mlp_norm_b, n, h.data());
    apply_site(hooks, P_MLP_NORM, l, h.data(), n, d, pos0, 0);
    const size_t nf = size_t(n) * c.ffn;
    if (c.gated_mlp) {
      kernels().matmul(L.gate, h.data(), n, a.data(), L.gate_b);
      kernels().matmul(L.up, h.data(), n, u.data(), L.up_b);
      apply_site(hooks, P_MLP_PRE, l, a.data(), n, c.ffn, pos0, 0);
      apply_site(hooks, P_MLP_PRE_LINEAR, l, u.data(), n, c.ffn, pos0, 0);
      activate(c.act, a.data(), nf);
      for (size_t i = 0; i < nf; ++i) a[i] *= u[i];
    } else {
      kernels().matmul(L.up, h.data(), n, a.data(), L.up_b);
      apply_site(hooks, P_MLP_PRE, l, a.data(), n, c.ffn, pos0, 0);
      activate(c.act, a.data(), nf);
    }
    apply_site(hooks, P_MLP_POST, l, a.data(), n, c.ffn, pos0, 0);
    kernels().matmul(L.down, a.data(), n, h.data(), L.down_b);
    apply_site(hooks, P_MLP_OUT, l, h.data(), n, d, pos0, 0);
    add_into(x.data(), h.data(), nd);
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
  std::vector<float> out(size_t(rows) * c.vocab);
  const WeightView& un = w_.unembed.empty() ? w_.embed : w_.unembed;
  kernels().matmul(un, h.data(), rows, out.data(), nullptr);
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
