"""The warm ClientApp launcher (deploy/warm.py) with real processes: ``edgemri client serve`` and its shim.

The tasks here are Flower's own ``flwr-clientapp`` command run through the shim: ``--help``, bad arguments,
and a task that waits for a Runtime API that is not there (so that it is still running when it is crashed
or its caller killed). The deployment test (tests/test_deploy.py) runs whole rounds through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from edgemri.deploy import warm_shim
from edgemri.deploy.errors import DeployError
from edgemri.deploy.warm import COMMAND, MAGIC, MAX_CONNECTIONS, listen, parse_request, warm_paths, write_shim
from edgemri.deploy.warm_shim import HEADER, REQUEST_TIMEOUT_S
from edgemri.simulation.flower_run import VENV_BIN

TOKEN = "ab" * 32
WAITING = ["--runtime-api-address", "127.0.0.1:9", "--token", TOKEN, "--insecure"]  # retries, never connects


class Served:
    def __init__(self, folder: Path, process: subprocess.Popen, log: Path) -> None:
        self.folder, self.process, self.log = folder, process, log
        self.socket, bin_dir = warm_paths(folder)
        self.shim = bin_dir / COMMAND

    def children(self) -> list[int]:
        return [int(pid) for pid in re.findall(r": ClientApp in child (\d+)", self.log.read_text(errors="replace"))]

    def run(self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.shim), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              env=env)

    def start(self, *args: str) -> subprocess.Popen:
        known = len(self.children())
        shim = subprocess.Popen([str(self.shim), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait(lambda: len(self.children()) > known, "the launcher to fork the task")
        return shim


def _wait(check, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    folder = Path(tempfile.mkdtemp(prefix="emw-"))  # short: Unix socket paths are limited to ~107 bytes
    log = folder.parent / f"{folder.name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(VENV_BIN / "edgemri"), "client", "serve", "--dir", str(folder),
                                    "--preload", "json"], stdout=out, stderr=subprocess.STDOUT)
    launcher = Served(folder, process, log)
    try:
        _wait(lambda: launcher.shim.is_file() and launcher.socket.is_socket() or process.poll() is not None,
              "the launcher to listen")
        assert process.poll() is None, log.read_text()
        yield launcher
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
        log.unlink(missing_ok=True)


def test_a_task_runs_flowers_own_command_in_a_child_with_the_callers_streams(served: Served) -> None:
    done = served.run("--help")
    assert done.returncode == 0, done.stderr
    assert "usage: flwr-clientapp" in done.stdout  # the child wrote to the shim's own stdout
    assert served.children() and served.children()[-1] != served.process.pid


def test_a_task_gets_the_callers_folder_and_its_exit_code_comes_back(served: Served, tmp_path: Path) -> None:
    (tmp_path / "token.txt").write_text("  \n")
    done = served.run("--token-file", "token.txt", cwd=tmp_path)  # relative: found only in the caller's folder
    assert done.returncode == 1
    assert "does not contain a token" in done.stderr
    missing = served.run("--bogus")
    assert missing.returncode == 2 and "one of the arguments --token --token-file is required" in missing.stderr


def test_a_task_that_crashes_ends_only_its_child(served: Served) -> None:
    crashing = served.start(*WAITING)
    child = served.children()[-1]
    running = served.start(*WAITING)  # forked after the first task's connection existed: it must not hold it
    os.kill(child, signal.SIGSEGV)
    assert crashing.wait(timeout=30) == 128 + signal.SIGSEGV  # what a cold process killed by SIGSEGV returns
    assert served.process.poll() is None and running.poll() is None  # the other task runs on
    assert served.run("--help").returncode == 0  # the launcher takes the next task
    assert f"child {child} exited on signal {int(signal.SIGSEGV)}" in served.log.read_text()
    running.kill()
    running.wait(timeout=10)


def test_a_task_whose_import_time_environment_differs_runs_cold(served: Served) -> None:
    before = len(served.children())
    done = served.run("--help", env={**os.environ, "FLWR_LOG_LEVEL": "DEBUG"})
    assert done.returncode == 0 and "usage: flwr-clientapp" in done.stdout  # Flower's own process answered
    assert "FLWR_LOG_LEVEL differ from the launcher's" in done.stderr and "running the task cold" in done.stderr
    assert len(served.children()) == before


def test_a_killed_caller_takes_its_child_with_it(served: Served) -> None:
    shim = served.start(*WAITING)
    child = served.children()[-1]
    shim.kill()
    shim.wait(timeout=10)
    _wait(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE,
          "the orphaned task to stop", 30)
    assert served.run("--help").returncode == 0


def test_a_bad_request_is_refused_in_one_line_and_the_launcher_keeps_serving(served: Served) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(served.socket))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")  # no header, no descriptors
        reply = s.recv(4096).decode()
    assert reply.startswith("error ") and reply.count("\n") == 1
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(served.socket))
        body = json.dumps({"argv": ["sh", "-c", "id"], "cwd": "/", "env": {}}).encode()
        socket.send_fds(s, [MAGIC + len(body).to_bytes(4, "big")], [0, 1, 2])
        s.sendall(body)
        assert "starting with 'flwr-clientapp'" in s.recv(4096).decode()
    assert served.run("--help").returncode == 0


def _connect(served: Served) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(served.socket))
    return conn


def _still_waiting(conn: socket.socket) -> bool:
    """The launcher has neither answered nor closed this connection."""
    conn.setblocking(False)
    try:
        conn.recv(1)
    except BlockingIOError:
        return True
    finally:
        conn.setblocking(True)
    return False


def test_idle_connections_do_not_delay_a_task(served: Served) -> None:
    idle = [_connect(served) for _ in range(4)]  # the failing case: they held a real task up for 19.7 s
    try:
        before = len(served.children())
        started = time.monotonic()
        done = served.run("--help")
        assert done.returncode == 0 and "running the task cold" not in done.stderr, done.stderr
        assert time.monotonic() - started < 3.0 < REQUEST_TIMEOUT_S
        assert len(served.children()) == before + 1  # served warm, while the idle ones are still open
        assert all(map(_still_waiting, idle))
        idle[0].settimeout(2 * REQUEST_TIMEOUT_S)  # each idle one is dropped at its own deadline
        assert re.fullmatch(rf"error .*more than {REQUEST_TIMEOUT_S:.0f} s to arrive\n", idle[0].recv(4096).decode())
    finally:
        for conn in idle:
            conn.close()


def test_a_task_does_not_hold_the_streams_of_a_request_still_arriving(served: Served) -> None:
    read_end, write_end = os.pipe()
    try:
        with _connect(served) as stalled:
            socket.send_fds(stalled, [MAGIC + HEADER.pack(1000)], [write_end] * 3)  # then nothing more
            os.close(write_end)
            running = served.start(*WAITING)  # forked while the launcher holds the stalled caller's streams
            stalled.settimeout(2 * REQUEST_TIMEOUT_S)
            assert "more than" in stalled.recv(4096).decode()  # dropped at its deadline, its streams closed
            assert select.select([read_end], [], [], 10)[0] and os.read(read_end, 1) == b""  # by the task too
            assert running.poll() is None
            running.kill()
            running.wait(timeout=10)
    finally:
        os.close(read_end)


def _framed(body: bytes, declared: int | None = None) -> tuple[bytes, bytes]:
    """(the shim's header for ``body``, declaring ``declared`` bytes if given, and the body)."""
    return MAGIC + HEADER.pack(len(body) if declared is None else declared), body


DEEP = b"[" * 200_000 + b"]" * 200_000
HUGE_INTEGER = b'{"argv": [' + b"9" * 600_000 + b'], "cwd": "/", "env": {}}'


@pytest.mark.parametrize("header, body, reply", [
    pytest.param(*_framed(DEEP), "is not valid JSON", id="deep JSON"),
    pytest.param(*_framed(HUGE_INTEGER), "an integer of 600000 digits", id="a huge integer"),
    pytest.param(b"\xff\x00" * 2048, b"", "must start with the launcher's header", id="garbage bytes"),
    pytest.param(*_framed(b'{"argv": [', 1000), "ended after 10 of 1000 bytes", id="a half-sent request"),
    pytest.param(b"", b"", None, id="a caller that hangs up"),
])
def test_a_bad_request_ends_only_its_connection_with_one_log_line(served: Served, header: bytes, body: bytes,
                                                                   reply: str | None) -> None:
    logged = len(served.log.read_text(errors="replace").splitlines())
    with _connect(served) as conn:
        with contextlib.suppress(BrokenPipeError):  # the launcher may refuse before it has read everything
            if header.startswith(MAGIC):
                socket.send_fds(conn, [header], [0, 1, 2])
            else:
                conn.sendall(header)
            conn.sendall(body)
            conn.shutdown(socket.SHUT_WR)  # the caller sends no more: it stopped half-way, or at the end
        if reply is not None:
            conn.settimeout(30)
            answer = conn.recv(4096).decode()
            assert answer.startswith("error ") and answer.count("\n") == 1 and reply in answer, answer
    _wait(lambda: len(served.log.read_text(errors="replace").splitlines()) > logged, "the refusal to be logged")
    before = len(served.children())
    assert served.run("--help").returncode == 0 and len(served.children()) == before + 1  # the next task runs warm
    new_lines = served.log.read_text(errors="replace").splitlines()[logged:]
    assert len([line for line in new_lines if "refused" in line]) == 1, new_lines
    assert served.process.poll() is None and "Traceback" not in served.log.read_text(errors="replace")


def test_connections_over_the_bound_are_refused_at_once_and_their_tasks_run_cold(served: Served) -> None:
    refused = served.log.read_text(errors="replace").count(" refused")
    held = [_connect(served) for _ in range(MAX_CONNECTIONS)]
    try:
        with _connect(served) as extra:
            extra.settimeout(REQUEST_TIMEOUT_S / 2)  # answered at once, not queued behind the held ones
            assert re.fullmatch(r"error .*busy.*\n", extra.recv(4096).decode())
        assert _still_waiting(held[0])
        done = served.run("--help")
        assert done.returncode == 0 and "running the task cold" in done.stderr
    finally:
        for conn in held:
            conn.close()
    # the extra one, the shim's and each held one: refused once hung up (or at its deadline, if the cold run was slow)
    _wait(lambda: served.log.read_text(errors="replace").count(" refused") >= refused + MAX_CONNECTIONS + 2,
          "the launcher to drop the held connections")
    before = len(served.children())
    assert served.run("--help").returncode == 0 and len(served.children()) == before + 1


@pytest.mark.parametrize("body, message", [
    (b"\xff", "the request is not UTF-8"),
    (b'{"argv": ["flwr-clientapp"], "argv": ["sh"], "cwd": "/", "env": {}}', "duplicate key 'argv'"),
    (b"[]", "the request is a JSON list, not an object"),
    (json.dumps({"argv": [COMMAND], "cwd": "/", "env": {}, "more": 1}).encode(), "unexpected: more"),
    (json.dumps({"argv": [], "cwd": "/", "env": {}}).encode(), "starting with 'flwr-clientapp'"),
    (json.dumps({"argv": [COMMAND, "a\0b"], "cwd": "/", "env": {}}).encode(), "without NUL bytes"),
    (json.dumps({"argv": [COMMAND], "cwd": "relative", "env": {}}).encode(), "absolute path"),
    (json.dumps({"argv": [COMMAND], "cwd": "/", "env": {"A": 1}}).encode(), "key 'env' has value"),
])
def test_requests_are_validated_before_anything_runs(body: bytes, message: str) -> None:
    with pytest.raises(DeployError, match=re.escape(message)):
        parse_request(body)


def test_the_socket_needs_a_private_folder_and_one_launcher(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(DeployError, match="mode 0700"):
        listen(shared / "launcher.sock")
    private = Path(tempfile.mkdtemp(prefix="emw-"))
    try:
        first = listen(private / "launcher.sock")
        with pytest.raises(DeployError, match="already listens"):
            listen(private / "launcher.sock")
        first.close()
        listen(private / "launcher.sock").close()  # a stale socket file of a dead launcher is replaced
    finally:
        shutil.rmtree(private, ignore_errors=True)


def test_the_launchers_folders_are_private_whatever_the_umask() -> None:
    folder = Path(tempfile.mkdtemp(prefix="emw-"))
    warm = folder / "new" / "warm"
    umask = os.umask(0)  # the failing case for `edgemri deploy`: folders made 0777
    try:
        listen(warm / "launcher.sock").close()
        shim = write_shim(warm / "bin", warm / "launcher.sock")
        modes = [stat.S_IMODE(path.stat().st_mode) for path in (folder / "new", warm, warm / "bin", shim)]
    finally:
        os.umask(umask)
        shutil.rmtree(folder, ignore_errors=True)
    assert modes == [0o700, 0o700, 0o700, 0o755]


def test_the_shim_is_the_packages_file_run_by_this_interpreter_with_its_settings_beside(tmp_path: Path) -> None:
    shim = write_shim(tmp_path / "bin", tmp_path / "launcher.sock")
    first, source = shim.read_bytes().split(b"\n", 1)
    assert first == f"#!{sys.executable} -IS".encode() and source == Path(warm_shim.__file__).read_bytes()
    assert os.access(shim, os.X_OK)
    settings = json.loads(Path(f"{shim}{warm_shim.SETTINGS_SUFFIX}").read_text())
    assert settings["socket"] == str(tmp_path / "launcher.sock") and Path(settings["real"]).name == COMMAND


def test_a_shim_that_finds_no_launcher_runs_the_real_command_and_one_without_settings_says_so(tmp_path: Path) -> None:
    shim = write_shim(tmp_path / "bin", tmp_path / "nobody.sock")
    done = subprocess.run([str(shim), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "usage: flwr-clientapp" in done.stdout
    Path(f"{shim}{warm_shim.SETTINGS_SUFFIX}").unlink()
    broken = subprocess.run([str(shim), "--help"], capture_output=True, text=True, timeout=60)
    assert broken.returncode == 2 and broken.stdout == "" and broken.stderr.count("\n") == 1
    assert "cannot read" in broken.stderr


@pytest.mark.parametrize("line, code", [("exit 0", 0), ("exit 3", 3), ("exit -11", 139), ("exit", None),
                                        ("exit x", None), ("started 12", None), ("", None)])
def test_the_shim_exits_with_the_tasks_code_as_a_cold_process_would(line: str, code: int | None) -> None:
    assert warm_shim.task_exit_code(line) == code


def test_without_a_launcher_the_shim_runs_the_real_command(served: Served) -> None:
    served.process.send_signal(signal.SIGTERM)  # last test of the module: it stops the launcher
    assert served.process.wait(timeout=30) == 0
    assert not served.socket.exists()  # removed on a clean stop
    before = len(served.children())
    done = served.run("--help")
    assert done.returncode == 0 and "usage: flwr-clientapp" in done.stdout
    assert len(served.children()) == before  # Flower's own process answered
