"""Generation, beam search and scoring on top of a model's sessions.

Only this interface of the model is used:

* ``model.tokenizer`` (may be None when working on ids only) and ``model.config``;
* ``model.session()`` -> a session with ``feed(ids, all_logits=False)``,
  ``fork()``, ``pos`` and (optionally) ``limit``, the positions it can hold;
* ``model.forward(ids, all_positions=True)`` -> logits [len(ids), vocab].

:func:`generate` samples with a :class:`~tokentrail.sampling.Sampler` (every
option of :class:`~tokentrail.sampling.SamplingConfig` is accepted as a
keyword), stops on end-of-sequence ids, on stop strings, at
``max_new_tokens`` or when the context is full, and reports each step.
:func:`beam_search` keeps the best ``num_beams`` continuations, forking the
parent's KV cache for every new beam. :func:`score` gives the
log-probability of every token of a text given the tokens before it.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .sampling import SamplingConfig, Sampler, log_softmax, make_chain
from .tokenizer import StreamDecoder

# Prompt tokens given to the stream decoder as context: enough for the
# tokenizer to decide spaces and joins at the boundary, without re-decoding
# a long prompt at every step.
DECODE_CONTEXT = 16


@dataclass
class Alternative:
    """One candidate token with its probability under some distribution."""

    token: int
    text: str
    prob: float
    logprob: float


@dataclass
class Step:
    """One generated token.

    ``text`` is the text released at this step: a character whose bytes span
    several tokens appears with its last token, and text that might be the
    start of a stop string is held back until it is known not to be; joining
    every step's text gives the generation's text. The other fields are filled
    with ``logprobs=True`` / ``top_n > 0``: ``logprob`` and ``rank`` (1 = most
    likely) are under the model's own distribution, ``sampled_logprob`` under
    the distribution actually sampled from (after the processor chain);
    ``top_model`` and ``top_sampled`` are the ``top_n`` most likely tokens
    under each.
    """

    index: int
    token: int
    text: str
    logprob: float | None = None
    rank: int | None = None
    sampled_logprob: float | None = None
    top_model: list[Alternative] = field(default_factory=list)
    top_sampled: list[Alternative] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Generation:
    """The outcome of :func:`generate`.

    ``finish_reason``: "eos" (an end-of-sequence token was sampled; it is the
    last of ``token_ids`` and adds no text), "stop" (``stop_string`` appeared;
    the text is cut before it), "length" (``max_new_tokens``) or "context"
    (the session is full). ``seed`` reproduces the run.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    steps: list[Step]
    seed: int
    stop_string: str | None = None

    @property
    def logprob(self) -> float | None:
        """Sum of the model log-probabilities of the generated tokens (with logprobs=True)."""
        if any(s.logprob is None for s in self.steps):
            return None
        return float(sum(s.logprob for s in self.steps))


