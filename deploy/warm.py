"""A warm ClientApp launcher: the stack imported once, each ClientApp task in a child forked from it.

Flower 1.42 runs every message in a fresh ``flwr-clientapp`` process: its SuperExec starts the
command by name from ``PATH`` for each task, so each round pays Python's start, the import of
torch, Flower and the app, and Python's exit. The launcher keeps to that public contract and
changes only who answers the command:

- ``serve`` imports the modules a task needs (``DEFAULT_PRELOAD``) and Flower's ``flwr-clientapp``
  command itself, found by its console-script name, then listens on a Unix socket.
- ``write_shim`` puts a small ``flwr-clientapp`` (``deploy/warm_shim.py``, stdlib only) into a folder
  that goes first on the SuperNode's ``PATH``. The SuperExec starts it as it would the real command;
  it hands its arguments, working folder, environment and standard streams (file descriptors) to the
  launcher and exits with the task's exit code. When no launcher answers, it runs the real command.
- For each task the launcher forks a child that runs Flower's ``flwr-clientapp`` with exactly those
  arguments, environment and streams: the child pulls its task, runs the ClientApp and pushes the
  reply as a cold process would, then ends without Python's teardown.

A child that crashes (an exception, a signal, a segfault) ends only itself: its exit status goes
back to the SuperExec through the shim, and the launcher takes the next task. A shim that is
killed takes its child with it (SIGTERM, so Flower's own exit handler pushes the task's status).
Only processes of the launcher's own user may connect (the socket's folder is 0700 and the peer's
uid is checked). POSIX only (fork, descriptor passing).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.resources
import logging
import os
import selectors
import shutil
import signal
import socket
import stat
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemri.core.io import write_bytes, write_json
from edgemri.core.untrusted import Check, check_record, list_of, mapping_of, parse_json
from edgemri.deploy.errors import DeployError
from edgemri.deploy.warm_shim import COMMAND, HEADER, MAGIC, SETTINGS_SUFFIX

log = logging.getLogger("edgemri.launcher")

# What a ClientApp task imports: this project's ClientApp (torch with it) and Opacus, which a client imports
# only when it trains with DP-SGD, as a phone does. Flower's command is always loaded.
DEFAULT_PRELOAD = ("edgemri.clients.client_app", "opacus")
MAX_REQUEST_BYTES = 1 << 20
MAX_ARGS, MAX_ARG_CHARS, MAX_ENV_ENTRIES = 64, 4096, 4096
REQUEST_TIMEOUT_S = 5.0  # the shim sends its request at once; a silent peer is dropped
STOP_WAIT_S = 10.0  # on shutdown, how long running tasks get to push their final status
MAX_SOCKET_PATH_BYTES = 100  # AF_UNIX paths are limited to ~107 bytes
# Read once, when the launcher imported its stack: a task whose environment sets them otherwise runs cold
# (Flower's telemetry switch and log level, the thread pools' sizes, the module search path).
IMPORT_TIME_ENV = ("FLWR_TELEMETRY_ENABLED", "FLWR_LOG_LEVEL", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                   "OPENBLAS_NUM_THREADS", "PYTHONPATH")


def flwr_clientapp_command() -> Callable[[], object]:
    """Flower's ``flwr-clientapp`` command as a function: the console script its package registers."""
    found = importlib.metadata.entry_points(group="console_scripts", name=COMMAND)
    if not found:
        raise DeployError(f"no {COMMAND!r} console script is installed; install flwr 1.42 in this environment")
    return next(iter(found)).load()


def real_command(bin_dir: Path) -> Path:
    """The real ``flwr-clientapp`` executable: beside this interpreter, else on PATH outside ``bin_dir``."""
    beside = Path(sys.executable).parent / COMMAND
    if beside.is_file():
        return beside
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != bin_dir.resolve())
    found = shutil.which(COMMAND, path=path)
    if found is None:
        raise DeployError(f"no {COMMAND} executable beside {sys.executable} or on PATH; install flwr 1.42")
    return Path(found)


