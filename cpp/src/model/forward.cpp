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

// Where one sequence's rows sit in the batch's concatenated buffers.
struct Rows {
  const SequenceStep* step;
  int row0;        // its first row in the batch
  int n;           // its rows (tokens this step)
  int pos0;        // the position of its first row
  bool long_rope;  // LongRoPE: this sequence reaches past the short table's range
};

// Each sequence's own hooks over the batch's buffers: interventions and
// captures see that sequence's rows and positions only.
class BatchHooks {
 public:
  explicit BatchHooks(const std::vector<Rows>& seqs) : seqs_(seqs) {
    for (const Rows& s : seqs) any_ = any_ || s.step->hooks != nullptr;
  }
  // Rows [batch rows][width]; `heads` > 0 when the width is split into head segments.
  void apply(int point, int layer, float* data, int width, int heads = 0) const {
    if (!any_) return;
    for (const Rows& s : seqs_)
      if (s.step->hooks)
        apply_site(s.step->hooks, point, layer, data + size_t(s.row0) * width, s.n, width, s.pos0, heads);
  }

 private:
  const std::vector<Rows>& seqs_;
  bool any_ = false;
};

// y = down(act(gate(h)) * up(h)) (or down(act(up(h))) without a gate), hooks at mlp_pre/pre_linear/post.
struct MlpWeights {
  const WeightView *gate, *up, *down;
  const float *gate_b, *up_b, *down_b;
};

void dense_mlp(const Config& c, const MlpWeights& W, const float* h, int n, int ffn, float* a, float* u, float* y,
               const BatchHooks* hooks, int l) {
  const size_t nf = size_t(n) * ffn;
  if (c.gated_mlp) {
    const MatmulJob gate_up[2] = {{W.gate, a, W.gate_b}, {W.up, u, W.up_b}};
    kernels().matmul_group(gate_up, 2, h, n);
    if (hooks) hooks->apply(P_MLP_PRE, l, a, ffn);
    if (hooks) hooks->apply(P_MLP_PRE_LINEAR, l, u, ffn);
    activate(c.act, a, nf);
    for (size_t i = 0; i < nf; ++i) a[i] *= u[i];
  } else {
    kernels().matmul(*W.up, h, n, a, W.up_b);
    if (hooks) hooks->apply(P_MLP_PRE, l, a, ffn);
    activate(c.act, a, nf);
  }
  if (hooks) hooks->apply(P_MLP_POST, l, a, ffn);
  kernels().matmul(*W.down, a, n, y, W.down_b);
}

// Mixture of experts: the router's softmax picks the top experts of each token; each expert
// runs once over the rows of the tokens routed to it (from every sequence of the batch),
// and its output joins theirs weighted.
void moe_mlp(const Config& c, const LayerWeights& L, const float* h, int n, float* y, const BatchHooks& hooks,
             int l) {
  const int E = c.n_experts, top = c.n_experts_used, d = c.dim;
  std::vector<float> probs(size_t(n) * E);
  kernels().matmul(L.router, h, n, probs.data(), nullptr);
  kernels().softmax(probs.data(), n, E, 1.0f);
  hooks.apply(P_ROUTER, l, probs.data(), E);
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
    dense_mlp(c, W, xin.data(), m, c.ffn, a.data(), u.data(), out.data(), nullptr, l);
    for (int r = 0; r < m; ++r) {
      float* yr = y + size_t(rows[e][r]) * d;
      const float* o = out.data() + size_t(r) * d;
      const float w = weights[e][r];
      for (int j = 0; j < d; ++j) yr[j] += w * o[j];
    }
  }
}

