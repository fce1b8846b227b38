// The hot sampling stages (see tokentrail/sampler.h).
//
// Until the first truncating stage the chain works on the whole vocabulary
// without copying it: a token's current logit is the model's float logit,
// divided by the temperature if one ran, unless a penalty touched the token,
// in which case its exact float64 value is kept aside ("overrides", few).
// Division by a temperature in [1e-30, 1e30] maps distinct float logits to
// distinct doubles in the same order, so top-k can select on the float
// logits directly; the overridden tokens are added to the selection and the
// exact top-k is then taken among these candidates. Every later stage works
// on the candidates only.
#include "tokentrail/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <utility>

#if defined(__SSE2__)
#include <emmintrin.h>  // SSE2 is part of every x86-64 CPU: no run-time dispatch needed
#endif

namespace tokentrail {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

struct Candidate {
  int64_t id;
  double value;
};

bool by_id(const Candidate& a, const Candidate& b) { return a.id < b.id; }

// Highest value first, lower id first among ties (numpy's stable argsort of -x).
bool by_rank(const Candidate& a, const Candidate& b) {
  return a.value > b.value || (a.value == b.value && a.id < b.id);
}

// A penalised token and how often it occurs in the penalty's window.
struct Counted {
  int64_t id;
  int64_t count;
};

// The in-vocabulary ids of the last `window` history tokens (-1: all), with their counts, ascending.
std::vector<Counted> counted_ids(const int64_t* history, int64_t n, int64_t window, int64_t n_vocab) {
  const int64_t start = window < 0 ? 0 : std::max<int64_t>(0, n - window);
  std::vector<int64_t> ids;
  ids.reserve(static_cast<size_t>(n - start));
  for (int64_t i = start; i < n; ++i)
    if (history[i] >= 0 && history[i] < n_vocab) ids.push_back(history[i]);
  std::sort(ids.begin(), ids.end());
  std::vector<Counted> out;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j < ids.size() && ids[j] == ids[i]) ++j;
    out.push_back({ids[i], static_cast<int64_t>(j - i)});
    i = j;
  }
  return out;
}

// The penalty of `stage` applied to one logit of a token seen `count` times (count >= 1).
double penalised(const SamplerStage& stage, double v, int64_t count) {
  if (stage.kind == StageKind::kRepetitionPenalty) {
    if (stage.flag) return v / stage.a;  // the rule as first published: divide every logit
    return v < 0 ? v * stage.a : v / stage.a;
  }
  // llama.cpp's presence/frequency: logit -= count * frequency + presence
  return v - (static_cast<double>(count) * stage.b + stage.a);
}

constexpr int64_t kBlock = 16;

// The largest of x[0..16): the scan skips a whole block when it is below the threshold.
inline float block_max(const float* x) {
#if defined(__SSE2__)
  const __m128 m = _mm_max_ps(_mm_max_ps(_mm_loadu_ps(x), _mm_loadu_ps(x + 4)),
                              _mm_max_ps(_mm_loadu_ps(x + 8), _mm_loadu_ps(x + 12)));
  const __m128 h = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
#else
  float m = x[0];
  for (int j = 1; j < kBlock; ++j) m = x[j] > m ? x[j] : m;
  return m;
#endif
}

