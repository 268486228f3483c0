"""The one error base class: every bad input a user can cause raises a subclass of ``EdgemriError``.

The command line catches this base alone and prints its one-line message (exit 2, no
traceback); anything else is a bug and keeps its traceback. ``printable`` is how untrusted
text (a file name from a data folder, a name in a downloaded model) enters a message or a line
of output.
"""

from __future__ import annotations

import os
from importlib import metadata


class EdgemriError(Exception):
    """A bad input or an impossible request; the message names what and how to fix it."""


def printable(text: str | os.PathLike[str]) -> str:
    """``text`` (or a path) safe to print on one line: undecodable file-name bytes as ``\\xNN``, control characters
    escaped (a newline as ``\\n``, ESC as ``\\x1b``), so a name cannot forge a log line or drive the terminal.

    Linux file names are bytes; Python keeps the ones that are not UTF-8 as lone surrogates, which a UTF-8
    terminal (or pipe) refuses to print. Escaping twice changes nothing.
    """
    text = os.fsdecode(text)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name made
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def version() -> str:
    """The installed package's version (one source: pyproject.toml)."""
    try:
        return metadata.version("edgemri")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"
