"""Run the Flower app on a private SuperLink and leave nothing behind.

Flower's default ``local`` connection starts a detached SuperLink on a fixed port that
stays up and is shared with whatever else listens there. Instead each run gets its
own ``FLWR_HOME`` inside the run folder, its own SuperLink on a free port, runtime
dependency installation disabled (the pinned torch stays), and a cleanup that stops
every process it started, Ray's included, even when the run fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from edgemri.core.errors import EdgemriError
from edgemri.core.io import write_text

VENV_BIN = Path(sys.executable).parent
PR_SET_PDEATHSIG = 1  # prctl(2)  # flwr and flower-* are installed beside this python


class FlowerRunError(EdgemriError):
    """The Flower run did not start or did not complete; the message says where to look."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string escapes like JSON


def flower_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every flwr / flower-* process of a run."""
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(extra or {})}


def write_connection(home: Path, name: str, address: str, *, root_certificates: Path | None = None) -> None:
    """A connection entry in FLWR_HOME/config.toml (TLS when a CA certificate is given)."""
    security = (f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true")
    write_text(home / "config.toml",
               f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n')


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def processes_under(root: Path) -> list[psutil.Process]:
    """Live processes whose FLWR_HOME lies under ``root``: every flwr and flower-* process of a run or deployment
    started here (``flower_env``), and Ray's workers, which inherit it."""
    roots = {Path(root), Path(root).resolve()}  # FLWR_HOME is written as the caller spelled the folder
    found = []
    for process in psutil.process_iter(["environ", "status"]):
        home = (process.info["environ"] or {}).get("FLWR_HOME")  # None: another user's process
        if home and any(Path(home).is_relative_to(r) for r in roots) and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def stop_group(pgid: int, term_wait_s: float = 5.0, *, kill: bool = False) -> None:
    """SIGTERM a process group, then SIGKILL what is left (Ray agents ignore SIGTERM); ``kill``: SIGKILL at once."""
    steps = ((signal.SIGKILL, 2.0),) if kill else ((signal.SIGTERM, term_wait_s), (signal.SIGKILL, 2.0))
    for sig, wait_s in steps:
        if not _group_members(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)


@dataclass
class ManagedProcess:
    """A Flower process in its own session; stopping it stops its whole tree."""

    process: subprocess.Popen
    log: Path
    groups: set[int] = field(default_factory=set)

    def remember_children(self) -> None:
        """SuperLink and SuperNode start SuperExec/ClientApp processes in new sessions."""
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self.groups.add(os.getpgid(child.pid))
        except (psutil.Error, ProcessLookupError):
            pass

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the process tree: the children first, at once, then the process itself with ``sig``.

        The children (SuperExec, the ServerApp or ClientApp processes, Ray) are killed, not asked: Flower's
        SIGTERM handler ends a process's main thread, and Python then waits for its other threads, so a
        simulation's ServerApp thread would train its remaining rounds (and spend DP budget) after the user
        said stop. Everything edgemri writes is atomic, so whatever was saved stays loadable."""
        self.remember_children()
        for group in self.groups - {self.process.pid}:
            stop_group(group, kill=True)
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.remember_children()  # whatever it started while it stopped
        for group in self.groups | {self.process.pid}:  # its own group too: children it left in it
            stop_group(group)


def die_with_parent() -> None:
    """In a child before it executes: SIGTERM it when the process that started it dies, even by SIGKILL, so a
    killed ``edgemri`` leaves no SuperLink or ``flwr run`` behind (Linux; elsewhere the stop in ``finally`` is
    the only guard). The kernel ties this to the starting thread: start these processes from the main thread."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_process(args: list[str], env: dict[str, str], log: Path, cwd: Path, niceness: int = 0) -> ManagedProcess:
    """Start ``args`` in its own session, its output appended to ``log``; ``niceness`` added to its own (its
    children inherit it)."""
    def prepare() -> None:
        die_with_parent()
        os.nice(niceness)

    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=prepare)
    return ManagedProcess(process, log)


def wait_healthy(link: ManagedProcess, port: int, timeout_s: float = 60.0, scheme: str = "http") -> None:
    deadline = time.monotonic() + timeout_s
    context = None
    if scheme == "https":  # a health probe on loopback: the link's self-signed certificate is not checked here
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    while True:
        if link.process.poll() is not None:
            raise FlowerRunError(f"flower-superlink exited with {link.process.returncode}; see {link.log}")
        try:
            urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=1, context=context)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise FlowerRunError(f"flower-superlink did not come up in {timeout_s:.0f} s; see {link.log}") from None
            time.sleep(0.2)