def write_shim(bin_dir: Path, socket_path: Path) -> Path:
    """Install ``bin_dir/flwr-clientapp`` (deploy/warm_shim.py, run by this interpreter) and its settings beside
    it: it hands each task to the launcher at ``socket_path``, or runs the real command when none answers."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / COMMAND
    write_json(Path(f"{shim}{SETTINGS_SUFFIX}"), {"socket": str(socket_path), "real": str(real_command(bin_dir))})
    source = importlib.resources.files(__package__).joinpath("warm_shim.py").read_bytes()
    return write_bytes(shim, f"#!{sys.executable} -IS\n".encode() + source, mode=0o755)


@dataclass(frozen=True)
class TaskRequest:
    """What the shim hands over: the command line, working folder and environment of one task."""

    argv: list[str]
    cwd: str
    env: dict[str, str]


def _string(limit: int) -> Check:
    """Any string a shell could pass (not only printable text), without NUL bytes, at most ``limit`` characters."""
    return Check(lambda v: isinstance(v, str) and "\0" not in v and len(v) <= limit,
                 f"a string without NUL bytes, at most {limit:,} characters")


_ARGUMENT = _string(MAX_ARG_CHARS)
_REQUEST = {  # what a shim sends: its command line, working folder and environment
    "argv": Check(lambda v: list_of(_ARGUMENT, 1, MAX_ARGS)(v) and v[0] == COMMAND,
                  f"a list of 1 to {MAX_ARGS} strings starting with {COMMAND!r}, each {_ARGUMENT.allowed}"),
    "cwd": Check(lambda v: _ARGUMENT(v) and Path(v).is_absolute(), "an absolute path"),
    "env": mapping_of(_string(256), _string(65_536), MAX_ENV_ENTRIES),
}


def parse_request(body: bytes) -> TaskRequest:
    """Validate a shim's request: JSON with exactly argv (``flwr-clientapp`` first), cwd and env."""
    request = check_record(parse_json(body, "the request", DeployError), _REQUEST, "the request", DeployError)
    return TaskRequest(list(request["argv"]), request["cwd"], dict(request["env"]))


def _exit_code(code: object) -> int:
    """What Python does with ``sys.exit(code)``: None is 0, an int itself, anything else printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def check_import_time_env(env: dict[str, str]) -> None:
    """Refuse a task whose environment differs from the launcher's where the stack read it at import."""
    differ = [name for name in IMPORT_TIME_ENV if env.get(name) != os.environ.get(name)]
    if differ:
        raise DeployError(f"the task's {', '.join(differ)} differ from the launcher's, which its imports already "
                          "read; start the launcher with the SuperNode's environment")


def run_task(command: Callable[[], object], request: TaskRequest, streams: Sequence[int]) -> int:
    """In the forked child: become the task's process (streams, folder, environment), run the command."""
    try:
        for target, fd in zip((0, 1, 2), streams, strict=True):
            os.dup2(fd, target)
            if fd != target:
                os.close(fd)
        for handler in logging.root.handlers[:]:  # the launcher's logging is not the task's: Flower sets its own
            logging.root.removeHandler(handler)
        os.chdir(request.cwd)
        os.environ.clear()
        os.environ.update(request.env)
        sys.argv = list(request.argv)
        command()
        return 0
    except SystemExit as done:
        return _exit_code(done.code)
    except BaseException:  # noqa: BLE001 - the child reports any failure as its exit code, like a cold process
        traceback.print_exc()
        return 1


def _receive(conn: socket.socket) -> tuple[TaskRequest, list[int]]:
    """Read a shim's header with its three stream descriptors, then its request; close the descriptors on error."""
    deadline = time.monotonic() + REQUEST_TIMEOUT_S  # for the whole request: a peer cannot trickle it
    conn.settimeout(REQUEST_TIMEOUT_S)
    head, fds, _, _ = socket.recv_fds(conn, len(MAGIC) + HEADER.size, 3)
    try:
        if len(fds) != 3 or not head.startswith(MAGIC) or len(head) != len(MAGIC) + HEADER.size:
            raise DeployError("the request must start with the launcher's header and three stream descriptors")
        (size,) = HEADER.unpack(head[len(MAGIC):])
        if size > MAX_REQUEST_BYTES:
            raise DeployError(f"the request is {size} bytes; allowed: at most {MAX_REQUEST_BYTES}")
        body = bytearray()
        while len(body) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeployError(f"the request took more than {REQUEST_TIMEOUT_S:.0f} s to arrive")
            conn.settimeout(left)
            chunk = conn.recv(min(65536, size - len(body)))
            if not chunk:
                raise DeployError(f"the request ended after {len(body)} of {size} bytes")
            body += chunk
        return parse_request(bytes(body)), fds
    except BaseException:
        _close_all(fds)
        raise


