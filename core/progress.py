"""What a long step shows while it runs: a bar at a terminal, a few log lines anywhere else.

Every long step (decoding, hashing, synthesis, site clustering, each training stage) reports through
``ProgressBar``, so one rule decides how. When standard error is a terminal it is a tqdm bar, redrawn in place.
Anywhere else (a log file, a pipe, CI) a bar's carriage returns would flood the file, so it is a log line (logger
``edgemri.progress``, INFO) when the step starts, at most one every ``LOG_EVERY_S`` seconds while it runs, and one
when it ends. ``enabled=False`` (``--quiet``; the default of most library functions) shows nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from types import TracebackType
from typing import TypeVar

from tqdm import tqdm

log = logging.getLogger("edgemri.progress")

LOG_EVERY_S = 20.0  # a log line per bar at most this often: a day-long run stays a readable log
Item = TypeVar("Item")


class ProgressBar:
    """One step's progress over ``total`` units (None: unknown), shown as the module docstring says."""

    def __init__(self, desc: str, total: int | None = None, *, enabled: bool, unit: str = "it", initial: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.desc, self.total, self.unit, self.n = desc, total, unit, initial
        self.postfix: dict[str, str] = {}
        self._clock = clock
        self._started = self._logged = clock()
        self._open = enabled
        self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True) if (
            enabled and sys.stderr.isatty()) else None
        if enabled and self._bar is None:
            log.info("%s: %s", desc, f"resumed at {self._position()}" if initial else
                     f"started, {total} {unit}" if total is not None else "started")

    def update(self, count: int = 1) -> None:
        self.advance_to(self.n + count)

    def advance_to(self, n: int) -> None:
        """``n`` units done (a bar never moves back)."""
        if n <= self.n or not self._open:
            return
        step, self.n = n - self.n, n
        if self._bar is not None:
            self._bar.update(step)
        elif self._clock() - self._logged >= LOG_EVERY_S:
            self._logged = self._clock()
            log.info("%s: %s, %.0f s%s", self.desc, self._position(), self._logged - self._started, self._shown())

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description_str(desc, refresh=False)

    def set_postfix(self, **values: float) -> None:
        """Numbers shown after the bar (at a terminal) or at the end of each log line, to 3 decimals."""
        self.postfix.update({name: f"{value:.3f}" for name, value in values.items()})
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=False)

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        if self._bar is not None:
            self._bar.close()
            return
        seconds = self._clock() - self._started
        if self.total is None or self.n >= self.total:
            log.info("%s: finished %d %s in %.1f s%s", self.desc, self.n, self.unit, seconds, self._shown())
        else:
            log.info("%s: stopped at %s after %.1f s%s", self.desc, self._position(), seconds, self._shown())

    def _position(self) -> str:
        if self.total is None:
            return f"{self.n} {self.unit}"
        return f"{self.n}/{self.total} {self.unit} ({100 * self.n / max(self.total, 1):.0f} %)"

    def _shown(self) -> str:
        return "".join(f", {name}={value}" for name, value in self.postfix.items())

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def track(items: Iterable[Item], desc: str, *, enabled: bool, total: int | None = None,
          unit: str = "it") -> Iterator[Item]:
    """``items`` one at a time, with a ``ProgressBar`` over them (``total``: their length when they have one)."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    with ProgressBar(desc, total, enabled=enabled, unit=unit) as bar:
        for item in items:
            yield item
            bar.update()
