"""The Flower ClientApp: a thin adapter from messages to ``clients.runtime.Client``.

Only model arrays and scalar metrics leave the client; images, file names and paths never do,
and neither does an exception's text: a failure travels as a coded status (``protocol.FailureCode``)
and its details stay in the device's own log. What the server sends is parsed and validated
(``protocol.RoundInstructions``) before use, and the device's own privacy floor (node config
``dp-required``, ``dp-max-epsilon``, ...) overrides any weaker instruction.

When the run config names an ``audit-dir``, ``timeline_mod`` also writes when each step of the
message ended (``audit-dir/timings/``, wall-clock times only), for ``benchmarks/device_footprint.py``.
"""

# ruff: noqa: E402 - the import clock starts before the imports it times
from __future__ import annotations

import time

APP_IMPORT_STARTED = time.time()  # when this process began loading the app: the first mark of its timeline

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from edgemri.clients.audit import audit_mod
from edgemri.clients.runtime import Client, ClientState, resolve_setup
from edgemri.core.config import ConfigError
from edgemri.core.data.images import DataError
from edgemri.core.data.partition import ManifestError
from edgemri.core.errors import EdgemriError
from edgemri.core.federation import protocol as p
from edgemri.core.federation.personalize import State, create_method
from edgemri.core.io import write_json
from edgemri.core.privacy.dp import PrivacyError
from edgemri.core.privacy.ledger import LedgerError
from edgemri.core.privacy.policy import DevicePolicy
from edgemri.core.registries import REGISTRIES
from edgemri.core.training.checkpoint import CheckpointError

try:
    import resource
except ImportError:  # Windows: the timeline then has no memory figures
    resource = None

APP_IMPORTED = time.time()
log = logging.getLogger("edgemri.client")


class Timeline:
    """When each step of the message being handled ended, and this process's peak RSS then.

    Flower starts a fresh ClientApp process per message on a SuperNode, so one message's
    timeline starts at the app's import; ``timeline_mod`` resets it per message (a simulation
    process handles many) and writes it when auditing. A mark costs a clock read and a getrusage.
    """

    def __init__(self) -> None:
        self.marks: list[tuple[str, float, float]] = []

    def reset(self) -> None:
        self.marks.clear()

    def mark(self, step: str) -> None:
        """``step`` ended now."""
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if resource is not None else 0  # Linux: KiB
        self.marks.append((step, time.time(), round(peak_kib / 1024, 1)))


TIMELINE = Timeline()


def timeline_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: marks the handler's start and end around every other mod, and writes the timeline."""
    TIMELINE.reset()
    TIMELINE.mark("app-called")  # Flower loaded the app and handed it the message
    reply = call_next(msg, context)
    TIMELINE.mark("reply-and-audit")
    audit_dir = str(context.run_config.get("audit-dir", ""))
    if audit_dir:
        write_json(Path(audit_dir) / "timings" / f"node-{context.node_id}-{time.time_ns()}-{os.getpid()}.json", {
            "message_type": msg.metadata.message_type, "pid": os.getpid(),
            "app_import_started": APP_IMPORT_STARTED, "app_imported": APP_IMPORTED,
            "marks": [{"step": step, "time": at, "peak_rss_mb": peak} for step, at, peak in TIMELINE.marks]})
    return reply


