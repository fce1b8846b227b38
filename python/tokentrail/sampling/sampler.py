"""The sampler: a chain, a seeded random stream and the draw."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from .chain import Chain, SamplingConfig, make_chain
from .core import CoreChain, compile_chain, draw_kept
from .numerics import NEG_INF, softmax
from .processors import Processor
from .validate import check_integer, check_logits


class Draw:
    """One drawn token and the distribution it was drawn from.

    ``logits`` (after the chain) and ``probs`` span the whole vocabulary, with
    -inf and 0 for the tokens the chain removed; ``kept_ids``, ``kept_logits``
    and ``kept_probs`` are the surviving tokens only (ascending ids). On the
    core path only the survivors are computed, and the whole-vocabulary
    arrays are made the first time they are read.
    """

    def __init__(self, token: int, logits: np.ndarray | None = None, probs: np.ndarray | None = None, *,
                 kept: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, n_vocab: int | None = None):
        if (logits is None or probs is None) and (kept is None or n_vocab is None):
            raise InvalidArgumentError("Draw needs the logits and probabilities, or the kept tokens and the vocabulary size")
        self.token = int(token)
        self._logits, self._probs, self._kept, self._n_vocab = logits, probs, kept, n_vocab

    @property
    def logits(self) -> np.ndarray:
        if self._logits is None:
            ids, kept_logits, _ = self._kept
            self._logits = np.full(self._n_vocab, NEG_INF)
            self._logits[ids] = kept_logits
        return self._logits

    @property
    def probs(self) -> np.ndarray:
        if self._probs is None:
            ids, _, kept_probs = self._kept
            self._probs = np.zeros(self._n_vocab)
            self._probs[ids] = kept_probs
        return self._probs

    def _survivors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._kept is None:
            ids = np.flatnonzero(self._logits > NEG_INF)
            self._kept = (ids, self._logits[ids], self._probs[ids])
        return self._kept

    @property
    def kept_ids(self) -> np.ndarray:
        return self._survivors()[0]

    @property
    def kept_logits(self) -> np.ndarray:
        return self._survivors()[1]

    @property
    def kept_probs(self) -> np.ndarray:
        return self._survivors()[2]

    def __repr__(self) -> str:
        return f"Draw(token={self.token}, kept={self.kept_ids.size})"


class Sampler:
    """A chain plus a seeded numpy Generator: the same seed, logits and history
    give the same tokens, bit for bit. Exactly one uniform number is drawn per
    step; random processors (XTC) get their own generators spawned from the
    same seed. seed=None takes fresh OS entropy, recorded in `self.seed` so the
    run can be repeated.

    When every processor of the chain is one the C++ core implements (see
    :mod:`tokentrail.sampling.core`) and the logits are a float32 vector (what
    the model returns), a step runs in the core: the same kept tokens, the
    same probabilities to rounding and the same token for the same seed as
    the Python processors, at a fraction of the cost. ``core=False`` always
    runs the Python processors; ``core=True`` insists on the core (an error if
    the chain cannot run there). A step with ``observe`` runs in Python, which
    shows every stage. The chain is compiled for the core when the sampler is
    made (and on `reset`), so change a sampler's chain only before that.
    """

    def __init__(self, chain: Chain | SamplingConfig | Sequence[Processor] | None = None,
                 seed: int | None = None, core: bool | None = None, **options: Any):
        if isinstance(chain, SamplingConfig):
            chain = make_chain(chain, **options)
        elif chain is None:
            chain = make_chain(**options)
        elif options:
            raise InvalidArgumentError("pass either a chain or sampling options, not both")
        elif not isinstance(chain, Chain):
            chain = Chain(chain)
        self.chain = chain
        if core is not None and not isinstance(core, (bool, np.bool_)):
            raise InvalidArgumentError(f"core: must be True, False or None, got {core!r}")
        self.use_core = core
        if seed is not None:
            check_integer("seed", seed, lo=0)
        self.reset(seed)

    def reset(self, seed: int | None = None) -> None:
        """Restart the random streams (from `seed`, or the current seed) and the stateful stages."""
        if seed is None:
            seed = getattr(self, "seed", None)
        ss = np.random.SeedSequence(seed)
        self.seed = ss.entropy
        children = ss.spawn(1 + len(self.chain))
        self.rng = np.random.Generator(np.random.PCG64(children[0]))
        for proc, child in zip(self.chain, children[1:]):
            if hasattr(proc, "bind_rng"):
                proc.bind_rng(np.random.Generator(np.random.PCG64(child)))
        self.chain.reset()
        self.core_chain: CoreChain | None = None if self.use_core is False else compile_chain(self.chain)
        if self.use_core and self.core_chain is None:
            raise InvalidArgumentError(f"core=True: the chain {self.chain.names} has a stage that runs only in "
                                       "Python (or a parameter outside the core's range)")

    def step(self, logits: np.ndarray, history: Sequence[int] = (),
             observe: Callable[[Processor, np.ndarray], None] | None = None) -> Draw:
        """Run the chain and draw one token; `observe(proc, x)` sees each processor's output
        (the journey records the chain stage by stage through it)."""
        if (self.core_chain is not None and observe is None and isinstance(logits, np.ndarray)
                and logits.dtype == np.float32 and logits.ndim == 1 and logits.flags.c_contiguous):
            return self._core_step(logits, history)
        processed = self.chain(logits, history, observe)
        probs = softmax(processed)
        token = draw(probs, self.rng)
        self.chain.accept(token, probs)
        return Draw(token, processed, probs)

    def _core_step(self, logits: np.ndarray, history: Sequence[int]) -> Draw:
        try:
            ids, kept_logits, kept_probs = self.core_chain.keep(logits, history)
        except ValueError as e:
            check_logits(logits)  # the reference's own message for bad logits
            raise InvalidArgumentError(f"logits: {e}") from e
        token = draw_kept(ids, kept_probs, self.rng.random())
        return Draw(token, kept=(ids, kept_logits, kept_probs), n_vocab=logits.size)

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        return self.step(logits, history).token

    __call__ = sample


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw with one uniform number; zero-probability tokens are never chosen."""
    support = np.flatnonzero(probs > 0)  # the same partial sums as over every token: zeros add nothing
    cdf = np.cumsum(probs[support])
    j = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(support[min(j, support.size - 1)])  # u * total may round up to the total
