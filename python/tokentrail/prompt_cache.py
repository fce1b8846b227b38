"""The prompt cache: KV caches of earlier sequences, reused by prompts that begin the same way.

A conversation sends its whole history again at every turn, and many
requests to a server share a system prompt. Recomputing those positions is
the bulk of the time to first token. A :class:`PromptCache` keeps the
sessions of finished sequences (their KV caches and the ids they hold) up
to a budget of memory; :meth:`PromptCache.take` gives a new prompt a
session that already holds the longest beginning it shares with one of
them, so that only the rest of the prompt is fed. :meth:`PromptCache.session_for`
also weighs sequences still in flight (a batch, a server's running
requests): it copies what one has computed, or asks the prompt to wait while
one computes a longer shared beginning, so that a burst of prompts with one
system prompt computes it once.

The reused positions are the ones a fresh prefill would compute: the same
ids at the same positions through the same weights. (A position computed in
another batch, or one token at a time, can differ from a prefill's by
float rounding where the products of a weight type depend on the batch;
see docs/architecture.md.)

    cache = PromptCache(model, max_mb=512)
    model.generate(history_ids, prompt_cache=cache)   # or model.chat(..., prompt_cache=cache)
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError

DEFAULT_MAX_MB = 1024.0
BLOCK_TOKENS = 16  # shared beginnings are found in whole blocks of this many ids, then followed exactly
CANDIDATES = 16    # cached sequences compared id by id per lookup, at most


@dataclass
class PromptCacheStats:
    """What a prompt cache did so far: prompts that reused positions (`hits`) or none (`misses`),
    positions reused in all, and what it holds now."""

    hits: int = 0
    misses: int = 0
    reused_tokens: int = 0
    entries: int = 0
    bytes: int = 0


def bytes_per_position(model, kv_dtype: str | None = None) -> int:
    """Bytes of keys and values one cached position takes in every layer of `model`."""
    c = model.config
    elem = 2 if (kv_dtype or model.kv_dtype) == "f16" else 4
    return 2 * c.n_layers * c.n_kv_heads * c.head_dim * elem


def _block_keys(ids: np.ndarray, block: int) -> list[bytes]:
    """One key per whole block of `ids`: the k-th stands for the beginning ids[:block * (k + 1)]."""
    data = np.ascontiguousarray(ids, dtype="<i8").tobytes()
    step = block * 8
    h = hashlib.blake2b(digest_size=16)
    keys = []
    for k in range(len(ids) // block):
        h.update(data[k * step:(k + 1) * step])
        keys.append(h.digest())  # the hash of everything so far; updating goes on from there
    return keys


def shared_length(held: np.ndarray, prompt: np.ndarray) -> int:
    """How many ids `held` and `prompt` share from their start."""
    n = min(held.size, prompt.size)
    if n == 0:
        return 0
    differ = np.flatnonzero(held[:n] != prompt[:n])
    return int(differ[0]) if differ.size else n


class _Entry:
    __slots__ = ("session", "held", "keys")

    def __init__(self, session, held: np.ndarray, keys: list[bytes]):
        self.session, self.held, self.keys = session, held, keys


class PromptCache:
    """Sessions of finished sequences, kept for prompts that start with what they hold.

    `max_mb` bounds the memory of the KV caches kept (their allocated size);
    the least recently used go first. Shared beginnings are found through
    an index of whole blocks of `block_tokens` ids (so a lookup costs the
    prompt's length, not the number of sequences kept), then followed id by
    id: a prompt reuses a beginning of at least `block_tokens` ids. Safe to
    share between threads.
    """

    def __init__(self, model, max_mb: float = DEFAULT_MAX_MB, block_tokens: int = BLOCK_TOKENS):
        if isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)) or not 0 <= max_mb < 2**40:
            raise InvalidArgumentError(f"max_mb must be a number of megabytes >= 0, got {max_mb!r}")
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or not 1 <= block_tokens <= 4096:
            raise InvalidArgumentError(f"block_tokens must be an integer within 1..4096, got {block_tokens!r}")
        self.model = model
        self.max_bytes = int(max_mb * 2**20)
        self.block_tokens = block_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # by id(session), least recently used first
        self._by_block: dict[bytes, set[int]] = {}  # block key -> entries holding that beginning
        self._ending: dict[bytes, set[int]] = {}    # block key -> entries whose last whole block it is
        self._bytes = 0
        self._lock = threading.Lock()
        self._stats = PromptCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        s = self.stats
        return (f"PromptCache(entries={s.entries}, {s.bytes / 2**20:.1f} of {self.max_bytes / 2**20:.0f} MB, "
                f"hits={s.hits}, misses={s.misses}, reused_tokens={s.reused_tokens})")

    @property
    def stats(self) -> PromptCacheStats:
        with self._lock:
            return PromptCacheStats(self._stats.hits, self._stats.misses, self._stats.reused_tokens,
                                    len(self._entries), self._bytes)

    def _size(self, session) -> int:
        return session._cache.capacity * bytes_per_position(self.model, session.kv_dtype)

    def clear(self) -> None:
        """Forget every cached sequence (their memory is freed)."""
        with self._lock:
            self._entries.clear()
            self._by_block.clear()
            self._ending.clear()
            self._bytes = 0

    def _add(self, entry: _Entry) -> None:
        key = id(entry.session)
        self._entries[key] = entry
        for k in entry.keys:
            self._by_block.setdefault(k, set()).add(key)
        self._ending.setdefault(entry.keys[-1], set()).add(key)
        self._bytes += self._size(entry.session)

    def _remove(self, key: int) -> _Entry:
        entry = self._entries.pop(key)
        for k in entry.keys:
            holders = self._by_block[k]
            holders.discard(key)
            if not holders:
                del self._by_block[k]
        ending = self._ending[entry.keys[-1]]
        ending.discard(key)
        if not ending:
            del self._ending[entry.keys[-1]]
        self._bytes -= self._size(entry.session)
        return entry

    @staticmethod
    def _fits(entry: _Entry, limit: int, kv_dtype: str) -> bool:
        return entry.session.limit == limit and entry.session.kv_dtype == kv_dtype

    def _most_recent(self, keys: set[int]) -> list[int]:
        """Up to CANDIDATES of `keys`, the most recently used first."""
        if len(keys) <= CANDIDATES:
            return list(keys)
        out = []
        for key in reversed(self._entries):
            if key in keys:
                out.append(key)
                if len(out) == CANDIDATES:
                    break
        return out

    def _lookup(self, prompt: np.ndarray, limit: int, kv_dtype: str) -> tuple[int | None, int]:
        """The entry sharing the longest beginning with `prompt` (at most all but its last id), and
        that length; (None, 0) when none shares a whole block. Called with the lock held."""
        keys = _block_keys(prompt[:-1], self.block_tokens)
        # The deepest block some entry shares (beginnings nest: a binary search finds it).
        lo, hi = 0, len(keys)
        while lo < hi:
            mid = (lo + hi) // 2
            if keys[mid] in self._by_block:
                lo = mid + 1
            else:
                hi = mid
        best_key, best = None, 0
        for depth in range(lo - 1, -1, -1):  # deeper blocks first; shallower if none there fits
            for key in self._most_recent(self._by_block[keys[depth]]):
                entry = self._entries[key]
                if not self._fits(entry, limit, kv_dtype):
                    continue
                n = min(shared_length(entry.held, prompt), prompt.size - 1)
                if n > best:
                    best_key, best = key, n
            if best_key is not None:
                break
        return best_key, best

    def _wants(self, limit: int | None, kv_dtype: str | None) -> tuple[int, str]:
        return (self.model.context_limit if limit is None else limit,
                self.model.kv_dtype if kv_dtype is None else kv_dtype)

    def peek(self, prompt_ids: Sequence[int], limit: int | None = None, kv_dtype: str | None = None) -> int:
        """How many positions `take` would reuse for this prompt now (nothing is taken)."""
        with self._lock:
            return self._lookup(np.asarray(prompt_ids, dtype=np.int64), *self._wants(limit, kv_dtype))[1]

    def take(self, prompt_ids: Sequence[int], limit: int | None = None, kv_dtype: str | None = None):
        """A session for `prompt_ids` and how many of its positions are already there.

        The session holds the longest beginning of the prompt that a cached
        sequence shares, but never the whole prompt: its last id is left to
        feed, since its logits choose the next token. A cached sequence used
        entirely is handed over (it is the start of this one); one used in
        part is copied up to the shared length and stays cached. With no
        beginning of `block_tokens` ids or more to reuse, a fresh session
        (`model.session(limit, kv_dtype)`) and 0.
        """
        prompt = np.asarray(prompt_ids, dtype=np.int64)
        with self._lock:
            best_key, best = self._lookup(prompt, *self._wants(limit, kv_dtype))
            if best_key is None:
                self._stats.misses += 1
                session = None
            else:
                self._stats.hits += 1
                self._stats.reused_tokens += best
                session = self._entries[best_key].session
                if best == session.pos:
                    self._remove(best_key)  # all of it is this prompt's start: hand it over
                else:
                    self._entries.move_to_end(best_key)
                    session = session.fork(best)
        if session is None:
            return self.model.session(limit, kv_dtype), 0
        return session, best

    def session_for(self, prompt_ids: Sequence[int], running: Iterable[tuple[np.ndarray, object]] = ()):
        """A session for `prompt_ids` holding the longest beginning to be had now: from this cache
        (`take`), or copied from a sequence in flight; None when one in flight is still computing a
        longer shared beginning (by a block or more), which the prompt had better wait for.

        `running` gives each sequence in flight as (its prompt ids, its session, or None when it has
        not started): the positions its session holds are computed; the rest of its prompt is coming.
        """
        prompt = np.asarray(prompt_ids, dtype=np.int64)
        most = prompt.size - 1
        cached = self.peek(prompt)
        live, live_n, coming = None, 0, 0
        for other_prompt, session in running:
            if other_prompt.size == 0 or other_prompt[0] != prompt[0]:
                continue
            shared = min(shared_length(other_prompt, prompt), most)
            have = 0 if session is None else min(shared, session.pos)
            if have > live_n:
                live, live_n = session, have
            if session is None or session.pos < other_prompt.size:
                coming = max(coming, shared)
        if coming - max(cached, live_n) >= self.block_tokens:
            return None
        if live_n > cached and live_n >= self.block_tokens:
            return live.fork(live_n)
        return self.take(prompt)[0]

    def put(self, session) -> None:
        """Keep `session` (the caller lets go of it) for later prompts that start as it does.

        A cached sequence that is a beginning of this one is dropped (this one
        serves every prompt it served); if a cached one begins with all of this
        one, this one is not kept. Then the least recently used go until the
        rest fit. A sequence shorter than one block is not kept.
        """
        if session.model is not self.model:
            raise InvalidArgumentError("put: the session belongs to another model than this prompt cache's")
        held = np.asarray(session.tokens, dtype=np.int64)
        keys = _block_keys(held, self.block_tokens)
        size = self._size(session)
        if not keys or size > self.max_bytes:
            return
        # A session that led a batched step holds that step's activations as scratch (megabytes for a
        # prompt chunk): a kept session needs only its keys and values.
        session._cache.release_scratch()
        with self._lock:
            # Cached sequences that are beginnings of this one end at one of its blocks.
            for k in keys:
                for key in list(self._ending.get(k, ())):
                    entry = self._entries[key]
                    if self._fits(entry, session.limit, session.kv_dtype) and \
                            entry.held.size <= held.size and shared_length(entry.held, held) == entry.held.size:
                        self._remove(key)
            for key in self._most_recent(self._by_block.get(keys[-1], set())):
                entry = self._entries[key]
                if self._fits(entry, session.limit, session.kv_dtype) and \
                        shared_length(entry.held, held) == held.size:
                    self._entries.move_to_end(key)
                    return
            self._add(_Entry(session, held, keys))
            while self._bytes > self.max_bytes:
                self._remove(next(iter(self._entries)))
