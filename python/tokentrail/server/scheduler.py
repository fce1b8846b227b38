"""Continuous batching: many sequences advanced together, one step at a time.

One engine thread owns the model. At every step it drops the sequences
(running or queued) whose client went away or whose time ran out, admits
waiting ones (up to `parallel` running), and advances every running
sequence by one step through :func:`forward_step`: a prefilling sequence by
its next chunk of prompt, a decoding one by its last token. The prompt
tokens of a step are capped (`prefill_chunk`, shared in order of arrival),
so that a burst of new prompts never stalls the decoding sequences for more
than one chunk. Each sequence then chooses its next token with its own
:class:`~tokentrail.generation.Run` (the same Sampler, chain, stop strings
and end-of-sequence rules as ``model.generate``) and leaves the batch when
it finishes. The choices of one prompt (a request's ``n``) share its
prefill: the first choice runs the prompt, and the others start from copies
of its KV cache (Session.fork) and the same last-position logits. With a
prompt cache (tokentrail.prompt_cache), a prompt starts from the longest
beginning that a finished sequence shares with it (a conversation's earlier
turns, a common system prompt), or a running one has computed, and prefills
only the rest; a prompt whose beginning a running sequence is still
prefilling waits for it (without a slot) and then copies it, so that a burst
of requests with one system prompt computes it once. Every finished
sequence goes back into the cache. Events go
back to the asyncio side through a callback that is safe to call from the
engine thread.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from ..generation import Run, Step
from ..journey import TOKEN_JOURNEY_POINTS, token_journey


@dataclass
class Work:
    """One sequence's share of a step: the tokens to run at its next positions."""

    session: Any                 # tokentrail.model.Session
    ids: list[int]
    hooks: Any = None            # per-sequence captures (the journey), or None


def forward_step(work: Sequence[Work]) -> list[np.ndarray]:
    """Advance every sequence of the batch by its tokens; the next-token logits of each.

    Every step of the scheduler goes through this one function: one ragged
    batched call of the core (Model.forward_batch), so each weight is read
    once per step for all sequences, prefill chunks and decode tokens alike.
    """
    model = work[0].session.model
    return model.forward_batch([w.session for w in work], [w.ids for w in work], logits="last",
                               hooks=[w.hooks for w in work])


class QueueFull(Exception):
    """The waiting queue holds its maximum; the client should retry later."""


@dataclass
class SequenceEvent:
    """What the engine reports for a sequence: a step, its end, or an error."""

    index: int                   # the choice index within its request
    kind: str                    # "step", "error"
    step: Step | None = None
    journey: dict | None = None
    error: str | None = None
    code: int = 500


@dataclass
class GenerationRequest:
    """One sequence to generate (a request with n choices submits n of them)."""

    run: Run
    index: int
    emit: Callable[[SequenceEvent], None]
    journey_top: int = 0         # > 0: record the journey of every token with this many alternatives
    deadline: float | None = None
    cache_prompt: bool = True    # False: neither reuses nor leaves anything in the prompt cache
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # Choices of the same prompt that start from this sequence's prefill (a copy of its KV cache)
    # instead of running the prompt again; they are submitted with it but never queued themselves.
    followers: list["GenerationRequest"] = field(default_factory=list)
    # Engine-side state.
    session: Any = None
    hooks: Any = None
    pending: list[int] = field(default_factory=list)
    next_token: int | None = None
    first_token_at: float | None = None

    def cancel(self) -> None:
        """Stop this sequence at the next step (its slot and KV cache are freed then)."""
        self.cancelled = True


class Stats:
    """Counters the metrics endpoint reads; updated only by the engine thread."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self.generated = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0       # prompt positions taken from the prompt cache instead
        self.steps = 0
        self.finished = 0
        self.cancelled = 0
        self.timed_out = 0
        self.forked = 0
        self.rows = 0                # tokens run through the model (prompt chunks and decode tokens)
        self.forward_seconds = 0.0   # inside the forward pass (the core; the GIL is released)
        self.step_seconds = 0.0      # whole steps: building the batch, the forward pass, sampling, events
        self.ttft: list[float] = []  # drained by the metrics side
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def tokens(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated += n
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - self.window:
                self._recent.popleft()

    def step_time(self, rows: int, forward: float, total: float) -> None:
        self.steps += 1
        self.rows += rows
        self.forward_seconds += forward
        self.step_seconds += total

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last `window` seconds."""
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.window

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.append(seconds)

    def drain_ttft(self) -> list[float]:
        with self._lock:
            out, self.ttft = self.ttft, []
        return out


