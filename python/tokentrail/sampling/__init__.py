"""The decoding step: a chain of logits processors, then one draw.

The package is laid out as

* :mod:`.processors`: one class per sampler, the readable reference of each
  stage, registered by stage name;
* :mod:`.chain`: :class:`SamplingConfig` and the assembly of a :class:`Chain`
  in the orders below;
* :mod:`.sampler`: :class:`Sampler` (the chain, the seeded stream, the draw);
* :mod:`.core`: the hot stages in the C++ core, tested against the processors;
* :mod:`.numerics` and :mod:`.validate`: the one softmax and the one set of
  checks they all share.

A *processor* is any callable ``proc(logits, history) -> logits``: ``logits``
is a 1-D float array over the vocabulary (float32 from the model, float64
inside a chain), ``history`` the token ids so far (prompt and generated), and
the result a new float64 array in which removed tokens are ``-inf``. Every
built-in processor below is a small class of that shape, and any user
callable of the same signature can be put into a chain.

Processors never modify their input. They work in float64 so that very small
temperatures and very peaked distributions stay exact: softmaxes subtract the
maximum first, and truncation rules compare log-probabilities where the
probabilities themselves would underflow.

Two optional hooks make a processor stateful or random:

* ``accept(token, probs)`` is called by the :class:`Sampler` after each draw
  with the chosen token and the distribution it was drawn from (mirostat
  uses it to steer its target surprise);
* ``bind_rng(generator)`` hands the processor its own
  ``numpy.random.Generator``, derived from the sampler's seed (XTC uses it),
  so that a whole run is reproducible bit for bit from one seed.

Chain order
-----------
:func:`make_chain` builds the processors named in ``order``. The default,
``order="hf"``, follows Hugging Face transformers: penalties and biases act on
the model's logits, then temperature, then the truncation samplers see the
temperature-scaled distribution::

    logit_bias, repetition_penalty, presence_frequency, dry, no_repeat_ngram,
    banned_tokens, temperature, top_n_sigma, top_k, top_p, min_p, typical_p,
    epsilon, eta, xtc, mirostat

``order="llama.cpp"`` follows llama.cpp's default sampler chain, in which the
truncation samplers see the distribution at temperature 1 and temperature is
applied last (so top-p and min-p keep different sets than with "hf" whenever
temperature != 1)::

    logit_bias, banned_tokens, no_repeat_ngram, repetition_penalty,
    presence_frequency, dry, top_n_sigma, top_k, typical_p, top_p, min_p, xtc,
    epsilon, eta, temperature, mirostat

``order`` may also be an explicit sequence of these names and/or processor
callables; an option that is set but whose name is missing from an explicit
order is an error rather than silently ignored.

Conventions where the two reference implementations differ
-----------------------------------------------------------
* Repetition penalty: both transformers and llama.cpp divide a repeated
  token's positive logit by the penalty and multiply a negative one (the fix
  for the rule as first published, which divided every logit and so made
  repeated tokens with negative logits *more* likely; that rule is available
  as ``repetition_negative="divide"``). They differ in which tokens count:
  transformers penalises every token of the whole context, llama.cpp only
  those in the last ``penalty_last_n`` (64). tokentrail's default is the whole
  context; ``repetition_window=64`` gives llama.cpp's.
* Presence and frequency penalties follow llama.cpp: over the last
  ``penalty_window`` tokens, ``logit -= count * frequency + (count > 0) *
  presence``.
* top-k: ``top_k=0`` disables it (llama.cpp). On ties at the k-th logit
  transformers keeps every tied token, llama.cpp keeps exactly k; the default
  is transformers' (``top_k_ties="keep"``), ``top_k_ties="cut"`` keeps
  exactly k (lower token id first among ties).
* top-p keeps the smallest set of most probable tokens whose mass reaches p
  (both implementations agree on the rule); ``top_p=1`` is a no-op.
* min-p keeps tokens with ``p >= min_p * p_max``, evaluated as
  ``logit >= max_logit + log(min_p)`` on the logits it receives; the two
  implementations agree on the rule and differ in where it runs (before or
  after temperature, see the orders above).
"""
from .chain import DEFAULT_ORDER, ORDERS, SAMPLING_OPTIONS, STAGES, Chain, SamplingConfig, make_chain
from .numerics import NEG_INF, greedy_mask, log_softmax, softmax
from .processors import (DRY, REGISTRY, XTC, BanTokens, DynamicTemperature, EpsilonCutoff, EtaCutoff, LogitBias,
                         MinP, Mirostat, MirostatV2, NoRepeatNGram, PresenceFrequencyPenalty, Processor,
                         RepetitionPenalty, Temperature, TopK, TopNSigma, TopP, TypicalP, register)
from .sampler import Draw, Sampler, draw
from .validate import check_logits

__all__ = [
    "DEFAULT_ORDER", "ORDERS", "SAMPLING_OPTIONS", "STAGES", "Chain", "SamplingConfig", "make_chain",
    "NEG_INF", "greedy_mask", "log_softmax", "softmax",
    "DRY", "REGISTRY", "XTC", "BanTokens", "DynamicTemperature", "EpsilonCutoff", "EtaCutoff", "LogitBias",
    "MinP", "Mirostat", "MirostatV2", "NoRepeatNGram", "PresenceFrequencyPenalty", "Processor",
    "RepetitionPenalty", "Temperature", "TopK", "TopNSigma", "TopP", "TypicalP", "register",
    "Draw", "Sampler", "draw", "check_logits",
]
