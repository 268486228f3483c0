"""The ``edgemri`` console script: signals are handled before anything else is imported.

Ctrl-C (SIGINT), SIGTERM and SIGHUP (its terminal closed) end the command with exit code 130, 143 or 129 and
one line, at any point, imports included; a second signal while it stops is ignored rather than printed as a
traceback. Every process the command started is stopped on the way out (simulation/flower_run.py). Everything edgemri
writes is atomic (core/io.py), so what was saved before the signal stays loadable and ``--resume`` continues.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


class Terminated(BaseException):  # noqa: N818 - a signal, like KeyboardInterrupt, not an error
    """SIGTERM or SIGHUP, raised where the process is, so that ``finally`` blocks and context managers still run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def _stopped(code: int, how: str) -> int:
    for signum in STOP_SIGNALS:  # a second signal now would print a traceback
        signal.signal(signum, signal.SIG_IGN)
    print(f"edgemri: {how}; what was saved stays, continue with --resume where the command has it",
          file=sys.stderr)
    return code


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_pending: list[int] = []


def _hold(signum: int, frame: FrameType | None) -> None:
    _pending.append(signum)


# Installed when the console script imports this module: a signal between here and run()'s ``try`` is held,
# not raised where nothing would catch it.
for _signum in STOP_SIGNALS:
    signal.signal(_signum, _hold)


def _stop(signum: int) -> int:
    if signum == signal.SIGINT:
        return _stopped(130, "interrupted")
    return _stopped(128 + signum, "terminated" if signum == signal.SIGTERM else "hung up")


def run() -> None:
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_terminated)
        signal.signal(signal.SIGHUP, _raise_terminated)
        if _pending:
            sys.exit(_stop(_pending[0]))
        from edgemri.main import main

        code = main()
    except KeyboardInterrupt:
        code = _stop(signal.SIGINT)
    except Terminated as stop:
        code = _stop(stop.signum)
    sys.exit(code)
