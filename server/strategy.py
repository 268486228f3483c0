"""The federation's round logic as a Flower strategy: FedAvg plus what a federation of devices needs.

``FederationStrategy`` overrides FedAvg's steps only where this federation differs:
- ``configure_train``: per tier, the known clients that are not retired and are online this round (a
  seeded availability draw), then the tier's seeded sample of them (``sample_per_round``; null: all),
  each with its own tier's instructions;
- ``aggregate_train``: every reply is screened first (``screen_train``): a reply with the wrong
  arrays, non-finite values, an impossible example count, bad metrics or a privacy ledger that
  went backwards is that client's failure for the round, never averaged in; declines are
  recorded and retire the client where they are final; FedAvg then averages the good replies,
  and only the method's shared keys enter the new global model;
- ``configure_evaluate`` / ``aggregate_evaluate``: each client reports its global and
  personalized accuracy, kept per client (tiers are never averaged together);
- ``after_round`` (Flower's ``evaluate_fn``): central accuracy, the round's record, progress.

``PhaseClock`` times the server's own work in each of these steps and the waits for the clients between them
(``server/timings.json``, read by ``benchmarks/scale.py``).

Client-level DP is Flower's fixed-clipping wrapper around this strategy (``with_central_dp``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)

from edgemri.core.config import CentralDPConfig, Config, ConfigError
from edgemri.core.errors import printable
from edgemri.core.federation import protocol as p
from edgemri.core.federation.personalize import State, create_method, merge_shared

log = logging.getLogger(__name__)

CENTRAL_DP_AGGREGATION = "unweighted mean of the clipped updates (each client counts once)"


@dataclass
class RoundState:
    """What the strategy learns about the clients over a run (saved with the server's state)."""

    history: list[p.RoundRecord] = field(default_factory=list)
    retired: dict[str, str] = field(default_factory=dict)  # client -> why it never trains again
    epsilon: dict[str, float] = field(default_factory=dict)  # client -> highest cumulative epsilon reported
    ledger_records: dict[str, float] = field(default_factory=dict)  # client -> longest ledger reported
    best_round: int | None = None  # the round whose global model federated validation preferred
    best_val: float | None = None  # its accuracy over the clients' validation splits


class PhaseClock:
    """Where the server's time goes, per stage ("setup", "round-1", ..., "final"): seconds per phase.

    A phase is the server's own work (sampling, building messages, screening, aggregation, ...). The time
    from one phase's end to the next one's start is spent waiting for the clients (and Flower's transport);
    the next phase books it under the wait's name. Each stage also keeps when it started and last ended
    (``time.time()``), so a client's step timings can be placed in the stage they belong to.
    """

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}
        self.stage = "setup"
        self._last: float | None = None

    def begin(self, stage: str) -> None:
        self.stage, self._last = stage, None
        self.stages[stage] = {"started_at": time.time()}

    @contextlib.contextmanager
    def phase(self, name: str, waited: str | None = None) -> Iterator[None]:
        """Time the server's work ``name`` (in seconds, key ``NAME_s``); ``waited``: the wait before it."""
        times = self.stages.setdefault(self.stage, {"started_at": time.time()})
        started = time.perf_counter()
        if waited is not None and self._last is not None:
            times[f"{waited}_s"] = times.get(f"{waited}_s", 0.0) + started - self._last
        try:
            yield
        finally:
            self._last = time.perf_counter()
            times[f"{name}_s"] = times.get(f"{name}_s", 0.0) + self._last - started
            times["ended_at"] = time.time()


def available(config: Config, client: p.ClientInfo, server_round: int) -> bool:
    """Seeded per-round availability draw (a phone is offline, charging, on a train)."""
    seed = (config.seed, server_round, zlib.crc32(client.client.encode()))
    return bool(np.random.default_rng(seed).random() < config.federation.tier(client.kind).availability)