def _peer_uid(conn: socket.socket) -> int | None:
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


def _private_folder(folder: Path) -> None:
    """The socket's folder: created 0700, or an existing one that is ours and no one else's."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = folder.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise DeployError(f"{folder} must belong to this user with mode 0700 (it holds the launcher's socket); "
                          f"it is mode {stat.S_IMODE(info.st_mode):o}, uid {info.st_uid}")


def listen(socket_path: Path) -> socket.socket:
    """A Unix socket at ``socket_path`` in a private folder; a stale socket file from a dead launcher is replaced."""
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH_BYTES:
        raise DeployError(f"the launcher's socket {socket_path} is longer than {MAX_SOCKET_PATH_BYTES} bytes (a Unix "
                          "socket path limit); choose a shorter --dir")
    _private_folder(socket_path.parent)
    if socket_path.is_symlink() or (socket_path.exists() and not socket_path.is_socket()):
        raise DeployError(f"{socket_path} exists and is not a socket; remove it or choose another --dir")
    with contextlib.suppress(FileNotFoundError):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(socket_path))
            raise DeployError(f"a launcher already listens on {socket_path}")
        except ConnectionRefusedError:
            socket_path.unlink()
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen(64)
    return listener


@dataclass
class _Task:
    number: int
    conn: socket.socket
    started: float
    stopped: float | None = None  # when it was sent SIGTERM because its caller went away


class Launcher:
    """The serving loop: one thread, children forked from it, each child's exit sent back to its shim."""

    def __init__(self, listener: socket.socket, command: Callable[[], object]) -> None:
        self.listener, self.command = listener, command
        self.socket_path = listener.getsockname()
        self.selector = selectors.DefaultSelector()
        self.tasks: dict[int, _Task] = {}  # child pid -> its task
        self.count = 0
        self.stopping = False
        self.wake_read, self.wake_write = socket.socketpair()
        for end in (self.wake_read, self.wake_write):
            end.setblocking(False)

    def run(self) -> None:
        signal.set_wakeup_fd(self.wake_write.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that the wakeup fd sees it
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_read, selectors.EVENT_READ, "wake")
        log.info("warm launcher ready on %s (pid %d)", self.socket_path, os.getpid())
        try:
            while not self.stopping:
                for key, _ in self.selector.select(timeout=1.0):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            self.wake_read.recv(4096)
                    else:
                        self._shim_gone(key.data)
                self._reap()
                self._kill_overdue()
        finally:
            self._shutdown()

    def _stop(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError as err:  # out of file descriptors, say: the shim falls back to the real command
            log.warning("could not accept a task: %s", err)
            return
        fds: list[int] = []
        try:
            uid = _peer_uid(conn)
            if uid is not None and uid != os.getuid():
                raise DeployError(f"a process of uid {uid} connected; only uid {os.getuid()} may start tasks")
            request, fds = _receive(conn)
            check_import_time_env(request.env)
            pid = self._fork(conn, request, fds)
        except (DeployError, OSError) as err:
            log.warning("refused a task (it runs cold): %s", err)
            _close_all(fds)
            with contextlib.suppress(OSError):
                conn.sendall(f"error {err}\n".encode())
            conn.close()
            return
        _close_all(fds)
        self.count += 1
        self.tasks[pid] = _Task(self.count, conn, time.monotonic())
        with contextlib.suppress(OSError):  # a shim already gone is seen as such below
            conn.sendall(f"started {pid}\n".encode())
        conn.setblocking(False)
        self.selector.register(conn, selectors.EVENT_READ, pid)
        log.info("task %d: ClientApp in child %d", self.count, pid)

    def _fork(self, conn: socket.socket, request: TaskRequest, fds: list[int]) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        code = 1  # the child: nothing of the launcher's loop may run here
        try:
            signal.set_wakeup_fd(-1)
            for signum, handler in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGCHLD, signal.SIG_DFL),
                                    (signal.SIGINT, signal.default_int_handler)):
                signal.signal(signum, handler)
            self.selector.close()
            for own in (self.listener, self.wake_read, self.wake_write, conn, *(t.conn for t in self.tasks.values())):
                own.close()
            code = run_task(self.command, request, fds)
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _shim_gone(self, pid: int) -> None:
        """The shim's end readable: at EOF it has exited or been killed, and its child goes with it."""
        task = self.tasks.get(pid)
        if task is None:
            return
        try:
            if task.conn.recv(1):
                return  # the shim sends nothing after its request; ignore it
        except BlockingIOError:
            return
        except OSError:
            pass  # reset: gone as well
        self.selector.unregister(task.conn)
        log.warning("task %d: its flwr-clientapp caller is gone; stopping child %d", task.number, pid)
        task.stopped = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def _kill_overdue(self) -> None:
        """A child stopped for its gone caller that is still pushing its status after STOP_WAIT_S is killed."""
        for pid, task in self.tasks.items():
            if task.stopped is not None and time.monotonic() - task.stopped > STOP_WAIT_S:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _reap(self) -> None:
        while self.tasks:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # no children left: tasks still listed were reaped elsewhere
                for pid in list(self.tasks):
                    self._finish(pid, 1)
                return
            if pid == 0:
                return
            if pid in self.tasks:
                self._finish(pid, os.waitstatus_to_exitcode(status))

    def _finish(self, pid: int, code: int) -> None:
        task = self.tasks.pop(pid)
        level = logging.INFO if code == 0 else logging.WARNING
        log.log(level, "task %d: child %d exited %s after %.2f s", task.number, pid,
                code if code >= 0 else f"on signal {-code}", time.monotonic() - task.started)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(task.conn)
        with contextlib.suppress(OSError):
            task.conn.setblocking(True)
            task.conn.sendall(f"exit {code}\n".encode())
        task.conn.close()

    def _shutdown(self) -> None:
        """Stop taking tasks (new shims run cold), then give running ones STOP_WAIT_S to push their status."""
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        log.info("stopping: %d running task(s) get %.0f s to finish", len(self.tasks), STOP_WAIT_S)
        for signum in (signal.SIGTERM, signal.SIGKILL):  # what is still running after the wait is killed
            for pid in list(self.tasks):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            deadline = time.monotonic() + STOP_WAIT_S
            while self.tasks and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.05)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _standard_streams_open() -> None:
    """Make sure descriptors 0-2 exist, so that a received stream can never land on one of them."""
    while True:
        fd = os.open(os.devnull, os.O_RDWR)
        if fd > 2:
            os.close(fd)
            return


