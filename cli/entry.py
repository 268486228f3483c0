"""The ``edgemri`` console script: signals are handled before anything else is imported.

Ctrl-C (SIGINT) and SIGTERM end the command with exit code 130 or 143 and one line, at any point, imports
included; a second signal while it stops is ignored rather than printed as a traceback. Everything edgemri
writes is atomic (core/io.py), so what was saved before the signal stays loadable and ``--resume`` continues.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


class Terminated(BaseException):  # noqa: N818 - a signal, like KeyboardInterrupt, not an error
    """SIGTERM, raised where the process is, so that ``finally`` blocks and context managers still run."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def _stopped(code: int, how: str) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM):  # a second signal now would print a traceback
        signal.signal(signum, signal.SIG_IGN)
    print(f"edgemri: {how}; what was saved stays, continue with --resume where the command has it",
          file=sys.stderr)
    return code


def run() -> None:
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        from edgemri.main import main

        code = main()
    except KeyboardInterrupt:
        code = _stopped(130, "interrupted")
    except Terminated:
        code = _stopped(143, "terminated")
    sys.exit(code)
