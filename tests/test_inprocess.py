"""The in-process engine's Grid, with toy apps (the full federation is compared with Ray's in test_federation)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

from edgemri.simulation.inprocess import CLIENT_APP_RAISED, InProcessGrid, run_in_process

toy_client = ClientApp()


@toy_client.query()
def _answer(msg: Message, context: Context) -> Message:
    if context.node_config["partition-id"] == 2:
        raise RuntimeError("this node is broken")
    msg.content["cfg"]["seen"] = True  # a client that scribbles on what it received
    count = int(context.state["count"]["n"]) + 1 if "count" in context.state else 1
    context.state["count"] = ConfigRecord({"n": count})
    return Message(RecordDict({"cfg": ConfigRecord({"node": context.node_config["partition-id"], "count": count})}),
                   reply_to=msg)


def test_the_engine_restores_the_runtime_identity_it_sets(tmp_path: Path) -> None:
    seen: dict[str, object] = {}
    toy_server = ServerApp()

    @toy_server.main()
    def _main(grid: Grid, context: Context) -> None:
        seen["nodes"] = list(grid.get_node_ids())
        sent = [Message(RecordDict({"cfg": ConfigRecord({"x": 1})}), dst_node_id=n, message_type=MessageType.QUERY)
                for n in grid.get_node_ids()]
        replies = list(grid.send_and_receive(sent)) + list(grid.send_and_receive(sent[:1]))
        seen["replies"] = replies
        seen["sent_untouched"] = all("seen" not in m.content["cfg"] for m in sent)

    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)  # the names the engine sets
    assert run_in_process(toy_server, toy_client, {}, num_supernodes=3, log_file=tmp_path / "log.txt")
    assert (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id) == before
    assert seen["nodes"] == [1, 2, 3] and seen["sent_untouched"]
    replies = seen["replies"]
    ok = [r for r in replies if not r.has_error()]
    assert [r.metadata.src_node_id for r in ok] == [1, 2, 1]
    assert [int(r.content["cfg"]["count"]) for r in ok] == [1, 1, 2]  # each node keeps its own context.state
    errors = [r for r in replies if r.has_error()]
    assert [r.metadata.src_node_id for r in errors] == [3]  # a raising ClientApp: an error reply, Flower's code
    assert errors[0].error.code == CLIENT_APP_RAISED == ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def test_a_server_app_that_exits_with_an_error_is_reported(tmp_path: Path) -> None:
    failing = ServerApp()

    @failing.main()
    def _main(grid: Grid, context: Context) -> None:
        raise SystemExit(2)

    assert not run_in_process(failing, toy_client, {}, num_supernodes=1, log_file=tmp_path / "log.txt")


def test_pull_returns_each_reply_once() -> None:
    grid = InProcessGrid(toy_client, [{"partition-id": 0}], {})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        ids = list(grid.push_messages([Message(RecordDict({"cfg": ConfigRecord({})}), dst_node_id=1,
                                               message_type=MessageType.QUERY)]))
    finally:
        TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None
    assert len(list(grid.pull_messages(ids))) == 1 and list(grid.pull_messages(ids)) == []
