"""The same ServerApp and ClientApp in one process: a ``Grid`` that hands each message to the ClientApp.

Flower's simulation engine starts Ray, a SuperLink and a ServerApp process for every run, and
runs each message in a Ray actor; for the 12-client quickstart that is most of a run's wall
time, not the clients' training. Benchmarks run dozens of federations, so they use this
engine: Flower's own apps, strategy and messages, with only the transport replaced by a
function call. Each message is deep-copied on the way in and out, so server and client share
no objects, as over a wire. It runs clients one after another and has no timeouts: a test of
timeouts, restarts or TLS needs the real processes (``simulation.flower_run``, ``deploy``).

One Flower internal is used, here only: ``TaskIdentity``, which Flower's own process runtimes set
before a ServerApp runs (``Message(...)`` reads the run and node id from it). This engine is such a
runtime; tests/test_inprocess.py pins the attribute names.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity  # the runtime's identity (see the module docstring)

log = logging.getLogger(__name__)

SERVER_NODE_ID = 0
RUN_ID = 1
# The error code Flower's engines use when a ClientApp raises (flwr.common.constant.ErrorCode, not public in
# 1.42: restated, and tests/test_inprocess.py checks it against Flower's).
CLIENT_APP_RAISED = 2


class InProcessGrid(Grid):
    """Nodes 1..N, each a ClientApp call with its own ``Context`` (node config, state) kept across messages."""

    def __init__(self, client_app: ClientApp, node_configs: list[dict[str, Any]], run_config: dict[str, Any]
                 ) -> None:
        self.client_app = client_app
        self.contexts = {node_id: Context(run_id=RUN_ID, node_id=node_id, node_config=dict(node_config),
                                          state=RecordDict(), run_config=dict(run_config))
                         for node_id, node_config in enumerate(node_configs, start=1)}
        self._run: Any = None
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count(1)

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def deliver(self, message: Message) -> Message:
        """The ClientApp's reply to one message, or an error reply where it raised (as Flower's engines do)."""
        received = copy.deepcopy(message)
        try:
            reply = self.client_app(received, self.contexts[message.metadata.dst_node_id])
        except Exception as err:  # noqa: BLE001 - a raising ClientApp is an error reply, as in Flower's engines
            log.error("node %d raised %s", message.metadata.dst_node_id, err.__class__.__name__)
            reply = Message(Error(code=CLIENT_APP_RAISED, reason=err.__class__.__name__), reply_to=received)
        return copy.deepcopy(reply)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = str(next(self._ids))
            self._replies[message_id] = self.deliver(message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_in_process(server_app: ServerApp, client_app: ClientApp, run_config: dict[str, Any], *, num_supernodes: int,
                   log_file: Path, on_poll: Callable[[], None] | None = None) -> bool:
    """Run the apps with simulation node configs (``partition-id``); False when the ServerApp stopped with an error.

    The ServerApp's and ClientApps' log lines go to ``log_file``, as Flower's engine sends them to its log.
    """
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": num_supernodes}
                                      for i in range(num_supernodes)], run_config)
    context = Context(run_id=RUN_ID, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=dict(run_config))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handlers: list[logging.Handler] = [handler, *([_PollingHandler(on_poll)] if on_poll else [])]
    # Flower's console handler would print every line of the run; here its lines go to the log file only.
    flower, ours = logging.getLogger("flwr"), logging.getLogger("edgemri")
    saved = {logger: (logger.handlers[:], logger.propagate) for logger in (flower, ours)}
    for logger in saved:
        logger.handlers, logger.propagate = handlers[:], False
    identity = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SERVER_NODE_ID, RUN_ID
    try:
        server_app(grid, context)
        return True
    except SystemExit as stop:  # the ServerApp's one-line error is in the log; 0 means it ended normally
        return stop.code in (0, None)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = identity
        for logger, (kept, propagate) in saved.items():
            logger.handlers, logger.propagate = kept, propagate
        handler.close()


class _PollingHandler(logging.Handler):
    """Calls ``on_poll`` after each log line, so progress shows while the run holds the only thread."""

    def __init__(self, on_poll: Callable[[], None]) -> None:
        super().__init__()
        self.on_poll = on_poll

    def emit(self, record: logging.LogRecord) -> None:
        self.on_poll()
