"""Reading configuration values from a file: typed, range-checked, and accounted for.

Every reader (config.json, GGUF metadata) takes its values through a `FieldReader`,
which checks each value's type and range where it is read and remembers which
keys were consumed. A key that nobody read and that is not known to be harmless
is an error naming it: a field we do not understand may change the computation,
and guessing would make the model silently wrong.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import CheckpointError

_MISSING = object()
# Integers read from files are bounded: sizes beyond this are not real models and would
# only make loops and allocations explode before a later check could fail.
MAX_INT = 2**31 - 1


class FieldReader:
    """Typed access to a dict of values read from `path`; `where` prefixes messages (e.g. 'config.json')."""

    def __init__(self, values: dict, path, prefix: str = ""):
        self.values = values
        self.path = Path(path) if path is not None else None
        self.prefix = prefix
        self.used: set[str] = set()

    def error(self, key: str, message: str) -> CheckpointError:
        return CheckpointError(message, path=self.path, field=self.prefix + key)

    def has(self, key: str) -> bool:
        return self.prefix + key in self.values and self.values[self.prefix + key] is not None

    def raw(self, key: str, default=_MISSING):
        full = self.prefix + key
        self.used.add(full)
        v = self.values.get(full)
        if v is None:
            if default is _MISSING:
                raise self.error(key, "required field is missing")
            return default
        return v

    def ignore(self, *keys: str) -> None:
        """Keys known to carry nothing the forward pass needs (training settings, provenance)."""
        self.used.update(self.prefix + k for k in keys)

    def int(self, key: str, default=_MISSING, minimum: int = 1, maximum: int = MAX_INT) -> int:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:  # numpy scalars from GGUF
            v = v.item()
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.error(key, f"expected an integer, got {type(v).__name__} {_show(v)}")
        if not minimum <= v <= maximum:
            raise self.error(key, f"expected an integer within {minimum}..{maximum}, got {v}")
        return v

    def float(self, key: str, default=_MISSING, positive: bool = True, minimum: float | None = None) -> float:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
            v = v.item()
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise self.error(key, f"expected a number, got {type(v).__name__} {_show(v)}")
        v = float(v)
        if not math.isfinite(v):
            raise self.error(key, f"expected a finite number, got {v}")
        if positive and v <= 0:
            raise self.error(key, f"expected a positive number, got {v}")
        if minimum is not None and v < minimum:
            raise self.error(key, f"expected a number of at least {minimum}, got {v}")
        return v

    def bool(self, key: str, default=_MISSING) -> bool:
        v = self.raw(key, default)
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
            v = v.item()
        if not isinstance(v, bool):
            raise self.error(key, f"expected true or false, got {type(v).__name__} {_show(v)}")
        return v

    def str(self, key: str, default=_MISSING, choices: tuple[str, ...] | None = None) -> str:
        v = self.raw(key, default)
        if not isinstance(v, str):
            raise self.error(key, f"expected a string, got {type(v).__name__} {_show(v)}")
        if choices is not None and v not in choices:
            raise self.error(key, f"expected one of {list(choices)}, got {v!r}")
        return v

    def dict(self, key: str, default=_MISSING) -> dict:
        v = self.raw(key, default)
        if not isinstance(v, dict):
            raise self.error(key, f"expected an object, got {type(v).__name__} {_show(v)}")
        return v

    def list(self, key: str, default=_MISSING) -> list:
        v = self.raw(key, default)
        if hasattr(v, "tolist"):
            v = v.tolist()
        if not isinstance(v, list):
            raise self.error(key, f"expected a list, got {type(v).__name__} {_show(v)}")
        return v

    def require(self, key: str, allowed: tuple, default=None) -> None:
        """A field we implement only at the given values (e.g. a feature switched off)."""
        v = self.raw(key, default)
        if v not in allowed:
            raise self.error(key, f"value {_show(v)} is not supported (tokentrail implements "
                                  f"{', '.join(_show(a) for a in allowed)})")

    def unused(self, keys=None) -> list[str]:
        keys = self.values.keys() if keys is None else keys
        return [k for k in keys if k.startswith(self.prefix) and k not in self.used]

    def refuse_unused(self, what: str, keys=None) -> None:
        left = self.unused(keys)
        if left:
            raise CheckpointError(
                f"{what} has field{'s' if len(left) > 1 else ''} tokentrail does not understand: "
                f"{', '.join(sorted(left)[:8])}{' …' if len(left) > 8 else ''}; such a field may change "
                f"what the model computes, so the checkpoint is refused rather than run wrongly",
                path=self.path, field=sorted(left)[0])


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
