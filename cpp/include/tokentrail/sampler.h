// The hot stages of the sampling chain: penalties, temperature, top-k, top-p,
// min-p, the softmax and the draw, for one logit vector per call.
//
// The Python processors in tokentrail.sampling are the reference; every stage
// here follows its Python twin operation for operation in float64, so that
// kept sets and draws are the same and probabilities agree to rounding.
// Work is done once per token: one pass over the vocabulary (validation and
// the first truncation together), after which every later stage sees only the
// surviving candidates.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tokentrail {

enum class StageKind : int {
  kRepetitionPenalty = 0,  // a: penalty (> 0), window, flag: divide negative logits too
  kPresenceFrequency = 1,  // a: presence, b: frequency, window
  kTemperature = 2,        // a: temperature (> 0; greedy is top-k 1 with cut ties)
  kTopK = 3,               // k, min_keep, flag: cut ties (exactly k, lower id first)
  kTopP = 4,               // a: p in (0, 1], min_keep
  kMinP = 5,               // a: p in [0, 1], min_keep
};

struct SamplerStage {
  StageKind kind;
  double a = 0.0;
  double b = 0.0;
  int64_t k = 0;
  int64_t min_keep = 1;
  int64_t window = -1;  // -1: the whole history
  bool flag = false;
};

// Why a logit vector was refused (the Python layer turns it into its own message).
enum class LogitsProblem : int { kNone = 0, kNaN = 1, kPosInf = 2, kAllMasked = 3 };

struct KeptTokens {
  LogitsProblem problem = LogitsProblem::kNone;
  std::vector<int64_t> ids;    // the tokens kept by the chain, ascending
  std::vector<double> logits;  // their logits after the chain
  std::vector<double> probs;   // their probabilities (what the token is drawn from)
};

// The inverse-CDF draw with one uniform number `u` in [0, 1): the cumulative
// probabilities are summed in id order and zero-probability tokens are never
// chosen. `probs` must have a positive entry.
int64_t draw_token(const int64_t* ids, const double* probs, int64_t n, double u);

class SamplerChain {
 public:
  // Throws std::invalid_argument naming the bad parameter.
  explicit SamplerChain(std::vector<SamplerStage> stages);

  // Run the chain over `logits` (n_vocab floats) with the token history: the
  // kept tokens and their distribution (or the problem that refused the logits).
  KeptTokens keep(const float* logits, int64_t n_vocab, const int64_t* history, int64_t n_history) const;

  const std::vector<SamplerStage>& stages() const { return stages_; }

 private:
  std::vector<SamplerStage> stages_;
};

}  // namespace tokentrail