// Refuses a batch the pass cannot run, before any cache changes. Messages name
// the sequence when there are several.
void check_batch(const Config& c, const void* model, const SequenceStep* batch, int count) {
  if (count < 1) throw std::invalid_argument("forward needs at least one sequence");
  for (int i = 0; i < count; ++i) {
    const SequenceStep& s = batch[i];
    const std::string who = count > 1 ? "sequence " + std::to_string(i) + ": " : "";
    if (!s.cache || !s.logits || (s.n > 0 && !s.tokens))
      throw std::invalid_argument(who + "needs a KV cache, tokens and a place for its logits");
    if (s.cache->owner() != model) throw std::invalid_argument(who + "the KV cache was made for another model");
    if (s.hooks && s.hooks->n_layers() != c.n_layers) throw std::invalid_argument(who + "hooks were made for another model");
    if (s.n <= 0) throw std::invalid_argument(who + "forward needs at least one token");
    const int pos0 = s.cache->length();
    if (pos0 + s.n > s.cache->limit())
      throw std::length_error(who + "context is full: " + std::to_string(pos0) + " positions cached + " +
                              std::to_string(s.n) + " new exceed the limit of " + std::to_string(s.cache->limit()));
    for (int t = 0; t < s.n; ++t)
      if (s.tokens[t] < 0 || s.tokens[t] >= c.vocab)
        throw std::out_of_range(who + "token id " + std::to_string(s.tokens[t]) + " is outside the vocabulary (size " +
                                std::to_string(c.vocab) + ")");
    for (int j = 0; j < i; ++j) {
      if (batch[j].cache == s.cache)
        throw std::invalid_argument(who + "uses the same KV cache as sequence " + std::to_string(j));
      if (s.hooks && batch[j].hooks == s.hooks)
        throw std::invalid_argument(who + "shares its hooks with sequence " + std::to_string(j) +
                                    "; each sequence needs its own, or its records would mix");
    }
  }
}

// The attention tables one sequence's hooks record in a layer (scores, pattern), and their buffers.
struct AttentionRecord {
  AttentionCapture tables;
  std::vector<float> scores, pattern;
};

// One layer's cache store and attention, per sequence against that sequence's own history.
// A call large enough to split (a prompt) runs on all the threads by itself; the small ones
// (decode rows, or many sequences of similar size) run side by side on the threads, so that a
// prompt joining a step of decoding sequences does not leave their attention to one thread.
void attend_each(const Config& c, int l, const std::vector<Rows>& seqs, const AttentionShape& shape,
                 const float* q, const float* k, const float* v, float* z, std::vector<AttentionRecord>& records) {
  const int qs = c.n_heads * c.head_dim, kvs = c.n_kv_heads * c.head_dim, count = int(seqs.size());
  static thread_local std::vector<int> small, large;  // sequence indices, kept between calls
  small.clear();
  large.clear();
  // A call splits only if it is also a large share of the step: 16 sequences decoding at 600
  // positions each are large enough to split one by one, but side by side they take 16 parallel
  // regions fewer per layer (such a step 1.10-1.13x faster at 300-1500 positions, 2 threads).
  double total = 0.0;
  for (const Rows& s : seqs) total += attention_work(s.n, c.n_heads, s.pos0 + s.n, c.head_dim);
  const double share = total / (2.0 * get_threads());
  for (int i = 0; i < count; ++i) {
    const Rows& s = seqs[i];
    const double work = attention_work(s.n, c.n_heads, s.pos0 + s.n, c.head_dim);
    (work > ATTENTION_PARALLEL_WORK && work > share ? large : small).push_back(i);
    AttentionRecord& r = records[i];
    r.tables = AttentionCapture{};
    Hooks* hk = s.step->hooks;
    const size_t table = size_t(s.n) * c.n_heads * (s.pos0 + s.n);
    Site* site = hk ? hk->find(P_ATTN_SCORES, l) : nullptr;
    if (site && site->capture) {
      r.scores.resize(table);
      r.tables.scores = r.scores.data();
    }
    site = hk ? hk->find(P_ATTN_PATTERN, l) : nullptr;
    if (site && site->capture) {
      r.pattern.resize(table);
      r.tables.pattern = r.pattern.data();
    }
  }
  // Each sequence's new keys and values go into its cache by the thread that then attends over it.
  // `next`: the sequence the same thread attends over next (-1: none), whose first KV head's keys
  // this call asks for near its end.
  auto attend = [&](int i, int next) {
    const Rows& s = seqs[i];
    KVCache& cache = *s.step->cache;
    cache.store(l, s.pos0, s.n, k + size_t(s.row0) * kvs, v + size_t(s.row0) * kvs);
    AttentionShape mine = shape;
    mine.n = s.n;
    mine.pos0 = s.pos0;
    mine.cap = cache.capacity();
    if (next >= 0 && seqs[next].pos0 > 0) {
      const Rows& t = seqs[next];
      mine.next_keys = t.step->cache->k(l);
      mine.next_rows = t.pos0;  // its rows already cached (its new ones it stores itself)
    }
    const AttentionCapture& t = records[i].tables;
    kernels().attention(q + size_t(s.row0) * qs, cache.k(l), cache.v(l), cache.type(), mine,
                        z + size_t(s.row0) * qs, (t.scores || t.pattern) ? &t : nullptr);
  };
  for (int i : large) attend(i, -1);  // each spread over the threads inside
  const std::vector<int>& side = small;  // (named for the lambda: a thread_local's own name would be the worker's)
  parallel_for_if(side.size() > 1, int64_t(side.size()), 1, Split::Even, [&](int64_t i0, int64_t i1) {
    for (int64_t j = i0; j < i1; ++j) attend(side[size_t(j)], j + 1 < i1 ? side[size_t(j + 1)] : -1);
  });
  for (int i = 0; i < count; ++i) {
    const Rows& s = seqs[i];
    const int ctx = s.pos0 + s.n, row = c.n_heads * ctx;
    const AttentionRecord& r = records[i];
    if (r.tables.scores)
      capture_rows(s.step->hooks->find(P_ATTN_SCORES, l), r.scores.data(), s.n, row, s.pos0, {c.n_heads, ctx});
    if (r.tables.pattern)
      capture_rows(s.step->hooks->find(P_ATTN_PATTERN, l), r.pattern.data(), s.n, row, s.pos0, {c.n_heads, ctx});
  }
}

