"""The Flower ClientApp: a thin adapter from messages to ``clients.runtime.Client``.

Only model arrays and scalar metrics leave the client; images, file names and paths never do,
and neither does an exception's text: a failure travels as a coded status (``protocol.FailureCode``)
and its details stay in the device's own log. What the server sends is parsed and validated
(``protocol.RoundInstructions``) before use, and the device's own privacy floor (node config
``dp-required``, ``dp-max-epsilon``, ...) overrides any weaker instruction.

Each step of a message is logged when it ends, at DEBUG, with its name in the record's ``step``
(``clients/timeline.py`` times the steps when the run config names an ``audit-dir``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from edgemri.clients import timeline
from edgemri.clients.audit import audit_mod
from edgemri.clients.runtime import Client, ClientState, resolve_setup
from edgemri.core.config import ConfigError
from edgemri.core.data.images import DataError
from edgemri.core.data.partition import ManifestError
from edgemri.core.errors import EdgemriError
from edgemri.core.federation import protocol as p
from edgemri.core.federation.personalize import Method, State, create_method
from edgemri.core.privacy.dp import PrivacyError
from edgemri.core.privacy.ledger import LedgerError, LedgerRollback
from edgemri.core.privacy.policy import DevicePolicy
from edgemri.core.registries import REGISTRIES
from edgemri.core.training.checkpoint import CheckpointError

log = logging.getLogger("edgemri.client")


def central_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` for TRAIN messages whose server asks for client-side clipping."""
    config = msg.content.config_records.get(p.CONFIG)
    if msg.metadata.message_type == MessageType.TRAIN and config is not None and p.CLIPPING_NORM_KEY in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[timeline.timeline_mod, audit_mod, central_clipping_mod])

_CODES: tuple[tuple[type[Exception], p.FailureCode], ...] = (
    ((ManifestError, DataError, OSError), p.FailureCode.DATA),
    ((LedgerRollback,), p.FailureCode.LEDGER_ROLLBACK),  # before LedgerError, its base
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
    client = Client(resolve_setup(node_config, dict(context.run_config)), DevicePolicy.from_node_config(node_config))
    log.debug("manifest of %s read", client.name, extra={"step": "manifest"})
    return client


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


class RoundStart(NamedTuple):
    """What a train or evaluate message starts from."""

    client: Client
    instructions: p.RoundInstructions
    global_state: State
    method: Method
    state: ClientState


def _round_start(msg: Message, context: Context) -> RoundStart:
    """The preamble train and evaluate share: the client (its manifest), the server's instructions and global
    model, the personalization method they name, and this client's state."""
    if "partition-id" in context.node_config and context.run_config.get("owner-lock"):  # simulation only
        p.check_owner(p.run_path(dict(context.run_config), "owner-lock"))
    client = _client(context)
    instructions, global_state = _received(msg)
    start = RoundStart(client, instructions, global_state, create_method(instructions.federation),
                       _state(client, context))
    log.debug("round %d: message and state read", instructions.server_round, extra={"step": "message-and-state"})
    return start


@app.query()
@coded_failures
def describe(msg: Message, context: Context) -> Message:
    """Who this node is: client name, kind and site (names, never paths), and its size.

    Answered from the manifest alone: a client whose data is broken still says who it
    is, and then fails (reported, skipped) in the rounds that need the data.
    """
    client = _client(context)
    info, metrics = p.ClientInfo(client.name, client.kind, client.manifest.site,
                                 client.manifest.num_examples("train")).to_record()
    return _reply(msg, metrics={**metrics, p.ROUNDS_TRAINED: _state(client, context).rounds_trained}, info=info)


@app.train()
@coded_failures
def train(msg: Message, context: Context) -> Message:
    client, instructions, global_state, method, state = _round_start(msg, context)
    reply = client.train_round(method, global_state, state, instructions)
    log.debug("round %d: train round done", instructions.server_round, extra={"step": "train-round"})
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
    client, instructions, global_state, method, state = _round_start(msg, context)
    if instructions.final:
        start, best = msg.content.array_records.get(p.START), msg.content.array_records.get(p.BEST)
        if start is None or best is None:
            raise p.ProtocolError("the final evaluation lacks the start or the best global model")
        metrics = client.final_evaluate(method, start.to_torch_state_dict(), best.to_torch_state_dict(),
                                        global_state, state, instructions)
    else:
        metrics = client.evaluate(method, global_state, state, instructions)
    log.debug("round %d: evaluated", instructions.server_round, extra={"step": "evaluate"})
    privacy_status = client.privacy_status(client.dp_plan(instructions))
    log.debug("round %d: privacy status read", instructions.server_round, extra={"step": "privacy-status"})
    return _reply(msg, metrics={**metrics, **privacy_status, p.NUM_EXAMPLES: len(client.data().test),
                                p.ROUNDS_TRAINED: state.rounds_trained})
