"""The Python face of the engine: Model (weights + tokenizer) and Session (a KV cache)."""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import _core, generation
from .config import ModelConfig
from .errors import ContextFullError, OptionError, TokentrailError
from .generation_config import GenerationDefaults, defaults_for
from .loading import Checkpoint, read_checkpoint
from .loading.weights import BLOCK_TYPES, DTYPES, Weight, bf16_from_float32
from .progress import ProgressOption, Task

if TYPE_CHECKING:
    from .capture import ActivationCache, Hooks
    from .journey import Journey

DEMO_MODEL = Path(__file__).parent / "models" / "demo"
# Default KV cache limit when a model allows very long contexts: memory for
# keys and values is reserved as it is used, but a cap keeps a runaway loop bounded.
DEFAULT_CONTEXT_CAP = 8192


KV_DTYPES = ("f32", "f16")


def _check_kv_dtype(kv_dtype: str) -> str:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    return kv_dtype


def check_isa_setting() -> None:
    """Apply TOKENTRAIL_ISA, or refuse a value this binary or CPU cannot run (never ignore it)."""
    forced = os.environ.get("TOKENTRAIL_ISA", "").strip()
    if not forced:
        return
    available = list(_core.available_isas())
    if forced not in available:
        raise TokentrailError(f"TOKENTRAIL_ISA={forced!r} is not a kernel variant this machine runs; "
                              f"choose one of {', '.join(available)} (or unset it to pick the best)")
    if _core.isa() != forced:
        _core.set_isa(forced)


