"""Progress of long work (converting weights, writing GGUF, scoring long texts), on stderr.

Every function that can take more than a second takes ``progress=``:

* ``None`` (the default): a rich progress bar on stderr when stderr is a terminal, nothing otherwise;
* ``True``: the bar on stderr even when it is not a terminal (logs, tests); ``False``: nothing;
* a callable ``f(description, completed, total)``: called at the start and after each unit of work.

Progress never writes to stdout, so piped output and JSON stay clean.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Union

from .errors import OptionError

ProgressCallback = Callable[[str, int, int], None]
ProgressOption = Union[bool, None, ProgressCallback]


def check_progress(progress: ProgressOption) -> ProgressOption:
    """`progress` if it is a valid option, else an OptionError."""
    if progress is None or isinstance(progress, bool) or callable(progress):
        return progress
    raise OptionError(f"progress: must be None (a bar when stderr is a terminal), True, False or a callable "
                      f"f(description, completed, total), got {progress!r}")


class Task:
    """One piece of work of `total` units; use as a context manager and call `advance()`."""

    def __init__(self, description: str, total: int, progress: ProgressOption = None):
        self.description = description
        self.total = int(total)
        self.completed = 0
        check_progress(progress)
        self._callback = progress if callable(progress) and not isinstance(progress, bool) else None
        show = progress is True or (progress is None and sys.stderr.isatty())
        self._bar = None
        if show and self._callback is None:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=Console(file=sys.stderr), transient=False)
            self._id = None

    def __enter__(self) -> "Task":
        if self._bar is not None:
            self._bar.start()
            self._id = self._bar.add_task(self.description, total=self.total)
        if self._callback is not None:
            self._callback(self.description, 0, self.total)
        return self

    def advance(self, units: int = 1) -> None:
        self.completed += units
        if self._bar is not None:
            self._bar.update(self._id, completed=self.completed)
        if self._callback is not None:
            self._callback(self.description, self.completed, self.total)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __repr__(self) -> str:
        return f"Task({self.description!r}, {self.completed}/{self.total})"
