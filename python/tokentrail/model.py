"""The Python face of the engine: Model (weights + tokenizer) and Session (a KV cache)."""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _core, generation
from .config import ModelConfig
from .errors import ContextFullError, InvalidArgumentError, OptionError, OutOfRangeError, TokentrailError
from .generation_config import GenerationDefaults, defaults_for
from .loading import Checkpoint, read_checkpoint
from .loading.weights import BLOCK_TYPES, Weight, bf16_from_float32
from .progress import ProgressOption, Task

if TYPE_CHECKING:
    from .capture import ActivationCache, Hooks
    from .journey import Journey
    from .prompt_cache import PromptCache
    from .sampling import SamplingConfig

DEMO_MODEL = Path(__file__).parent / "models" / "demo"
# Default KV cache limit when a model allows very long contexts: memory for
# keys and values is reserved as it is used, but a cap keeps a runaway loop bounded.
DEFAULT_CONTEXT_CAP = 8192
# More threads than this is a mistake, not a machine.
MAX_THREADS = 1024
# The core's count when the process started (the CPUs it may run on, or TOKENTRAIL_THREADS /
# OMP_NUM_THREADS when set): a model of threads=None uses it whatever another model set before on
# the same thread.
DEFAULT_THREADS = min(_core.get_threads(), MAX_THREADS)


KV_DTYPES = ("f32", "f16")
# Which logits a forward step returns per sequence: its last position's, every position's, or none.
LOGITS_MODES = ("last", "all", "none")


def _check_kv_dtype(kv_dtype: str) -> str:
    if not isinstance(kv_dtype, str) or kv_dtype not in KV_DTYPES:
        raise InvalidArgumentError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    return kv_dtype


def check_isa_setting() -> None:
    """Apply TOKENTRAIL_ISA, or refuse a value this binary or CPU cannot run (never ignore it);
    refuse a TOKENTRAIL_AMX other than 0 (int8 products off the AMX tiles) or 1 (on them where the
    CPU has them, the default), which the core reads."""
    amx = os.environ.get("TOKENTRAIL_AMX")
    if amx is not None and amx not in ("0", "1"):
        raise TokentrailError(f"TOKENTRAIL_AMX={amx!r} must be 0 (int8 products without AMX tiles) or 1 "
                              "(with them where this CPU has them; the default)")
    forced = os.environ.get("TOKENTRAIL_ISA", "").strip()
    if not forced:
        return
    available = list(_core.available_isas())
    if forced not in available:
        raise TokentrailError(f"TOKENTRAIL_ISA={forced!r} is not a kernel variant this machine runs; "
                              f"choose one of {', '.join(available)} (or unset it to pick the best)")
    if _core.isa() != forced:
        _core.set_isa(forced)


def _check_count(name: str, value, minimum: int, maximum: int) -> int:
    """An integer argument within minimum..maximum, or an InvalidArgumentError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not minimum <= value <= maximum:
        raise InvalidArgumentError(f"{name} must be an integer within {minimum}..{maximum}, got {value!r}")
    return int(value)


def _in_read_only_file(a: np.ndarray) -> bool:
    """Whether the array's memory is a read-only mapping of a file (np.memmap mode "r")."""
    while a is not None:
        if isinstance(a, np.memmap):
            return a.mode == "r"
        a = a.base if isinstance(a.base, np.ndarray) else None
    return False


