"""Generation, beam search and scoring on top of a model's sessions.

Only this interface of the model is used:

* ``model.tokenizer`` (may be None when working on ids only) and ``model.config``;
* ``model.session()`` -> a session with ``feed(ids, all_logits=False)``,
  ``fork()``, ``pos`` and (optionally) ``limit``, the positions it can hold;
* ``model.forward(ids, all_positions=True)`` -> logits [len(ids), vocab];
* ``model.forward_batch(sessions, token_lists, logits=, hooks=)`` when it has
  it (several sessions advanced in one step); without it, sessions are fed
  one by one.

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
import inspect
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ContextFullError, InvalidArgumentError, OptionError, unknown_options
from .progress import ProgressOption, Task, check_progress
from .generation_config import (MAX_LENGTH_PENALTY, SAMPLING_FIELDS, TRANSFORMERS_SAMPLING_TOP_K,
                                GenerationDefaults)
from . import speculative
from .sampling import SAMPLING_OPTIONS, Processor, SamplingConfig, Sampler, Temperature, log_softmax
from .tokenizer import StreamDecoder

if TYPE_CHECKING:
    from .capture import Hooks

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
    under each. With speculative decoding, ``proposed_by`` names the proposer
    ("draft" or "prompt-lookup") when a proposal was tested at this position,
    ``proposed`` is that token and ``accepted`` whether the target kept it
    (when not, ``token`` is the target's own choice); all three are None where
    the target chose without a proposal.
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
    proposed_by: str | None = None
    proposed: int | None = None
    accepted: bool | None = None


@dataclass(repr=False)
class Generation:
    """The outcome of :func:`generate`.

    ``finish_reason``: "eos" (an end-of-sequence token was sampled; it is the
    last of ``token_ids`` and adds no text), "stop" (``stop_string`` appeared;
    the text is cut before it), "length" (``max_new_tokens``) or "context"
    (the session is full). ``seed`` reproduces the run. ``speculation``
    counts proposals and acceptances when a draft was given.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    steps: list[Step]
    seed: int
    stop_string: str | None = None
    timings: Timings | None = None
    speculation: speculative.SpeculationStats | None = None

    def __repr__(self) -> str:
        return (f"Generation(text={self.text!r:.80}, {len(self.token_ids)} tokens after a prompt of "
                f"{len(self.prompt_ids)}, finish_reason={self.finish_reason!r}, seed={self.seed})")

    @property
    def logprob(self) -> float | None:
        """Sum of the model log-probabilities of the generated tokens (with logprobs=True)."""
        if any(s.logprob is None for s in self.steps):
            return None
        return float(sum(s.logprob for s in self.steps))


def _count(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < lo:
        raise InvalidArgumentError(f"{name}: must be an integer >= {lo}, got {value!r}")
    return int(value)


def _limit(model, session) -> int:
    limit = getattr(session, "limit", None)
    return int(limit) if limit is not None else int(model.config.max_seq_len)


def _check_fits(model, ids: Sequence[int], name: str = "prompt") -> None:
    limit = getattr(model, "context_limit", None) or model.config.max_seq_len
    if len(ids) > limit:
        raise ContextFullError.for_tokens(0, len(ids), limit, name)


def _prompt_ids(model, prompt, name: str = "prompt") -> list[int]:
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise InvalidArgumentError(f"{name}: this model has no tokenizer; pass token ids")
        ids = model.tokenizer.encode(prompt)
    else:
        try:
            ids = [int(i) for i in np.asarray(list(prompt)).reshape(-1)] if len(prompt) else []
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"{name}: must be text or a sequence of token ids, got {prompt!r}") from None
    if not ids:
        raise InvalidArgumentError(f"{name}: is empty (no tokens to condition on)")
    vocab = model.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise InvalidArgumentError(f"{name}: token id {bad[0]} is outside the vocabulary (size {vocab})")
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


@dataclass
class Timings:
    """Where a generation's time went, in seconds (wall clock).

    ``prompt_seconds``: the prompt's forward pass; ``first_token_seconds``:
    from the start until the first token was chosen (the prompt plus one
    draw); ``generation_seconds``: everything after the first token (each
    later token's forward pass and draw).
    """

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt positions taken from a prompt cache, not computed
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    first_token_seconds: float = 0.0
    generation_seconds: float = 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        """Prompt positions computed (those not taken from a prompt cache) per second."""
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prompt_seconds if self.prompt_seconds > 0 else math.inf

    @property
    def generation_tokens_per_second(self) -> float:
        """Tokens after the first, per second of the time after the first."""
        later = self.generated_tokens - 1
        return later / self.generation_seconds if later > 0 and self.generation_seconds > 0 else math.nan

    def summary(self) -> str:
        """One line in the manner of llama.cpp's timing report."""
        later = max(0, self.generated_tokens - 1)
        gen = self.generation_tokens_per_second
        gen_s = f"{gen:.1f} tokens/s" if math.isfinite(gen) else "n/a"
        cached = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
        return (f"prompt: {self.prompt_tokens} tokens{cached} in {self.prompt_seconds * 1e3:.1f} ms "
                f"({self.prompt_tokens_per_second:.1f} tokens/s) | first token after "
                f"{self.first_token_seconds * 1e3:.1f} ms | generation: {later} more tokens in "
                f"{self.generation_seconds * 1e3:.1f} ms ({gen_s})")


class Stream:
    """The steps of a streamed generation, as an iterator; its `timings` and
    `finish_reason` are filled in as it runs."""

    def __init__(self, run: "Run"):
        self._run = run
        self._steps = run.steps()

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Step:
        return next(self._steps)

    @property
    def timings(self) -> Timings:
        return self._run.timings

    @property
    def finish_reason(self) -> str | None:
        return self._run.finish_reason if self._run.done else None

    @property
    def seed(self) -> int:
        return int(self._run.sampler.seed)

    @property
    def greedy(self) -> bool:
        """Whether tokens are chosen by argmax (the seed then plays no part)."""
        return any(isinstance(p, Temperature) and p.temperature == 0.0 for p in self._run.sampler.chain)

    @property
    def prompt_ids(self) -> list[int]:
        return list(self._run.prompt_ids)

    @property
    def speculation(self) -> speculative.SpeculationStats | None:
        """Proposals and acceptances so far, when a draft was given."""
        return self._run.speculation_stats

    def __repr__(self) -> str:
        return f"Stream(prompt of {len(self._run.prompt_ids)} tokens, seed={self.seed})"


