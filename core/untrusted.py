"""The one way to read untrusted JSON: strict parsing, then a schema of named checks.

A manifest, a ledger, a run folder's result, a references file or a reply's metrics can be written by
anyone with the folder (or the wire). ``parse_json`` refuses what Python's ``json`` silently accepts (a key
given twice, NaN and Infinity, nesting deep enough to crash); ``read_json`` adds a size bound and UTF-8; and
``check_record`` holds an object to a schema whose checks say what they allow, so every error is one line
naming the file (``where``), the key and the allowed values. Each caller passes its own error class (a
subclass of EdgemriError), so the CLI's exit-2 path and each module's error names stay as they are.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from edgemri.core.errors import EdgemriError

MAX_JSON_BYTES = 64 * 2**20  # far above any file this project writes; a bigger one is not read into memory


class Check:
    """A predicate on one value and the words that say what it allows (the error message's "allowed: ...")."""

    def __init__(self, ok: Callable[[Any], bool], allowed: str) -> None:
        self.ok, self.allowed = ok, allowed

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.ok(value))
        except (TypeError, ValueError):
            return False

    def nullable(self) -> Check:
        return Check(lambda v: v is None or self(v), f"null or {self.allowed}")

    def or_nan(self) -> Check:
        """This check, or NaN: how the project's own reports write a value they do not have (read with
        ``nonfinite=True``)."""
        return Check(lambda v: (isinstance(v, float) and math.isnan(v)) or self(v), f"NaN or {self.allowed}")


def _is_number(value: Any) -> bool:
    """A JSON number, not a bool (True is an int in Python)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bound(value: float) -> str:
    """A bound as people write it: 2147483647, 0.5, 1e-12 (not 2.14748e+09)."""
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def number(low: float = -math.inf, high: float = math.inf, *, integer: bool = False, finite: bool = True,
           open_low: bool = False, open_high: bool = False) -> Check:
    """A number in [low, high]; ``open_low``/``open_high`` leave that bound out (a rate in (0, 1])."""
    kind = "an integer" if integer else ("a finite number" if finite else "a number")

    def ok(v: Any) -> bool:
        if integer and not (isinstance(v, int) and not isinstance(v, bool)):
            return False
        return _is_number(v) and (math.isfinite(v) or not finite) and (low < v if open_low else low <= v) \
            and (v < high if open_high else v <= high)
    if math.isfinite(low) and math.isfinite(high):
        bounds = f" in {'(' if open_low else '['}{_bound(low)}, {_bound(high)}{')' if open_high else ']'}"
    elif math.isfinite(low):
        bounds = f" {'>' if open_low else '>='} {_bound(low)}"
    else:
        bounds = f" {'<' if open_high else '<='} {_bound(high)}" if math.isfinite(high) else ""
    return Check(ok, kind + bounds)


def text(limit: int = 200, pattern: re.Pattern[str] | None = None, *, allowed: str | None = None) -> Check:
    """A printable one-line string of at most ``limit`` characters (matching ``pattern`` in full, if given)."""
    def ok(v: Any) -> bool:
        return isinstance(v, str) and len(v) <= limit and v.isprintable() \
            and (pattern is None or pattern.fullmatch(v) is not None)
    return Check(ok, allowed or f"printable text of at most {limit} characters")


def one_of(names: Collection[Any]) -> Check:
    return Check(lambda v: v in names, "one of " + ", ".join(map(str, names)))


SHA256 = Check(lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
               "a SHA-256 hex digest (64 lowercase hex digits)")
BOOL = Check(lambda v: isinstance(v, bool), "true or false")
OBJECT = Check(lambda v: isinstance(v, dict), "a JSON object")
MAX_ITEMS = 100_000  # entries in one list or object when the caller names no bound


def list_of(items: Check, low: int = 0, high: int = MAX_ITEMS) -> Check:
    """A list of ``low`` to ``high`` entries, each passing ``items``."""
    return Check(lambda v: isinstance(v, list) and low <= len(v) <= high and all(map(items, v)),
                 f"a list of {low:,} to {high:,} entries, each {items.allowed}")


def mapping_of(keys: Check, values: Check, limit: int = MAX_ITEMS) -> Check:
    """An object of at most ``limit`` entries whose every key passes ``keys`` and every value ``values``:
    a record keyed by names (clients, metrics) rather than by a fixed schema."""
    return Check(lambda v: isinstance(v, dict) and len(v) <= limit and all(keys(k) and values(x) for k, x in v.items()),
                 f"an object of at most {limit:,} entries, keys {keys.allowed}, values {values.allowed}")


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key[:60]!r}")
        seen.add(key)
    return dict(pairs)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


MAX_INT_DIGITS = 30  # no count, seed or size this project reads needs more; Python's own cap is 4,300


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits.lstrip('-'))} digits (allowed: at most {MAX_INT_DIGITS})")
    return int(digits)


def _finite_float(text_: str) -> float:
    value = float(text_)
    if not math.isfinite(value):
        raise ValueError(f"{text_[:40]} overflows a float")
    return value


def parse_json(raw: str | bytes, where: str, error: type[EdgemriError], *, nonfinite: bool = False,
               max_chars: int = MAX_JSON_BYTES) -> Any:
    """JSON from untrusted text: at most ``max_chars``, UTF-8, no key twice, no NaN/Infinity, integers of at most
    MAX_INT_DIGITS digits, nesting within Python's recursion limit; else one-line ``error``.

    ``nonfinite``: accept NaN and Infinity, which the project's own reports write (Python's ``json`` default) for
    a missing accuracy or an unbounded epsilon; the schema's checks then say where they are allowed."""
    if len(raw) > max_chars:
        raise error(f"{where}: {len(raw):,} characters of JSON; allowed: at most {max_chars:,}")
    try:
        text_ = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text_, object_pairs_hook=_refuse_duplicates, parse_int=_bounded_int,
                          parse_float=float if nonfinite else _finite_float,
                          parse_constant=float if nonfinite else _refuse_constant)
    except UnicodeDecodeError:
        raise error(f"{where} is not UTF-8 text") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise error(f"{where} is not valid JSON ({' '.join(str(err).split())[:120]})") from None