def load(path: str | os.PathLike | None = None, dtype: str | None = None, threads: int | None = None,
         context: int | None = None, kv_dtype: str = "f32", progress: ProgressOption = None,
         check_finite: bool = True, exact: bool = True, repack: bool | None = None) -> "Model":
    """Load a checkpoint (Hugging Face directory, .gguf, or llama2.c .bin).

    With no path, the demo model bundled with tokentrail. `dtype` converts the
    weight matrices at load time ("f32", "f16", "bf16", "q8_0", "q4_0");
    None keeps them as stored. `threads` sets the core's thread count (None:
    every core). `context` caps the positions a session holds (default: the
    model's, at most 8192). `kv_dtype` is the element type of every
    session's KV cache: "f32" (exact) or "f16" (half the memory, and half the
    bytes attention reads per token at long contexts; keys and values
    rounded to half precision). `progress` shows the conversion's progress
    (see tokentrail.progress: None = a bar when stderr is a terminal).
    `check_finite` scans every weight for NaN and infinities at load (with
    all threads, about 0.1 s per GB of weights on a 2-core VM); pass False to
    skip it.
    `exact=False` multiplies block-quantized weights (q8_0, q4_0, q4_k, q6_k
    and the other block types) by activations rounded to int8 per 32 values,
    as llama.cpp does, in products over several tokens (prefill, batched
    steps; q8_0 with AVX-512 VNNI at every number of tokens, so that its
    results do not depend on the batch): faster, with logits that differ
    from the float path by that rounding (docs/benchmarks.md has the
    measured difference). True keeps float32 activations.
    `repack` keeps a copy of every q8_0 matrix laid out for the AVX-512
    (VNNI) kernels, which then load 16 rows' weights as they multiply them:
    faster products at every batch size (1.1x in decode, 1.3x for 8-48
    tokens), and float results that do not depend on the batch. It does
    the same for the matrices of every other block type
    (q4_0, q4_1, q5_0, q5_1, iq4_nl, and q4_k, q5_k and q6_k where the rows
    hold whole 256-value super-blocks): on an Intel Xeon their products ran
    1.5-2.7x faster at one token and 1.3-4.7x at 2-32 tokens, and llama.cpp's
    own Q4_K_M and Q5_K_M files decoded 1.6-2.6x faster than llama.cpp.
    Those copies serve the float products: with `exact=False`, decode (the
    int8 products of 8 tokens or more read the original rows, so both stay
    in memory). A copy takes about as many bytes again as its weights (a GGUF
    file's own pages are handed back once copied, and come back only where
    int8 products read them). None: where the CPU has those kernels; True
    insists (an error elsewhere); False never.

    Errors: CheckpointError for a file that cannot be read as a model,
    InvalidArgumentError for a bad argument (see tokentrail.errors).
    """
    if not isinstance(check_finite, bool):
        raise InvalidArgumentError(f"check_finite must be True or False, got {check_finite!r}")
    ckpt = read_checkpoint(DEMO_MODEL if path is None else path, check_finite=check_finite)
    return Model(ckpt, dtype=dtype, threads=threads, context=context, kv_dtype=kv_dtype, progress=progress,
                 exact=exact, repack=repack)


WEIGHT_DTYPES = ("f32", "f16", "bf16") + tuple(BLOCK_TYPES)


def _check_dtype(dtype: str) -> str:
    if not isinstance(dtype, str) or dtype not in WEIGHT_DTYPES:
        raise InvalidArgumentError(f"unknown dtype {dtype!r}; expected one of {', '.join(WEIGHT_DTYPES)}")
    return dtype


def _convert(w: Weight, dtype: str) -> Weight:
    if w.dtype == dtype:
        return w
    values = w.to_float32()
    if dtype == "f32":
        return Weight(values, "f32", w.shape)
    if dtype == "f16":
        return Weight(values.astype(np.float16), "f16", w.shape)
    if dtype == "bf16":
        return Weight(bf16_from_float32(values), "bf16", w.shape)
    if dtype in BLOCK_TYPES:
        from .loading.quant import quantize

        if w.shape[-1] % BLOCK_TYPES[dtype][0]:
            # Rows that do not fill whole blocks stay in half precision, as GGUF writers do.
            return Weight(values.astype(np.float16), "f16", w.shape)
        return Weight(quantize(values, dtype), dtype, w.shape)
    _check_dtype(dtype)
    raise AssertionError(dtype)  # every dtype _check_dtype accepts is handled above


