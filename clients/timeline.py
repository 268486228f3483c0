"""When each step of a ClientApp message ended: a Flower mod, for ``benchmarks/device_footprint.py``.

``timeline_mod`` is the ClientApp's outermost mod. When the run config names an ``audit-dir``, it
collects the steps the handlers log (records of the ``edgemri.client`` logger that carry a ``step``
name, at DEBUG) with the wall-clock time and this process's peak RSS, and writes them to
``audit-dir/timings/`` with the time the app's import began: times and memory only, nothing of the data.

That time is this module's import: ``clients/client_app.py`` imports it before the rest of its stack
(tests/test_client.py checks). In a ClientApp process that Flower started cold, it is when the app
began loading; in a child forked by the warm launcher, it is before the child existed (the launcher
imported the app).
"""

# ruff: noqa: E402 - the import clock starts before the imports that load the stack
from __future__ import annotations

import time

IMPORT_STARTED = time.time()

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from edgemri.core.io import write_json

try:
    import resource
except ImportError:  # Windows: the timeline then has no memory figures
    resource = None

STEP_LOGGER = "edgemri.client"  # the ClientApp's logger: a record with a ``step`` attribute ends that step


def peak_rss_mb() -> float:
    """This process's peak RSS so far, in MiB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1) if resource is not None else 0.0


class Timeline(logging.Filter):
    """The steps of one message: each step's name, when it ended and this process's peak RSS then.

    A filter on the step logger while ``listening``: it marks every step record and lets a record on
    only if the logger passed its level before (the step records, at DEBUG, stay out of the device's
    log unless it logs DEBUG anyway). A mark costs a clock read and a getrusage.
    """

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[tuple[str, float, float]] = []
        self.passes_from = logging.NOTSET

    def mark(self, step: str, at: float | None = None) -> None:
        """``step`` ended at ``at`` (default: now)."""
        self.marks.append((step, time.time() if at is None else at, peak_rss_mb()))

    def filter(self, record: logging.LogRecord) -> bool:
        step = getattr(record, "step", None)
        if step is not None:
            self.mark(str(step), record.created)
        return record.levelno >= self.passes_from

    @contextlib.contextmanager
    def listening(self, logger: logging.Logger) -> Iterator[None]:
        """Mark ``logger``'s step records while inside; its level and filters are restored after."""
        level, self.passes_from = logger.level, logger.getEffectiveLevel()
        logger.addFilter(self)
        logger.setLevel(logging.DEBUG)
        try:
            yield
        finally:
            logger.removeFilter(self)
            logger.setLevel(level)


def timeline_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: when auditing, the handler's start, its logged steps and its end, in ``audit-dir/timings/``."""
    audit_dir = str(context.run_config.get("audit-dir", ""))
    if not audit_dir:
        return call_next(msg, context)
    timeline = Timeline()
    timeline.mark("app-called")  # Flower loaded the app and handed it the message
    with timeline.listening(logging.getLogger(STEP_LOGGER)):
        reply = call_next(msg, context)
    timeline.mark("reply-and-audit")
    write_json(Path(audit_dir) / "timings" / f"node-{context.node_id}-{time.time_ns()}-{os.getpid()}.json", {
        "message_type": msg.metadata.message_type, "pid": os.getpid(), "app_import_started": IMPORT_STARTED,
        "marks": [{"step": step, "time": at, "peak_rss_mb": peak} for step, at, peak in timeline.marks]})
    return reply
