"""The Flower ClientApp: a thin adapter from messages to ``clients.runtime.Client``.

Only model arrays and scalar metrics leave the client; images, file names and paths
never do. The server sends the settings for the round in the message's ConfigRecord
(method, the tier's local epochs, ...), so a device needs no copy of the YAML config.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_clip_model_update

from edgemri.clients.audit import audit_mod
from edgemri.clients.runtime import Client, ClientState, resolve_setup
from edgemri.core.config import FederationConfig, PrivacyConfig, TrainSpec, from_dict
from edgemri.core.personalize import State, create_method

app = ClientApp(mods=[audit_mod])

# Keys of the round's ConfigRecord that are federation settings (the rest are per round).
_TRAIN_KEYS = ("local-epochs", "batch-size", "lr")


def _client(context: Context) -> Client:
    return Client(resolve_setup(dict(context.node_config), dict(context.run_config)))


def _settings(config: ConfigRecord) -> tuple[FederationConfig, PrivacyConfig, TrainSpec, int]:
    federation = from_dict(FederationConfig, json.loads(str(config["federation-json"])), "federation")
    privacy = from_dict(PrivacyConfig, json.loads(str(config["privacy-json"])), "privacy")
    spec = TrainSpec(epochs=int(config["local-epochs"]), batch_size=int(config["batch-size"]), lr=float(config["lr"]))
    return federation, privacy, spec, int(config["seed"])


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


def clip_update(shared: State, global_state: State, clipping_norm: float) -> State:
    """Client-level DP with side: client: the shared arrays with their update clipped to ``clipping_norm``.

    Flower's ``compute_clip_model_update``, the function its ``fixedclipping_mod`` calls. The mod itself
    does not fit this app: it turns a reply without arrays (a client declining the round for its
    sample-level budget) into an error, and it wants the reply to carry every array it was sent, while
    FedPer keeps its head on the device.
    """
    keys = list(shared)
    clipped = [shared[k].numpy() for k in keys]
    compute_clip_model_update(clipped, [global_state[k].numpy() for k in keys], clipping_norm)
    return {k: torch.from_numpy(v) for k, v in zip(keys, clipped, strict=True)}


def _reply(msg: Message, *, arrays: dict[str, Any] | None = None, metrics: dict[str, float],
           config: dict[str, Any] | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    if config is not None:
        content["info"] = ConfigRecord(config)
    return Message(content, reply_to=msg)


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Who this node is: client name, kind and site (names, never paths), and its size.

    Answered from the manifest alone: a client whose data is broken still says who it
    is, and then fails (reported, skipped) in the rounds that need the data.
    """
    client = _client(context)
    state = _state(client, context)
    return _reply(msg, metrics={"num-examples": client.manifest.num_examples("train"),
                                "rounds-trained": state.rounds_trained},
                  config={"client": client.name, "kind": client.kind, "site": client.manifest.site})


@app.train()
def train(msg: Message, context: Context) -> Message:
    client = _client(context)
    config = msg.content["config"]
    federation, privacy, spec, seed = _settings(config)
    global_state = msg.content["arrays"].to_torch_state_dict()
    reply = client.train_round(create_method(federation), global_state, _state(client, context), spec,
                               int(config["server-round"]), seed, privacy, federation.rounds)
    _remember(context, reply.state)
    shared = reply.shared
    if shared is not None and KEY_CLIPPING_NORM in config:  # the server asks for client-side clipping
        shared = clip_update(shared, global_state, float(config[KEY_CLIPPING_NORM]))
    return _reply(msg, arrays=shared, metrics={**reply.metrics, "num-examples": client.data().num_examples()},
                  config={"status": reply.status, "reason": reply.reason})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    client = _client(context)
    config = msg.content["config"]
    federation, privacy, spec, seed = _settings(config)
    method = create_method(federation)
    global_state = msg.content["arrays"].to_torch_state_dict()
    state = _state(client, context)
    if bool(config.get("final", False)):
        start = msg.content["start"].to_torch_state_dict()
        metadata = {"config": {"federation": dataclasses.asdict(federation), "seed": seed}}
        metrics = client.final_evaluate(method, start, global_state, state, spec, federation.rounds, seed, metadata)
    else:
        metrics, _ = client.evaluate(method, global_state, state, spec, int(config["server-round"]), seed)
    privacy_status = client.privacy_status(client.dp_plan(privacy, spec, federation.rounds))
    return _reply(msg, metrics={**metrics, **privacy_status, "num-examples": len(client.data().test),
                                "rounds-trained": state.rounds_trained})