class Model:
    """A loaded model: weights the core computes with, a tokenizer, and decoding defaults.

    Attributes: `config` (ModelConfig, the family's differences as fields),
    `tokenizer` (None for id-only checkpoints), `weights` (neutral name ->
    Weight), `generation_defaults` (from the model's generation_config.json,
    else greedy), `context_limit` (positions a session holds), `kv_dtype`,
    `tokens_run` (tokens run through the forward pass so far).

    Methods follow a token's path: `encode`, `forward` (logits), `session`
    (a KV cache to feed yourself), `generate`, `score`, `run_with_cache` and
    `hooks` (capture and intervene), `journey` (one token followed through
    the model). Make one with tokentrail.load(). `exact` is False when
    quantized products round activations to int8 (see load).
    """

    def __init__(self, checkpoint: Checkpoint, dtype: str | None = None, threads: int | None = None,
                 context: int | None = None, kv_dtype: str = "f32", progress: ProgressOption = None,
                 exact: bool = True, repack: bool | None = None):
        check_isa_setting()
        if not isinstance(exact, bool):
            raise InvalidArgumentError(f"exact must be True or False, got {exact!r}")
        if repack is not None and not isinstance(repack, bool):
            raise InvalidArgumentError(f"repack must be True, False or None, got {repack!r}")
        if repack and not _core.int8_row_lanes():
            raise InvalidArgumentError(f"repack=True needs the AVX-512 VNNI row-lane kernels, which the "
                                       f"{_core.int8_isa()} variant lacks; pass None or False")
        self.exact = exact
        self.kv_dtype = _check_kv_dtype(kv_dtype)
        self.threads = threads
        self._apply_threads()
        if dtype is not None:
            _check_dtype(dtype)
        if context is not None:
            context = _check_count("context", context, 1, 2**31 - 1)
        self.config: ModelConfig = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.source = checkpoint.source
        self.generation_defaults: GenerationDefaults = defaults_for(checkpoint.source, self.config.vocab_size)
        weights = {}
        label = f"converting weights to {dtype}" if dtype is not None else "loading weights"
        # Only a conversion takes long enough to show; memory-mapped weights load at once.
        with Task(label, len(checkpoint.weights), progress if dtype is not None else False) as task:
            for name, w in checkpoint.weights.items():
                if len(w.shape) == 1:
                    # Norm weights and biases are tiny: always float32 for the core.
                    w = Weight(np.ascontiguousarray(w.to_float32()), "f32", w.shape)
                elif dtype is not None and (name != "pos_embed.weight"):
                    w = _convert(w, dtype)
                weights[name] = w
                task.advance()
        self.weights = weights
        wanted = _core.int8_row_lanes() if repack is None else repack
        arrays = {n: np.ascontiguousarray(w.data) for n, w in weights.items()}
        self._core = _core.Model(self.config.core_dict(), {n: (a, weights[n].dtype) for n, a in arrays.items()},
                                 int8_activations=not exact, repack=wanted,
                                 file_backed=[n for n, a in arrays.items() if _in_read_only_file(a)])
        # Whether matrices carry the row-lane copy (False for a model with none to lay out).
        self.repacked: bool = self._core.row_lane_copies > 0
        cap = DEFAULT_CONTEXT_CAP if context is None else context
        self.context_limit = min(cap, self.config.max_seq_len)
        self._tokens_run = 0
        self._tokens_run_lock = threading.Lock()  # sessions of one model may run in several threads
        self._prompt_cache = None

    def __repr__(self) -> str:
        c = self.config
        types = ",".join(sorted({w.dtype for w in self.weights.values() if len(w.shape) > 1}))
        return (f"Model({self.source!r}, {c.architecture or 'model'}, layers={c.n_layers}, d_model={c.hidden_size}, "
                f"heads={c.n_heads}/{c.n_kv_heads}, vocab={c.vocab_size}, context={self.context_limit}, "
                f"weights={types}, kv={self.kv_dtype}{'' if self.exact else ', int8 activations'}, "
                f"decoding: {self.generation_defaults})")

    @property
    def threads(self) -> int | None:
        """Threads each core call of this model uses (None: the core's default at start, every CPU).

        The core keeps its thread count per OS thread, so it is set again at every
        core call: the count holds whichever Python thread runs the model."""
        return self._threads

    @threads.setter
    def threads(self, value: int | None) -> None:
        self._threads = None if value is None else _check_count("threads", value, 1, MAX_THREADS)

    def _apply_threads(self) -> None:
        """Set this model's thread count for the calling OS thread, before a core call."""
        _core.set_threads(self._threads or DEFAULT_THREADS)

    @property
    def tokens_run(self) -> int:
        """Tokens this model has run through its forward pass, over all its sessions: every
        position computed (prompt and generated tokens alike), never a forked copy."""
        return self._tokens_run

    def _count_tokens(self, n: int) -> None:
        with self._tokens_run_lock:
            self._tokens_run += n

    @property
    def n_params(self) -> int:
        """Number of weights (every element of every tensor)."""
        return int(sum(np.prod(w.shape) for w in self.weights.values()))

    @property
    def prompt_cache(self) -> "PromptCache":
        """This model's own prompt cache (made at first use, 1 GB of KV caches at most), which
        `generate(..., prompt_cache=True)` and `chat(..., prompt_cache=True)` use."""
        with self._tokens_run_lock:
            if self._prompt_cache is None:
                from .prompt_cache import PromptCache

                self._prompt_cache = PromptCache(self)
            return self._prompt_cache

    def session(self, limit: int | None = None, kv_dtype: str | None = None) -> "Session":
        """A fresh KV cache holding up to `limit` positions (default: context_limit);
        `kv_dtype` overrides the model's ("f32" or "f16")."""
        return Session(self, limit, kv_dtype=kv_dtype)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the tokenizer's special tokens (BOS) where the model uses them."""
        if self.tokenizer is None:
            raise InvalidArgumentError("this checkpoint has no tokenizer; pass token ids instead of text")
        return self.tokenizer.encode(text)

    def forward(self, ids: Sequence[int] | str, all_positions: bool = True, hooks: Hooks | None = None) -> np.ndarray:
        """Logits for `ids` (or text) from an empty cache: [len(ids), vocab], or [vocab] for the last position.

        `hooks` (from hooks()) records and intervenes during the pass.
        """
        if isinstance(ids, str):
            ids = self.encode(ids)
        return self.session().feed(ids, all_logits=all_positions, hooks=hooks)

    def forward_batch(self, sessions: Sequence[Session], tokens: Sequence[Sequence[int]],
                      logits: str | Sequence[str] = "last",
                      hooks: Sequence[Hooks | None] | None = None) -> list[np.ndarray | None]:
        """Advance several sessions in one step of the core: `sessions[i]` runs `tokens[i]` at its next positions.

        The sequences may be at different positions and feed different
        numbers of tokens (a prompt for one, a single decode token for
        another); the rows of all of them go through every weight matrix
        together, so each weight is read once per step. Results equal feeding
        each session alone (Session.feed). `logits` is "last" ([vocab]),
        "all" ([n, vocab]) or "none" (None), for every sequence or one per
        sequence. `hooks` gives each sequence its own Hooks or None (one
        Hooks object may serve only one sequence of a step, so that its
        records stay apart). Everything is checked before any session changes.
        """
        sessions = list(sessions)
        tokens = list(tokens)
        count = len(sessions)
        if count == 0:
            raise InvalidArgumentError("forward_batch: needs at least one session")
        if len(tokens) != count:
            raise InvalidArgumentError(f"forward_batch: {count} sessions but {len(tokens)} token lists; "
                                       f"give one per session")
        modes = [logits] * count if isinstance(logits, str) else list(logits)
        hooks = [None] * count if hooks is None else list(hooks)
        for name, given in (("logits", modes), ("hooks", hooks)):
            if len(given) != count:
                raise InvalidArgumentError(f"forward_batch: {name} has {len(given)} entries for {count} sessions")
        core_hooks, ids, seen = [], [], {}
        for i, (session, toks, mode, hk) in enumerate(zip(sessions, tokens, modes, hooks)):
            who = f"forward_batch: sequence {i}: "
            if not isinstance(session, Session):
                raise OptionError(f"{who}expected a Session (model.session()), got {type(session).__name__}")
            if session.model is not self:
                raise InvalidArgumentError(f"{who}the session belongs to another model")
            if id(session) in seen or id(session._cache) in seen:
                raise InvalidArgumentError(f"{who}is the same session as sequence "
                                           f"{seen.get(id(session), seen.get(id(session._cache)))}; a session can advance once per step")
            seen[id(session)] = seen[id(session._cache)] = i
            if mode not in LOGITS_MODES:
                raise InvalidArgumentError(f"{who}logits must be one of {', '.join(LOGITS_MODES)}, got {mode!r}")
            if hk is not None:
                from .capture import check_hooks

                check_hooks(self, hk)
                if id(hk) in seen:
                    raise InvalidArgumentError(f"{who}shares its hooks with sequence {seen[id(hk)]}; give each sequence "
                                           f"its own Hooks (their records would mix)")
                seen[id(hk)] = i
            ids.append(session._checked_ids(toks, who))
            core_hooks.append(hk._core_hooks() if hk is not None else None)
        # Each session's lock, as feed takes it, in one global order so that two batches sharing
        # sessions cannot deadlock; a session fed from another thread meanwhile waits or is waited for.
        with contextlib.ExitStack() as held:
            for session in sorted(sessions, key=id):
                held.enter_context(session._lock)
            for hk in sorted((h for h in hooks if h is not None), key=id):  # after every session lock
                held.enter_context(hk._running())
            for i, (session, toks) in enumerate(zip(sessions, ids)):
                session._check_room(toks.size, f"forward_batch: sequence {i}: ")  # fed meanwhile?
            self._apply_threads()
            try:
                out = self._core.forward_batch([s._cache for s in sessions], ids, modes, core_hooks)
            except TokentrailError:
                raise
            except IndexError as e:
                raise OutOfRangeError(f"forward_batch: {e}") from None
            except ValueError as e:
                raise InvalidArgumentError(f"forward_batch: {e}") from None
            for session, toks in zip(sessions, ids):
                session.tokens.extend(toks.tolist())
            self._count_tokens(sum(toks.size for toks in ids))
        return [None if mode == "none" else o for mode, o in zip(modes, out)]

    def hooks(self) -> Hooks:
        """A fresh set of capture requests and interventions for this model (tokentrail.capture.Hooks)."""
        from .capture import Hooks

        return Hooks(self)

    def run_with_cache(self, prompt: str | Sequence[int] | Sequence[str | Sequence[int]],
                       names: str | Iterable[str] = "*", positions: Iterable[int] | None = None,
                       hooks: Hooks | Sequence[Hooks | None] | None = None
                       ) -> tuple[np.ndarray, ActivationCache] | tuple[list[np.ndarray], list[ActivationCache]]:
        """Logits of every position and an ActivationCache of the named points (all by default).

        `names` are capture-point names, TransformerLens hook names or glob
        patterns. `positions` limits the record to those positions of the
        prompt; negative ones count from the end (-1 = the last token). For
        long prompts, recording only what you will look at saves most of the
        memory. A position outside the prompt is an IndexError.

        A list of prompts runs them together (each step of the core advancing
        several) and gives a list of logits ([len(prompt), vocab] each) and a
        list of caches, one per prompt, each exactly what the prompt alone
        gives; negative positions count from each prompt's own end, and
        `hooks`, when given, is a list with one Hooks (or None) per prompt.
        """
        if generation.is_prompt_list(prompt):
            return self._run_with_caches(list(prompt), names, positions, hooks)
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        hooks = self._capturing_hooks(ids, names, positions, hooks)
        logits = self.forward(ids, all_positions=True, hooks=hooks)
        return logits, hooks.cache

    def _capturing_hooks(self, ids: list[int], names, positions, hooks: Hooks | None) -> Hooks:
        """`hooks` (or fresh ones) asked to record `names` at `positions` of the prompt `ids`."""
        if positions is not None:
            positions = _prompt_positions(positions, len(ids))
        if hooks is None:
            hooks = self.hooks()
        else:
            from .capture import check_hooks

            check_hooks(self, hooks)
        return hooks.capture(names, positions=positions)

    def _run_with_caches(self, prompts: list, names, positions, hooks) -> tuple[list[np.ndarray], list[ActivationCache]]:
        if hooks is None:
            hooks = [None] * len(prompts)
        elif not isinstance(hooks, (list, tuple)) or len(hooks) != len(prompts):
            raise OptionError(f"hooks: with a list of {len(prompts)} prompts, give a list of as many Hooks "
                              f"(or None), got {hooks!r:.60}")
        elif len({id(h) for h in hooks if h is not None}) < sum(h is not None for h in hooks):
            raise OptionError("hooks: each prompt needs its own Hooks, or their records would mix")
        ids = [generation._prompt_ids(self, p, f"prompt {i}") for i, p in enumerate(prompts)]
        for i, one in enumerate(ids):
            generation._check_fits(self, one, f"prompt {i}")
        try:
            hooks = [self._capturing_hooks(one, names, positions, h) for one, h in zip(ids, hooks)]
        except IndexError as e:
            raise OutOfRangeError(f"{e} (positions apply to every prompt of the list)") from None
        logits: list[np.ndarray] = [None] * len(prompts)
        for step in generation.whole_prompt_steps([len(one) for one in ids]):
            out = self.forward_batch([self.session() for _ in step], [ids[i] for i in step], logits="all",
                                     hooks=[hooks[i] for i in step])
            for i, row in zip(step, out):
                logits[i] = row
        return logits, [h.cache for h in hooks]

    def journey(self, prompt: str | Sequence[int], *, position: int = -1, top: int = 5,
                seed: int | None = None, sampling: SamplingConfig | None = None, **options: Any) -> Journey:
        """Follow the token at `position` of `prompt` through the model; see tokentrail.journey.

        `seed`, `sampling` and the sampling options (temperature, top_k,
        top_p, ...) are generate's, with generate's defaults (the model's
        generation_config.json): the journey's chosen token is the first
        token generate returns with the same ones, drawn through the same chain.
        """
        from .journey import Journey

        return Journey(self, prompt, position=position, top=top, seed=seed, sampling=sampling, **options)

    def chat(self, messages, **kwargs):
        """The assistant's reply to a conversation, through the model's chat template; see tokentrail.chat.chat."""
        from .chat import chat

        return chat(self, messages, **kwargs)

    # One signature, written once: generation.generate(model, ...) is the method generate(...).
    generate = generation.generate
    score = generation.score


