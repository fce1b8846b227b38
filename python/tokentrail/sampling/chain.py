"""Chain assembly: the processors that a SamplingConfig switches on, in order.

Which class builds which stage comes from the registry of
:mod:`tokentrail.sampling.processors`; the orders below place the stages.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from .processors import REGISTRY, Processor
from .validate import check_integer, check_logits, fail


def _name_of(proc: Any) -> str:
    return getattr(proc, "name", None) or getattr(proc, "__name__", None) or type(proc).__name__


class Chain:
    """Processors applied in order; the input is checked (NaN, shape) first."""

    def __init__(self, processors: Sequence[Processor] = ()):
        for p in processors:
            if not callable(p):
                fail("processors", f"{p!r} is not callable")
        self.processors = list(processors)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = (),
                 observe: Callable[[Processor, np.ndarray], None] | None = None) -> np.ndarray:
        """The logits after every processor; `observe(proc, x)` sees each stage's output."""
        x = check_logits(logits)
        for proc in self.processors:
            x = np.asarray(proc(x, history), dtype=np.float64)
            if x.ndim != 1 or np.isnan(x).any() or np.isposinf(x).any():
                raise InvalidArgumentError(f"processor {_name_of(proc)!r} returned NaN, +inf or a wrong shape")
            if observe is not None:
                observe(proc, x)
        return x

    def accept(self, token: int, probs: np.ndarray) -> None:
        for proc in self.processors:
            if hasattr(proc, "accept"):
                proc.accept(token, probs)

    def reset(self) -> None:
        for proc in self.processors:
            if hasattr(proc, "reset"):
                proc.reset()

    @property
    def names(self) -> list[str]:
        return [_name_of(p) for p in self.processors]

    def __iter__(self):
        return iter(self.processors)

    def __len__(self) -> int:
        return len(self.processors)

    def __repr__(self) -> str:
        return "Chain([" + ", ".join(repr(p) for p in self.processors) + "])"


ORDERS: dict[str, tuple[str, ...]] = {
    "hf": ("logit_bias", "repetition_penalty", "presence_frequency", "dry", "no_repeat_ngram",
           "banned_tokens", "temperature", "top_n_sigma", "top_k", "top_p", "min_p", "typical_p",
           "epsilon", "eta", "xtc", "mirostat"),
    "llama.cpp": ("logit_bias", "banned_tokens", "no_repeat_ngram", "repetition_penalty",
                  "presence_frequency", "dry", "top_n_sigma", "top_k", "typical_p", "top_p", "min_p",
                  "xtc", "epsilon", "eta", "temperature", "mirostat"),
}
DEFAULT_ORDER = "hf"
STAGES = frozenset(ORDERS["hf"])
assert STAGES == frozenset(ORDERS["llama.cpp"]) == frozenset(REGISTRY), "every registered stage has a place in each order"


@dataclass
class SamplingConfig:
    """Every decoding option; the defaults sample from the model's own distribution.

    Validated on construction, so a bad option fails before any model work.
    See the module docstring for `order` and the conventions chosen.
    """

    temperature: float = 1.0
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    top_k: int = 0
    top_k_ties: str = "keep"
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    top_n_sigma: float | None = None
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_window: int | None = None
    dry_breakers: Sequence[int] = ()
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    repetition_penalty: float = 1.0
    repetition_window: int | None = None
    repetition_negative: str = "multiply"
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_window: int | None = 64
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    banned_tokens: Sequence[int] = ()
    no_repeat_ngram_size: int = 0
    min_keep: int = 1
    order: str | Sequence[str | Processor] = DEFAULT_ORDER
    processors: Sequence[Processor] = ()

    def __post_init__(self) -> None:
        # Building every stage validates its parameters; the chain is rebuilt per use
        # so stateful stages (mirostat) start fresh.
        self.build()

    def _stages(self) -> dict[str, Processor]:
        """The stages the options switch on, by name, each built (and validated) by its registered class."""
        check_integer("min_keep", self.min_keep, lo=1)
        stages: dict[str, Processor] = {}
        for name in ORDERS["hf"]:
            proc = REGISTRY[name].from_config(self)
            if proc is not None:
                stages[name] = proc
        if "mirostat" in stages:
            clash = [n for n in stages if n != "mirostat" and REGISTRY[n].truncates]
            if clash:
                fail("mirostat", f"replaces the truncation samplers; do not combine it with {clash}")
        return stages

    def build(self) -> Chain:
        """A fresh Chain for these options, in `order`."""
        stages = self._stages()
        for p in self.processors:
            if not callable(p):
                fail("processors", f"{p!r} is not callable")
        if isinstance(self.order, str):
            if self.order not in ORDERS:
                fail("order", f"must be one of {sorted(ORDERS)} or a sequence of stage names, "
                               f"got {self.order!r}")
            order: list = list(ORDERS[self.order])
        else:
            order = list(self.order)
            for item in order:
                if isinstance(item, str) and item not in STAGES:
                    fail("order", f"unknown stage {item!r}; known: {sorted(STAGES)}")
                if not isinstance(item, str) and not callable(item):
                    fail("order", f"{item!r} is neither a stage name nor a processor")
            named = [i for i in order if isinstance(i, str)]
            if len(set(named)) != len(named):
                fail("order", "names a stage twice")
            missing = [n for n in stages if n not in named]
            if missing:
                fail("order", f"options are set for {missing} but the order leaves them out")
        procs: list[Processor] = []
        for item in order:
            if not isinstance(item, str):
                procs.append(item)
            elif item == "mirostat":
                continue
            elif item in stages:
                procs.append(stages[item])
        procs.extend(self.processors)
        # Mirostat's truncation must see the final distribution it steers.
        if "mirostat" in stages:
            procs.append(stages["mirostat"])
        return Chain(procs)

    def replace(self, **changes: Any) -> "SamplingConfig":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SamplingConfig(**values)


SAMPLING_OPTIONS = frozenset(f.name for f in fields(SamplingConfig))


def make_chain(config: SamplingConfig | None = None, **options: Any) -> Chain:
    """Build the processor chain from a SamplingConfig and/or keyword options."""
    unknown = set(options) - SAMPLING_OPTIONS
    if unknown:
        raise InvalidArgumentError(f"unknown sampling option(s): {sorted(unknown)}")
    cfg = config.replace(**options) if config is not None else SamplingConfig(**options)
    return cfg.build()