def central_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` for TRAIN messages whose server asks for client-side clipping."""
    config = msg.content.config_records.get(p.CONFIG)
    if msg.metadata.message_type == MessageType.TRAIN and config is not None and p.CLIPPING_NORM_KEY in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[timeline_mod, audit_mod, central_clipping_mod])

_CODES: tuple[tuple[type[Exception], p.FailureCode], ...] = (
    ((ManifestError, DataError, OSError), p.FailureCode.DATA),
    ((LedgerError, PrivacyError), p.FailureCode.PRIVACY),
    ((p.ProtocolError, ConfigError, CheckpointError), p.FailureCode.CONFIG),  # what the server sent
)


def _code(err: Exception) -> p.FailureCode:
    return next((code for types, code in _CODES if isinstance(err, types)), p.FailureCode.INTERNAL)


def coded_failures(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """A handler that fails replies with a coded status; the exception's text stays in this device's log."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:  # noqa: BLE001 - any failure becomes a code, never a traceback to the server
            code = _code(err)
            if isinstance(err, EdgemriError | OSError):
                log.error("%s failed: %s", msg.metadata.message_type, str(err).splitlines()[0] if str(err) else err)
            else:
                log.exception("%s failed", msg.metadata.message_type)
            return _reply(msg, metrics={p.NUM_EXAMPLES: 0}, info={"status": p.Status.FAILED.value,
                                                                  "code": code.value})

    return wrapped


def _client(context: Context) -> Client:
    node_config = dict(context.node_config)
    return Client(resolve_setup(node_config, dict(context.run_config)), DevicePolicy.from_node_config(node_config))


def _state(client: Client, context: Context) -> ClientState:
    """Client state from memory (context.state) or, after a restart, from disk."""
    if "client-counters" in context.state:
        counters = context.state["client-counters"]
        personal = context.state["personal"].to_torch_state_dict() if "personal" in context.state else None
        return ClientState(personal, int(counters["rounds-trained"]), int(counters["last-round"]))
    return client.load_state()


def _remember(context: Context, state: ClientState) -> None:
    context.state["client-counters"] = ConfigRecord({"rounds-trained": state.rounds_trained,
                                                     "last-round": state.last_round})
    if state.personal is not None:
        context.state["personal"] = ArrayRecord(state.personal)


def _reply(msg: Message, *, arrays: State | None = None, metrics: dict[str, float],
           info: dict[str, Any] | None = None) -> Message:
    content = RecordDict({p.METRICS: MetricRecord(metrics)})
    if arrays is not None:
        content[p.ARRAYS] = ArrayRecord(arrays)
    if info is not None:
        content[p.INFO] = ConfigRecord(info)
    return Message(content, reply_to=msg)


def _received(msg: Message) -> tuple[p.RoundInstructions, State]:
    config, arrays = msg.content.config_records.get(p.CONFIG), msg.content.array_records.get(p.ARRAYS)
    if config is None or arrays is None:
        raise p.ProtocolError("the server's message lacks its config or arrays")
    return p.RoundInstructions.from_config(dict(config), REGISTRIES), arrays.to_torch_state_dict()


@app.query()
@coded_failures
def describe(msg: Message, context: Context) -> Message:
    """Who this node is: client name, kind and site (names, never paths), and its size.

    Answered from the manifest alone: a client whose data is broken still says who it
    is, and then fails (reported, skipped) in the rounds that need the data.
    """
    client = _client(context)
    TIMELINE.mark("manifest")
    info, metrics = p.ClientInfo(client.name, client.kind, client.manifest.site,
                                 client.manifest.num_examples("train")).to_record()
    return _reply(msg, metrics={**metrics, p.ROUNDS_TRAINED: _state(client, context).rounds_trained}, info=info)


@app.train()
@coded_failures
def train(msg: Message, context: Context) -> Message:
    client = _client(context)
    TIMELINE.mark("manifest")
    instructions, global_state = _received(msg)
    method = create_method(instructions.federation)
    state = _state(client, context)
    TIMELINE.mark("message-and-state")
    reply = client.train_round(method, global_state, state, instructions)
    TIMELINE.mark("train-round")
    _remember(context, reply.state)
    if reply.status is not p.Status.TRAINED:
        log.info("round %d: %s (%s)", instructions.server_round, reply.status.value, reply.reason)
    # Every trained reply carries the global model's keys in its order: personal keys come back as they
    # were received, so the server's checks and Flower's clipping see one layout.
    arrays = None if reply.shared is None else {k: reply.shared.get(k, v) for k, v in global_state.items()}
    if arrays is None and instructions.clipping_norm is not None:
        arrays = global_state  # Flower's clipping mod wants arrays back; an unchanged model is a zero update
    return _reply(msg, arrays=arrays, metrics={**reply.metrics, p.NUM_EXAMPLES: client.data().num_examples()},
                  info={"status": reply.status.value})


@app.evaluate()
@coded_failures
def evaluate(msg: Message, context: Context) -> Message:
    client = _client(context)
    TIMELINE.mark("manifest")
    instructions, global_state = _received(msg)
    method = create_method(instructions.federation)
    state = _state(client, context)
    TIMELINE.mark("message-and-state")
    if instructions.final:
        start, best = msg.content.array_records.get(p.START), msg.content.array_records.get(p.BEST)
        if start is None or best is None:
            raise p.ProtocolError("the final evaluation lacks the start or the best global model")
        metrics = client.final_evaluate(method, start.to_torch_state_dict(), best.to_torch_state_dict(),
                                        global_state, state, instructions)
    else:
        metrics = client.evaluate(method, global_state, state, instructions)
    TIMELINE.mark("evaluate")
    privacy_status = client.privacy_status(client.dp_plan(instructions))
    TIMELINE.mark("privacy-status")
    return _reply(msg, metrics={**metrics, **privacy_status, p.NUM_EXAMPLES: len(client.data().test),
                                p.ROUNDS_TRAINED: state.rounds_trained})
