"""The one error base class: every bad input a user can cause raises a subclass of ``EdgemriError``.

The command line catches this base alone and prints its one-line message (exit 2, no
traceback); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from importlib import metadata


class EdgemriError(Exception):
    """A bad input or an impossible request; the message names what and how to fix it."""


def version() -> str:
    """The installed package's version (one source: pyproject.toml)."""
    try:
        return metadata.version("edgemri")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"
