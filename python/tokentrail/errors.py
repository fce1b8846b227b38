"""Exceptions that name what went wrong and where."""
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


class OptionError(TokentrailError, TypeError, ValueError):
    """An option that does not exist, or a value of the wrong kind (e.g. hooks='x').

    A TypeError as Python's own unknown-keyword error is, and a ValueError as
    tokentrail's other argument errors are, so either `except` catches it.
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