def _check_fork_safe() -> None:
    """Fork copies one thread: nothing the preloaded stack started may be running or initialized."""
    if threading.active_count() > 1:
        raise DeployError(f"the preloaded modules started {threading.active_count() - 1} thread(s); a forked task "
                          "would inherit their locks; leave such modules out of --preload")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise DeployError("the preloaded modules initialized CUDA, which a forked task cannot use")


def serve(socket_path: Path, bin_dir: Path, preload: Sequence[str] = DEFAULT_PRELOAD) -> None:
    """Import the stack, write the shim, and serve ClientApp tasks until SIGTERM or SIGINT."""
    if not hasattr(socket, "send_fds") or not hasattr(os, "fork"):
        raise DeployError("the warm launcher needs a POSIX system (fork and Unix-socket descriptor passing)")
    socket_path, bin_dir = Path(socket_path).absolute(), Path(bin_dir).absolute()
    started = time.perf_counter()
    command = flwr_clientapp_command()
    for module in preload:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise DeployError(f"--preload {module}: cannot import it ({err})") from err
    _check_fork_safe()
    _standard_streams_open()
    listener = listen(socket_path)
    shim = write_shim(bin_dir, socket_path)
    log.info("imported %s in %.1f s; put %s first on the SuperNode's PATH", ", ".join(preload) or "Flower only",
             time.perf_counter() - started, shim.parent)
    Launcher(listener, command).run()


def warm_paths(folder: Path | None = None) -> tuple[Path, Path]:
    """The launcher's socket and shim folder inside ``folder`` (default: FLWR_HOME's ``edgemri-warm``)."""
    if folder is None:
        folder = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr") / "edgemri-warm"
    return folder / "launcher.sock", folder / "bin"


def shim_path_env(bin_dir: Path, env: dict[str, Any]) -> dict[str, str]:
    """``env`` with ``bin_dir`` first on PATH: what a SuperNode needs to reach the launcher."""
    return {**env, "PATH": os.pathsep.join([str(Path(bin_dir).absolute()), env.get("PATH", os.defpath)])}
