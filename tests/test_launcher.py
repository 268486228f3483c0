"""The warm ClientApp launcher (deploy/warm.py): Flower's arguments, and a crashed task never takes it down.

The executor is tested in this process with tasks that finish, raise, exit with a code and die
of a signal; the launcher itself runs as a real ``edgemri client serve`` process against a
stand-in for a SuperNode's Runtime API that hands out two ClientApp tasks: the first task's
child is SIGKILLed while it pulls its input, the second's input request is refused (Flower's
``flwr-clientapp`` then fails). The real deployment with the launcher is in test_deploy.py.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
from flwr.proto.runtime_pb2 import AcquireTaskResponse, SendTaskHeartbeatResponse  # pylint: disable=E0611
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec
from flwr.supercore.superexec.executor import subprocess_executor as flower_executor

from edgemri.deploy.warm import ForkExecutor, clientapp_argv

VENV_BIN = Path(sys.executable).parent


def _spec(task_id: int, **kw: object) -> ExecutionSpec:
    return ExecutionSpec(**{"task_type": TaskType.CLIENT_APP, "runtime_api_address": "127.0.0.1:9094",
                            "token": f"token-{task_id}", "insecure": True, "root_certificates_path": None,
                            "runtime_dependency_install": False, "parent_pid": os.getpid(),
                            "suppress_output": False, "task_id": task_id, **kw})


def _wait_for(check: Callable[[], object], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("spec", [_spec(1), _spec(2, insecure=False, root_certificates_path="/etc/ca.pem"),
                                  _spec(3, runtime_dependency_install=True, parent_pid=None)])
def test_the_child_gets_the_command_line_flowers_superexec_gives_flwr_clientapp(
        spec: ExecutionSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    launched: list[list[str]] = []
    monkeypatch.setattr(flower_executor.subprocess, "Popen", lambda args, **_: launched.append(args))
    flower_executor.SubprocessExecutor().launch(spec)
    assert clientapp_argv(spec) == launched[0]
    assert launched[0][0] == "flwr-clientapp" and spec.token in launched[0]


def test_tasks_that_raise_exit_or_die_are_reaped_and_the_executor_carries_on(tmp_path: Path) -> None:
    def task(argv: list[str]) -> None:
        token = argv[argv.index("--token") + 1]
        (tmp_path / token).write_text(json.dumps(argv))
        if token == "token-2":
            raise RuntimeError("a bug in the ClientApp")
        if token == "token-3":
            sys.exit(7)  # how Flower's flwr_exit ends a failed task
        if token == "token-4":
            faulthandler.disable()  # pytest's: its traceback of the crash would only clutter the output
            os.kill(os.getpid(), signal.SIGSEGV)  # a crash in native code

    executor = ForkExecutor(run_task=task)
    for task_id in (1, 2, 3, 4, 5):
        assert executor.launch(_spec(task_id)).status == "accepted"
    _wait_for(lambda: executor.reconcile() or not executor.children, "every child to end")
    assert sorted(executor.exits) == [(1, 0), (2, 1), (3, 7), (4, -signal.SIGSEGV), (5, 0)]
    assert json.loads((tmp_path / "token-5").read_text()) == clientapp_argv(_spec(5))
    assert executor.get_eligible_capacity(set(TaskType)) == ({TaskType.CLIENT_APP}, set())
    assert executor.launch(_spec(6, task_type=TaskType.SERVER_APP)).status == "failed"


def test_close_stops_a_task_that_ignores_the_end_of_the_launcher() -> None:
    def stubborn(_argv: list[str]) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)

    executor = ForkExecutor(run_task=stubborn)
    executor.launch(_spec(1))
    time.sleep(0.3)
    started = time.monotonic()
    executor.close(wait_s=0.5)
    assert executor.exits == [(1, -signal.SIGKILL)] and not executor.children
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------- the launcher as a real process


class RuntimeApi(ThreadingHTTPServer):
    """A SuperNode's Runtime API as far as the launcher and a failing task see it."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.tokens = ["token-1", "token-2"]  # tasks still to hand out
        self.pulls: list[str] = []  # the token of every task-input request
        self.release = threading.Event()  # ends the first task's hanging input request


class Handler(BaseHTTPRequestHandler):
    server: RuntimeApi

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length", 0)))
        reply = b""
        if self.path == "/v1/runtime/acquire-task" and self.server.tokens:
            token = self.server.tokens.pop(0)
            task = Task(task_id=int(token.rsplit("-", 1)[1]), type=TaskType.CLIENT_APP, run_id=1)
            reply = AcquireTaskResponse(task=task, token=token).SerializeToString()
        elif self.path == "/v1/runtime/send-task-heartbeat":
            reply = SendTaskHeartbeatResponse(success=True).SerializeToString()
        elif self.path == "/v1/runtime/pull-task-input":
            token = next((v for k, v in self.headers.items() if "token" in k.lower()), "")
            self.server.pulls.append(token)
            if token == "token-1":
                self.server.release.wait(30)  # the test kills this task's process meanwhile
            self.send_error(400, "no such task")  # not retried: flwr-clientapp fails the task
            return
        self.send_response(200)
        self.send_header("content-type", "application/protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def runtime_api() -> Iterator[RuntimeApi]:
    server = RuntimeApi()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()


def test_the_launcher_survives_a_task_killed_mid_task_and_one_that_fails(runtime_api: RuntimeApi,
                                                                         tmp_path: Path) -> None:
    log = tmp_path / "launcher.log"
    address = f"127.0.0.1:{runtime_api.server_address[1]}"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "FLWR_TELEMETRY_ENABLED": "0"}
    with log.open("wb") as out:
        launcher = subprocess.Popen(
            [str(VENV_BIN / "edgemri"), "client", "serve", "--runtime-api-address", address, "--insecure",
             "--preload", "flwr.supernode.cli", "--poll-interval", "0.1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: runtime_api.pulls, "the first task to pull its input")
        first = psutil.Process(launcher.pid).children()
        assert len(first) == 1
        first[0].kill()  # the task crashes while it runs
        _wait_for(lambda: len(runtime_api.pulls) == 2, "the second task to pull its input")
        _wait_for(lambda: "child" in log.read_text() and "exited with code" in log.read_text(),
                  "the second task to fail")
        assert launcher.poll() is None, log.read_text()[-2000:]
        text = log.read_text()
        assert runtime_api.pulls == ["token-1", "token-2"]
        assert "task 1: child" in text and "was killed by signal 9" in text
        assert "task 2: child" in text
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=20) == 128 + signal.SIGTERM
        assert not psutil.pid_exists(first[0].pid) or psutil.Process(first[0].pid).status() == psutil.STATUS_ZOMBIE
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