def sample_clients(config: Config, clients: Iterable[p.ClientInfo], retired: Collection[str], server_round: int
                   ) -> set[str]:
    """Who trains this round: per tier, the clients online and not retired, then the tier's seeded sample of them.

    The draw is over names in sorted order, never over node ids (Flower picks those anew each run), so the same
    seed, round and clients give the same sample on every run and engine."""
    by_tier: dict[str, list[p.ClientInfo]] = {}
    for client in sorted(clients, key=lambda c: c.client):
        by_tier.setdefault(client.kind, []).append(client)
    chosen: set[str] = set()
    for kind, members in by_tier.items():
        eligible = [c.client for c in members if c.client not in retired and available(config, c, server_round)]
        size = config.federation.tier(kind).sample_size(len(members))
        if size is not None and size < len(eligible):
            rng = np.random.default_rng((config.seed, server_round, zlib.crc32(f"sample:{kind}".encode())))
            eligible = [eligible[i] for i in rng.choice(len(eligible), size=size, replace=False)]
        chosen.update(eligible)
    return chosen


class FederationStrategy(FedAvg):
    def __init__(self, config: Config, nodes: dict[int, p.ClientInfo], global_state: State, *,
                 state: RoundState | None = None, best_state: State | None = None, round_offset: int = 0,
                 unweighted: bool = False,
                 central_eval: Callable[[State], dict[str, float]] | None = None,
                 on_round: Callable[[p.RoundRecord, State], None] | None = None,
                 before_round: Callable[[], None] | None = None, clock: PhaseClock | None = None) -> None:
        fed = config.federation
        super().__init__(min_train_nodes=fed.min_clients, min_available_nodes=fed.min_clients,
                         weighted_by_key=p.NUM_EXAMPLES)
        self.config = config
        self.nodes = nodes
        self.method = create_method(fed)
        self.shapes = {k: tuple(v.shape) for k, v in global_state.items()}
        self.shared = self.method.shared_keys(list(global_state))
        self.global_state = global_state  # the full global model; FedAvg sees only what travels
        self.best_state = best_state or global_state  # the global model federated validation prefers so far
        self.state = state or RoundState()
        self.round_offset = round_offset  # Strategy.start counts from 1; a resumed run continues its numbering
        self.unweighted = unweighted  # client-level DP: every client counts once
        self.central_eval = central_eval
        self.on_round = on_round
        self.before_round = before_round  # raises to stop the run before a round trains (its owner is gone)
        self.clock = clock or PhaseClock()
        self.max_update_norm = fed.max_update_norm
        self.clipping_norm: float | None = None  # client-level DP, side client: the server checks the clipping
        self.stop_reason: str | None = None  # set when no further round may run (client-level DP budget)
        self.record = p.RoundRecord(round=round_offset, sampled=[])  # the round in progress
        self._screened: int | None = None  # the round whose replies the DP wrapper already screened
        self._asked: list[int] = []  # the nodes this round's evaluation asked
        self._sent: list[Message] = []  # the last instructions; the Grid sets their message ids when it pushes them
        self._started = 0.0

    # -- who trains ------------------------------------------------------------

    def _messages(self, node_ids: list[int], server_round: int, message_type: str, base: ConfigRecord,
                  **extra: RecordDict | ArrayRecord) -> list[Message]:
        arrays = ArrayRecord(self.global_state)
        clipping = base.get(p.CLIPPING_NORM_KEY)
        messages = []
        for node_id in node_ids:
            client = self.nodes[node_id]
            instructions = p.RoundInstructions.for_tier(
                self.config, client.kind, server_round, final=bool(base.get("final", False)),
                clipping_norm=None if clipping is None else float(clipping), ledger_floor=self.ledger_floor(client))
            content = RecordDict({p.ARRAYS: arrays, p.CONFIG: ConfigRecord(instructions.to_config()), **extra})
            messages.append(Message(content, dst_node_id=node_id, message_type=message_type))
        self._sent = messages
        return messages

    def ledger_floor(self, client: p.ClientInfo) -> p.LedgerFloor:
        """What this client's ledger reported at most: its device refuses to train below it."""
        return p.LedgerFloor(int(self.state.ledger_records.get(client.client, 0)),
                             self.state.epsilon.get(client.client, 0.0))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        server_round += self.round_offset
        if self.before_round:
            self.before_round()
        self._started = time.perf_counter()
        self.clock.begin(f"round-{server_round}")
        self.global_state = merge_shared(self.global_state, arrays.to_torch_state_dict())
        with self.clock.phase("sampling"):
            chosen = set() if self.stop_reason else sample_clients(self.config, self.nodes.values(),
                                                                    self.state.retired, server_round)
        sampled = [n for n, c in sorted(self.nodes.items()) if c.client in chosen]
        self.record = p.RoundRecord(round=server_round, sampled=[self.nodes[n].client for n in sampled])
        if self.stop_reason:
            log.warning("round %d: no training: %s", server_round, self.stop_reason)
        if p.CLIPPING_NORM_KEY in config:
            self.clipping_norm = float(config[p.CLIPPING_NORM_KEY])
        with self.clock.phase("train_messages"):
            return self._messages(sampled, server_round, MessageType.TRAIN, config)

    # -- screening: one bad reply must not decide the federation --------------

    def _client(self, reply: Message) -> p.ClientInfo | None:
        """Who a reply is about: its sender, or, for an error Flower itself sent in a client's place (the SuperLink's
        "node unavailable", the Grid's "objects unavailable"), the client the instruction it answers went to."""
        client = self.nodes.get(reply.metadata.src_node_id)
        if client is not None or not reply.has_error():
            return client
        answered = reply.metadata.reply_to_message_id
        node = next((m.metadata.dst_node_id for m in self._sent if m.metadata.message_id == answered), None)
        return None if node is None or not answered else self.nodes.get(node)

    def _error_code(self, reply: Message, client: p.ClientInfo) -> tuple[p.FailureCode, str]:
        """An error reply: the client's app raised, or Flower answered for a client it could not reach."""
        if self.nodes.get(reply.metadata.src_node_id) is client:
            return p.FailureCode.INTERNAL, "the client's app raised"
        reason = str(reply.error.reason or "").splitlines()
        return p.FailureCode.UNAVAILABLE, printable(reason[0][:200]) if reason else ""

    def _order(self, reply: Message) -> tuple[str, int]:
        client = self._client(reply)
        return (client.client if client else "", reply.metadata.src_node_id)

    def _fail(self, name: str, code: p.FailureCode, detail: str = "") -> None:
        self.record.failed[name] = code.value
        log.warning("round %d: client %s: %s%s", self.record.round, name, code.value, f" ({detail})" if detail else "")

    def _check_arrays(self, arrays: Any) -> dict[str, np.ndarray]:
        if not isinstance(arrays, ArrayRecord):
            raise p.ProtocolError("no arrays")
        if set(arrays) != set(self.shapes):
            missing, extra = sorted(set(self.shapes) - set(arrays)), sorted(set(arrays) - set(self.shapes))
            raise p.ProtocolError(f"array keys differ from the global model (missing {missing[:3]}, extra {extra[:3]})")
        values = {}
        for key in self.shapes:  # the global model's order: Flower's clipping pairs arrays by position
            value = arrays[key].numpy()
            if tuple(value.shape) != self.shapes[key]:
                raise p.ProtocolError(f"array '{key}' has shape {tuple(value.shape)}, expected {self.shapes[key]}")
            if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
                raise p.ProtocolError(f"array '{key}' is not finite floating point")
            values[key] = value
        return values

    def _check_privacy(self, client: p.ClientInfo, metrics: MetricRecord) -> None:
        """A client's cumulative epsilon and ledger length only ever grow: a drop is a rolled-back ledger."""
        for key, seen in ((p.EPSILON, self.state.epsilon), (p.LEDGER_RECORDS, self.state.ledger_records)):
            if key not in metrics:
                continue
            value = p.check_metric(key, metrics[key], 0.0, p.MAX_EPSILON_REPORTED)
            if value < seen.get(client.client, 0.0) - 1e-9:
                self.state.retired[client.client] = f"round {self.record.round}: {p.FailureCode.LEDGER_ROLLBACK}"
                raise _Rollback(f"{key} went from {seen[client.client]:g} to {value:g}")
            seen[client.client] = max(value, seen.get(client.client, 0.0))

    def _check_metrics(self, metrics: Any, client: p.ClientInfo) -> dict[str, float]:
        if not isinstance(metrics, MetricRecord):
            raise p.ProtocolError("no metrics")
        n = p.check_metric(p.NUM_EXAMPLES, metrics.get(p.NUM_EXAMPLES), 1, client.num_examples)
        out = {k: p.check_metric(k, v, -p.MAX_EPSILON_REPORTED, p.MAX_EPSILON_REPORTED) for k, v in metrics.items()
               if not (isinstance(v, float) and math.isnan(v))}
        out[p.NUM_EXAMPLES] = n
        return out

    def screen_train(self, replies: Iterable[Message]) -> list[Message]:
        """The replies fit to aggregate, rebuilt with only arrays and weight; the rest are recorded."""
        with self.clock.phase("screening", waited="train_wait"):
            return self._screen_train(replies)

    def _screen_train(self, replies: Iterable[Message]) -> list[Message]:
        record = self.record
        good: list[Message] = []
        answered = set()
        # In client order, not arrival order: the float sums of the average do not depend on the network.
        for reply in sorted(replies, key=self._order):
            client = self._client(reply)
            if client is None or client.client in answered:
                log.warning("round %d: reply from unknown or repeated node %d ignored", record.round,
                            reply.metadata.src_node_id)
                continue
            answered.add(client.client)
            if reply.has_error():
                self._fail(client.client, *self._error_code(reply, client))
                continue
            try:
                info = reply.content.config_records.get(p.INFO)
                status = p.Status(info.get("status")) if isinstance(info, ConfigRecord) else None
                if status is None:
                    raise p.ProtocolError("no status")
                if status is p.Status.FAILED:
                    code = p.FailureCode(str(info.get("code", p.FailureCode.INTERNAL)))
                    if code is p.FailureCode.LEDGER_ROLLBACK:  # its device found its ledger below the floor
                        self.state.retired[client.client] = f"round {record.round}: {code}"
                    self._fail(client.client, code)
                    continue
                metrics = self._check_metrics(reply.content.metric_records.get(p.METRICS), client)
                self._check_privacy(client, reply.content.metric_records[p.METRICS])
                record.train_metrics[client.client] = metrics
                if status is not p.Status.TRAINED:
                    record.declined[client.client] = status.value
                    if status.retires:
                        self.state.retired[client.client] = f"round {record.round}: {status.value}"
                        log.warning("client %s stops training: %s", client.client, status.value)
                    continue
                arrays = self._check_arrays(reply.content.array_records.get(p.ARRAYS))
                norm = self._update_norm(arrays)
                if self.clipping_norm is not None and norm > self._clip_limit():
                    self._fail(client.client, p.FailureCode.NOT_CLIPPED, f"update norm {norm:.4g}")
                    continue
                if self.max_update_norm is not None and norm > self.max_update_norm:
                    self._fail(client.client, p.FailureCode.UPDATE_TOO_LARGE, f"update norm {norm:.4g}")
                    continue
            except _Rollback as err:
                self._fail(client.client, p.FailureCode.LEDGER_ROLLBACK, str(err))
                continue
            except (p.ProtocolError, ValueError) as err:
                self._fail(client.client, p.FailureCode.BAD_REPLY, str(err).splitlines()[0][:200])
                continue
            weight = 1.0 if self.unweighted else metrics[p.NUM_EXAMPLES]
            record.trained.append(client.client)
            good.append(Message(RecordDict({p.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                            p.METRICS: MetricRecord({p.NUM_EXAMPLES: weight})}), reply_to=reply))
        for node_id in self._sampled_nodes():
            name = self.nodes[node_id].client
            if name not in answered:
                self._fail(name, p.FailureCode.NO_REPLY)
        return good

    def _sampled_nodes(self) -> list[int]:
        names = set(self.record.sampled)
        return [n for n, c in self.nodes.items() if c.client in names]

    def _update_norm(self, arrays: dict[str, np.ndarray]) -> float:
        return float(np.sqrt(sum(float(((arrays[k].astype(np.float64) - self.global_state[k].numpy()) ** 2).sum())
                                 for k in arrays)))

    def _clip_limit(self) -> float:
        # The client sends global + clipped update in float32: rounding adds up to eps32 * |global| to the norm.
        size = float(np.sqrt(sum(float((v.double() ** 2).sum()) for v in self.global_state.values())))
        return self.clipping_norm * (1 + 1e-6) + 2 * float(np.finfo(np.float32).eps) * size

    # -- aggregation -----------------------------------------------------------

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        screened, self._screened = self._screened == server_round, None
        return self.aggregate_screened(server_round, replies if screened else self.screen_train(replies))

    def mark_screened(self, server_round: int) -> None:
        """The replies of ``server_round`` that reach ``aggregate_train`` next passed ``screen_train`` already.

        The DP wrapper screens the replies before Flower clips them, then Flower hands them to this strategy."""
        self._screened = server_round

    def aggregate_screened(self, server_round: int, good: list[Message]
                           ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg over replies that passed ``screen_train``; only the method's shared keys enter the global model."""
        record = self.record
        if len(good) < self.config.federation.min_clients:
            log.warning("round %d: %d good replies < federation.min_clients=%d; global model unchanged",
                        record.round, len(good), self.config.federation.min_clients)
            return None, self._summary()
        with self.clock.phase("aggregation"):
            averaged, _ = super().aggregate_train(server_round, good)
            record.aggregated = averaged is not None
            if averaged is not None:
                self.merge(averaged)
        return ArrayRecord(self.global_state), self._summary()

    def merge(self, averaged: ArrayRecord) -> None:
        """Only the method's shared keys enter the global model (FedPer's heads stay the clients' own)."""
        mean = averaged.to_torch_state_dict()
        self.global_state = merge_shared(self.global_state, {k: mean[k] for k in self.shared})

    def _summary(self) -> MetricRecord:
        record = self.record
        return MetricRecord({"trained": len(record.trained), "failed": len(record.failed),
                             "declined": len(record.declined)})

    # -- evaluation ------------------------------------------------------------

    def evaluation_targets(self) -> list[int]:
        """Who evaluates this round: every client of a tier that trains in full, and of a sampled tier only this
        round's cohort (cross-device practice: a thousand phones are not all asked every round; each one that
        exists is still scored in the final evaluation)."""
        cohort = set(self.record.sampled)
        return [n for n, c in sorted(self.nodes.items())
                if c.client in cohort or self.config.federation.tier(c.kind).sample_per_round is None]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        with self.clock.phase("evaluate_messages"):
            self._asked = self.evaluation_targets()
            return self._messages(self._asked, server_round + self.round_offset, MessageType.EVALUATE, config)

    def configure_final_evaluate(self, start: State, best: State) -> list[Message]:
        """The final evaluation: every known client gets the final global model, the start and the best one."""
        return self._messages(sorted(self.nodes), self.config.federation.rounds, MessageType.EVALUATE,
                              ConfigRecord({"final": True}), **{p.START: ArrayRecord(start), p.BEST: ArrayRecord(best)})

    def collect_evaluate(self, replies: Iterable[Message], asked: Iterable[int]
                         ) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
        """Per-client metrics from evaluation replies (validated), and who failed of the nodes ``asked``."""
        metrics: dict[str, dict[str, float]] = {}
        failed: dict[str, str] = {}
        for reply in replies:
            client = self._client(reply)
            if client is None or client.client in metrics:
                continue
            if reply.has_error():
                code, reason = self._error_code(reply, client)
                failed[client.client] = code.value
                log.warning("evaluation: client %s: %s%s", client.client, code.value,
                            f" ({reason})" if reason else "")
                continue
            info = reply.content.config_records.get(p.INFO)
            if isinstance(info, ConfigRecord) and info.get("status") == p.Status.FAILED.value:
                code = str(info.get("code"))
                failed[client.client] = code if code in set(p.FailureCode) else p.FailureCode.BAD_REPLY.value
                continue
            try:
                values = reply.content.metric_records.get(p.METRICS)
                if not isinstance(values, MetricRecord):
                    raise p.ProtocolError("no metrics")
                metrics[client.client] = {k: (float(v) if isinstance(v, float) and math.isnan(v) else
                                              p.check_metric(k, v, -p.MAX_EPSILON_REPORTED, p.MAX_EPSILON_REPORTED))
                                          for k, v in values.items()}
            except p.ProtocolError:
                failed[client.client] = p.FailureCode.BAD_REPLY.value
        for client in (self.nodes[n] for n in asked):
            if client.client not in metrics and client.client not in failed:
                failed[client.client] = p.FailureCode.NO_REPLY.value
        return metrics, failed

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        with self.clock.phase("evaluate_collect", waited="evaluate_wait"):
            metrics, failed = self.collect_evaluate(replies, self._asked)
        record = self.record
        record.eval_metrics = metrics
        for name, code in failed.items():
            record.failed.setdefault(name, code)
        record.federated_val = federated_validation(metrics)
        # Ties go to the later round: the same validation evidence, more training.
        if record.federated_val is not None and (self.state.best_val is None
                                                 or record.federated_val >= self.state.best_val):
            self.state.best_round, self.state.best_val = record.round, record.federated_val
            self.best_state = self.global_state
        # Counts only: accuracies stay per client (a mean over tiers would hide the phones).
        return MetricRecord({"evaluated": len(metrics), "failed": len(failed)})

    def after_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: central metrics, then the round's record (saved by ``on_round``)."""
        with self.clock.phase("central_evaluation"):
            central = self.central_eval(self.global_state) if self.central_eval else {}
        if server_round == 0:
            return MetricRecord(central) if central else None
        record = self.record
        record.central = central
        record.seconds = time.perf_counter() - self._started
        self.state.history.append(record)
        if self.on_round:
            with self.clock.phase("save_and_progress"):
                self.on_round(record, self.global_state)
        return MetricRecord(central) if central else None


def federated_validation(metrics: dict[str, dict[str, float]]) -> float | None:
    """The global model's accuracy over every client's validation split (weighted by its size), or None."""
    scored = [(m[p.GLOBAL_VAL_ACCURACY], m[p.VAL_EXAMPLES]) for m in metrics.values()
              if math.isfinite(m.get(p.GLOBAL_VAL_ACCURACY, math.nan)) and m.get(p.VAL_EXAMPLES, 0) > 0]
    total = sum(n for _, n in scored)
    return sum(acc * n for acc, n in scored) / total if total else None


class _Rollback(p.ProtocolError):
    """A client's privacy ledger went backwards."""


# -- client-level (central) DP: Flower's fixed-clipping wrappers around the strategy -----------------


class CentralAccountant:
    """Flower's RDP accountant for the noisy releases of the global model, and the stop rule."""

    def __init__(self, config: CentralDPConfig, population: int, state: dict[str, Any] | None = None) -> None:
        if config.noise_multiplier <= 0:
            raise ConfigError(f"config key 'privacy.central.noise_multiplier' has value {config.noise_multiplier!r}; "
                              "allowed: a number > 0 when privacy.central is enabled (without noise there is no "
                              "client-level guarantee)")
        self.config = config
        self.population = population
        # No amplification by sampling: which clients train is decided by seeded draws the server knows
        # (availability, the tier's sample_per_round) and by retirement, not by secret uniform sampling, so
        # the sampling rate (recorded per round in the summary) cannot lower epsilon.
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=config.delta, population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=config.max_epsilon))
        if state is not None:
            try:
                self.accountant.load_state_dict(state)
            except (ValueError, KeyError, TypeError) as err:
                raise ConfigError(f"privacy.central changed since this run started ({err}); start a new run") from None

    def event(self, clients: int) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(noise_multiplier=self.config.noise_multiplier, sample_size=max(clients, 1),
                                    population_size=self.population)

    @property
    def epsilon(self) -> float:
        return self.accountant.get_privacy_spent().epsilon

    def stop_reason(self, server_round: int) -> str | None:
        # Without amplification a round costs one Gaussian release whoever is sampled.
        if not self.accountant.would_exceed(self.event(self.population)):
            return None
        return (f"round {server_round} would take client-level epsilon above max_epsilon={self.config.max_epsilon} "
                f"(epsilon {self.epsilon:.3f} after {self.accountant.num_releases} noisy rounds)")

    def summary(self, history: list[p.RoundRecord], stop_reason: str | None) -> dict[str, Any]:
        c = self.config
        per_round = [{"round": h.round, "epsilon": h.central_epsilon, "clients": len(h.trained) if h.aggregated else 0,
                      "sample_rate": len(h.sampled) / self.population,
                      "noise_std": (c.noise_multiplier * c.clipping_norm / len(h.trained)) if h.aggregated else None}
                     for h in history if h.sampled]
        stopped = next((h.round - 1 for h in history if not h.sampled and stop_reason), None)
        return {"enabled": True, "side": c.side, "noise_multiplier": c.noise_multiplier,
                "clipping_norm": c.clipping_norm, "delta": c.delta, "max_epsilon": c.max_epsilon,
                "epsilon": self.epsilon, "epsilon_per_round": per_round, "aggregation": CENTRAL_DP_AGGREGATION,
                "stopped_at_round": stopped, "stop_reason": stop_reason,
                "accountant": {"name": "rdp", "implementation": "flwr.serverapp.RdpAccountant (Google dp-accounting)",
                               "sampling": SamplingMethod.NO_AMPLIFICATION.value,
                               "neighboring_relation": NeighboringRelation.ADD_OR_REMOVE_ONE.value,
                               "population": self.population, "noisy_rounds": self.accountant.num_releases}}