# Options of generate() that go into the SamplingConfig, and those whose default
# may come from the model's generation_config.json (None in the signature).
_FROM_FILE = SAMPLING_FIELDS + ("repetition_penalty", "no_repeat_ngram_size")
_ALIASES = {"eos_ids": "eos_token_id"}
# Chain stages that choose among tokens at random and so mean nothing under greedy decoding.
_SAMPLING_STAGES = ("top_n_sigma", "top_k", "top_p", "min_p", "typical_p", "epsilon", "eta", "xtc", "mirostat")


def take_aliases(options: dict[str, Any], extra: dict[str, Any]) -> None:
    """Move generate's other names (eos_ids for eos_token_id) from `extra` into `options`, refusing both at once."""
    for alias, name in _ALIASES.items():
        if alias in extra:
            if options.get(name) is not None:
                raise OptionError(f"{alias}: is another name for {name}; give one of them")
            options[name] = extra.pop(alias)


def _given(name: str, value: Any, defaults: dict[str, Any]) -> bool:
    d = defaults.get(name, None)
    if isinstance(value, np.ndarray) or isinstance(d, np.ndarray):
        return True
    return value is not None and not (value is d or (type(value) is type(d) and value == d))


def _sampling_config(model, options: dict[str, Any], sampling: SamplingConfig | None,
                     signature_defaults: dict[str, Any]) -> tuple[SamplingConfig, bool]:
    """The SamplingConfig that caller, model file and defaults together ask for; and whether it samples."""
    file = getattr(model, "generation_defaults", None) or GenerationDefaults()
    given = {k: v for k, v in options.items() if _given(k, v, signature_defaults)}
    base = {f.name: getattr(sampling, f.name) for f in fields(SamplingConfig)} if sampling is not None else {}
    do_sample = given.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, (bool, np.bool_)):
        raise InvalidArgumentError(f"do_sample: must be True or False, got {do_sample!r}")
    temperature = given.get("temperature")
    if temperature is not None:
        Temperature(temperature)  # validates
    if do_sample is None:
        if temperature is not None:
            do_sample = float(temperature) > 0.0
        elif "temperature" in base:
            do_sample = float(base["temperature"]) > 0.0
        else:
            do_sample = bool(file.do_sample)
    elif do_sample and temperature is not None and temperature == 0:
        raise InvalidArgumentError("temperature: do_sample=True needs a temperature above 0 (0 means greedy)")
    elif not do_sample and temperature is not None and temperature > 0:
        raise InvalidArgumentError(f"temperature: {temperature} acts only when sampling, and do_sample=False asks for "
                         f"greedy decoding; leave one of them out")
    values = dict(base)
    for name in _FROM_FILE:
        if name in given:
            values[name] = given[name]
        elif name in base:
            continue
        elif name in SAMPLING_FIELDS and not do_sample:
            continue  # the file's sampling settings rest while decoding is greedy
        elif getattr(file, name) is not None:
            values[name] = getattr(file, name)
        elif name == "top_k" and do_sample and given.get("do_sample") is True:
            values[name] = TRANSFORMERS_SAMPLING_TOP_K  # transformers' meaning of do_sample=True
    if "banned_tokens" in given:
        values["banned_tokens"] = given["banned_tokens"]
    elif "banned_tokens" not in base and file.suppress_tokens:
        values["banned_tokens"] = file.suppress_tokens
    for name in SAMPLING_OPTIONS:
        if name not in _FROM_FILE and name != "banned_tokens" and name in given:
            values[name] = given[name]
    if values.get("logit_bias") is None:
        values.pop("logit_bias", None)
    if not do_sample:
        values["temperature"] = 0.0
    config = SamplingConfig(**values)
    if not do_sample:
        idle = [n for n in config.build().names if n in _SAMPLING_STAGES]
        if float(config.dynatemp_range) > 0.0:
            idle.append("dynatemp_range")
        if idle:
            raise InvalidArgumentError(f"{idle[0]}: acts only when sampling, and decoding is greedy here "
                             f"({'do_sample=False' if given.get('do_sample') is False else 'the default'}); "
                             f"pass a temperature above 0 or do_sample=True")
    return config, do_sample


def sampling_config(model, options: Mapping[str, Any] | None = None,
                    sampling: SamplingConfig | None = None) -> SamplingConfig:
    """The SamplingConfig that generate() uses on `model` for these options (same names, same defaults).

    Whatever else chooses tokens (the journey, a server) goes through this,
    so that with the same options and seed it picks what generate() picks:
    ``Sampler(sampling_config(model, {"temperature": 0.8}), seed=1)``.
    """
    options = dict(options or {})
    unknown = set(options) - _CHAIN_OPTIONS
    if unknown:
        raise unknown_options(unknown, _CHAIN_OPTIONS, "sampling option")
    full = {name: _SIGNATURE_DEFAULTS[name] for name in _CHAIN_OPTIONS}
    full.update(options)
    return _sampling_config(model, full, sampling, _SIGNATURE_DEFAULTS)[0]


def make_sampler(model, options: Mapping[str, Any] | None = None, sampling: SamplingConfig | None = None,
                 seed: int | None = None) -> Sampler:
    """The Sampler generate() draws its tokens with for these options and seed.

    The chain is :func:`sampling_config`'s (the model's generation_config.json
    defaults and transformers' names, resolved as generate resolves them), so
    a journey drawing through it picks the token generate picks first.
    """
    return Sampler(sampling_config(model, options, sampling), seed=seed)


def _new_tokens(model, prompt_len: int, max_new_tokens, max_length) -> int:
    if max_new_tokens is not None and max_length is not None:
        raise InvalidArgumentError("max_length: give max_new_tokens or max_length (prompt included), not both")
    if max_new_tokens is not None:
        return _count("max_new_tokens", max_new_tokens, 0)
    if max_length is not None:
        total = _count("max_length", max_length, 1)
        if total < prompt_len:
            raise InvalidArgumentError(f"max_length: {total} is shorter than the prompt ({prompt_len} tokens); "
                             f"it counts the prompt's tokens too (or use max_new_tokens)")
        return total - prompt_len
    file = getattr(model, "generation_defaults", None) or GenerationDefaults()
    return file.new_tokens_for(prompt_len)