def _count(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < lo:
        raise ValueError(f"{name}: must be an integer >= {lo}, got {value!r}")
    return int(value)


def _limit(model, session) -> int:
    limit = getattr(session, "limit", None)
    return int(limit) if limit is not None else int(model.config.max_seq_len)


def _check_fits(model, ids: Sequence[int], name: str = "prompt") -> None:
    limit = getattr(model, "context_limit", None) or model.config.max_seq_len
    if len(ids) > limit:
        raise ValueError(f"{name}: {len(ids)} tokens do not fit the context of {limit}")


def _prompt_ids(model, prompt, name: str = "prompt") -> list[int]:
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise ValueError(f"{name}: this model has no tokenizer; pass token ids")
        ids = model.tokenizer.encode(prompt)
    else:
        try:
            ids = [int(i) for i in np.asarray(list(prompt)).reshape(-1)] if len(prompt) else []
        except (TypeError, ValueError):
            raise ValueError(f"{name}: must be text or a sequence of token ids, got {prompt!r}") from None
    if not ids:
        raise ValueError(f"{name}: is empty (no tokens to condition on)")
    vocab = model.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary (size {vocab})")
    return ids


def _eos_ids(model, eos_ids) -> set[int]:
    if eos_ids is not None:
        return {int(i) for i in ([eos_ids] if isinstance(eos_ids, numbers.Integral) else eos_ids)}
    ids = set(getattr(model.config, "eos_token_ids", None) or [])
    if model.tokenizer is not None:
        ids |= set(model.tokenizer.eos_ids)
    return {int(i) for i in ids}


def _display(model, token: int) -> str:
    tok = model.tokenizer
    return tok.display(token) if tok is not None else f"<{token}>"


def _top(model, logp: np.ndarray, n: int) -> list[Alternative]:
    n = min(n, int(np.isfinite(logp).sum()))
    idx = np.argsort(-logp, kind="stable")[:n]
    return [Alternative(int(i), _display(model, int(i)), float(math.exp(logp[i])), float(logp[i])) for i in idx]


def _held_back(text: str, start: int, stops: Sequence[str]) -> int:
    """Length of the longest tail of text[start:] that could begin a stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - start), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def generate(model, prompt, max_new_tokens: int = 64, *, seed: int | None = None,
             stop: str | Sequence[str] = (), eos_ids: int | Iterable[int] | None = None,
             ignore_eos: bool = False, stream: bool = False, logprobs: bool = False, top_n: int = 0,
             sampling: SamplingConfig | None = None, hooks=None, **options: Any):
    """Continue `prompt` (text or token ids) by sampling.

    Sampling options (temperature=0 for greedy, top_k, top_p, min_p,
    repetition_penalty, mirostat, order=, processors=, ...) are those of
    SamplingConfig, given as keywords or as `sampling=`. `seed` makes the run
    reproducible bit for bit (None: fresh entropy, reported in the result).
    `hooks` (from model.hooks()) records and intervenes during every forward
    pass of the run, the prompt's and each new token's.
    `eos_ids` defaults to the tokenizer's and config's end-of-sequence ids.

    Returns a Generation, or with stream=True an iterator of Step records
    (the last one carries the finish_reason). Every argument is checked
    before the model is run, also when streaming.
    """
    run = start_run(model, prompt, max_new_tokens, seed=seed, stop=stop, eos_ids=eos_ids, ignore_eos=ignore_eos,
                    logprobs=logprobs, top_n=top_n, sampling=sampling, hooks=hooks, **options)
    if stream:
        return run.steps()
    return run.result(list(run.steps()))


def start_run(model, prompt, max_new_tokens: int = 64, *, seed: int | None = None,
              stop: str | Sequence[str] = (), eos_ids: int | Iterable[int] | None = None,
              ignore_eos: bool = False, logprobs: bool = False, top_n: int = 0,
              sampling: SamplingConfig | None = None, hooks=None, **options: Any) -> "Run":
    """A checked, not yet started generation (the options of :func:`generate`).

    `run.steps()` drives it on a session of its own; a scheduler that feeds
    sessions itself calls `run.begin(limit)` once, then `run.advance(logits,
    position)` with each new set of next-token logits.
    """
    max_new_tokens = _count("max_new_tokens", max_new_tokens, 0)
    top_n = _count("top_n", top_n, 0)
    stops = [stop] if isinstance(stop, str) else list(stop)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop: stop strings must be non-empty strings, got {s!r}")
    if stops and model.tokenizer is None:
        raise ValueError("stop: stop strings need a tokenizer; this model has none")
    sampler = Sampler(make_chain(sampling, **options), seed=seed)
    prompt_ids = _prompt_ids(model, prompt)
    _check_fits(model, prompt_ids)
    eos = set() if ignore_eos else _eos_ids(model, eos_ids)
    return Run(model, prompt_ids, max_new_tokens, sampler, stops, eos, logprobs, top_n, hooks)


class Run:
    """One generation's state: the sampler, the text released so far, stop strings, the finish."""

    def __init__(self, model, prompt_ids, max_new_tokens, sampler, stops, eos, logprobs, top_n, hooks=None):
        self.hooks = hooks
        self.model = model
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.sampler = sampler
        self.stops = stops
        self.eos = eos
        self.logprobs = logprobs
        self.top_n = top_n
        self.text = ""
        self.released = 0
        self.finish_reason = "length"
        self.stop_string: str | None = None

    def steps(self) -> Iterator[Step]:
        if self.max_new_tokens == 0:
            return
        session = self.model.session()
        self.begin(_limit(self.model, session))
        feed_kw = {"hooks": self.hooks} if self.hooks is not None else {}
        logits = session.feed(self.prompt_ids, **feed_kw)
        while True:
            step = self.advance(logits, session.pos)
            yield step
            if step.finish_reason is not None:
                return
            logits = session.feed([step.token], **feed_kw)

    def begin(self, limit: int) -> None:
        """Start generating into a session that holds at most `limit` positions."""
        if len(self.prompt_ids) > limit:
            raise ValueError(f"prompt: {len(self.prompt_ids)} tokens do not fit the context of {limit}")
        self.limit = limit
        self.history = list(self.prompt_ids)
        tok = self.model.tokenizer
        self.decoder = StreamDecoder(tok, context=self.prompt_ids[-DECODE_CONTEXT:]) if tok is not None else None
        self.index = 0

    def advance(self, logits: np.ndarray, position: int) -> Step:
        """Choose the next token from `logits` (the session now holds `position` positions).

        The returned Step's finish_reason, when set, ends the run: the caller
        then feeds nothing more.
        """
        tok, decoder, i = self.model.tokenizer, self.decoder, self.index
        self.index += 1
        draw = self.sampler.step(logits, self.history)
        token = draw.token
        self.history.append(token)
        step = Step(i, token, "")
        if self.logprobs or self.top_n:
            self._details(step, logits, draw.probs)
        finish, cut = None, 0
        if token in self.eos:
            finish = "eos"
        elif decoder is not None:
            self.text += decoder.push(token)
            for s in self.stops:
                at = self.text.find(s, self.released)
                if at >= 0 and (finish is None or at < cut):
                    finish, cut, self.stop_string = "stop", at, s
        if finish is None and i == self.max_new_tokens - 1:
            finish = "length"
        if finish is None and position >= self.limit:
            finish = "context"
        if finish == "stop":
            end = cut
        elif finish is not None:
            if decoder is not None:  # release a character left incomplete at the end
                self.text += tok.decode(decoder.ids)[decoder.emitted:]
            end = len(self.text)
        else:
            end = len(self.text) - _held_back(self.text, self.released, self.stops)
        end = max(end, self.released)
        step.text = self.text[self.released:end]
        self.released = end
        step.finish_reason = finish
        if finish is not None:
            self.finish_reason = finish
        return step

    def result(self, steps: list[Step]) -> Generation:
        """The Generation made of this run's steps."""
        return Generation(self.prompt_ids, [s.token for s in steps], self.text[: self.released], self.finish_reason,
                          steps, int(self.sampler.seed), self.stop_string)

    def _details(self, step: Step, logits: np.ndarray, probs: np.ndarray) -> None:
        logp = log_softmax(logits)
        lp = float(logp[step.token])
        step.logprob = lp
        step.rank = 1 + int((logp > lp).sum())
        with np.errstate(divide="ignore"):
            logq = np.log(probs)
        step.sampled_logprob = float(logq[step.token])
        if self.top_n:
            step.top_model = _top(self.model, logp, self.top_n)
            step.top_sampled = _top(self.model, logq, self.top_n)


# ---------------------------------------------------------------- beam search

@dataclass
class Beam:
    """A finished or length-limited hypothesis of :func:`beam_search`.

    ``score = sum_logprob / len(token_ids) ** length_penalty`` (the
    end-of-sequence token, when there is one, counts and is the last id).
    """

    token_ids: list[int]
    sum_logprob: float
    score: float
    finished: bool
    text: str = ""


class _Hypotheses:
    """The best `size` finished hypotheses seen so far."""

    def __init__(self, size: int):
        self.size = size
        self.items: list[Beam] = []

    def add(self, beam: Beam) -> None:
        if len(self.items) < self.size or beam.score > self.worst:
            self.items.append(beam)
            self.items.sort(key=lambda b: -b.score)
            del self.items[self.size:]

    @property
    def full(self) -> bool:
        return len(self.items) >= self.size

    @property
    def worst(self) -> float:
        return self.items[-1].score if self.items else -math.inf


def beam_search(model, prompt_ids, num_beams: int = 4, length_penalty: float = 1.0,
                early_stopping: bool | str = False, max_new_tokens: int = 32,
                eos_ids: int | Iterable[int] | None = None, num_return: int | None = None) -> list[Beam]:
    """The `num_return` (default num_beams) best continuations, best first.

    Each step extends every running beam by its best tokens, keeps the
    2*num_beams best candidates, moves end-of-sequence candidates ranked
    within the first num_beams into the finished set, and continues the best
    num_beams others; a new beam forks its parent's session and feeds one
    token. Stopping (early_stopping): True stops once num_beams hypotheses
    are finished; False stops when the best running beam, scored as if it
    ended now, cannot beat the worst finished one; "never" stops only when no
    running beam can improve (with length_penalty > 0, scored at the longest
    possible length). At max_new_tokens, or a full context, the num_beams
    best candidates of the last step join the results unfinished. These are
    the rules of transformers' beam search, so its results can be compared.
    """
    num_beams = _count("num_beams", num_beams, 1)
    max_new_tokens = _count("max_new_tokens", max_new_tokens, 1)
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real) \
            or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty: must be a finite number, got {length_penalty!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping: must be True, False or 'never', got {early_stopping!r}")
    num_return = num_beams if num_return is None else _count("num_return", num_return, 1)
    if num_return > num_beams:
        raise ValueError(f"num_return: cannot exceed num_beams ({num_beams}), got {num_return}")
    prompt = _prompt_ids(model, prompt_ids, "prompt_ids")
    _check_fits(model, prompt, "prompt_ids")
    eos = _eos_ids(model, eos_ids)
    lp = float(length_penalty)

    session = model.session()
    limit = _limit(model, session)
    if len(prompt) > limit:
        raise ValueError(f"prompt_ids: {len(prompt)} tokens do not fit the context of {limit}")
    logits = session.feed(prompt)
    # Running beams: (sum_logprob, generated ids, session, logits of the next position).
    running = [(0.0, [], session, logits)]
    done = _Hypotheses(num_beams)
    # Enough candidates that num_beams survive even if end-of-sequence ids take places.
    width = max(2, 1 + len(eos)) * num_beams
    for step in range(max_new_tokens):
        length = step + 1
        # At the last step (or a full context) every candidate ends here.
        last = step == max_new_tokens - 1 or running[0][2].pos >= limit
        cands = []
        for b, (total, _, _, lg) in enumerate(running):
            logp = log_softmax(lg)
            k = min(width, logp.size)
            best = np.argpartition(-logp, k - 1)[:k]
            cands.extend((total + float(logp[t]), b, int(t)) for t in best)
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        chosen = []
        for rank, (total, b, t) in enumerate(cands[:width]):
            if t in eos or last:
                # Only the num_beams best candidates may end a hypothesis; the rest are spares.
                if rank < num_beams:
                    done.add(Beam(running[b][1] + [t], total, total / length ** lp, t in eos))
            elif len(chosen) < num_beams:
                chosen.append((total, b, t))
        if last or not chosen:
            break
        if done.full and _finished(early_stopping, done, chosen[0][0], length, max_new_tokens, lp):
            break
        # The last child of a parent takes over the parent's session; the others fork it.
        last_child = {b: n for n, (_, b, _) in enumerate(chosen)}
        new_running = []
        for n, (total, b, t) in enumerate(chosen):
            _, ids, sess, _ = running[b]
            s = sess if last_child[b] == n else sess.fork()
            new_running.append((total, ids + [t], s, s.feed([t])))
        running = new_running
    results = done.items[:num_return]
    if model.tokenizer is not None:
        for beam in results:
            beam.text = model.tokenizer.decode(beam.token_ids)
    return results


def _finished(early_stopping, done: _Hypotheses, best_running: float, length: int, max_new_tokens: int,
              lp: float) -> bool:
    if early_stopping is True:
        return True
    if early_stopping is False:
        return done.worst >= best_running / length ** lp
    # "never": the best score any running beam could still reach. Sums of
    # log-probabilities only fall, so with lp > 0 the bound is at the longest length.
    bound_length = max_new_tokens if lp > 0 else length
    return done.worst >= best_running / bound_length ** lp


# ---------------------------------------------------------------- scoring

@dataclass
class TokenScore:
    """One token of a scored text; the first token has no logprob (nothing precedes it)."""

    position: int
    token: int
    text: str
    logprob: float | None
    rank: int | None
    top: list[Alternative] = field(default_factory=list)


@dataclass
class Score:
    """Per-token log-probabilities of a text, and its perplexity
    exp(-mean logprob) over the tokens after the first."""

    token_ids: list[int]
    tokens: list[TokenScore]
    sum_logprob: float
    mean_logprob: float
    perplexity: float
    text: str = ""


def score(model, text_or_list, top_n: int = 5):
    """Log-probability of each token given the ones before it ("echo" log-probs).

    Accepts a text, a sequence of token ids, or a list of texts (or of id
    lists), and returns a Score or a list of them. Texts are encoded with the
    tokenizer's special tokens (BOS), so the first real token is scored too
    when the tokenizer adds a BOS.
    """
    top_n = _count("top_n", top_n, 0)
    if isinstance(text_or_list, str):
        return _score_one(model, text_or_list, top_n)
    items = list(text_or_list)
    if items and all(isinstance(i, (numbers.Integral, np.integer)) and not isinstance(i, bool) for i in items):
        return _score_one(model, items, top_n)
    prepared = [_prompt_ids(model, item, "text") for item in items]  # check all before running any
    for ids in prepared:
        if len(ids) < 2:
            raise ValueError(f"text: needs at least 2 tokens to score, got {len(ids)}")
    return [_score_one(model, ids, top_n) for ids in prepared]


def _score_one(model, item, top_n: int) -> Score:
    ids = _prompt_ids(model, item, "text")
    if len(ids) < 2:
        raise ValueError(f"text: needs at least 2 tokens to score, got {len(ids)}")
    logits = np.asarray(model.forward(ids, all_positions=True), dtype=np.float64)
    logits = logits[:-1]
    top = logits.max(axis=1, keepdims=True)
    logp = logits - top
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    tokens = [TokenScore(0, ids[0], _display(model, ids[0]), None, None)]
    lps = []
    for pos in range(1, len(ids)):
        row = logp[pos - 1]
        lp = float(row[ids[pos]])
        lps.append(lp)
        tokens.append(TokenScore(pos, ids[pos], _display(model, ids[pos]), lp, 1 + int((row > lp).sum()),
                                 _top(model, row, top_n) if top_n else []))
    total = float(sum(lps))
    mean = total / len(lps)
    text = model.tokenizer.decode(ids) if model.tokenizer is not None else ""
    return Score(ids, tokens, total, mean, math.exp(-mean), text)
