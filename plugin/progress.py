"""Progress bars for long commands (``cmr-ai demo``, ``phantom``, ``inspect``, ``exports retry
--now``, ``bench/*.py``): rich.progress on **stderr**, so ``--json`` and tables on stdout stay
clean.

Shown when stderr is a terminal, or when asked (``--progress``); ``--no-progress`` turns them
off. Asked for on a stderr that is not a terminal (a log file, a test capturing output), each
task writes plain lines instead of a live bar: one when it starts and one when it ends, e.g.
``writing the study: 41/41 done in 2.3 s`` — never cursor movements.

Usage::

    with Bars(enabled(args.progress)) as bars:
        task = bars.add("sending", total=len(files))
        for f in files:
            ...
            task.advance()
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO, TypeVar

T = TypeVar("T")


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def enabled(flag: Optional[bool] = None, stream: Optional[TextIO] = None) -> bool:
    """Whether to show progress: ``flag`` when given (``--progress`` / ``--no-progress``),
    else whether ``stream`` (default stderr) is a terminal."""
    if flag is not None:
        return bool(flag)
    return _isatty(sys.stderr if stream is None else stream)


def add_arguments(parser) -> None:
    """``--progress`` / ``--no-progress`` on an argparse parser (dest ``progress``: None = auto)."""
    parser.add_argument("--progress", dest="progress", action="store_true", default=None,
                        help="show progress bars on stderr (default: when stderr is a terminal)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


class Task:
    """One bar; ``advance``/``update``/``done`` are no-ops when progress is off."""

    def __init__(self, bars: "Bars", description: str, total: Optional[float], rich_id: Any = None):
        self._bars, self.description, self.total, self._id = bars, description, total, rich_id
        self.completed = 0.0
        self._t0 = time.monotonic()
        self._finished = False

    def advance(self, n: float = 1) -> None:
        self.completed += n
        if self._id is not None:
            self._bars._rich.advance(self._id, n)

    def update(self, *, description: Optional[str] = None, total: Optional[float] = None,
               completed: Optional[float] = None) -> None:
        if description is not None:
            self.description = description
        if total is not None:
            self.total = total
        if completed is not None:
            self.completed = completed
        if self._id is not None:
            self._bars._rich.update(self._id, description=description, total=total, completed=completed)

    def done(self) -> None:
        """Finish the task (a plain line in line mode; the bar goes away in rich mode)."""
        if self._finished:
            return
        self._finished = True
        if self._id is not None:
            self._bars._rich.remove_task(self._id)
        elif self._bars.mode == "lines":
            count = (f"{self.completed:g}/{self.total:g} " if self.total is not None
                     else (f"{self.completed:g} " if self.completed else ""))
            self._bars._line(f"{self.description}: {count}done in {time.monotonic() - self._t0:.1f} s")


class Bars:
    """A group of progress tasks on stderr: rich bars on a terminal, plain lines when forced
    on elsewhere, nothing when off (see the module docstring)."""

    def __init__(self, show: bool = False, *, stream: Optional[TextIO] = None, transient: bool = True):
        self.stream = sys.stderr if stream is None else stream
        self.mode = "off" if not show else ("rich" if enabled(None, self.stream) else "lines")
        self._transient = transient
        self._rich = None
        self._tasks: list[Task] = []

    def __enter__(self) -> "Bars":
        if self.mode == "rich":
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn)

            self._rich = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=Console(file=self.stream), transient=self._transient,
                                  # stdout lines go above the bars only when stdout is that terminal too;
                                  # piped stdout (results, --json) is never routed through stderr
                                  redirect_stdout=_isatty(sys.stdout), redirect_stderr=False)
            self._rich.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for t in self._tasks:
            if exc[0] is None:
                t.done()
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def add(self, description: str, total: Optional[float] = None) -> Task:
        """Start a task (``total`` None: a spinner without a known end)."""
        rid = self._rich.add_task(description, total=total) if self._rich is not None else None
        task = Task(self, description, total, rid)
        self._tasks.append(task)
        if self.mode == "lines":
            self._line(f"{description}" + (f": 0/{total:g}" if total is not None else "") + " …")
        return task

    def track(self, items: Iterable[T], description: str, total: Optional[float] = None) -> Iterator[T]:
        """Yield ``items``, advancing one task per item; the task ends with the loop."""
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        task = self.add(description, total)
        for item in items:
            yield item
            task.advance()
        task.done()

    def print(self, text: str) -> None:
        """A line on stderr above the bars (in line mode: a plain line; off: nothing)."""
        if self._rich is not None:
            self._rich.console.print(text, highlight=False)
        elif self.mode == "lines":
            self._line(text)


def rich_progress(show: bool, *columns: Any, transient: bool = True, stream: Optional[TextIO] = None):
    """A ``rich.progress.Progress`` on stderr for code that drives rich directly (``bench/*.py``):
    disabled (every call a no-op, nothing printed) unless ``show``; stdout routed above the bars
    only when stdout is a terminal too. ``columns``: rich columns (default: spinner, description,
    bar, M/N, elapsed)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    stream = sys.stderr if stream is None else stream
    columns = columns or (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn())
    return Progress(*columns, console=Console(file=stream), transient=transient, disable=not show,
                    redirect_stdout=_isatty(sys.stdout), redirect_stderr=False)