def _check_hooks(model, hooks) -> None:
    if hooks is not None:
        from .capture import check_hooks

        check_hooks(model, hooks)


def generate(model, prompt: str | Sequence[int] | Sequence[str | Sequence[int]],
             max_new_tokens: int | None = None, *,
             do_sample: bool | None = None,
             temperature: float | None = None,
             top_k: int | None = None,
             top_p: float | None = None,
             min_p: float | None = None,
             typical_p: float | None = None,
             epsilon_cutoff: float | None = None,
             eta_cutoff: float | None = None,
             repetition_penalty: float | None = None,
             no_repeat_ngram_size: int | None = None,
             top_n_sigma: float | None = None,
             dynatemp_range: float = 0.0,
             dynatemp_exponent: float = 1.0,
             xtc_threshold: float = 0.1,
             xtc_probability: float = 0.0,
             dry_multiplier: float = 0.0,
             dry_base: float = 1.75,
             dry_allowed_length: int = 2,
             dry_window: int | None = None,
             dry_breakers: Sequence[int] = (),
             mirostat: int = 0,
             mirostat_tau: float = 5.0,
             mirostat_eta: float = 0.1,
             repetition_window: int | None = None,
             repetition_negative: str = "multiply",
             presence_penalty: float = 0.0,
             frequency_penalty: float = 0.0,
             penalty_window: int | None = 64,
             logit_bias: Mapping[int, float] | None = None,
             banned_tokens: Sequence[int] | None = None,
             top_k_ties: str = "keep",
             min_keep: int = 1,
             order: str | Sequence[str | Processor] = "hf",
             processors: Sequence[Processor] = (),
             sampling: SamplingConfig | None = None,
             max_length: int | None = None,
             num_beams: int | None = None,
             length_penalty: float | None = None,
             early_stopping: bool | str | None = None,
             num_return_sequences: int | None = None,
             seed: int | None = None,
             stop: str | Sequence[str] = (),
             eos_token_id: int | Iterable[int] | None = None,
             pad_token_id: int | None = None,
             ignore_eos: bool = False,
             stream: bool = False,
             logprobs: bool = False,
             top_n: int = 0,
             hooks: Hooks | None = None,
             draft: Any = None,
             speculative_k: int | None = None,
             speculative_adaptive: bool = False,
             per_prompt: Sequence[Mapping[str, Any]] | None = None,
             prompt_cache: Any = None,
             **unexpected: Any) -> "Generation | list[Generation] | Stream | list":
    """Continue `prompt` (text or token ids), or each prompt of a list of them.

    Defaults: every option left at None takes the model's generation_config.json
    value when it has one, else tokentrail's: greedy decoding, 64 new tokens
    (see tokentrail.generation_config). `do_sample=False` is greedy,
    `do_sample=True` samples (with transformers' top_k=50 unless top_k is
    given); without do_sample, a `temperature` above 0 samples and 0 is greedy.

    Length and end: `max_new_tokens`, or `max_length` counting the prompt too;
    `stop` strings (also across tokens; the text is cut before them);
    `eos_token_id` (alias `eos_ids`; default: the model's end-of-sequence
    ids), `ignore_eos=True` to run on past them. `pad_token_id` is accepted
    for transformers' sake and has no effect on a single sequence.

    The processor chain (see tokentrail.sampling): temperature (0 = greedy),
    dynatemp_range/dynatemp_exponent, top_k (0 = off; top_k_ties "keep" or
    "cut"), top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff, top_n_sigma,
    xtc_threshold/xtc_probability, dry_multiplier/dry_base/
    dry_allowed_length/dry_window/dry_breakers, mirostat (1 or 2) with
    mirostat_tau/mirostat_eta, repetition_penalty (window
    repetition_window, rule repetition_negative), presence_penalty and
    frequency_penalty (over penalty_window tokens), no_repeat_ngram_size,
    logit_bias {id: bias}, banned_tokens, min_keep; `order` "hf" (as
    transformers), "llama.cpp", or a list of stage names and callables;
    `processors` extra callables f(logits, history) -> logits;
    `sampling` a SamplingConfig to start from (keywords that differ from
    their defaults override it).

    Several sequences: `num_beams` > 1 runs beam search (with
    `length_penalty`, `early_stopping`; greedy only), and
    `num_return_sequences` returns that many beams or independent samples
    as a list. Samples: the prompt is prefilled once, every sample starts
    from a copy of its KV cache (Session.fork) and its own copy of the last
    position's logits, and all of them advance together, one step of the
    core for all (see Model.forward_batch). Sample i is what a single run
    with its own seed gives: the first has `seed` itself, the others the
    first 32-bit word of each child of numpy's
    ``SeedSequence(seed).spawn(n - 1)``; each result reports its `seed`.
    (With `hooks`, the samples run one after another, each feeding the
    prompt, so the records are those of separate calls.)

    `seed` makes sampling reproducible bit for bit (None: fresh entropy,
    reported in the result). `stream=True` returns a Stream of Step records
    as they are produced (the last one carries the finish_reason).
    `logprobs=True` / `top_n` > 0 fill each step's log-probability, rank and
    top alternatives before and after the chain. `hooks` (from
    model.hooks()) records and intervenes during every forward pass of the run.

    Speculative decoding (see tokentrail.speculative): `draft` is a model
    with the same tokenizer (e.g. a q4_0 copy of this one) or "prompt-lookup";
    it proposes up to `speculative_k` tokens (default 4) that the model checks
    in one step. The output is exactly plain decoding's: the same tokens when
    greedy, the same distribution when sampling (not the same draws for a
    seed). `speculative_adaptive=True` raises k after a step whose proposals
    were all kept and lowers it after a refusal.

    Many prompts: a list of prompts (texts or id lists) is generated
    together, every step of the core advancing all of them at once (see
    Model.forward_batch), and gives a list with, for each prompt, what
    generate(prompt, ...) alone gives (with the same seed, the same tokens).
    The keywords apply to every prompt; `per_prompt`, one dict of options
    per prompt (`{"seed": 1, "temperature": 0.7}`), overrides them for that
    prompt. Prompts join while a step has room and leave when they finish;
    a prompt given more than once is prefilled once (as the samples of
    one prompt are); prompts that share one Hooks object run one after
    another, so that its records come in order. Streaming takes one prompt
    at a time, and one sequence.

    Prompt cache (see tokentrail.prompt_cache): `prompt_cache` is a
    PromptCache, or True for the model's own (`model.prompt_cache`). A
    prompt then starts from the longest beginning that a cached sequence
    shares with it and feeds only the rest, and each finished sequence is
    kept for later prompts: the next turn of a conversation computes only
    its new messages. `timings.cached_tokens` says how many prompt positions
    were reused. Not with beam search, `hooks` (they record every prompt
    position) or speculative decoding.

    Every argument is checked before the model runs, also when streaming;
    an unknown option name is refused with the nearest valid names.
    """
    options = dict(locals())
    for key in ("model", "prompt", "unexpected"):
        options.pop(key)
    take_aliases(options, unexpected)
    if unexpected:
        raise unknown_options(unexpected, GENERATE_OPTIONS | set(_ALIASES), "generate option")
    return _generate(model, prompt, options)


