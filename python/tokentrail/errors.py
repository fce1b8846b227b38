"""Exceptions that name what went wrong and where.

Every error tokentrail raises on purpose is a `TokentrailError`:

    TokentrailError
    ├── CheckpointError        a file is missing, malformed, hostile or inconsistent (also a ValueError)
    ├── ContextFullError       no room left in the KV cache or the model's context (also a ValueError)
    ├── InvalidArgumentError   a bad argument to a public function or method (also a ValueError)
    │   ├── OptionError        an unknown option or a value of the wrong kind (also a TypeError)
    │   ├── OutOfRangeError    a position, layer or head outside its range (also an IndexError)
    │   └── UnknownNameError   a capture point or record that does not exist (also a KeyError)
    ├── ChatTemplateError      a chat template that does not compile or refuses a conversation (also a ValueError)
    └── ConcurrentUseError     core objects (a KV cache, Hooks) used by two threads at once (also a RuntimeError)

Each also derives from the built-in exception code written before the hierarchy
caught, so `except ValueError` keeps working.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class TokentrailError(Exception):
    """Base class of every error tokentrail raises on purpose."""


class CheckpointError(TokentrailError, ValueError):
    """A checkpoint file is missing, malformed, or does not fit its config."""

    def __init__(self, message: str, path: object = None, tensor: str | None = None, field: str | None = None):
        where = []
        if path is not None:
            where.append(f"file {path}")
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.path = path
        self.tensor = tensor
        self.field = field


class ContextFullError(TokentrailError, ValueError):
    """The KV cache (or the model's context) has no room for more positions."""

    @classmethod
    def for_tokens(cls, cached: int, new: int, limit: int, what: str = "") -> "ContextFullError":
        """The one wording used everywhere: `cached` positions held, `new` more asked for (`what` they are)."""
        label = f" ({what})" if what else ""
        return cls(f"context is full: {cached} positions cached + {new} new{label} exceed the limit of {limit}")


class InvalidArgumentError(TokentrailError, ValueError):
    """A value passed to a public function or method is outside what it accepts."""


class OptionError(InvalidArgumentError, TypeError):
    """An option that does not exist, or a value of the wrong kind (e.g. hooks='x').

    A TypeError as Python's own unknown-keyword error is, and a ValueError as
    tokentrail's other argument errors are, so either `except` catches it.
    """


class OutOfRangeError(InvalidArgumentError, IndexError):
    """A position, layer or head index outside the range that exists."""


class UnknownNameError(InvalidArgumentError, KeyError):
    """A name (capture point, cached record) that does not exist."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


class ChatTemplateError(TokentrailError, ValueError):
    """A chat template that cannot be compiled, fails on a conversation, or refuses it (raise_exception)."""


class ConcurrentUseError(TokentrailError, RuntimeError):
    """A KV cache or Hooks of the core is already in use by a forward pass in another thread.

    Session and tokentrail.capture.Hooks take turns instead; this is what the raw
    core objects (tokentrail._core) raise.
    """


# Names people bring from llama.cpp, OpenAI's API and elsewhere, and what they are called here.
_SYNONYMS = {
    "temp": "temperature", "repeat_penalty": "repetition_penalty", "n_predict": "max_new_tokens",
    "max_tokens": "max_new_tokens", "n": "num_return_sequences", "stop_strings": "stop",
    "random_seed": "seed", "eos_ids": "eos_token_id", "typical": "typical_p", "top_a": "min_p",
    "penalty_last_n": "repetition_window", "repeat_last_n": "repetition_window",
    "dynatemp_exp": "dynatemp_exponent", "top_nsigma": "top_n_sigma",
}


def suggest(name: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """The valid names closest to `name` (a known synonym first, then difflib's nearest)."""
    valid = sorted(set(valid))
    out = []
    if _SYNONYMS.get(name) in valid:
        out.append(_SYNONYMS[name])
    out += [m for m in difflib.get_close_matches(name, valid, n=n, cutoff=0.55) if m not in out]
    return out[:n]


def unknown_options(names: Iterable[str], valid: Iterable[str], what: str = "option") -> OptionError:
    """An OptionError listing each unknown name with the nearest valid ones."""
    valid = sorted(set(valid))
    parts = []
    for name in sorted(names):
        near = suggest(name, valid)
        parts.append(f"{name!r}" + (f" (did you mean {' or '.join(repr(m) for m in near)}?)" if near else ""))
    return OptionError(f"unknown {what}{'s' if len(parts) > 1 else ''}: {', '.join(parts)}; "
                       f"valid: {', '.join(valid)}")
