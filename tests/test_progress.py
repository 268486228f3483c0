"""Progress people can see (core/progress.py): a bar at a terminal, a few log lines anywhere else, nothing with
--quiet; the terminal is a real pseudo-terminal around the real command."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch

from edgemri.core.config import TrainSpec
from edgemri.core.progress import LOG_EVERY_S, ProgressBar, track
from edgemri.core.training.losses import cross_entropy
from edgemri.core.training.train import TrainData, as_float, fit
from edgemri.main import main

PROGRESS_LOGGER = "edgemri.progress"
# A carriage return that does not end a line (a terminal turns "\n" into "\r\n"): a bar redrawn in place.
REDRAWN = re.compile(rb"\r(?!\n)")


class _Terminal(io.StringIO):
    """Standard error as a terminal sees it, without one."""

    def isatty(self) -> bool:
        return True


def _progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == PROGRESS_LOGGER]


def test_without_a_terminal_a_bar_is_a_start_line_a_few_lines_and_an_end_line(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger=PROGRESS_LOGGER)
    now = [0.0]
    with ProgressBar("decode Training", 1000, enabled=True, unit="images", clock=lambda: now[0]) as bar:
        for _ in range(1000):  # one image a second: 1000 s
            now[0] += 1.0
            bar.update()
            bar.set_postfix(loss=0.5)
    lines = _progress_lines(caplog)
    assert lines[0] == "decode Training: started, 1000 images"
    assert lines[1] == f"decode Training: {LOG_EVERY_S:.0f}/1000 images (2 %), {LOG_EVERY_S:.0f} s, loss=0.500"
    assert lines[-1] == "decode Training: finished 1000 images in 1000.0 s, loss=0.500"
    assert len(lines) == 2 + 1000 // LOG_EVERY_S
    assert sys.stderr.getvalue() == ""  # no bar: no carriage return in a log file


def test_a_step_left_early_says_where_it_stopped(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger=PROGRESS_LOGGER)
    with pytest.raises(KeyError):
        for k in track(range(4), "hash Testing", enabled=True, unit="images"):
            if k == 2:
                raise KeyError(k)
    assert _progress_lines(caplog)[-1].startswith("hash Testing: stopped at 2/4 images (50 %) after ")


@pytest.mark.parametrize("stream", [io.StringIO, _Terminal], ids=["log", "terminal"])
def test_disabled_progress_shows_nothing(stream: type[io.StringIO], monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sys, "stderr", stream())
    caplog.set_level(logging.INFO, logger=PROGRESS_LOGGER)
    assert list(track(range(3), "synth quickstart", enabled=False)) == [0, 1, 2]
    assert sys.stderr.getvalue() == "" and not _progress_lines(caplog)


def test_a_training_stage_is_one_bar_with_its_epoch_and_last_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    generator = torch.Generator().manual_seed(0)
    data = TrainData(torch.randn(24, 8, generator=generator), torch.arange(24) % 4, transform=as_float)
    fit(torch.nn.Linear(8, 4), data, loss=cross_entropy, spec=TrainSpec(epochs=3, batch_size=8), seed=0, val=data,
        progress=True, desc="teacher")
    shown = terminal.getvalue()
    assert "teacher epoch 1/3" in shown and "teacher epoch 3/3" in shown
    final = shown.rstrip("\n").rsplit("\r", 1)[-1]  # the bar as it stays on the screen
    assert final.startswith("teacher epoch 3/3: 100%") and " 9/9 " in final
    assert re.search(r"loss=\d\.\d{3}, acc=\d\.\d{3}, val_loss=\d\.\d{3}, val_acc=\d\.\d{3}\]$", final), final


def test_quiet_turns_every_bar_and_progress_line_off(tiny_data: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=PROGRESS_LOGGER)
    assert main(["data", "info", str(tiny_data), "--cache-dir", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert not _progress_lines(caplog) and "\r" not in capsys.readouterr().err
    assert main(["data", "info", str(tiny_data), "--cache-dir", str(tmp_path / "shown")]) == 0
    assert "decode Training: started, 160 images" in _progress_lines(caplog)


def _in_terminal(command: list[str], timeout_s: float = 120.0) -> tuple[int, bytes]:
    """Run ``command`` with a pseudo-terminal as its stdin, stdout and stderr: (exit status, what it showed)."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # rows, columns: a real size
    process = subprocess.Popen(command, stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    shown, deadline = [], time.monotonic() + timeout_s
    try:
        while select.select([controller], [], [], max(0.0, deadline - time.monotonic()))[0]:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the command exited and closed the terminal (Linux)
                break
            if not chunk:
                break
            shown.append(chunk)
        return process.wait(timeout=max(1.0, deadline - time.monotonic())), b"".join(shown)
    finally:
        process.kill()
        os.close(controller)


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_a_terminal_gets_bars_and_a_pipe_gets_a_few_log_lines(tiny_data: Path, tmp_path: Path) -> None:
    # Each run decodes and hashes afresh (a cache folder of its own): four steps with progress.
    info = [sys.executable, "-m", "edgemri", "data", "info", str(tiny_data), "--cache-dir"]
    status, shown = _in_terminal([*info, str(tmp_path / "terminal")])
    assert status == 0, shown[-2000:]
    for step in (b"decode Training", b"decode Testing", b"hash Training", b"hash Testing"):
        assert re.search(REDRAWN.pattern + re.escape(step) + rb": +100%\|", shown), step
    assert b"decode Training: started" not in shown  # a bar, not log lines

    piped = subprocess.run([*info, str(tmp_path / "pipe")], capture_output=True, timeout=120)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert not REDRAWN.search(piped.stderr + piped.stdout)
    progress = [line for line in piped.stderr.decode().splitlines() if re.match(r"edgemri: (decode|hash) ", line)]
    assert progress[0] == "edgemri: decode Training: started, 160 images"
    assert progress[1].startswith("edgemri: decode Training: finished 160 images in ")
    assert len(progress) <= 4 * 3  # start and end per step (and a line per 20 s, should one take that long)