def _generate(model, prompt, o: dict[str, Any]):
    if is_prompt_list(prompt):
        return _generate_batch(model, list(prompt), o)
    if o["per_prompt"] is not None:
        raise OptionError("per_prompt: gives each prompt of a list of prompts its options; "
                          "with one prompt, pass the options as keywords")
    plan = _prepare(model, prompt, o)
    if plan.beams is None and o["stream"]:
        return Stream(plan.runs[0])
    return _run_to_end(model, [plan])[0]


def _run_to_end(model, plans: list["_Plan"]) -> list:
    """The results of the plans, their runs advanced together to their end. Nothing reads a step
    before then, so the runs may make their steps' texts at the end (Run.texts_at_end)."""
    runs = [run for plan in plans for run in plan.runs]
    for run in runs:
        run.texts_at_end = True
    for _ in _advance_together(model, runs):
        pass
    return [plan.result() for plan in plans]


def start_run(model, prompt: str | Sequence[int], max_new_tokens: int | None = None, **options: Any) -> "Run":
    """One sequence of generate(model, prompt, ...), checked and not yet started.

    The options are generate's, with its defaults and checks (one prompt, one
    sequence: no beams, no streaming). A caller that feeds sessions itself
    (the server's scheduler) calls ``run.begin(session, time.perf_counter())``
    for the prompt ids to feed, then ``run.advance(logits)`` with the logits of
    the last position fed, until a Step has a finish_reason.
    """
    given = dict(options)
    known = {name: given.pop(name) for name in list(given) if name in GENERATE_OPTIONS}
    take_aliases(known, given)
    if given:
        raise unknown_options(given, GENERATE_OPTIONS | set(_ALIASES), "generate option")
    for name in ("stream", "per_prompt", "num_beams", "num_return_sequences"):
        if known.get(name) not in (None, False, 1):
            raise OptionError(f"{name}: a run is one sequence generated step by step")
    for name in ("draft", "speculative_k", "speculative_adaptive"):
        if known.get(name) not in (None, False):
            raise OptionError(f"{name}: speculative decoding runs inside generate; a run is fed one step at a time")
    if known.get("prompt_cache") not in (None, False):
        raise OptionError("prompt_cache: a run's caller feeds its session; take the session from the cache "
                          "(PromptCache.take) and give it to Run.begin")
    o = dict(_SIGNATURE_DEFAULTS)
    o.update(known, max_new_tokens=max_new_tokens)
    o["num_beams"] = o["num_return_sequences"] = 1  # not the model file's: a run is one sequence
    plan = _prepare(model, prompt, o)
    return plan.runs[0]


def is_prompt_list(prompt) -> bool:
    """Whether `prompt` is a list (or tuple) of prompts, each text or ids, rather than one prompt of ids."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and \
        all(isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt)


def _generate_batch(model, prompts: list, o: dict[str, Any]) -> list:
    """generate() of several prompts advanced together; result i is what generate(prompts[i], ...) gives."""
    per_prompt = o.pop("per_prompt")
    if per_prompt is not None:
        if isinstance(per_prompt, Mapping) or not isinstance(per_prompt, Sequence):
            raise OptionError(f"per_prompt: must be a list with one dict of options per prompt, got {per_prompt!r:.60}")
        if len(per_prompt) != len(prompts):
            raise InvalidArgumentError(f"per_prompt: has {len(per_prompt)} dicts of options for {len(prompts)} prompts")
    if o["stream"]:
        raise InvalidArgumentError("stream: a list of prompts is generated together and returned at the end; "
                         "stream one prompt at a time")
    plans = []
    for i, prompt in enumerate(prompts):
        options = dict(o)
        if per_prompt is not None:
            options.update(_prompt_options(per_prompt[i], options, i))
        try:
            plans.append(_prepare(model, prompt, options))
        except (ValueError, TypeError) as e:
            if e.args and isinstance(e.args[0], str):
                e.args = (f"prompt {i}: {e.args[0]}",) + e.args[1:]
            raise
    return _run_to_end(model, plans)


def _prompt_options(given, shared: dict[str, Any], i: int) -> dict[str, Any]:
    """One prompt's own options (aliases resolved, names checked); they override the shared keywords."""
    if not isinstance(given, Mapping):
        raise OptionError(f"per_prompt[{i}]: must be a dict of generate options, got {given!r:.60}")
    own = dict(given)
    for alias, name in _ALIASES.items():
        if alias in own:
            if name in own:
                raise OptionError(f"per_prompt[{i}]: {alias} is another name for {name}; give one of them")
            own[name] = own.pop(alias)
    unknown = set(own) - _PER_PROMPT_OPTIONS
    if unknown:
        raise unknown_options(unknown, _PER_PROMPT_OPTIONS | set(_ALIASES), f"per_prompt[{i}] option")
    return own


class _Plan:
    """One prompt's generation, checked and ready to run: the runs to advance (one per
    returned sequence), or a beam search."""

    def __init__(self, prompt_ids: list[int], runs: list["Run"], n_return: int, beams=None):
        self.prompt_ids = prompt_ids
        self.runs = runs
        self.n_return = n_return
        self.beams = beams  # a callable that runs the beam search, or None

    def result(self) -> "Generation | list[Generation]":
        if self.beams is not None:
            return self.beams()
        out = [run.generation() for run in self.runs]
        return out[0] if self.n_return == 1 else out


