"""Worker processes that stop with their parent: the one way edgemri runs work in a process pool.

The terminal sends Ctrl-C (and a service manager SIGTERM) to the whole process group. Workers ignore both: the
parent alone decides, and on a signal (or any error) it cancels the work not yet started instead of waiting for
all of it, so a command stops within one chunk of work rather than after the whole job.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager


def _ignore_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_signals)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