// Every token whose float logit is finite and >= the m-th largest (all ties at the boundary kept).
// The logits hold no NaN (checked before).
std::vector<Candidate> scan_top(const float* x, int64_t n_vocab, int64_t m) {
  std::vector<std::pair<float, int64_t>> buf;
  size_t cap = static_cast<size_t>(std::max<int64_t>(2 * m, 64));
  buf.reserve(cap);
  constexpr float kMasked = -std::numeric_limits<float>::infinity();
  float threshold = kMasked;
  auto cut_to_m = [&]() {
    if (static_cast<int64_t>(buf.size()) <= m) return;
    std::nth_element(buf.begin(), buf.begin() + (m - 1), buf.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
    threshold = buf[static_cast<size_t>(m - 1)].first;
    buf.erase(std::remove_if(buf.begin(), buf.end(), [&](const auto& e) { return e.first < threshold; }),
              buf.end());
  };
  auto visit = [&](int64_t i) {
    const float v = x[i];
    if (v >= threshold && v > kMasked) {
      buf.emplace_back(v, i);
      if (buf.size() >= cap) {
        cut_to_m();
        if (buf.size() * 2 > cap) cap *= 2;  // many ties at the boundary
      }
    }
  };
  int64_t i = 0;
  for (; i + kBlock <= n_vocab; i += kBlock) {
    if (block_max(x + i) < threshold) continue;
    for (int64_t j = i; j < i + kBlock; ++j) visit(j);
  }
  for (; i < n_vocab; ++i) visit(i);
  cut_to_m();
  std::vector<Candidate> out;
  out.reserve(buf.size());
  for (const auto& e : buf) out.push_back({e.second, static_cast<double>(e.first)});
  return out;
}

// The value of the `k`-th largest candidate (1-based, k <= size).
double kth_largest(const std::vector<Candidate>& c, int64_t k) {
  std::vector<double> v(c.size());
  for (size_t i = 0; i < c.size(); ++i) v[i] = c[i].value;
  std::nth_element(v.begin(), v.begin() + (k - 1), v.end(), std::greater<double>());
  return v[static_cast<size_t>(k - 1)];
}

void drop_below(std::vector<Candidate>& c, double threshold) {
  c.erase(std::remove_if(c.begin(), c.end(), [&](const Candidate& e) { return e.value < threshold; }), c.end());
}

// ---- the stages on candidates (sorted by id, every value > -inf) ---------------------------

void top_k(std::vector<Candidate>& c, const SamplerStage& s, int64_t n_vocab) {
  const int64_t k = std::max(s.k, s.min_keep);
  if (s.k == 0 || k >= n_vocab || static_cast<int64_t>(c.size()) <= k) return;
  if (!s.flag) {
    drop_below(c, kth_largest(c, k));  // every token tied with the k-th stays
    return;
  }
  std::partial_sort(c.begin(), c.begin() + k, c.end(), by_rank);
  c.resize(static_cast<size_t>(k));
  std::sort(c.begin(), c.end(), by_id);
}

void top_p(std::vector<Candidate>& c, const SamplerStage& s) {
  if (s.a >= 1.0 || c.empty()) return;
  double max = kNegInf;
  for (const Candidate& e : c) max = std::max(max, e.value);
  double total = 0.0;
  for (const Candidate& e : c) total += std::exp(e.value - max);
  // The kept tokens are a prefix of the ranking: rank only as far as needed, in growing steps.
  // Token i is kept iff the mass before it is < p (or it is among the min_keep first). Once
  // the whole list is ranked every token is tested, as the reference does.
  std::vector<Candidate> order(c);
  std::vector<Candidate> kept;
  double cumulative = 0.0;
  size_t ranked = 0;
  size_t i = 0;
  bool done = false;
  while (!done && ranked < order.size()) {
    const size_t next = std::min(order.size(), std::max<size_t>(256, ranked * 4));
    std::partial_sort(order.begin() + ranked, order.begin() + next, order.end(), by_rank);
    ranked = next;
    for (; i < ranked; ++i) {
      const double p = std::exp(order[i].value - max) / total;
      cumulative += p;
      const double before = cumulative - p;
      if (before < s.a || static_cast<int64_t>(i) < s.min_keep) {
        kept.push_back(order[i]);
      } else if (ranked < order.size()) {
        done = true;  // every later token has at least this much mass before it
        break;
      }
    }
  }
  std::sort(kept.begin(), kept.end(), by_id);
  c.swap(kept);
}

void min_p(std::vector<Candidate>& c, const SamplerStage& s, int64_t n_vocab) {
  if (s.a == 0.0 || c.empty()) return;
  double max = kNegInf;
  for (const Candidate& e : c) max = std::max(max, e.value);
  const double log_p = std::log(s.a);
  const int64_t k = std::min(s.min_keep, n_vocab);
  // The min_keep highest (and their ties) always stay; with fewer live tokens than that, all do.
  const double keep_from = static_cast<int64_t>(c.size()) >= k ? kth_largest(c, k) : kNegInf;
  c.erase(std::remove_if(c.begin(), c.end(),
                         [&](const Candidate& e) { return (e.value - max) < log_p && e.value < keep_from; }),
          c.end());
}

// ---- the whole vocabulary before the first truncation ---------------------------------------

class FullVocabulary {
 public:
  FullVocabulary(const float* x, int64_t n_vocab) : x_(x), n_vocab_(n_vocab) {}

  double value(int64_t id) const {
    auto it = std::lower_bound(overrides_.begin(), overrides_.end(), Candidate{id, 0.0}, by_id);
    if (it != overrides_.end() && it->id == id) return it->value;
    return base(id);
  }

  void penalise(const SamplerStage& s, const std::vector<Counted>& seen) {
    std::vector<Candidate> merged;
    merged.reserve(overrides_.size() + seen.size());
    size_t i = 0;
    for (const Counted& t : seen) {
      while (i < overrides_.size() && overrides_[i].id < t.id) merged.push_back(overrides_[i++]);
      double v = base(t.id);
      if (i < overrides_.size() && overrides_[i].id == t.id) v = overrides_[i++].value;
      merged.push_back({t.id, penalised(s, v, t.count)});
    }
    while (i < overrides_.size()) merged.push_back(overrides_[i++]);
    overrides_.swap(merged);
  }

  void divide(double temperature) {
    temperature_ = temperature;
    for (Candidate& o : overrides_) o.value /= temperature;
  }

  // The exact candidates top-k needs: the top (k + overrides) by float logit, plus the overrides.
  std::vector<Candidate> top_candidates(int64_t k) const {
    const int64_t m = std::min<int64_t>(n_vocab_, k + static_cast<int64_t>(overrides_.size()));
    std::vector<Candidate> c = scan_top(x_, n_vocab_, m);
    for (Candidate& e : c) e.value = base(e.id);
    c.insert(c.end(), overrides_.begin(), overrides_.end());
    // Overrides come last, so a stable sort followed by keeping the last of equal ids keeps them.
    std::stable_sort(c.begin(), c.end(), by_id);
    std::vector<Candidate> out;
    out.reserve(c.size());
    for (size_t i = 0; i < c.size(); ++i) {
      if (i + 1 < c.size() && c[i + 1].id == c[i].id) continue;
      if (c[i].value > kNegInf) out.push_back(c[i]);
    }
    return out;
  }

  // The live tokens min-p keeps, found without visiting the blocks of logits that cannot hold one.
  std::vector<Candidate> min_p_candidates(const SamplerStage& s) const {
    const int64_t k = std::min(s.min_keep, n_vocab_);
    // The k highest current values (and the maximum) are among these candidates.
    const std::vector<Candidate> top = top_candidates(k);
    double max = kNegInf;
    for (const Candidate& e : top) max = std::max(max, e.value);
    const double keep_from = static_cast<int64_t>(top.size()) >= k ? kth_largest(top, k) : kNegInf;
    const double log_p = std::log(s.a);
    // Removal is monotone in the value, and the value in the float logit: a block whose
    // largest logit is removed is removed whole.
    auto removed = [&](double v) { return (v - max) < log_p && v < keep_from; };
    std::vector<Candidate> out;
    size_t o = 0;
    auto visit = [&](int64_t id) {
      while (o < overrides_.size() && overrides_[o].id < id) ++o;
      if (o < overrides_.size() && overrides_[o].id == id) return;  // added with the overrides below
      const double v = base(id);
      if (v > kNegInf && !removed(v)) out.push_back({id, v});
    };
    int64_t i = 0;
    for (; i + kBlock <= n_vocab_; i += kBlock) {
      const float largest = block_max(x_ + i);
      if (largest == -std::numeric_limits<float>::infinity() || removed(base_of(largest))) continue;
      for (int64_t j = i; j < i + kBlock; ++j) visit(j);
    }
    for (; i < n_vocab_; ++i) visit(i);
    for (const Candidate& e : overrides_)
      if (e.value > kNegInf && !removed(e.value)) out.push_back(e);
    std::sort(out.begin(), out.end(), by_id);
    return out;
  }

  // Every live token with its current value.
  std::vector<Candidate> all() const {
    std::vector<Candidate> out;
    out.reserve(static_cast<size_t>(n_vocab_));
    size_t o = 0;
    for (int64_t id = 0; id < n_vocab_; ++id) {
      double v;
      if (o < overrides_.size() && overrides_[o].id == id) {
        v = overrides_[o++].value;
      } else {
        v = base(id);
      }
      if (v > kNegInf) out.push_back({id, v});
    }
    return out;
  }

 private:
  double base(int64_t id) const { return base_of(x_[id]); }

  // A logit's current value when no penalty touched its token.
  double base_of(float logit) const {
    const double v = static_cast<double>(logit);
    return temperature_ > 0.0 ? v / temperature_ : v;
  }

  const float* x_;
  int64_t n_vocab_;
  double temperature_ = 0.0;         // 0: no temperature has run
  std::vector<Candidate> overrides_;  // tokens a penalty touched, by id, exact values
};

LogitsProblem check(const float* x, int64_t n) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  bool bad = false;  // a NaN or +inf somewhere: !(v < inf)
  float max = -kInf;
  int64_t i = 0;
#if defined(__SSE2__)
  const __m128 inf = _mm_set1_ps(kInf);
  __m128 bad4 = _mm_setzero_ps();
  __m128 max4 = _mm_set1_ps(-kInf);
  for (; i + 4 <= n; i += 4) {
    const __m128 v = _mm_loadu_ps(x + i);
    bad4 = _mm_or_ps(bad4, _mm_cmpnlt_ps(v, inf));
    max4 = _mm_max_ps(v, max4);  // NaN lanes are caught by bad4
  }
  bad = _mm_movemask_ps(bad4) != 0;
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, max4);
  for (float v : lanes) max = v > max ? v : max;