def _prepare(model, prompt, o: dict[str, Any]) -> _Plan:
    """Every check of generate() for one prompt, before anything runs."""
    top_n = _count("top_n", o["top_n"], 0)
    stops = [o["stop"]] if isinstance(o["stop"], str) else list(o["stop"])
    for s in stops:
        if not isinstance(s, str) or not s:
            raise InvalidArgumentError(f"stop: stop strings must be non-empty strings, got {s!r}")
    if stops and model.tokenizer is None:
        raise InvalidArgumentError("stop: stop strings need a tokenizer; this model has none")
    _check_hooks(model, o["hooks"])
    if o["pad_token_id"] is not None:
        _count("pad_token_id", o["pad_token_id"], 0)
    config, do_sample = _sampling_config(model, o, o["sampling"], _SIGNATURE_DEFAULTS)
    if o["seed"] is not None:
        _count("seed", o["seed"], 0)
    prompt_ids = _prompt_ids(model, prompt)
    _check_fits(model, prompt_ids)
    max_new_tokens = _new_tokens(model, len(prompt_ids), o["max_new_tokens"], o["max_length"])
    eos = set() if o["ignore_eos"] else _eos_ids(model, o["eos_token_id"])
    file = getattr(model, "generation_defaults", None) or GenerationDefaults()
    num_beams = _count("num_beams", o["num_beams"] if o["num_beams"] is not None else (file.num_beams or 1), 1)
    n_return = o["num_return_sequences"] if o["num_return_sequences"] is not None \
        else (file.num_return_sequences or 1)
    n_return = _count("num_return_sequences", n_return, 1)
    speculation = speculative.plan(model, o["draft"], o["speculative_k"], o["speculative_adaptive"], config,
                                   o["hooks"])
    if num_beams > 1:
        if speculation is not None:
            raise InvalidArgumentError("draft: speculative decoding samples one sequence; not with beam search "
                                       "(num_beams > 1)")
        if o["prompt_cache"] not in (None, False):
            raise InvalidArgumentError("prompt_cache: not available with beam search (num_beams > 1)")
        beams = _beams(model, prompt_ids, config, do_sample, num_beams, n_return, max_new_tokens, eos, o, file)
        return _Plan(prompt_ids, [], n_return, beams)
    if n_return > 1:
        if not do_sample:
            raise InvalidArgumentError("num_return_sequences: greedy decoding gives one sequence; sample "
                             "(do_sample=True or temperature > 0) or use num_beams")
        if o["stream"]:
            raise InvalidArgumentError("num_return_sequences: streaming gives one sequence at a time")
    seeds = [o["seed"]] if n_return == 1 else _seeds(o["seed"], n_return)
    runs = [Run(model, prompt_ids, max_new_tokens, Sampler(config.build(), seed=seed), stops, eos, o["logprobs"],
                 top_n, o["hooks"]) for seed in seeds]
    cache = _prompt_cache(model, o["prompt_cache"], o["hooks"], speculation)
    for run in runs:
        run.speculation = speculation
        run.prompt_cache = cache
    return _Plan(prompt_ids, runs, n_return)


def _prompt_cache(model, given, hooks, speculation):
    """The PromptCache `given` asks for (None, True: the model's own, or one), checked against the run."""
    if given is None or given is False:
        return None
    from .prompt_cache import PromptCache

    cache = model.prompt_cache if given is True else given
    if not isinstance(cache, PromptCache):
        raise OptionError(f"prompt_cache: must be a tokentrail PromptCache or True, got {type(given).__name__}")
    if cache.model is not model:
        raise InvalidArgumentError("prompt_cache: this PromptCache holds another model's sequences")
    if hooks is not None:
        raise InvalidArgumentError("prompt_cache: hooks record every prompt position, which a prompt cache "
                                   "skips; use one or the other")
    if speculation is not None:
        raise InvalidArgumentError("prompt_cache: not available with speculative decoding (draft)")
    return cache


def _seeds(seed: int | None, n: int) -> list[int]:
    """n seeds: `seed` itself first (so one sequence equals a single run), the rest derived from it."""
    root = np.random.SeedSequence(seed)
    return [int(root.entropy)] + [int(c.generate_state(1)[0]) for c in root.spawn(n - 1)]


def _beams(model, prompt_ids, config: SamplingConfig, do_sample: bool, num_beams: int, n_return: int,
           max_new_tokens: int, eos: set[int], o: dict[str, Any], file: GenerationDefaults):
    """num_beams > 1: checks the options, and returns the beam search that gives the best `n_return`
    hypotheses as Generations, to be called when its turn comes."""
    if do_sample:
        raise InvalidArgumentError("num_beams: beam search here is deterministic; do not combine it with sampling "
                         "(do_sample=False or temperature=0)")
    stages = [n for n in config.build().names if n != "temperature"]
    if stages:
        raise InvalidArgumentError(f"num_beams: beam search ranks the model's own log-probabilities; it does not apply "
                         f"{', '.join(stages)}")
    for name in ("stream", "logprobs", "hooks"):
        if o[name]:
            raise InvalidArgumentError(f"{name}: not available with beam search (num_beams > 1)")
    if o["stop"] or o["top_n"]:
        raise InvalidArgumentError(f"{'stop' if o['stop'] else 'top_n'}: not available with beam search (num_beams > 1)")
    early = o["early_stopping"] if o["early_stopping"] is not None else \
        (file.early_stopping if file.early_stopping is not None else False)
    lp = o["length_penalty"] if o["length_penalty"] is not None else \
        (file.length_penalty if file.length_penalty is not None else 1.0)

    def run():
        if max_new_tokens == 0:
            return [] if n_return > 1 else Generation(prompt_ids, [], "", "length", [], 0)
        beams = beam_search(model, prompt_ids, num_beams=num_beams, length_penalty=lp, early_stopping=early,
                            max_new_tokens=max_new_tokens, eos_ids=sorted(eos), num_return=n_return)
        out = []
        for beam in beams:
            steps = [Step(i, t, "") for i, t in enumerate(beam.token_ids)]
            if steps:
                steps[-1].finish_reason = "eos" if beam.finished else "length"
            out.append(Generation(prompt_ids, beam.token_ids, beam.text, "eos" if beam.finished else "length",
                                  steps, 0))
        return out[0] if n_return == 1 else out
    return run