class _ScreenedCentralDP:
    """The one workaround around Flower's fixed-clipping wrappers (used through the two classes below).

    Flower's wrapper (1.42) fixes the number of clients when it is built, skips aggregation if any reply
    is an error, and its accountant mode insists on FedAvg's own ``aggregate_train``. Here clients go
    offline, decline for their sample-level budget or fail, so the round's number of clients varies:
    this override screens the replies first (a malformed reply would otherwise crash Flower's clipping),
    sets the wrapper's public ``num_sampled_clients`` to the clients actually averaged (noise std
    sigma * C / m is the sensitivity of a mean of m clipped updates), lets Flower clip, average and
    noise, keeps only the shared keys, and accounts the release with Flower's RdpAccountant.
    """

    strategy: FederationStrategy
    num_sampled_clients: int

    def __init__(self, strategy: FederationStrategy, config: CentralDPConfig, accountant: CentralAccountant) -> None:
        super().__init__(strategy, config.noise_multiplier, config.clipping_norm,  # type: ignore[call-arg]
                         max(len(strategy.nodes), 1))
        self.central = accountant

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        # Checked before anyone trains: a round whose release would exceed max_epsilon never starts.
        self.strategy.stop_reason = self.strategy.stop_reason or self.central.stop_reason(
            server_round + self.strategy.round_offset)
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        inner = self.strategy
        good = inner.screen_train(replies)
        record = inner.record
        record.central_epsilon = self.central.epsilon
        if len(good) < inner.config.federation.min_clients:
            return inner.aggregate_screened(server_round, good)
        self.num_sampled_clients = len(good)
        inner.mark_screened(server_round)
        previous = inner.global_state
        noisy, metrics = super().aggregate_train(server_round, good)  # type: ignore[misc]
        if noisy is None:
            return None, metrics
        inner.global_state = previous
        inner.merge(noisy)  # the noise lands on the shared keys only
        self.central.accountant.compose(self.central.event(len(good)))
        record.central_epsilon = self.central.epsilon
        log.info("round %d: client-level DP over %d clients, epsilon %.3f", record.round, len(good),
                 self.central.epsilon)
        return ArrayRecord(inner.global_state), metrics


class ServerSideCentralDP(_ScreenedCentralDP, DifferentialPrivacyServerSideFixedClipping):
    """Client-level DP, clipped on the server."""


class ClientSideCentralDP(_ScreenedCentralDP, DifferentialPrivacyClientSideFixedClipping):
    """Client-level DP, clipped by each client (Flower's ``fixedclipping_mod``); the server checks the norm."""


def with_central_dp(strategy: FederationStrategy, config: CentralDPConfig, accountant: CentralAccountant
                    ) -> ServerSideCentralDP | ClientSideCentralDP:
    """Flower's fixed-clipping wrapper around the strategy, built once for the run."""
    strategy.unweighted = True  # a large client must not move the mean by more than C / m
    wrapper = ServerSideCentralDP if config.side == "server" else ClientSideCentralDP
    return wrapper(strategy, config, accountant)