#endif
  for (; i < n; ++i) {
    const float v = x[i];
    bad |= !(v < kInf);
    max = v > max ? v : max;
  }
  if (bad) {
    for (int64_t j = 0; j < n; ++j)
      if (std::isnan(x[j])) return LogitsProblem::kNaN;
    return LogitsProblem::kPosInf;
  }
  return max > -kInf ? LogitsProblem::kNone : LogitsProblem::kAllMasked;
}

void fail(const std::string& message) { throw std::invalid_argument(message); }

}  // namespace

SamplerChain::SamplerChain(std::vector<SamplerStage> stages) : stages_(std::move(stages)) {
  int temperatures = 0;
  for (const SamplerStage& s : stages_) {
    if (!std::isfinite(s.a) || !std::isfinite(s.b)) fail("sampler stage parameters must be finite");
    if (s.min_keep < 1) fail("min_keep must be >= 1");
    if (s.window < -1) fail("a penalty window must be >= 0 (or -1 for the whole history)");
    switch (s.kind) {
      case StageKind::kRepetitionPenalty:
        if (s.a < 1e-30 || s.a > 1e30) fail("repetition_penalty must be in [1e-30, 1e30] on the core path");
        break;
      case StageKind::kPresenceFrequency:
        if (std::fabs(s.a) > 1e30 || std::fabs(s.b) > 1e30)
          fail("presence_penalty and frequency_penalty must be within +-1e30 on the core path");
        break;
      case StageKind::kTemperature:
        if (s.a < 1e-30 || s.a > 1e30) fail("temperature must be in [1e-30, 1e30] on the core path");
        if (++temperatures > 1) fail("a chain has at most one temperature stage");
        break;
      case StageKind::kTopK:
        if (s.k < 0) fail("top_k must be >= 0");
        break;
      case StageKind::kTopP:
        if (!(s.a > 0.0 && s.a <= 1.0)) fail("top_p must be in (0, 1]");
        break;
      case StageKind::kMinP:
        if (!(s.a >= 0.0 && s.a <= 1.0)) fail("min_p must be in [0, 1]");
        break;
      default:
        fail("unknown sampler stage kind " + std::to_string(static_cast<int>(s.kind)));
    }
  }
}