# Tokens one step of a batched generation carries at most: waiting prompts join
# while they fit. A prompt is always fed whole in one step, as it is alone (a
# longer one runs in a step of its own), so that results equal single runs.
BATCH_TOKENS = 512


def _advance_together(model, runs: Sequence["Run"]) -> Iterator[tuple["Run", Step]]:
    """Run every run to its end in one batch, yielding (run, step) as steps are made.

    Each step of the core (model.forward_batch) feeds every running sequence
    its last token and every joining one its whole prompt. Runs join in
    order while the step has room (BATCH_TOKENS) and leave when they finish.
    Runs of the same prompt (the samples of num_return_sequences, or a prompt
    given twice in a list) share one prefill: the first feeds the prompt, and
    the others join with it, each starting from a copy of its KV cache
    (Session.fork) and its own copy of the last position's logits.
    Runs that share one Hooks object go one after another, so that its
    records come in the order separate calls would give. Runs that speculate
    go one after another through tokentrail.speculative.
    """
    if any(run.speculation is not None for run in runs):
        yield from speculative.advance(model, runs)
        return
    waiting, forks = _prefill_sharing(runs)
    active: list[tuple[Run, list[int]]] = []  # each run and the tokens it feeds next
    while waiting or active:
        rows = sum(len(feed) for _, feed in active)
        busy = {id(run.hooks) for run, _ in active if run.hooks is not None}
        joining = []
        for run in list(waiting):
            if run.max_new_tokens == 0:
                waiting.remove(run)
                run.done = True
                continue
            if run.hooks is not None and id(run.hooks) in busy:
                continue
            if rows + len(run.prompt_ids) > BATCH_TOKENS and (active or joining):
                break
            waiting.remove(run)
            joining.append(run)
            rows += len(run.prompt_ids)
            if run.hooks is not None:
                busy.add(id(run.hooks))
        if not active and not joining:
            break
        start = time.perf_counter()
        started: list[Run] = []
        deferred: list[Run] = []
        for run in joining:
            if run.prompt_cache is None:
                session = model.session()
            else:
                # The longest beginning to be had: cached, or copied from a running sequence; when
                # a run joining before it computes a longer one in this step, the next step copies that.
                running = [(r.prompt_array, r.session) for r, _ in active] + \
                    [(r.prompt_array, r.session) for r in started]
                session = run.prompt_cache.session_for(run.prompt_array, running)
                if session is None:
                    deferred.append(run)
                    continue
            started.append(run)
            active.append((run, run.begin(session, start)))
        waiting[:0] = deferred  # first in the next step, in their order
        joining = started
        logits = _feed_together(model, [run.session for run, _ in active], [feed for _, feed in active],
                                [run.hooks for run, _ in active])
        fed = time.perf_counter()
        for run in joining:
            run.timings.prompt_seconds = fed - start
        stepped = []
        for (run, _), row in zip(active, logits):
            stepped.append((run, row))
            # The runs sharing this prompt take copies now, before its first token is fed.
            for follower in forks.pop(id(run), ()):
                follower.begin(run.session.fork(), start)
                follower.timings.prompt_seconds = fed - start
                stepped.append((follower, row.copy()))  # copied before any sampler sees the row
        still = []
        for run, row in stepped:
            step = run.advance(row)
            if step.finish_reason is None:
                still.append((run, [step.token]))
            elif run.prompt_cache is not None:
                run.prompt_cache.put(run.session)  # before the step is seen: the next prompt may start here
            yield run, step
        active = still


def _prefill_sharing(runs: Sequence["Run"]) -> tuple[list["Run"], dict[int, list["Run"]]]:
    """The runs that feed their prompt, in order, and for each of them (by id) the later runs of
    the same prompt that start from a copy of its prefilled cache instead. A run with hooks feeds
    its own prompt (its records are those of a separate call), as does one with nothing to make."""
    waiting: list[Run] = []
    forks: dict[int, list[Run]] = {}
    first_of: dict[tuple[int, ...], Run] = {}
    for run in runs:
        if run.hooks is not None or run.max_new_tokens == 0:
            waiting.append(run)
            continue
        key = tuple(run.prompt_ids)
        leader = first_of.setdefault(key, run)
        if leader is run:
            waiting.append(run)
        else:
            forks.setdefault(id(leader), []).append(run)
    return waiting, forks


def _feed_together(model, sessions: list, feeds: list[list[int]], hooks: list, all_logits: bool = False) -> list:
    """Each session fed its tokens: in one step of the core when the model has forward_batch, else one by one."""
    mode = "all" if all_logits else "last"
    if hasattr(model, "forward_batch"):
        return model.forward_batch(sessions, feeds, logits=mode, hooks=hooks)
    return [s.feed(f, all_logits=all_logits, **({"hooks": h} if h is not None else {}))
            for s, f, h in zip(sessions, feeds, hooks)]


def _plain_greedy(sampler: Sampler) -> bool:
    """Whether the sampler's chain is temperature 0 alone: greedy decoding with nothing else that
    could change the choice (no penalty, bias, ban or processor of the caller's)."""
    procs = sampler.chain.processors
    return len(procs) == 1 and type(procs[0]) is Temperature and procs[0].temperature == 0.0


