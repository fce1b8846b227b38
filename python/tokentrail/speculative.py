"""Speculative decoding: something cheap proposes the next tokens, the target model checks them in one step.

A *proposer* guesses up to k tokens that follow the text so far: a draft
model (:class:`DraftModel`, any tokentrail model with the target's
vocabulary, for instance a q4_0 copy of the target) samples them one by one,
or :class:`PromptLookup` copies what followed the latest earlier occurrence
of the text's last few tokens. The target then runs its last token and the k
proposals at once (one forward step of k+1 positions, which reads each weight
once, as one decode step does) and so has its distribution at every proposed
position. Proposals are accepted from the left while the target agrees; at
the first disagreement the target's own token replaces the proposal, the
rest is dropped, and both KV caches are rewound past what was dropped. When
every proposal is accepted, the last row gives one more token for free.

The result is exactly what plain decoding gives:

* greedy: the target's argmax at every position, token for token. This
  rests on the core computing a position's logits identically whether it is
  fed alone or with a few others (products of fewer than GEMM_MIN_ROWS rows
  take the same kernel path); ``MAX_K`` keeps every verification below that,
  and below INT8_MIN_ROWS for a model with int8 activations (``exact=False``)
  unless the int8 kernels give its weight types the same results at every
  row count (Q8_0 with AVX-512 VNNI; ``max_k_for``).
* sampling: the standard rejection rule. With p the target's distribution
  and q the proposer's (both after the same processor chain, evaluated for
  each position with the tokens before it, so penalties see what plain
  sampling would see), a proposal x is kept with probability
  min(1, p(x)/q(x)); when it is refused the token is drawn from
  normalize(max(0, p - q)). The token at each position is then distributed
  exactly as p. For prompt lookup q is a point mass on the proposal.

Each emitted Step says whether a proposal was tested at its position
(``proposed_by``, ``proposed``) and whether it was kept (``accepted``); the
run's :class:`SpeculationStats` counts rounds, proposals and acceptances.
"""
from __future__ import annotations

import numbers
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from . import _core
from .errors import InvalidArgumentError, OptionError
from .sampling import Chain, Sampler, SamplingConfig, draw, softmax

if TYPE_CHECKING:
    from .generation import Run, Step
    from .model import Model

# Proposals per round when none is given.
DEFAULT_K = 4
# At most this many proposals per round: the k+1 rows of a verification then stay below the core's
# GEMM_MIN_ROWS, so each row's logits are bitwise those of a single-token decode step.
MAX_K = min(32, int(_core.GEMM_MIN_ROWS) - 2)
# Adaptive k: up by this much after a round whose proposals were all kept, down by one after a refusal.
ADAPTIVE_STEP_UP = 2
PROMPT_LOOKUP = "prompt-lookup"
# Separate streams of random numbers, derived from the run's seed: the acceptance test and the draft's draws.
_ACCEPT_STREAM, _DRAFT_STREAM = 0x5EC0, 0x5EC1


@dataclass
class Proposal:
    """Tokens proposed for the next positions, and the distribution each was drawn from
    (`probs` None: every proposal is certain, a point mass)."""

    tokens: list[int]
    probs: list[np.ndarray] | None = None


_NOTHING = Proposal([])


def _vocab_of(tokenizer) -> dict[str, int]:
    return tokenizer.inner.get_vocab(with_added_tokens=True)