// Steps of more rows than this give their buffers back when they end.
constexpr int KEEP_BUFFERS_ROWS = 64;

// Final norm and unembedding for the rows someone needs: every row of a sequence that
// wants all logits or records there, else its last row, else (no logits, no hooks) none.
// The rows of all sequences go through the unembedding together.
void final_norm_and_unembed(const Config& c, const Weights& w, const std::vector<Rows>& seqs, const float* x,
                            ForwardBuffers& B) {
  struct Tail {
    int first = 0, rows = 0;  // its rows from `first` on
    int normed_at = 0, logits_at = 0;  // where they sit among the normalised rows and among the logits rows
    bool logits = false;
  };
  const int d = c.dim, vocab = c.vocab;
  static thread_local std::vector<Tail> tails;
  tails.assign(seqs.size(), Tail{});
  int normed = 0, unembedded = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Rows& s = seqs[i];
    Tail& t = tails[i];
    Hooks* hk = s.step->hooks;
    const bool fn = hk && hk->find(P_FINAL_NORM, -1), lg = hk && hk->find(P_LOGITS, -1);
    const LogitsMode mode = s.step->mode;
    t.logits = mode != LogitsMode::None || lg;
    if (!t.logits && !fn) continue;
    t.first = (mode == LogitsMode::All || fn || lg) ? 0 : s.n - 1;
    t.rows = s.n - t.first;
    t.normed_at = normed;
    normed += t.rows;
    if (t.logits) {
      t.logits_at = unembedded;
      unembedded += t.rows;
    }
  }
  std::vector<float>& hn = B.normed;
  hn.resize(size_t(normed) * d);
  for (size_t i = 0; i < seqs.size(); ++i)
    if (tails[i].rows)
      std::copy(x + size_t(seqs[i].row0 + tails[i].first) * d, x + size_t(seqs[i].row0 + seqs[i].n) * d,
                hn.data() + size_t(tails[i].normed_at) * d);
  normalize(c, hn.data(), w.final_norm_w, w.final_norm_b, normed, hn.data());
  for (size_t i = 0; i < seqs.size(); ++i)
    if (tails[i].rows)
      apply_site(seqs[i].step->hooks, P_FINAL_NORM, -1, hn.data() + size_t(tails[i].normed_at) * d, tails[i].rows,
                 d, seqs[i].pos0 + tails[i].first, 0);
  // The unembedding's input: the normalised rows of the sequences that want logits.
  std::vector<float>& hl = B.unembed_in;
  const float* rows_in = hn.data();
  if (unembedded < normed) {
    hl.resize(size_t(unembedded) * d);
    for (const Tail& t : tails)
      if (t.logits)
        std::copy(hn.data() + size_t(t.normed_at) * d, hn.data() + size_t(t.normed_at + t.rows) * d,
                  hl.data() + size_t(t.logits_at) * d);
    rows_in = hl.data();
  }
  std::vector<float>& out = B.logits;
  out.resize(size_t(unembedded) * vocab);
  if (unembedded) {
    const WeightView& un = w.unembed.empty() ? w.embed : w.unembed;
    kernels().matmul(un, rows_in, unembedded, out.data(), nullptr);
    if (c.final_softcap > 0.0f) softcap(out.data(), out.size(), c.final_softcap);
  }
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Tail& t = tails[i];
    const SequenceStep& step = *seqs[i].step;
    if (!t.logits) {
      step.logits->clear();
      continue;
    }
    float* mine = out.data() + size_t(t.logits_at) * vocab;
    apply_site(step.hooks, P_LOGITS, -1, mine, t.rows, vocab, seqs[i].pos0 + t.first, 0);
    if (step.mode == LogitsMode::All && seqs.size() == 1)
      step.logits->swap(out);  // the batch of one: hand over the buffer, no copy
    else if (step.mode == LogitsMode::All)
      step.logits->assign(mine, mine + size_t(t.rows) * vocab);
    else if (step.mode == LogitsMode::Last)
      step.logits->assign(mine + size_t(t.rows - 1) * vocab, mine + size_t(t.rows) * vocab);
    else
      step.logits->clear();
  }
}

}  // namespace

