"""The Python face of the engine: Model (weights + tokenizer) and Session (a KV cache)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import _core
from .config import ModelConfig
from .errors import ContextFullError
from .loading import Checkpoint, read_checkpoint
from .loading.weights import BLOCK_TYPES, Weight, bf16_from_float32

DEMO_MODEL = Path(__file__).parent / "models" / "demo"
# Default KV cache limit when a model allows very long contexts: memory for
# keys and values is reserved as it is used, but a cap keeps a runaway loop bounded.
DEFAULT_CONTEXT_CAP = 8192


KV_DTYPES = ("f32", "f16")


def _check_kv_dtype(kv_dtype: str) -> str:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    return kv_dtype


def load(path=None, dtype: str | None = None, threads: int | None = None,
         context: int | None = None, kv_dtype: str = "f32") -> "Model":
    """Load a checkpoint (Hugging Face directory, .gguf, or llama2.c .bin).

    With no path, the demo model bundled with tokentrail. `dtype` converts the
    weight matrices at load time ("f32", "f16", "bf16", "q8_0", "q4_0");
    None keeps them as stored. `threads` sets the core's thread count.
    `kv_dtype` is the element type of every session's KV cache: "f32" (exact)
    or "f16" (half the memory, and half the bytes attention reads per token
    at long contexts; keys and values rounded to half precision).
    """
    ckpt = read_checkpoint(DEMO_MODEL if path is None else path)
    return Model(ckpt, dtype=dtype, threads=threads, context=context, kv_dtype=kv_dtype)


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
    raise ValueError(f"unknown dtype {dtype!r}; expected f32, f16, bf16, q8_0, q4_0, q4_k or q6_k")


class Model:
    def __init__(self, checkpoint: Checkpoint, dtype: str | None = None, threads: int | None = None,
                 context: int | None = None, kv_dtype: str = "f32"):
        self.kv_dtype = _check_kv_dtype(kv_dtype)
        if threads is not None:
            _core.set_threads(int(threads))
        self.config: ModelConfig = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.source = checkpoint.source
        weights = {}
        for name, w in checkpoint.weights.items():
            if len(w.shape) == 1:
                # Norm weights and biases are tiny: always float32 for the core.
                w = Weight(np.ascontiguousarray(w.to_float32()), "f32", w.shape)
            elif dtype is not None and (name != "pos_embed.weight"):
                w = _convert(w, dtype)
            weights[name] = w
        self.weights = weights
        self._core = _core.Model(self.config.to_dict(),
                                 {n: (np.ascontiguousarray(w.data), w.dtype) for n, w in weights.items()})
        if context is not None and int(context) < 1:
            raise ValueError(f"context must be at least 1, got {context}")
        cap = DEFAULT_CONTEXT_CAP if context is None else int(context)
        self.context_limit = min(cap, self.config.max_seq_len)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({self.source!r}, layers={c.n_layers}, d_model={c.hidden_size}, heads={c.n_heads}"
                f"/{c.n_kv_heads}, vocab={c.vocab_size})")

    @property
    def n_params(self) -> int:
        return int(sum(np.prod(w.shape) for w in self.weights.values()))

    def session(self, limit: int | None = None, kv_dtype: str | None = None) -> "Session":
        """A fresh KV cache; `kv_dtype` overrides the model's ("f32" or "f16")."""
        return Session(self, limit, kv_dtype=kv_dtype)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer; pass token ids instead of text")
        return self.tokenizer.encode(text)

    def forward(self, ids: Sequence[int] | str, all_positions: bool = True, hooks=None) -> np.ndarray:
        """Logits for `ids` from an empty cache: [len(ids), vocab], or [vocab] for the last position."""
        if isinstance(ids, str):
            ids = self.encode(ids)
        return self.session().feed(ids, all_logits=all_positions, hooks=hooks)

    def hooks(self):
        """A fresh set of capture requests and interventions for this model."""
        from .capture import Hooks

        return Hooks(self)

    def run_with_cache(self, prompt, names="*", positions=None, hooks=None):
        """Logits of every position and an ActivationCache of the named points (all by default).

        `positions` limits the record to those absolute positions: for long
        prompts, recording only what you will look at saves most of the memory.
        """
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        hooks = hooks if hooks is not None else self.hooks()
        hooks.capture(names, positions=positions)
        logits = self.forward(ids, all_positions=True, hooks=hooks)
        return logits, hooks.cache

    def journey(self, prompt, temperature: float = 1.0, position: int = -1, top: int = 5, seed=None,
                chosen: int | None = None):
        """Follow the token at `position` of `prompt` through the model; see tokentrail.journey.

        `chosen` names the token that came next (e.g. the one a generation sampled);
        by default the journey shows the greedy choice, or a draw with `seed`.
        """
        from .journey import Journey

        return Journey(self, prompt, temperature=temperature, position=position, top=top, seed=seed,
                       chosen=chosen)

    def generate(self, prompt, max_new_tokens: int = 32, **kwargs):
        """Continue `prompt` (text or ids); see tokentrail.generation.generate for the options."""
        from .generation import generate

        return generate(self, prompt, max_new_tokens=max_new_tokens, **kwargs)

    def chat(self, messages, **kwargs):
        """The assistant's reply to a conversation, through the model's chat template; see tokentrail.chat.chat."""
        from .chat import chat

        return chat(self, messages, **kwargs)

    def score(self, text, **kwargs):
        from .generation import score

        return score(self, text, **kwargs)


class Session:
    """A KV cache and the position reached: feed tokens, one or many at a time."""

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

    def feed(self, ids: Sequence[int], all_logits: bool = False, hooks=None) -> np.ndarray:
        """Run `ids` at the next positions; logits of the last one ([vocab]), or of all ([n, vocab])."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("feed needs a non-empty 1-D sequence of token ids")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got {ids.dtype}")
        if self.pos + ids.size > self.limit:
            raise ContextFullError(f"context is full: {self.pos} positions cached + {ids.size} new exceed the "
                                   f"limit of {self.limit}")
        vocab = self.model.config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary (size {vocab})")
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
