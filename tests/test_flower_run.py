"""`flwr_run` against a stand-in `flwr` command: it waits on the run's own status when the log stream ends early,
and then keeps the run's whole log."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from edgemri.simulation import flower_run

# `flwr run` prints that the run started and exits (its stream ended); `flwr ls` fails the first FAILING times it
# is asked (a SuperLink too busy), lists the run as running the next LIVE times, then finished; `flwr log --show`
# prints the run's whole log.
FAKE_FLWR = """#!{python}
import json, pathlib, sys
calls = pathlib.Path(sys.argv[0]).with_name("ls-calls")
if sys.argv[1] == "run":
    print("Successfully started run 42")
elif sys.argv[1] == "ls":
    asked = int(calls.read_text()) if calls.exists() else 0
    calls.write_text(str(asked + 1))
    if asked < {failing}:
        sys.exit("Connection to the SuperLink is unavailable.")
    status = "running" if asked < {failing} + {live} else "finished:completed"
    print(json.dumps({{"runs": [{{"run-id": 42, "status": status, "status-details": ""}}]}}))
elif sys.argv[1] == "log":
    print("WARNING: round 2: reply from unknown or repeated node 7 ignored")
"""


def _fake_flwr(folder: Path, live: int, failing: int = 0) -> Path:
    flwr = folder / "flwr"
    flwr.write_text(FAKE_FLWR.format(python=sys.executable, live=live, failing=failing))
    flwr.chmod(flwr.stat().st_mode | stat.S_IXUSR)
    return folder


@pytest.mark.parametrize(("live", "failing"), [(0, 0), (4, 0), (2, 3)])
def test_a_run_outliving_its_stream_is_awaited_and_its_whole_log_kept(
        live: int, failing: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(2, 3): `flwr ls` failed 3 times first (a SuperLink too busy); the run was live all along."""
    monkeypatch.setattr(flower_run, "VENV_BIN", _fake_flwr(tmp_path, live, failing))
    monkeypatch.setattr(flower_run, "STATUS_POLL_S", 0.3)
    (tmp_path / "app").mkdir()
    log = tmp_path / "logs" / "flwr-run.log"
    log.parent.mkdir()
    outcome = flower_run.flwr_run(tmp_path / "app", "sim", {}, log, run_config={"run-dir": "x"}, timeout_s=60)
    assert (outcome.run_id, outcome.status) == ("42", "finished:completed")
    assert int((tmp_path / "ls-calls").read_text()) == failing + live + 1  # asked until final, no more
    whole = "reply from unknown or repeated node 7 ignored"
    # Right away final: the stream had it all. Live for a while: the stream ended early, the whole log follows.
    assert (whole in log.read_text()) == (whole in outcome.output) == bool(live)


def test_a_run_whose_status_cannot_be_read_for_long_is_given_up_as_unknown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flower_run, "VENV_BIN", _fake_flwr(tmp_path, 0, failing=10**6))
    monkeypatch.setattr(flower_run, "STATUS_POLL_S", 0.2)
    monkeypatch.setattr(flower_run, "STATUS_GIVE_UP_S", 2.0)
    (tmp_path / "app").mkdir()
    log = tmp_path / "flwr-run.log"
    outcome = flower_run.flwr_run(tmp_path / "app", "sim", {}, log, run_config={}, timeout_s=60)
    assert outcome.status == "unknown" and "unavailable" in outcome.details
    assert 3 <= int((tmp_path / "ls-calls").read_text()) < 30  # asked again for 2 s, then given up


def test_a_status_that_cannot_be_read_once_our_superlink_has_exited_is_final_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulation's private SuperLink died: nobody will answer `flwr ls` again, so no minutes are spent asking."""
    monkeypatch.setattr(flower_run, "VENV_BIN", _fake_flwr(tmp_path, 0, failing=10**6))
    monkeypatch.setattr(flower_run, "STATUS_POLL_S", 0.2)
    (tmp_path / "app").mkdir()
    outcome = flower_run.flwr_run(tmp_path / "app", "sim", {}, tmp_path / "flwr-run.log", run_config={},
                                  timeout_s=60, link_alive=lambda: False)
    assert outcome.status == "unknown" and outcome.seconds < 20
    assert int((tmp_path / "ls-calls").read_text()) == 1  # the first failure is final: never asked again