def load(path: str | os.PathLike | None = None, dtype: str | None = None, threads: int | None = None,
         context: int | None = None, kv_dtype: str = "f32", progress: ProgressOption = None) -> "Model":
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
    """
    ckpt = read_checkpoint(DEMO_MODEL if path is None else path)
    return Model(ckpt, dtype=dtype, threads=threads, context=context, kv_dtype=kv_dtype, progress=progress)


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
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")


class Model:
    """A loaded model: weights the core computes with, a tokenizer, and decoding defaults.

    Attributes: `config` (ModelConfig, the family's differences as fields),
    `tokenizer` (None for id-only checkpoints), `weights` (neutral name ->
    Weight), `generation_defaults` (from the model's generation_config.json,
    else greedy), `context_limit` (positions a session holds), `kv_dtype`.

    Methods follow a token's path: `encode`, `forward` (logits), `session`
    (a KV cache to feed yourself), `generate`, `score`, `run_with_cache` and
    `hooks` (capture and intervene), `journey` (one token followed through
    the model). Make one with tokentrail.load().
    """

    def __init__(self, checkpoint: Checkpoint, dtype: str | None = None, threads: int | None = None,
                 context: int | None = None, kv_dtype: str = "f32", progress: ProgressOption = None):
        check_isa_setting()
        self.kv_dtype = _check_kv_dtype(kv_dtype)
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise ValueError(f"threads must be a positive integer, got {threads!r}")
            _core.set_threads(int(threads))
        self.config: ModelConfig = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.source = checkpoint.source
        self.generation_defaults: GenerationDefaults = defaults_for(checkpoint.source)
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
        self._core = _core.Model(self.config.core_dict(),
                                 {n: (np.ascontiguousarray(w.data), w.dtype) for n, w in weights.items()})
        if context is not None and int(context) < 1:
            raise ValueError(f"context must be at least 1, got {context}")
        cap = DEFAULT_CONTEXT_CAP if context is None else int(context)
        self.context_limit = min(cap, self.config.max_seq_len)

    def __repr__(self) -> str:
        c = self.config
        types = ",".join(sorted({w.dtype for w in self.weights.values() if len(w.shape) > 1}))
        return (f"Model({self.source!r}, {c.architecture or 'model'}, layers={c.n_layers}, d_model={c.hidden_size}, "
                f"heads={c.n_heads}/{c.n_kv_heads}, vocab={c.vocab_size}, context={self.context_limit}, "
                f"weights={types}, kv={self.kv_dtype}, decoding: {self.generation_defaults})")

    @property
    def n_params(self) -> int:
        """Number of weights (every element of every tensor)."""
        return int(sum(np.prod(w.shape) for w in self.weights.values()))

    def session(self, limit: int | None = None, kv_dtype: str | None = None) -> "Session":
        """A fresh KV cache holding up to `limit` positions (default: context_limit);
        `kv_dtype` overrides the model's ("f32" or "f16")."""
        return Session(self, limit, kv_dtype=kv_dtype)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the tokenizer's special tokens (BOS) where the model uses them."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer; pass token ids instead of text")
        return self.tokenizer.encode(text)

    def forward(self, ids: Sequence[int] | str, all_positions: bool = True, hooks: Hooks | None = None) -> np.ndarray:
        """Logits for `ids` (or text) from an empty cache: [len(ids), vocab], or [vocab] for the last position.

        `hooks` (from hooks()) records and intervenes during the pass.
        """
        if isinstance(ids, str):
            ids = self.encode(ids)
        return self.session().feed(ids, all_logits=all_positions, hooks=hooks)

    def hooks(self) -> Hooks:
        """A fresh set of capture requests and interventions for this model (tokentrail.capture.Hooks)."""
        from .capture import Hooks

        return Hooks(self)

    def run_with_cache(self, prompt: str | Sequence[int], names: str | Iterable[str] = "*",
                       positions: Iterable[int] | None = None,
                       hooks: Hooks | None = None) -> tuple[np.ndarray, ActivationCache]:
        """Logits of every position and an ActivationCache of the named points (all by default).

        `names` are capture-point names, TransformerLens hook names or glob
        patterns. `positions` limits the record to those positions of the
        prompt; negative ones count from the end (-1 = the last token). For
        long prompts, recording only what you will look at saves most of the
        memory. A position outside the prompt is an IndexError.
        """
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if positions is not None:
            positions = _prompt_positions(positions, len(ids))
        if hooks is None:
            hooks = self.hooks()
        else:
            from .capture import check_hooks

            check_hooks(self, hooks)
        hooks.capture(names, positions=positions)
        logits = self.forward(ids, all_positions=True, hooks=hooks)
        return logits, hooks.cache

    def journey(self, prompt: str | Sequence[int], temperature: float = 1.0, position: int = -1, top: int = 5,
                seed: int | None = None) -> Journey:
        """Follow the token at `position` of `prompt` through the model; see tokentrail.journey."""
        from .journey import Journey

        return Journey(self, prompt, temperature=temperature, position=position, top=top, seed=seed)

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
            raise IndexError(f"positions: {int(p)} is outside a prompt of {n} tokens "
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
        self.model = model
        limit = model.context_limit if limit is None else min(int(limit), model.config.max_seq_len)
        kv_dtype = model.kv_dtype if kv_dtype is None else kv_dtype
        _check_kv_dtype(kv_dtype)
        self._cache = _cache if _cache is not None else _core.KVCache(model._core, limit, kv_dtype)
        self.tokens: list[int] = []

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
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("feed needs a non-empty 1-D sequence of token ids")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got {ids.dtype}")
        if self.pos + ids.size > self.limit:
            raise ContextFullError.for_tokens(self.pos, ids.size, self.limit)
        vocab = self.model.config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary (size {vocab})")
        if hooks is not None:
            from .capture import check_hooks

            check_hooks(self.model, hooks)
        core_hooks = hooks._core_hooks() if hooks is not None else None
        out = self.model._core.forward(self._cache, ids.astype(np.int32), "all" if all_logits else "last",
                                       core_hooks)
        self.tokens.extend(int(i) for i in ids)
        return out

    def fork(self) -> "Session":
        """An independent copy of this session (the cache's filled part is copied, nothing recomputed)."""
        s = Session(self.model, _cache=self._cache.clone())
        s.tokens = list(self.tokens)
        return s

    def rewind(self, positions: int) -> None:
        """Forget everything after the first `positions` positions."""
        self._cache.truncate(int(positions))
        del self.tokens[positions:]

    def __repr__(self) -> str:
        return f"Session(pos={self.pos}, limit={self.limit}, kv_dtype={self.kv_dtype!r})"
