"""Reading configuration values from a file: typed, range-checked, and accounted for.

Every reader (config.json, GGUF metadata) takes its values through a `FieldReader`,
which checks each value's type and range where it is read and remembers which
keys were consumed. A key that nobody read and that is not known to be harmless
is an error naming it: a field we do not understand may change the computation,
and guessing would make the model silently wrong.
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from ..errors import CheckpointError

_MISSING = object()
# Integers read from files are bounded: sizes beyond this are not real models and would
# only make loops and allocations explode before a later check could fail.
MAX_INT = 2**31 - 1


# A JSON file larger than this is not a config (safetensors caps its header at 100 MB too).
MAX_JSON_BYTES = 100 * 2**20


def open_regular(path, what: str = "file"):
    """`path` opened for binary reading, if it is a regular file.

    A FIFO, device or directory named like a checkpoint file is refused rather
    than opened: reading a FIFO blocks forever. The file is opened without
    blocking and checked through its descriptor, so nothing can swap it between
    the check and the read.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise CheckpointError(f"cannot read {what}: {e.strerror}", path=path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"cannot read {what}: it is not a regular file", path=path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_json(path, what: str = "JSON file", data: bytes | None = None) -> dict:
    """A JSON object from `path` (or from `data` read from it): malformed, deeply nested,
    non-object or oversized JSON is a CheckpointError naming the file, never echoing it."""
    path = Path(path)
    if data is None:
        with open_regular(path, what) as fh:
            data = fh.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise CheckpointError(f"{what} is larger than {MAX_JSON_BYTES} bytes", path=path)
    try:
        value = json.loads(data)
    except RecursionError:
        raise CheckpointError(f"{what} is nested too deeply", path=path) from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{what} is not UTF-8 text", path=path) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})",
                              path=path) from None
    except ValueError as e:  # e.g. an integer too long to convert
        raise CheckpointError(f"{what} is not valid JSON ({type(e).__name__})", path=path) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} must hold a JSON object, not {type(value).__name__}", path=path)
    return value


def is_count(v, minimum: int = 0, maximum: int = MAX_INT) -> bool:
    """A JSON or numpy integer (not a bool, not a float) within minimum..maximum."""
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
    return isinstance(v, int) and not isinstance(v, bool) and minimum <= v <= maximum


def is_number(v) -> bool:
    """A finite JSON number (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_rope(config, path, field: str) -> None:
    """The rotary tables `config` implies can be computed and are finite and positive.

    Bases and scaling factors that pass their own range checks can still break the
    tables together (a base of 1 makes YaRN divide by zero, a huge base underflows
    every frequency to 0, a factor list of the wrong length): refused here, at load.
    """
    if config.position != "rope":
        return
    import numpy as np

    from ..errors import TokentrailError
    from ..rope import tables

    try:
        t = tables(config.rope_theta, config.rotary_size, config.rope_scaling, config.max_seq_len,
                   config.rope_local_theta)
    except (ArithmeticError, TokentrailError) as e:
        raise CheckpointError(f"rope parameters cannot be used: {e}", path=path, field=field) from None
    good = all(a is None or bool(np.all(np.isfinite(a)) and np.all(a > 0))
               for a in (t.inv_freq, t.inv_freq_local, t.inv_freq_long))
    if not good or not (math.isfinite(t.attn_factor) and t.attn_factor > 0):
        raise CheckpointError("rope parameters give non-finite or zero rotary frequencies", path=path, field=field)


class FieldReader:
    """Typed access to a dict of values read from `path`; `where` prefixes messages (e.g. 'config.json')."""

    def __init__(self, values: dict, path, prefix: str = "", limits: dict[str, tuple[int, str]] | None = None):
        """`limits` bounds counts by what the file holds: key -> (maximum, why), e.g. a layer count
        by the number of tensors, checked before anything loops over or allocates by the count."""
        self.values = values
        self.path = Path(path) if path is not None else None
        self.prefix = prefix
        self.limits = limits or {}
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
        if key in self.limits and v > self.limits[key][0]:
            bound, why = self.limits[key]
            raise self.error(key, f"{v} is more than {why} allow ({bound})")
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
