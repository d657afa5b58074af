"""Progress of long work outside Lightning's loops (latency measurement, evaluation of several
models, benchmarks): a rich bar with time remaining on a terminal, and log lines otherwise (a
batch job's log shows where it is without a bar's control characters).

    with progress("evaluate: latency", total=n) as advance:
        for ...:
            ...
            advance()
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Callable, Iterator, Optional

log = logging.getLogger("dsframe")


def _eta(elapsed: float, done: int, total: int) -> str:
    if done <= 0:
        return "?"
    left = elapsed / done * (total - done)
    return f"{int(left // 60)}:{int(left % 60):02d}"


@contextlib.contextmanager
def progress(description: str, total: int, *, every_s: float = 30.0, stream=None,
             clock: Callable[[], float] = time.monotonic, bar: Optional[bool] = None) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n=1)``. ``bar``: force (True) or refuse (False) the rich bar; default: a
    bar when ``stream`` (stderr) is a terminal. Without a bar a line is logged at most every
    ``every_s`` seconds and at the end: ``description: done/total (pct), elapsed, ETA``."""
    stream = stream or sys.stderr
    use_bar = stream.isatty() if bar is None else bar
    total = max(1, int(total))
    if use_bar:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("left"), TimeRemainingColumn(), console=Console(file=stream),
                      transient=False) as bar_:
            task = bar_.add_task(description, total=total)
            yield lambda n=1: bar_.advance(task, n)
        return
    start = last = clock()
    done = 0

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        now = clock()
        if now - last >= every_s or done >= total:
            last = now
            log.info("%s: %d/%d (%d%%), %.0f s elapsed, ETA %s", description, done, total, 100 * done // total,
                     now - start, _eta(now - start, done, total))

    yield advance