def check_vocabulary(target: "Model", draft: "Model") -> None:
    """Refuse a draft whose token ids mean something else than the target's (an InvalidArgumentError)."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise InvalidArgumentError(f"draft: its vocabulary has {dv} tokens and the target's {tv}; a draft model "
                                   f"must use the target's tokenizer")
    tt, dt = target.tokenizer, draft.tokenizer
    if (tt is None) != (dt is None):
        raise InvalidArgumentError("draft: one of the two models has a tokenizer and the other none; a draft model "
                                   "must use the target's tokenizer")
    if tt is None or tt is dt:
        return
    t_vocab, d_vocab = _vocab_of(tt), _vocab_of(dt)
    if t_vocab != d_vocab:
        t_by_id = {i: s for s, i in t_vocab.items()}
        d_by_id = {i: s for s, i in d_vocab.items()}
        first = min(i for i in set(t_by_id) | set(d_by_id) if t_by_id.get(i) != d_by_id.get(i))
        raise InvalidArgumentError(f"draft: token {first} is {d_by_id.get(first)!r} for the draft and "
                                   f"{t_by_id.get(first)!r} for the target; a draft model must use the target's "
                                   f"tokenizer")
    if tt.bos_id != dt.bos_id or sorted(tt.eos_ids) != sorted(dt.eos_ids):
        raise InvalidArgumentError("draft: the two tokenizers disagree on the BOS or EOS ids; a draft model must "
                                   "use the target's tokenizer")


class PromptLookup:
    """Proposes the continuation of the latest earlier occurrence of the text's last n tokens
    (the latest that k tokens follow, else the earliest).

    The text is the prompt and everything generated so far; n goes from
    `max_ngram` down to `min_ngram`, the first (longest) match wins. Costs
    no model: useful where the output repeats its input (code edits,
    extraction, summaries quoting the source, repetitive text).
    """

    name = PROMPT_LOOKUP

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        for label, value in (("max_ngram", max_ngram), ("min_ngram", min_ngram)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise InvalidArgumentError(f"PromptLookup: {label} must be an integer >= 1, got {value!r}")
        if min_ngram > max_ngram:
            raise InvalidArgumentError(f"PromptLookup: min_ngram ({min_ngram}) exceeds max_ngram ({max_ngram})")
        self.max_ngram, self.min_ngram = int(max_ngram), int(min_ngram)

    def check(self, target: "Model") -> None:
        """Any model can look up its own text."""

    def start(self, target: "Model", config: SamplingConfig, seed: int) -> "PromptLookup":
        return self  # nothing to keep between rounds

    def propose(self, history: Sequence[int], k: int) -> Proposal:
        text = np.asarray(history, dtype=np.int64)
        size = text.size
        for n in range(min(self.max_ngram, size - 1), self.min_ngram - 1, -1):
            key = text[size - n:]
            # Windows of n tokens that start early enough to have a token after them (before the key itself).
            windows = np.lib.stride_tricks.sliding_window_view(text[:size - 1], n)
            hits = np.flatnonzero((windows == key).all(axis=1))
            if hits.size:
                # The latest match followed by k tokens; else the earliest (the longest continuation:
                # in text that repeats a short cycle the latest match is followed by little).
                full = hits[hits + n + k <= size]
                after = int(full[-1] if full.size else hits[0]) + n
                return Proposal([int(t) for t in text[after:after + k]])
        return _NOTHING

    def __repr__(self) -> str:
        return f"PromptLookup(max_ngram={self.max_ngram}, min_ngram={self.min_ngram})"


class DraftModel:
    """A smaller (or quantized) model with the target's vocabulary that samples the proposals.

    It samples through the same processor chain as the target, with its own
    seeded sampler, in a session of its own that is rewound with the target's.
    """

    name = "draft"

    def __init__(self, model: "Model"):
        from .model import Model

        if not isinstance(model, Model):
            raise OptionError(f"draft: expected a tokentrail Model (tokentrail.load(...)), got {type(model).__name__}")
        self.model = model

    def check(self, target: "Model") -> None:
        check_vocabulary(target, self.model)

    def start(self, target: "Model", config: SamplingConfig, seed: int) -> "_Drafting":
        return _Drafting(self.model, config, seed)

    def __repr__(self) -> str:
        return f"DraftModel({self.model.source!r})"


class _Drafting:
    """One run's draft: its session and sampler."""

    def __init__(self, model: "Model", config: SamplingConfig, seed: int):
        self.session = model.session()
        self.sampler = Sampler(config.build(), seed=_derived_seed(seed, _DRAFT_STREAM))
        self.synced = 0  # leading tokens of the session known to equal the text

    def propose(self, history: Sequence[int], k: int) -> Proposal:
        s = self.session
        # The session holds the text up to the last round plus that round's proposals: keep what the
        # text still begins with, and feed the rest (at least the last token, for its logits).
        common = self.synced
        end = min(s.pos, len(history) - 1)
        while common < end and s.tokens[common] == history[common]:
            common += 1
        k = min(k, s.limit - len(history) + 1)
        if k <= 0:
            return _NOTHING
        if common < s.pos:
            s.rewind(common)
        logits = s.feed(history[common:])
        self.synced = len(history)
        context = list(history)
        tokens, probs = [], []
        for j in range(k):
            chosen = self.sampler.step(logits, context)
            tokens.append(chosen.token)
            probs.append(chosen.probs)
            context.append(chosen.token)
            if j < k - 1:
                logits = s.feed([chosen.token])
        return Proposal(tokens, probs)


