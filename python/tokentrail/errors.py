"""Exceptions that name what went wrong and where."""
from __future__ import annotations


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
    """The KV cache has no room for more positions."""
