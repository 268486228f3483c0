"""A client's rounds of a finished run, replayed exactly: what it received, trained and sent.

The replay runs the client's own code path (``Client.dp_plan``, ``Client.local_training``: its trainer and seed,
its DP-SGD plan through Opacus, the method's training) without its side effects (no ledger record, no state file
written), from the global model the server sent (``RunFolder.received``). Simulated clients train on one thread
each, and so does the replay (``one_thread``), which makes it bit-exact; ``replay_check`` compares it with the
training loss and step count the client reported.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from edgemri.clients.runtime import Client
from edgemri.core.config import Config
from edgemri.core.federation.personalize import Method, RoundOutput, State, create_method
from edgemri.core.federation.protocol import RoundInstructions
from edgemri.core.privacy.dp import DPPlan
from edgemri.simulation.run_folder import PrivacyAttackError, RunFolder

REPLAY_RTOL = 1e-4  # the replayed train loss against the reported one: float noise passes, another run does not


@contextmanager
def one_thread() -> Iterator[None]:
    """Simulated clients train on one thread each: the same reductions in the same order make the replay exact
    (and inversion is fastest unthreaded at this size)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Replay:
    """One round of one client, rebuilt."""

    server_round: int
    received: State  # the global model the server sent
    local_start: State  # the model its local training started from (the method's, e.g. FedPer's own head)
    update: State  # what it sent minus what it received, over every key of the global model
    plan: DPPlan | None
    metrics: dict[str, float]
    seconds: float


def round_instructions(config: Config, kind: str, server_round: int) -> RoundInstructions:
    """What the server sent this client's tier in ``server_round`` (as the strategy's ``configure_train`` builds it)."""
    central = config.privacy.central
    clipping = central.clipping_norm if central.enabled and central.side == "client" else None
    return RoundInstructions.for_tier(config, kind, server_round, clipping_norm=clipping)


def replay_round(client: Client, method: Method, received: State, personal: State | None,
                 instructions: RoundInstructions) -> tuple[RoundOutput, DPPlan | None]:
    """The client's local training for one round as ``Client.train_round`` runs it (its trainer and seed, its
    DP-SGD plan through Opacus), without the side effects: no ledger record, no state file written."""
    plan = client.dp_plan(instructions)
    if plan is not None and not plan.feasible:
        raise PrivacyAttackError(f"{client.name}: the run's config gives it an infeasible DP plan "
                                 f"({plan.reason}), yet the run says it trained")
    return client.local_training(method, received, personal, instructions, plan), plan


def sent_update(received: State, shared: State, clipping_norm: float | None) -> State:
    """The reply minus the global model, over every global key (personal keys return as received, as the ClientApp
    sends them); with client-side clipping (client-level DP), clipped by Flower's own function as its mod does."""
    update = {k: shared.get(k, v).to(v.dtype) - v for k, v in received.items()}
    if clipping_norm is not None:
        # As Flower's fixedclipping_mod clips a reply: the whole update scaled to an L2 norm of at most C.
        norm = float(torch.sqrt(sum((u.double() ** 2).sum() for u in update.values())))
        scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
        update = {k: (u * scale).to(u.dtype) for k, u in update.items()}
    return update


def replay_client(run: RunFolder, name: str, rounds: list[int]) -> dict[int, Replay]:
    """The replays of ``rounds`` (rounds the client trained). A method with a personal state carried between
    rounds (FedPer's head, Ditto's model) is replayed from the client's first round to keep that state exact."""
    client, method = run.client(name), create_method(run.config.federation)
    wanted = sorted(set(rounds) & set(run.trained[name]))
    path = [r for r in run.trained[name] if r <= max(wanted, default=0)] if method.keeps_personal_state else wanted
    personal: State | None = None
    replays = {}
    for r in path:
        received = run.received(r)
        instructions = round_instructions(run.config, client.kind, r)
        started = time.perf_counter()
        out, plan = replay_round(client, method, received, personal, instructions)
        if r in wanted:
            replays[r] = Replay(r, received, method.local_start(received, personal),
                                sent_update(received, out.shared, instructions.clipping_norm), plan, out.metrics,
                                time.perf_counter() - started)
        personal = out.personal
    return replays


def replay_check(replay: Replay, reported: Mapping[str, Any]) -> dict[str, Any]:
    """The replayed round against what the client reported for it: loss and steps come from the same training."""
    loss, steps = reported.get("train-loss"), reported.get("steps")
    replayed_loss, replayed_steps = replay.metrics["train-loss"], replay.metrics["steps"]
    difference = None if loss is None else abs(replayed_loss - loss) / max(abs(loss), 1e-12)
    matches = None if loss is None or steps is None else bool(difference <= REPLAY_RTOL and steps == replayed_steps)
    return {"reported_train_loss": loss, "replayed_train_loss": replayed_loss, "relative_difference": difference,
            "reported_steps": steps, "replayed_steps": replayed_steps, "matches": matches,
            "seconds": replay.seconds}