class Scheduler:
    """Owns the model on one engine thread and runs continuous batching over its sequences."""

    def __init__(self, model, parallel: int = 4, max_queue: int = 64, prefill_chunk: int = 256,
                 step: Callable[[Sequence[Work]], list[np.ndarray]] = forward_step, prompt_cache=None):
        if parallel < 1 or max_queue < 0 or prefill_chunk < 1:
            raise InvalidArgumentError("parallel and prefill_chunk must be >= 1 and max_queue >= 0")
        self.model = model
        self.prompt_cache = prompt_cache  # a PromptCache, or None
        self.parallel = parallel
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.step = step
        self.stats = Stats()
        self._waiting: deque[GenerationRequest] = deque()
        self._active: list[GenerationRequest] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the asyncio side ---------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    def submit(self, sequences: Sequence[GenerationRequest]) -> None:
        """Queue sequences (all or none); QueueFull when they do not fit."""
        with self._wake:
            free = self.max_queue + max(0, self.parallel - len(self._active)) - len(self._waiting)
            if len(sequences) > free:
                raise QueueFull(f"the server is busy: {len(self._waiting)} sequences are waiting")
            following = {id(f) for seq in sequences for f in seq.followers}
            self._waiting.extend(seq for seq in sequences if id(seq) not in following)
            self._wake.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tokentrail-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- the engine thread ------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._active:
                    self._wake.wait()
                if self._stopping:
                    break
            self._drop_finished_early()  # first, so that the slots it frees are filled at once
            with self._wake:
                self._admit()
            if self._active:
                self._advance()
        for seq in list(self._waiting) + self._active:
            for s in [seq] + seq.followers:
                s.emit(SequenceEvent(s.index, "error", error="the server is shutting down", code=503))

    def _admit(self) -> None:
        later = []  # sequences waiting for a running prefill of their beginning
        while self._waiting and len(self._active) < self.parallel:
            seq = self._waiting.popleft()
            if seq.cancelled:
                self.stats.cancelled += 1 + len(seq.followers)
                continue
            if seq.session is not None:  # a forked choice that waited for a free slot
                self._active.append(seq)
                continue
            try:
                seq.session = self._session_for(seq) if self.prompt_cache is not None and seq.cache_prompt \
                    else self.model.session()
                if seq.session is None:
                    later.append(seq)
                    continue
                seq.pending = seq.run.begin(seq.session, time.perf_counter())
            except Exception as e:  # noqa: BLE001 - reported to the request, the engine goes on
                self._fail([seq], str(e), 400)
                continue
            self.stats.prompt_tokens += len(seq.pending)
            self.stats.cached_tokens += seq.session.pos
            if seq.journey_top:
                first = seq.session.pos + len(seq.pending) - 1  # the last prompt position chooses the first token
                seq.hooks = self.model.hooks().capture(TOKEN_JOURNEY_POINTS,
                                                       positions=range(first, seq.session.limit))
            self._active.append(seq)
        if later:
            self._waiting.extendleft(reversed(later))

    def _session_for(self, seq: GenerationRequest):
        """A session holding the longest beginning of `seq`'s prompt to be had now (the prompt cache,
        or a running sequence's cache), or None when `seq` had better wait for a running prefill."""
        running = [(other.run.prompt_array, other.session) for other in self._active
                   if other.cache_prompt and other.session is not None and not other.cancelled]
        return self.prompt_cache.session_for(seq.run.prompt_array, running)

    def _drop_finished_early(self) -> None:
        """Drop running and waiting sequences whose client went away or whose time ran out."""
        now = time.monotonic()
        self._active = [seq for seq in self._active if self._still_wanted(seq, now)]
        # (dropped sequences release their sessions, their KV caches, here)
        if any(seq.cancelled or (seq.deadline is not None and now > seq.deadline) for seq in self._waiting):
            with self._wake:
                self._waiting = deque(seq for seq in self._waiting if self._still_wanted(seq, now))

    def _still_wanted(self, seq: GenerationRequest, now: float) -> bool:
        if seq.cancelled:
            self.stats.cancelled += 1 + len(seq.followers)
            return False
        if seq.deadline is not None and now > seq.deadline:
            self.stats.timed_out += 1 + len(seq.followers)
            self._fail([seq], "the request ran past the server's time limit", 408)
            return False
        return True

    def _advance(self) -> None:
        started = time.perf_counter()
        batch, work = [], []
        budget = self.prefill_chunk  # prompt tokens this step, shared in order of arrival
        for seq in self._active:
            if seq.pending:
                if budget == 0:
                    continue  # sits this step out; the decoding sequences go on without waiting for it
                ids, seq.pending = seq.pending[:budget], seq.pending[budget:]
                budget -= len(ids)
            else:
                ids = [seq.next_token]
            batch.append(seq)
            work.append(Work(seq.session, ids, seq.hooks))
        try:
            logits = self.step(work)
        except Exception as e:  # noqa: BLE001 - a failed step ends its sequences, not the server
            self._fail(batch, f"the forward pass failed: {e}", 500)
            self._active = [s for s in self._active if s not in batch]
            return
        forward_done = time.perf_counter()
        done = []
        for seq, lg in zip(batch, logits):
            if seq.pending:
                continue  # still prefilling: these logits are of a prompt position
            if seq.followers:
                self._fork_followers(seq, lg)
            if self._choose(seq, lg):
                done.append(seq)
        if done:
            self._active = [s for s in self._active if s not in done]
            for seq in done:
                self._keep(seq)
        self.stats.step_time(sum(len(w.ids) for w in work), forward_done - started, time.perf_counter() - started)

    def _fail(self, seqs: Sequence[GenerationRequest], message: str, code: int) -> None:
        """Report an error to each sequence and to the choices still waiting for its prefill."""
        for seq in seqs:
            for s in [seq] + seq.followers:
                s.emit(SequenceEvent(s.index, "error", error=message, code=code))
            seq.followers = []

    def _fork_followers(self, leader: GenerationRequest, logits: np.ndarray) -> None:
        """The prompt is in `leader`'s cache: every other choice of it starts from a copy of that cache
        and chooses its first token from the same logits; it runs on when a slot is free."""
        followers, leader.followers = leader.followers, []
        queued = []
        for seq in followers:
            if seq.cancelled:
                self.stats.cancelled += 1
                continue
            try:
                seq.session = leader.session.fork()
                seq.run.begin(seq.session, time.perf_counter())
                seq.pending = []
            except Exception as e:  # noqa: BLE001
                seq.emit(SequenceEvent(seq.index, "error", error=str(e), code=500))
                continue
            self.stats.forked += 1
            if self._choose(seq, logits.copy()):  # a copy: each choice's sampler is on its own logits
                self._keep(seq)
                continue
            if len(self._active) < self.parallel:
                self._active.append(seq)
            else:
                queued.append(seq)
        if queued:  # ahead of the queue, in the order of their choices
            with self._wake:
                self._waiting.extendleft(reversed(queued))

    def _keep(self, seq: GenerationRequest) -> None:
        """A finished sequence's session goes into the prompt cache, for prompts that start as it does."""
        if self.prompt_cache is not None and seq.session is not None and seq.cache_prompt:
            self.prompt_cache.put(seq.session)

    def _choose(self, seq: GenerationRequest, lg: np.ndarray) -> bool:
        """Sample `seq`'s next token from the logits of its last position and report it; True when it ends."""
        try:
            step = seq.run.advance(lg)
            journey = None
            if seq.hooks is not None:
                journey = token_journey(self.model, seq.hooks.cache, seq.session.pos - 1, seq.session.tokens,
                                        step.token, top=seq.journey_top)
                seq.hooks.reset()
        except Exception as e:  # noqa: BLE001
            seq.emit(SequenceEvent(seq.index, "error", error=str(e), code=500))
            return True
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
            self.stats.first_token(seq.first_token_at - seq.submitted)
        self.stats.tokens(1)
        seq.next_token = step.token
        seq.emit(SequenceEvent(seq.index, "step", step=step, journey=journey))
        if step.finish_reason is not None:
            self.stats.finished += 1
            return True
        return False