class Run:
    """One sequence being generated: the sampler, the text released so far and
    the end conditions. `begin` takes a fresh session and gives the prompt to
    feed; `advance` turns the logits of each step into the next Step."""

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
        self.timings = Timings(prompt_tokens=len(prompt_ids))
        self.done = False
        self.made: list[Step] = []
        self.speculation: speculative.Speculation | None = None
        self.speculation_stats: speculative.SpeculationStats | None = None
        self.prompt_cache = None  # a PromptCache: the session comes from it and goes back to it at the end
        self._prompt_array: np.ndarray | None = None
        # Plain greedy decoding with no log-probabilities asked: the token is the logits' first
        # argmax (what the sampler's greedy chain keeps), taken without the sampler's machinery.
        self.argmax_only = not (logprobs or top_n) and _plain_greedy(sampler)
        # Set by a caller that reads the steps only when the run is over (generate without
        # streaming): without stop strings, the texts are then decoded at the end, all at once.
        self.texts_at_end = False
        self.texts_made = 0  # steps whose text is made
        self.decoder: StreamDecoder | None = None  # made by begin

    @property
    def prompt_array(self) -> np.ndarray:
        """The prompt's ids as an int64 array (made once), for prompt cache lookups."""
        if self._prompt_array is None:
            self._prompt_array = np.asarray(self.prompt_ids, dtype=np.int64)
        return self._prompt_array

    def steps(self) -> Iterator[Step]:
        """The steps of this run alone (a batch of one), as they are made."""
        for _, step in _advance_together(self.model, [self]):
            yield step

    def generation(self) -> Generation:
        if self._texts_later():
            self._release_later_texts()
        return Generation(self.prompt_ids, [s.token for s in self.made], self.text[: self.released],
                          self.finish_reason, list(self.made), int(self.sampler.seed), self.stop_string,
                          self.timings, self.speculation_stats)

    def begin(self, session, start: float) -> list[int]:
        """Take `session` for this run, started at `start`; the prompt ids to feed it. The session
        is empty, holds a beginning of the prompt (from a prompt cache: the rest is fed), or holds
        the whole prompt (a fork of another run's prefill: nothing to feed)."""
        limit = _limit(self.model, session)
        if len(self.prompt_ids) > limit:
            raise ContextFullError.for_tokens(0, len(self.prompt_ids), limit, "prompt")
        held = session.pos
        if held > len(self.prompt_ids) or list(session.tokens[:held]) != list(self.prompt_ids[:held]):
            raise InvalidArgumentError("begin: the session holds positions that are not a beginning of this prompt")
        if held < len(self.prompt_ids):
            self.timings.cached_tokens = held
        self.session, self.limit, self.start = session, limit, start
        self.history = list(self.prompt_ids)
        tok = self.model.tokenizer
        self.decoder = StreamDecoder(tok, context=self.prompt_ids[-DECODE_CONTEXT:]) if tok is not None else None
        return list(self.prompt_ids[held:])

    def advance(self, logits: np.ndarray) -> Step:
        """Choose the next token from the logits of the last position fed, and make its Step."""
        if self.argmax_only and isinstance(logits, np.ndarray) and logits.ndim == 1 and logits.size \
                and logits.dtype.kind == "f":
            token = int(logits.argmax())
            # argmax finds a NaN or +inf first, and -inf only when every token is masked:
            # then the sampler runs, and its checks name what is wrong with the logits.
            if math.isfinite(logits[token]):
                return self.take(token, logits, None)
        draw = self.sampler.step(logits, self.history)
        return self.take(draw.token, logits, draw.probs)

    def take(self, token: int, logits: np.ndarray, probs: np.ndarray | None, position: int | None = None) -> Step:
        """Make the Step of `token`, chosen from `logits` (the model's) through `probs` (the
        distribution after the chain; read only for logprobs and top_n); `position` is the positions
        cached when it was chosen (default: the session's, which is that when the session is fed one
        token per step)."""
        i = len(self.made)
        self.history.append(token)
        step = Step(i, token, "")
        if self.logprobs or self.top_n:
            self._details(step, logits, probs)
        finish, cut = None, 0
        text_now = not self._texts_later()
        if token in self.eos:
            finish = "eos"
        elif text_now and self.decoder is not None:
            self.text += self.decoder.push(token)
            for s in self.stops:
                at = self.text.find(s, self.released)
                if at >= 0 and (finish is None or at < cut):
                    finish, cut, self.stop_string = "stop", at, s
        if finish is None and i == self.max_new_tokens - 1:
            finish = "length"
        if finish is None and (self.session.pos if position is None else position) >= self.limit:
            finish = "context"
        if text_now:
            self._release(step, finish, cut)
        step.finish_reason = finish
        self.made.append(step)
        if text_now:
            self.texts_made = len(self.made)
        self._clock(step)
        if finish is not None:
            self.finish_reason = finish
            self.done = True
        return step

    def _texts_later(self) -> bool:
        """Whether the steps' texts are made when the run is over: its caller reads the steps only
        then (texts_at_end), and no stop string needs the text to decide where the run ends."""
        return self.texts_at_end and not self.stops and self.decoder is not None

    def _release(self, step: Step, finish: str | None, cut: int) -> None:
        """Give `step` the text that is final once its token is in: up to a stop string (at `cut`), all of
        it at the end (with a character left incomplete), else all but what could begin a stop string."""
        if finish == "stop":
            end = cut
        elif finish is not None:
            if self.decoder is not None:  # release a character left incomplete at the end
                self.text += self.model.tokenizer.decode(self.decoder.ids)[self.decoder.emitted:]
            end = len(self.text)
        else:
            end = len(self.text) - _held_back(self.text, self.released, self.stops)
        end = max(end, self.released)
        step.text = self.text[self.released:end]
        self.released = end

    def _release_later_texts(self) -> None:
        """The texts of the steps made without them (see _texts_later): the decoder takes their tokens in
        order, as take would have given them one by one, so every text is the one it would have made."""
        for step in self.made[self.texts_made:]:
            if step.token not in self.eos:
                self.text += self.decoder.push(step.token)
            self._release(step, step.finish_reason, 0)
        self.texts_made = len(self.made)

    def _clock(self, step: Step) -> None:
        now = time.perf_counter()
        if step.index == 0:
            self.timings.first_token_seconds = now - self.start
            self.first = now
        else:
            self.timings.generation_seconds = now - self.first
        self.timings.generated_tokens = step.index + 1

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
                early_stopping: bool | str = False, max_new_tokens: int | None = None,
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
    `max_new_tokens` defaults to the model's default length, as in generate().
    """
    num_beams = _count("num_beams", num_beams, 1)
    if max_new_tokens is None:  # the model's default length, as generate() takes it
        max_new_tokens = _new_tokens(model, len(_prompt_ids(model, prompt_ids, "prompt_ids")), None, None)
    max_new_tokens = _count("max_new_tokens", max_new_tokens, 1)
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real) \
            or not abs(length_penalty) <= MAX_LENGTH_PENALTY:  # beyond it, length ** penalty overflows
        raise InvalidArgumentError(f"length_penalty: must be a number within -{MAX_LENGTH_PENALTY:g}.."
                                   f"{MAX_LENGTH_PENALTY:g}, got {length_penalty!r}")
    if early_stopping not in (True, False, "never"):
        raise InvalidArgumentError(f"early_stopping: must be True, False or 'never', got {early_stopping!r}")
    num_return = num_beams if num_return is None else _count("num_return", num_return, 1)
    if num_return > num_beams:
        raise InvalidArgumentError(f"num_return: cannot exceed num_beams ({num_beams}), got {num_return}")
    prompt = _prompt_ids(model, prompt_ids, "prompt_ids")
    _check_fits(model, prompt, "prompt_ids")
    eos = _eos_ids(model, eos_ids)
    lp = float(length_penalty)

    session = model.session()
    limit = _limit(model, session)
    if len(prompt) > limit:
        raise ContextFullError.for_tokens(0, len(prompt), limit, "prompt_ids")
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

    def to_dict(self) -> dict:
        """Plain JSON-ready data: numbers, strings, lists and None (a non-finite number becomes None)."""
        return _plain(asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# Texts longer than this are scored in pieces of this many tokens, so progress can be shown.
SCORE_CHUNK = 128


def score(model, text_or_list: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]], top_n: int = 5,
          progress: ProgressOption = None) -> "Score | list[Score]":
    """Log-probability of each token given the ones before it ("echo" log-probs).

    Accepts a text, a sequence of token ids, or a list of texts (or of id
    lists), and returns a Score or a list of them; the texts of a list are
    scored together, each step of the core advancing several of them (the
    scores equal those of each text alone). Texts are encoded with the
    tokenizer's special tokens (BOS), so the first real token is scored too
    when the tokenizer adds a BOS. `top_n` alternatives are listed per token.
    `progress` reports the work when more than SCORE_CHUNK tokens are
    scored (see tokentrail.progress; None = a bar when stderr is a terminal).
    """
    top_n = _count("top_n", top_n, 0)
    check_progress(progress)
    single = isinstance(text_or_list, str)
    items = [text_or_list] if single else list(text_or_list)
    if not single and items and all(isinstance(i, (numbers.Integral, np.integer)) and not isinstance(i, bool)
                                    for i in items):
        single, items = True, [items]
    prepared = [_prompt_ids(model, item, "text") for item in items]  # check all before running any
    for ids in prepared:
        if len(ids) < 2:
            raise InvalidArgumentError(f"text: needs at least 2 tokens to score, got {len(ids)}")
        _check_fits(model, ids, "text")
    scores = _score_together(model, prepared, top_n, progress)
    return scores[0] if single else scores


def _score_together(model, texts: list[list[int]], top_n: int, progress: ProgressOption) -> list[Score]:
    """Scores of every text. Each text goes through its own session SCORE_CHUNK tokens per
    step (its chunks as when it is scored alone); texts share a step while it has room
    (BATCH_TOKENS), and each chunk is scored as it arrives, so only one step's logits are held."""
    sessions = [model.session() for _ in texts]
    fed = [0] * len(texts)
    tokens = [[TokenScore(0, ids[0], _display(model, ids[0]), None, None)] for ids in texts]
    total = sum(len(ids) for ids in texts)
    pending = list(range(len(texts)))
    with Task("scoring", total, progress if total > SCORE_CHUNK else False) as task:
        while pending:
            step, rows = [], 0
            for i in pending:
                n = min(SCORE_CHUNK, len(texts[i]) - fed[i])
                if step and rows + n > BATCH_TOKENS:
                    break
                step.append(i)
                rows += n
            chunks = [texts[i][fed[i]:fed[i] + SCORE_CHUNK] for i in step]
            logits = _feed_together(model, [sessions[i] for i in step], chunks, [None] * len(step), all_logits=True)
            for i, chunk, rows_logits in zip(step, chunks, logits):
                tokens[i] += _scored_tokens(model, texts[i], fed[i], rows_logits, top_n)
                fed[i] += len(chunk)
                task.advance(len(chunk))
            pending = [i for i in pending if fed[i] < len(texts[i])]
    out = []
    for ids, scored in zip(texts, tokens):
        lps = [t.logprob for t in scored[1:]]
        total_lp = float(sum(lps))
        mean = total_lp / len(lps)
        text = model.tokenizer.decode(ids) if model.tokenizer is not None else ""
        out.append(Score(ids, scored, total_lp, mean, math.exp(-mean), text))
    return out