Proposer = Union[DraftModel, PromptLookup]


def as_proposer(draft: Any) -> Proposer:
    """The proposer `draft` names: a Model, "prompt-lookup", or a DraftModel / PromptLookup."""
    from .model import Model

    if isinstance(draft, (DraftModel, PromptLookup)):
        return draft
    if isinstance(draft, Model):
        return DraftModel(draft)
    if draft == PROMPT_LOOKUP:
        return PromptLookup()
    raise OptionError(f"draft: expected a tokentrail Model with the target's tokenizer, {PROMPT_LOOKUP!r}, or a "
                      f"DraftModel / PromptLookup, got {draft!r:.60}")


@dataclass
class Speculation:
    """How one generation speculates: the proposer, k (the most proposals per round) and whether k adapts."""

    proposer: Proposer
    k: int
    adaptive: bool
    config: SamplingConfig
    max_k: int = MAX_K


def max_k_for(target: "Model") -> int:
    """The most proposals one verification of `target` may hold: its k+1 rows must take the kernel path
    of a single row (below GEMM_MIN_ROWS; below INT8_MIN_ROWS when its products round activations to
    int8, unless the int8 kernels give every row count the same results for all its weight types)."""
    if getattr(target, "exact", True):
        return MAX_K
    int8_types = {w.dtype for w in target.weights.values()
                  if len(w.shape) == 2 and w.dtype not in ("f32", "f16", "bf16")}
    if int8_types and all(_core.int8_every_row_count(t) for t in int8_types):
        return MAX_K
    return min(MAX_K, int(_core.INT8_MIN_ROWS) - 2)


def plan(target: "Model", draft: Any, k: Any, adaptive: Any, config: SamplingConfig,
         hooks: Any = None) -> Speculation | None:
    """generate()'s speculative options checked: None without a draft, else the Speculation to run."""
    if draft is None:
        if k is not None:
            raise OptionError("speculative_k: sets how many tokens a draft proposes per step; give draft= too "
                              f"(a model with the same tokenizer, or {PROMPT_LOOKUP!r})")
        if adaptive:
            raise OptionError("speculative_adaptive: adapts the proposals of a draft; give draft= too")
        return None
    proposer = as_proposer(draft)
    proposer.check(target)
    if k is None:
        k = DEFAULT_K
    max_k = max_k_for(target)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= max_k:
        why = "" if max_k == MAX_K else " (a model with int8 activations verifies at most this many at once)"
        raise InvalidArgumentError(f"speculative_k: must be an integer within 1..{max_k}{why}, got {k!r}")
    if not isinstance(adaptive, (bool, np.bool_)):
        raise InvalidArgumentError(f"speculative_adaptive: must be True or False, got {adaptive!r}")
    if hooks is not None:
        raise InvalidArgumentError("hooks: not available with speculative decoding (the target also runs the "
                                   "proposals it then refuses, and the records would include them)")
    return Speculation(proposer, int(k), bool(adaptive), config, max_k)