def read_json(path: str | Path, error: type[EdgemriError], *, max_bytes: int = MAX_JSON_BYTES,
              where: str | None = None, nonfinite: bool = False) -> Any:
    """``parse_json`` of a file no larger than ``max_bytes``; a missing or unreadable file is ``error`` too."""
    path = Path(path)
    where = where or str(path)
    try:
        if not path.is_file():
            raise error(f"{where} not found")
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{where}: {size:,} bytes is over the {max_bytes:,}-byte limit for this file")
        raw = path.read_bytes()
    except OSError as err:
        raise error(f"cannot read {where}: {err.strerror or err}") from None
    return parse_json(raw, where, error, nonfinite=nonfinite)


def check_value(value: Any, check: Check, where: str, error: type[EdgemriError]) -> Any:
    """``value`` when it passes ``check``; else ``error``: "WHERE has value V; allowed: ..."."""
    if not check(value):
        raise error(f"{where} has value {str(value)[:60]!r}; allowed: {check.allowed}")
    return value


def check_record(record: Any, schema: Mapping[str, Check], where: str, error: type[EdgemriError], *,
                 optional: Collection[str] = (), extra: bool = False, within: str = "") -> dict[str, Any]:
    """``record`` when it is an object whose keys are ``schema``'s (those in ``optional`` may be missing; others
    only when ``extra``) and whose every value passes its check; else ``error`` naming ``where`` and the key.
    ``within`` names a record nested in the file (``files[3]``): its keys are then named ``files[3].path``."""
    name, prefix = (f"{where}: {within}", f"{within}.") if within else (where, "")
    if not isinstance(record, dict):
        raise error(f"{name} is a JSON {type(record).__name__}, not an object")
    missing = sorted(set(schema) - set(record) - set(optional))
    unexpected = [] if extra else sorted(str(k) for k in set(record) - set(schema))
    if missing or unexpected:
        raise error(f"{name} has the wrong keys (missing: {', '.join(missing) or '-'}; "
                    f"unexpected: {', '.join(unexpected)[:80] or '-'})")
    for key, check in schema.items():
        if key in record:
            check_value(record[key], check, f"{where}: key {prefix + key!r}", error)
    return record