def _scored_tokens(model, ids: list[int], start: int, logits: np.ndarray, top_n: int) -> list[TokenScore]:
    """The tokens that the logits of positions start.. predict (each row, the token after its position)."""
    logits = np.asarray(logits, dtype=np.float64)[: len(ids) - 1 - start]
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    out = []
    for j, row in enumerate(logp):
        pos = start + j + 1
        lp = float(row[ids[pos]])
        out.append(TokenScore(pos, ids[pos], _display(model, ids[pos]), lp, 1 + int((row > lp).sum()),
                              _top(model, row, top_n) if top_n else []))
    return out


def whole_prompt_steps(lengths: Sequence[int], budget: int = BATCH_TOKENS) -> list[list[int]]:
    """Prompts grouped into steps of the core: indices in order, each prompt whole, a step
    taking prompts while their tokens fit in `budget` (BATCH_TOKENS); a longer prompt alone."""
    steps: list[list[int]] = []
    rows = 0
    for i, n in enumerate(lengths):
        if not steps or rows + n > budget:
            steps.append([])
            rows = 0
        steps[-1].append(i)
        rows += n
    return steps


_SIGNATURE_DEFAULTS = {name: p.default for name, p in inspect.signature(generate).parameters.items()
                       if p.kind is inspect.Parameter.KEYWORD_ONLY or name == "max_new_tokens"}
GENERATE_OPTIONS = frozenset(_SIGNATURE_DEFAULTS)
_PER_PROMPT_OPTIONS = GENERATE_OPTIONS - {"per_prompt", "stream"}
_CHAIN_OPTIONS = SAMPLING_OPTIONS | {"do_sample"}