@dataclass
class SpeculationStats:
    """What speculation did in one run: steps of the target (each verifies a round of proposals and
    chooses at least one token; a short prompt goes with the first round), proposals tested and accepted (those after a refusal, or after the end, are not tested), tokens
    emitted, and the seconds spent proposing and verifying."""

    proposer: str
    k: int
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0
    propose_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted proposals per proposal (nan before any)."""
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """Tokens each verification step of the target gave (1 without speculation)."""
        return self.emitted / self.rounds if self.rounds else float("nan")

    def summary(self) -> str:
        rate = f"{self.acceptance_rate:.0%}" if self.proposed else "n/a"
        return (f"speculative ({self.proposer}, k={self.k}): {self.proposed} proposed, {self.accepted} accepted "
                f"({rate}), {self.tokens_per_round:.2f} tokens per target step")


def _derived_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence(seed, spawn_key=(stream,)).generate_state(1, np.uint64)[0])


def _distribution(chain: Chain, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
    """The probabilities plain sampling draws from at this position: the chain, then the softmax.
    The one place that goes through the chain instead of Sampler.step, which would also draw."""
    return softmax(chain(logits, history))


def _accepts(token: int, p: np.ndarray, q: np.ndarray | None, rng: np.random.Generator) -> bool:
    """Keep a proposal drawn from q with probability min(1, p/q) (q None: a point mass)."""
    px = float(p[token])
    qx = 1.0 if q is None else float(q[token])
    return px >= qx or rng.random() * qx < px


def _residual(p: np.ndarray, q: np.ndarray | None, token: int) -> np.ndarray:
    """normalize(max(0, p - q)): where the target's mass exceeds the proposer's. Refusals happen only
    where p(token) < q(token), so the remainder has mass."""
    if q is None:
        rest = p.copy()
        rest[token] = 0.0
    else:
        rest = np.maximum(p - q, 0.0)
    total = rest.sum()
    return rest / total if total > 0 else p


def advance(model: "Model", runs: Sequence["Run"]) -> Iterator[tuple["Run", "Step"]]:
    """Every run to its end, one after another, yielding (run, step) as steps are made
    (a run without speculation, given its own options in a list of prompts, decodes plainly)."""
    for run in runs:
        if run.max_new_tokens == 0:
            run.done = True
            continue
        for step in _speculate(model, run) if run.speculation is not None else run.steps():
            yield run, step


def _speculate(model: "Model", run: "Run") -> Iterator["Step"]:
    spec: Speculation = run.speculation
    start = time.perf_counter()
    session = model.session()
    prompt = run.begin(session, start)
    seed = int(run.sampler.seed)
    proposing = spec.proposer.start(model, spec.config, seed)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(_ACCEPT_STREAM,))))
    chain = run.sampler.chain
    stats = run.speculation_stats = SpeculationStats(spec.proposer.name, spec.k)

    def emit(token: int, row: np.ndarray, p: np.ndarray) -> "Step":
        chain.accept(token, p)
        stats.emitted += 1
        return run.take(token, row, p, position=len(prompt) + len(run.made))

    k = spec.k
    pending = list(prompt)  # what the next step feeds before its proposals: the prompt, then the last token
    if len(prompt) + min(k, run.max_new_tokens - 1) >= _core.GEMM_MIN_ROWS:
        # A long prompt goes alone, as plain decoding feeds it (with the proposals its rows could take
        # another kernel path and round differently); a short one goes with the first proposals.
        logits = session.feed(prompt)
        run.timings.prompt_seconds = time.perf_counter() - start
        p = _distribution(chain, logits, run.history)
        step = emit(draw(p, rng), logits, p)
        yield step
        pending = [step.token]
    while not run.done:
        base = session.pos  # everything before `pending`
        want = min(k, run.max_new_tokens - len(run.made) - 1, session.limit - base - len(pending))
        clock = time.perf_counter()
        proposal = proposing.propose(run.history, want) if want > 0 else _NOTHING
        fed = time.perf_counter()
        rows = session.feed(pending + proposal.tokens, all_logits=True)[len(pending) - 1:]
        stats.propose_seconds += fed - clock
        stats.verify_seconds += time.perf_counter() - fed
        if base == 0:
            run.timings.prompt_seconds = time.perf_counter() - start
        stats.rounds += 1
        kept = 0
        for j, proposed in enumerate(proposal.tokens):
            p = _distribution(chain, rows[j], run.history)
            q = proposal.probs[j] if proposal.probs is not None else None
            accepted = _accepts(proposed, p, q, rng)
            stats.proposed += 1
            token = proposed if accepted else draw(_residual(p, q, proposed), rng)
            step = emit(token, rows[j], p)
            step.proposed_by, step.proposed, step.accepted = spec.proposer.name, proposed, accepted
            yield step
            kept += accepted
            if not accepted or run.done:
                break
        else:  # every proposal kept (or none made): the last row gives the target's own next token
            p = _distribution(chain, rows[-1], run.history)
            step = emit(draw(p, rng), rows[-1], p)
            yield step
        stats.accepted += kept
        if run.done:
            break
        session.rewind(base + len(pending) + kept)
        pending = [step.token]
        if spec.adaptive and proposal.tokens:
            k = min(k + ADAPTIVE_STEP_UP, spec.max_k) if kept == len(proposal.tokens) else max(1, k - 1)
