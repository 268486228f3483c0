"""Bounded command-line values: every number and list an ``edgemri`` option takes has an explicit range.

A value out of range is argparse's own usage error, which names the option and the range (exit 2), before
anything is loaded or run: ``--seeds 1000000000`` is refused, not run until killed. The ranges are ones no
real use reaches; where a library function checks the same value (a run's rounds, a certificate's days),
its check stays, for callers that do not come through the command line.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from edgemri.core.errors import EdgemriError

T = TypeVar("T")
SHOWN_CHARS = 60  # of a refused value, in the one-line error


@dataclass(frozen=True)
class BoundedInt:
    """An argparse ``type``: a whole number from ``low`` to ``high``; ``str()`` is the range, for --help."""

    low: int
    high: int

    def __call__(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # a word, a fraction, or more digits than Python converts
            raise argparse.ArgumentTypeError(f"expected a whole number from {self}, got {text[:SHOWN_CHARS]!r}") \
                from None
        if not self.low <= value <= self.high:
            raise argparse.ArgumentTypeError(f"{value} is out of range; allowed: {self}")
        return value

    def __str__(self) -> str:
        return f"{self.low} to {self.high}"


@dataclass(frozen=True)
class CommaList(Generic[T]):
    """An argparse ``type``: at most ``most`` comma-separated values, each read by ``item``, the list then
    checked by ``check`` (a library's own check, whose ``EdgemriError`` becomes the usage error)."""

    item: Callable[[str], T]
    most: int
    example: str
    check: Callable[[list[T]], None] | None = None

    def __call__(self, text: str) -> list[T]:
        parts = [part.strip() for part in text.split(",")]
        if len(parts) > self.most:
            raise argparse.ArgumentTypeError(f"at most {self.most} comma-separated values, got {len(parts)}")
        try:
            values = [self.item(part) for part in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated values such as {self.example}, "
                                             f"got {text[:SHOWN_CHARS]!r}") from None
        if self.check is not None:
            try:
                self.check(values)
            except EdgemriError as err:
                raise argparse.ArgumentTypeError(str(err)) from None
        return values


class AtMost(argparse.Action):
    """An argparse ``action`` for a list option (``nargs="+"``, or one value a time when repeated): at most
    ``most`` values in all, e.g. ``add_argument("--set", action=AtMost, most=100, default=[])``."""

    def __init__(self, *args: Any, most: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.most = most

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        if self.nargs is None:  # repeated: one value now, added to the earlier ones (a new list: never the default)
            values = [*(getattr(namespace, self.dest, None) or []), values]
        values = list(values or [])
        if len(values) > self.most:
            raise argparse.ArgumentError(self, f"at most {self.most} values, got {len(values)}")
        setattr(namespace, self.dest, values)


SEEDS = BoundedInt(1, 100)  # repeats of a whole run, each a distillation or a federation: `distill --seeds`, benchmarks