void Model::forward(KVCache& cache, const int* tokens, int n, LogitsMode mode, Hooks* hooks,
                    std::vector<float>& logits) const {
  const SequenceStep one{&cache, tokens, n, mode, hooks, &logits};
  forward(&one, 1);
}

void Model::forward(const SequenceStep* batch, int count) const {
  const Config& c = cfg_;
  check_batch(c, this, batch, count);
  // Bookkeeping of the step, kept by the calling thread between steps (forward never runs
  // inside itself on one thread); the activations live with the first sequence's cache.
  static thread_local std::vector<Rows> seqs;
  static thread_local std::vector<AttentionRecord> records;
  seqs.clear();
  int n = 0;  // rows of the whole batch
  for (int i = 0; i < count; ++i) {
    const SequenceStep& s = batch[i];
    const int pos0 = s.cache->length();
    seqs.push_back({&s, n, s.n, pos0, !c.inv_freq_long.empty() && pos0 + s.n > c.rope_long_after});
    n += s.n;
  }
  for (const Rows& s : seqs) s.step->cache->reserve(s.pos0 + s.n);
  const BatchHooks hooks(seqs);
  const KernelTable& K = kernels();
  const int d = c.dim, qs = c.n_heads * c.head_dim, kvs = c.n_kv_heads * c.head_dim;
  const size_t nd = size_t(n) * d;

  // x: the residual stream; h: a block's input or output; m: the MLP's input in parallel blocks.
  // Resizing keeps each buffer's memory, so a decode step after the first allocates nothing.
  ForwardBuffers& B = batch[0].cache->buffers();
  std::vector<float>&x = B.x, &h = B.h, &m = B.m, &out = B.out, &q = B.q, &k = B.k, &v = B.v, &z = B.z, &a = B.a,
      &u = B.u;
  x.resize(nd);
  h.resize(nd);
  m.resize(c.parallel_residual ? nd : 0);
  out.resize(nd);
  q.resize(size_t(n) * qs);
  k.resize(size_t(n) * kvs);
  v.resize(size_t(n) * kvs);
  z.resize(size_t(n) * qs);
  a.resize(size_t(n) * c.ffn);
  u.resize(c.gated_mlp ? size_t(n) * c.ffn : 0);
  std::vector<int>& positions = B.positions;
  positions.resize(n);
  for (const Rows& s : seqs)
    for (int i = 0; i < s.n; ++i) positions[s.row0 + i] = s.pos0 + i;

  // Embedding (scaled, in families that scale it), then learned positions.
  for (const Rows& s : seqs)
    for (int i = 0; i < s.n; ++i) row_to_f32(w_.embed, s.step->tokens[i], x.data() + size_t(s.row0 + i) * d);
  if (c.embed_scale != 1.0f)
    for (float& e : x) e *= c.embed_scale;
  hooks.apply(P_EMBED, -1, x.data(), d);
  if (c.learned_positions) {
    for (int r = 0; r < n; ++r) row_to_f32(w_.pos_embed, positions[r], h.data() + size_t(r) * d);
    hooks.apply(P_POS_EMBED, -1, h.data(), d);
    add_into(x.data(), h.data(), nd);
  }

  records.resize(seqs.size());
  AttentionShape shape;
  shape.n_heads = c.n_heads;
  shape.n_kv = c.n_kv_heads;
  shape.head_dim = c.head_dim;
  shape.scale = c.attn_scale > 0.0f ? c.attn_scale : 1.0f / std::sqrt(float(c.head_dim));
  shape.softcap = c.attn_softcap;
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = w_.layers[l];
    const bool sliding = !c.sliding.empty() && c.sliding[l];
    hooks.apply(P_RESID_PRE, l, x.data(), d);

    // Attention: projections over the rows of every sequence at once.
    if (c.pre_norms)
      normalize(c, x.data(), L.attn_norm_w, L.attn_norm_b, n, h.data());
    else
      h = x;
    hooks.apply(P_ATTN_NORM, l, h.data(), d);
    const MatmulJob qkv[3] = {{&L.q, q.data(), L.q_b}, {&L.k, k.data(), L.k_b}, {&L.v, v.data(), L.v_b}};
    K.matmul_group(qkv, 3, h.data(), n);
    if (c.qk_norm == QKNorm::Head) {
      K.rmsnorm(q.data(), L.q_norm_w, n * c.n_heads, c.head_dim, c.norm_eps, q.data());
      K.rmsnorm(k.data(), L.k_norm_w, n * c.n_kv_heads, c.head_dim, c.norm_eps, k.data());
    } else if (c.qk_norm == QKNorm::Full) {
      K.rmsnorm(q.data(), L.q_norm_w, n, qs, c.norm_eps, q.data());
      K.rmsnorm(k.data(), L.k_norm_w, n, kvs, c.norm_eps, k.data());
    }
    if (!c.learned_positions) {
      // Each sequence rotates by its own positions, with the table its own length selects.
      const bool local = sliding && !c.inv_freq_local.empty();
      const float factor = local ? 1.0f : c.rope_attn_factor;
      for (const Rows& s : seqs) {
        const float* freq = local ? c.inv_freq_local.data() : s.long_rope ? c.inv_freq_long.data() : c.inv_freq.data();
        const int* pos = positions.data() + s.row0;
        K.rope(q.data() + size_t(s.row0) * qs, s.n, c.n_heads, c.head_dim, c.rotary_dim, pos, freq, factor,
               c.rope_adjacent);
        K.rope(k.data() + size_t(s.row0) * kvs, s.n, c.n_kv_heads, c.head_dim, c.rotary_dim, pos, freq, factor,
               c.rope_adjacent);
      }
    }
    hooks.apply(P_Q, l, q.data(), qs, c.n_heads);
    hooks.apply(P_K, l, k.data(), kvs, c.n_kv_heads);
    hooks.apply(P_V, l, v.data(), kvs, c.n_kv_heads);
    shape.window = sliding ? c.sliding_window : 0;
    attend_each(c, l, seqs, shape, q.data(), k.data(), v.data(), z.data(), records);
    hooks.apply(P_ATTN_Z, l, z.data(), qs, c.n_heads);
    // The MLP of a parallel block reads the same input as attention: normalise it before x changes.
    if (c.parallel_residual) normalize(c, x.data(), L.mlp_norm_w, L.mlp_norm_b, n, m.data());
    K.matmul(L.o, z.data(), n, h.data(), L.o_b);
    if (c.post_norms) normalize(c, h.data(), L.attn_post_norm_w, L.attn_post_norm_b, n, h.data());
    hooks.apply(P_ATTN_OUT, l, h.data(), d);
    add_into(x.data(), h.data(), nd);
    hooks.apply(P_RESID_MID, l, x.data(), d);

    // MLP.
    if (c.parallel_residual)
      h.swap(m);
    else if (c.pre_norms)
      normalize(c, x.data(), L.mlp_norm_w, L.mlp_norm_b, n, h.data());
    else
      h = x;
    hooks.apply(P_MLP_NORM, l, h.data(), d);
    if (c.n_experts > 0) {
      moe_mlp(c, L, h.data(), n, out.data(), hooks, l);
    } else {
      const MlpWeights W{&L.gate, &L.up, &L.down, L.gate_b, L.up_b, L.down_b};
      dense_mlp(c, W, h.data(), n, c.ffn, a.data(), u.data(), out.data(), &hooks, l);
    }
    if (c.post_norms) normalize(c, out.data(), L.mlp_post_norm_w, L.mlp_post_norm_b, n, out.data());
    hooks.apply(P_MLP_OUT, l, out.data(), d);
    add_into(x.data(), out.data(), nd);
    hooks.apply(P_RESID_POST, l, x.data(), d);
  }
  for (const Rows& s : seqs) s.step->cache->advance(s.n);
  final_norm_and_unembed(c, w_, seqs, x.data(), B);
  // Prefill-sized buffers are not worth keeping: a step that large costs far more than its allocations.
  if (n > KEEP_BUFFERS_ROWS) B = ForwardBuffers{};
  for (AttentionRecord& r : records)
    if (r.scores.size() + r.pattern.size() > 0) r = AttentionRecord{};  // captured tables: freed, as before
}

}  // namespace tokentrail