def _prompt_positions(positions: Iterable[int], n: int) -> list[int]:
    """Positions of an n-token prompt, negative ones counted from the end; out of range is an error."""
    if isinstance(positions, (int, np.integer)):
        positions = [positions]
    out = []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)):
            raise OptionError(f"positions: must be integers, got {p!r}")
        if not -n <= p < n:
            raise OutOfRangeError(f"positions: {int(p)} is outside a prompt of {n} tokens "
                             f"(0..{n - 1}, or -{n}..-1 from the end)")
        out.append(int(p) % n)
    return out


class Session:
    """A KV cache and the position reached: feed tokens, one or many at a time.

    `pos` is the number of positions cached, `limit` how many it can hold,
    `tokens` the ids fed so far. `feed` runs tokens and returns logits,
    `fork` copies the cache, `rewind` forgets the end of it.
    """

    def __init__(self, model: Model, limit: int | None = None, _cache=None, kv_dtype: str | None = None):
        if not isinstance(model, Model):
            raise InvalidArgumentError(f"a Session needs a tokentrail Model, got {type(model).__name__}")
        self._model = model
        if limit is not None:
            limit = min(_check_count("limit", limit, 1, 2**31 - 1), model.config.max_seq_len)
        else:
            limit = model.context_limit
        kv_dtype = model.kv_dtype if kv_dtype is None else kv_dtype
        _check_kv_dtype(kv_dtype)
        self._cache = _cache if _cache is not None else _core.KVCache(model._core, limit, kv_dtype)
        self.tokens: list[int] = []
        # One forward pass at a time: a second thread waits for the first (the cache is not shareable).
        self._lock = threading.Lock()

    @property
    def model(self) -> Model:
        """The model this session's cache belongs to (fixed: the cache fits no other)."""
        return self._model

    @property
    def pos(self) -> int:
        return self._cache.length

    @property
    def limit(self) -> int:
        return self._cache.limit

    @property
    def kv_dtype(self) -> str:
        return self._cache.dtype

    def feed(self, ids: Sequence[int], all_logits: bool = False, hooks: Hooks | None = None) -> np.ndarray:
        """Run `ids` at the next positions; logits of the last one ([vocab]), or of all ([n, vocab])."""
        ids = self._checked_ids(ids)
        if hooks is not None:
            from .capture import check_hooks

            check_hooks(self.model, hooks)
        core_hooks = hooks._core_hooks() if hooks is not None else None
        with self._lock, (hooks._running() if hooks is not None else contextlib.nullcontext()):
            self._check_room(ids.size)  # another thread may have fed meanwhile
            self.model._apply_threads()
            out = self.model._core.forward(self._cache, ids, "all" if all_logits else "last", core_hooks)
            self.tokens.extend(int(i) for i in ids)
            self.model._count_tokens(int(ids.size))
        return out

    def _checked_ids(self, ids: Sequence[int], who: str = "") -> np.ndarray:
        """`ids` as int32 for the core, after the checks that give clear errors (`who` prefixes them)."""
        if type(ids) is list and ids and all(type(i) is int for i in ids):
            # The common case (a decode step's one id, a prompt): checked without numpy's reductions.
            self._check_room(len(ids), who)
            vocab = self.model.config.vocab_size
            if min(ids) < 0 or max(ids) >= vocab:
                bad = next(i for i in ids if not 0 <= i < vocab)
                raise InvalidArgumentError(f"{who}token id {bad} is outside the vocabulary (size {vocab})")
            return np.array(ids, dtype=np.int32)
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        if ids.ndim != 1 or ids.size == 0:
            raise InvalidArgumentError(f"{who}feed needs a non-empty 1-D sequence of token ids")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InvalidArgumentError(f"{who}token ids must be integers, got {ids.dtype}")
        self._check_room(ids.size, who)
        vocab = self.model.config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise InvalidArgumentError(f"{who}token id {bad} is outside the vocabulary (size {vocab})")
        return ids.astype(np.int32)

    def _check_room(self, new: int, who: str = "") -> None:
        """A ContextFullError unless `new` more positions fit in the cache."""
        if self.pos + new > self.limit:
            raise ContextFullError(f"{who}{ContextFullError.for_tokens(self.pos, new, self.limit)}")

    def fork(self, positions: int | None = None) -> "Session":
        """An independent copy of this session, or of its first `positions` positions (the cache's
        filled part is copied, nothing recomputed)."""
        with self._lock:
            if positions is None:
                positions = self.pos
            positions = _check_count("positions", positions, 0, self.pos)
            s = Session(self.model, _cache=self._cache.clone(positions))
            s.tokens = self.tokens[:positions]
        return s

    def rewind(self, positions: int) -> None:
        """Forget everything after the first `positions` positions (0..pos)."""
        with self._lock:
            positions = _check_count("positions", positions, 0, self.pos)
            self._cache.truncate(positions)
            del self.tokens[positions:]

    def __repr__(self) -> str:
        return f"Session(pos={self.pos}, limit={self.limit}, kv_dtype={self.kv_dtype!r})"