KeptTokens SamplerChain::keep(const float* logits, int64_t n_vocab, const int64_t* history,
                              int64_t n_history) const {
  KeptTokens out;
  if (n_vocab < 1) fail("logits must not be empty");
  out.problem = check(logits, n_vocab);
  if (out.problem != LogitsProblem::kNone) return out;

  FullVocabulary full(logits, n_vocab);
  std::vector<Candidate> c;
  bool truncated = false;
  for (const SamplerStage& s : stages_) {
    const bool penalty = s.kind == StageKind::kRepetitionPenalty || s.kind == StageKind::kPresenceFrequency;
    if (!truncated) {
      if (penalty) {
        full.penalise(s, counted_ids(history, n_history, s.window, n_vocab));
        continue;
      }
      if (s.kind == StageKind::kTemperature) {
        full.divide(s.a);
        continue;
      }
      if (s.kind == StageKind::kTopK) {
        const int64_t k = std::max(s.k, s.min_keep);
        if (s.k == 0 || k >= n_vocab) continue;  // a no-op: stay on the whole vocabulary
        c = full.top_candidates(k);
      } else if (s.kind == StageKind::kMinP) {
        if (s.a == 0.0) continue;  // a no-op
        c = full.min_p_candidates(s);
        truncated = true;
        continue;  // min-p is done: applying it again to its own survivors changes nothing
      } else {
        if (s.a >= 1.0) continue;  // top-p 1: a no-op
        c = full.all();
      }
      truncated = true;
    }
    if (penalty) {
      const std::vector<Counted> seen = counted_ids(history, n_history, s.window, n_vocab);
      size_t j = 0;
      for (Candidate& e : c) {  // both ascending by id
        while (j < seen.size() && seen[j].id < e.id) ++j;
        if (j < seen.size() && seen[j].id == e.id) e.value = penalised(s, e.value, seen[j].count);
      }
      continue;
    }
    switch (s.kind) {
      case StageKind::kTemperature:
        for (Candidate& e : c) e.value /= s.a;
        break;
      case StageKind::kTopK:
        top_k(c, s, n_vocab);
        break;
      case StageKind::kTopP:
        top_p(c, s);
        break;
      case StageKind::kMinP:
        min_p(c, s, n_vocab);
        break;
      default:
        break;
    }
  }
  if (!truncated) c = full.all();

  // The softmax over the kept tokens.
  double max = kNegInf;
  for (const Candidate& e : c) max = std::max(max, e.value);
  out.ids.resize(c.size());
  out.logits.resize(c.size());
  out.probs.resize(c.size());
  double total = 0.0;
  for (size_t i = 0; i < c.size(); ++i) {
    out.ids[i] = c[i].id;
    out.logits[i] = c[i].value;
    out.probs[i] = std::exp(c[i].value - max);
    total += out.probs[i];
  }
  for (double& p : out.probs) p /= total;
  return out;
}

int64_t draw_token(const int64_t* ids, const double* probs, int64_t n, double u) {
  if (!(u >= 0.0 && u < 1.0)) fail("the uniform number must be in [0, 1)");
  double total = 0.0;
  int64_t last = -1;  // the last token with a positive probability
  for (int64_t i = 0; i < n; ++i) {
    if (!(probs[i] >= 0.0) || std::isinf(probs[i])) fail("probabilities must be finite and >= 0");
    if (probs[i] > 0.0) {
      total += probs[i];
      last = i;
    }
  }
  if (last < 0) fail("no token has a positive probability");
  // The first token whose cumulative probability exceeds u * total (u * total may round up to it).
  const double target = u * total;
  double running = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (probs[i] > 0.0) {
      running += probs[i];
      if (running > target) return ids[i];
    }
  }
  return ids[last];
}

}  // namespace tokentrail