@dataclass
class RunOutcome:
    run_id: str | None
    status: str
    details: str
    seconds: float
    output: str = ""  # what `flwr run` streamed in this invocation (the log file also holds earlier ones)

    @property
    def error(self) -> str:
        """The ServerApp's one-line error in this invocation's output, if it logged one."""
        lines = self.output.splitlines()
        return next((line.split("edgemri: error: ", 1)[1] for line in reversed(lines) if "edgemri: error: " in line),
                    "")

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


UNANSWERED = "unanswered"  # `flwr ls` timed out: a SuperLink too busy to answer, its run maybe still going
LIVE_STATUSES = ("pending", "starting", "running", UNANSWERED)  # Flower's statuses before "finished:...", and ours
STATUS_POLL_S = 5.0  # `flwr ls` starts a Python process: asked at most this often
STATUS_TIMEOUT_S = 60.0
STATUS_GIVE_UP_S = 300.0  # a run whose `flwr ls` fails this long in a row is taken as gone ("unknown")


def _listed_status(run_id: str, connection: str, env: dict[str, str]) -> tuple[str, str]:
    """(status, details) of a run as `flwr ls` lists it; UNANSWERED when it times out, "unknown" (with what it
    said) when it fails: the SuperLink is gone."""
    try:
        listing = subprocess.run([str(VENV_BIN / "flwr"), "ls", connection, "--run-id", run_id, "--format", "json"],
                                 env=env, capture_output=True, text=True, timeout=STATUS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return UNANSWERED, f"`flwr ls` did not answer in {STATUS_TIMEOUT_S:.0f} s"
    try:
        run = json.loads(listing.stdout)["runs"][0]
        return run["status"], run.get("status-details", "")
    except (json.JSONDecodeError, KeyError, IndexError):
        return "unknown", listing.stdout[-2000:] + listing.stderr[-2000:]


def _output_since(log: Path, offset: int) -> str:
    """What this run wrote to ``log``, which every resume appends to, from byte ``offset`` on."""
    with log.open("rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


def _append_whole_log(run_id: str, connection: str, env: dict[str, str], log: Path) -> None:
    """Append the run's whole log as the SuperLink keeps it (`flwr log --show`), after a marker line."""
    with log.open("ab") as out:
        out.write(f"\n--- the log stream ended before run {run_id}: its whole log (flwr log --show) ---\n".encode())
        out.flush()
        with contextlib.suppress(subprocess.TimeoutExpired):  # a SuperLink that does not answer: nothing more
            subprocess.run([str(VENV_BIN / "flwr"), "log", run_id, connection, "--show"], env=env, stdout=out,
                           stderr=subprocess.STDOUT, timeout=STATUS_TIMEOUT_S)


def staged_app(app_dir: Path, into: Path) -> Path:
    """A copy of ``app_dir`` for `flwr run` to pack, less what its FAB never holds: hidden entries (``.git``)
    and the top-level folders its ``.gitignore`` names (``.venv/``, ``runs/``). Flower's FAB builder walks and
    resolves every file under the app before it filters them, which took about 10 s a run in a repository with
    its virtual environment and run folders inside (over 100,000 files). Flower still applies its own rules
    (``.gitignore``, its include and exclude patterns) to the copy, so the FAB is the same, unless a hidden
    folder holds a file Flower would pack (a ``.toml`` under ``.git``, say)."""
    ignore = app_dir / ".gitignore"
    lines = ignore.read_text(errors="replace").splitlines() if ignore.is_file() else []
    folders = [line.strip().strip("/") for line in lines if line.strip().endswith("/")]
    folders = [pattern for pattern in folders if pattern and "/" not in pattern]
    into.mkdir(parents=True, exist_ok=True)
    for entry in app_dir.iterdir():
        hidden = entry.name.startswith(".") and entry.name != ".gitignore"
        if hidden or entry.is_symlink() or any(fnmatch.fnmatch(entry.name, p) for p in folders):
            continue
        if entry.is_dir():
            shutil.copytree(entry, into / entry.name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(entry, into / entry.name)
    return into


def flwr_run(app_dir: Path, connection: str, env: dict[str, str], log: Path, *, run_config: dict[str, Any],
             federation_config: str | None = None, timeout_s: float = 3600.0,
             on_poll: Callable[[], None] | None = None, link_alive: Callable[[], bool] | None = None) -> RunOutcome:
    """`flwr run --stream`, then the run's real status from `flwr ls` (the CLI exits 0 on failure, and can exit
    before the run ends: then ``flwr ls`` is asked again, at most every STATUS_POLL_S, until the run ends, the
    SuperLink is gone, or ``timeout_s``). ``link_alive``: whether the SuperLink's process still runs, where the
    caller started it; once it has exited, a status that cannot be read is final at once."""
    started = time.monotonic()
    run_config_file = log.with_name("run_config.toml")
    write_text(run_config_file, "".join(f'"{k}" = {_toml_value(v)}\n' for k, v in run_config.items()))
    timed_out = False
    with tempfile.TemporaryDirectory(prefix="edgemri-app-") as staging, log.open("ab") as out:
        app = staged_app(app_dir, Path(staging) / app_dir.name)
        args = [str(VENV_BIN / "flwr"), "run", str(app), connection, "--stream", "--run-config", str(run_config_file)]
        if federation_config:
            args += ["--federation-config", federation_config]
        offset = out.tell()  # the log is appended to by every resume: this run's lines start here
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout_s
        while process.poll() is None:  # poll, so the caller can show progress while the run goes on
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                timed_out = True
                break
            time.sleep(0.5)
            if on_poll:
                on_poll()
    text = _output_since(log, offset)
    match = re.search(r"Successfully started run (\d+)", text)
    if not match:
        return RunOutcome(None, "not-started", text[-3000:], time.monotonic() - started, text)
    run_id = match.group(1)
    status, details = ("", "") if timed_out else _listed_status(run_id, connection, env)
    # `flwr run --stream` can exit while its run goes on (a SuperLink too busy to keep the log stream drops it):
    # the run's own status, not the CLI's exit, says when it is over.
    # A `flwr ls` that fails ("unknown") is asked again for STATUS_GIVE_UP_S: a SuperLink too busy to answer
    # fails it as one that is gone does, and taking a live run for ended would start a second one beside it.
    asked, stream_ended, failing_since = 0, time.monotonic(), None
    while time.monotonic() <= deadline:
        failing_since = (failing_since or time.monotonic()) if status == "unknown" else None
        link_gone = link_alive is not None and not link_alive()
        if status not in LIVE_STATUSES and (failing_since is None or link_gone or
                                            time.monotonic() - failing_since > STATUS_GIVE_UP_S):
            break
        time.sleep(min(STATUS_POLL_S, 0.25 * 2**asked))  # the status often turns final a moment after the stream
        asked += 1
        if on_poll:
            on_poll()
        status, details = _listed_status(run_id, connection, env)
    # A run still live a poll interval after its stream: the stream ended early, and the rest of the run's log
    # (the ServerApp's warnings) would be lost without this.
    if time.monotonic() - stream_ended > STATUS_POLL_S:
        _append_whole_log(run_id, connection, env, log)
        text = _output_since(log, offset)
    if timed_out or status in LIVE_STATUSES:
        with contextlib.suppress(subprocess.TimeoutExpired):  # a SuperLink that does not answer: nothing to stop
            subprocess.run([str(VENV_BIN / "flwr"), "stop", run_id, connection], env=env, capture_output=True,
                           timeout=STATUS_TIMEOUT_S)
        details = _listed_status(run_id, connection, env)[1]
        status, details = "timed-out", f"no result after {timeout_s:.0f} s; {details}"
    return RunOutcome(run_id, status, details, time.monotonic() - started, text)


@contextmanager
def simulation_superlink(run_dir: Path) -> Iterator[tuple[dict[str, str], str, ManagedProcess]]:
    """A private SuperLink in simulation mode; yields (env, connection name, its process)."""
    home = run_dir / "flwr_home"
    home.mkdir(parents=True, exist_ok=True)
    # Ray's unix socket paths must stay under 108 characters: a short temp folder.
    ray_tmp = Path(tempfile.mkdtemp(prefix="edgemri-ray-", dir="/tmp"))
    # Ray starts its workers (the ClientApp actors) at niceness 15, below Flower's own simulation process, whose
    # loop polls every virtual SuperNode: the clients' work would wait on the polling. Ray's system config (RAY_*).
    env = flower_env(home, {"RAY_TMPDIR": str(ray_tmp), "RAY_worker_niceness": "0"})
    port = free_port()
    write_connection(home, "sim", f"127.0.0.1:{port}")
    link = start_process([str(VENV_BIN / "flower-superlink"), "--insecure", "--simulation",
                          "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
                          "--database", str(run_dir / "superlink.db")], env, run_dir / "logs" / "superlink.log",
                         cwd=run_dir)
    try:
        wait_healthy(link, port)
        yield env, "sim", link
    finally:
        link.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def run_simulation(app_dir: Path, run_dir: Path, run_config: dict[str, Any], *, num_supernodes: int,
                   num_cpus: int = 1, timeout_s: float = 3600.0, on_poll: Callable[[], None] | None = None
                   ) -> RunOutcome:
    """The app in Flower's simulation engine, one virtual SuperNode per client."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with simulation_superlink(run_dir) as (env, connection, link):
        outcome = flwr_run(app_dir, connection, env, run_dir / "logs" / "flwr-run.log", run_config=run_config,
                           federation_config=f"num-supernodes={num_supernodes} client-resources-num-cpus={num_cpus}",
                           timeout_s=timeout_s, on_poll=on_poll, link_alive=lambda: link.process.poll() is None)
    return outcome
