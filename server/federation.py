"""The federation's round loop on the server, over Flower's Grid.

Each round: sample the clients that are online (phones only with their tier's
availability), send the global model, aggregate the replies that arrived in time
with FedAvg (sample-weighted; with client-level DP clipped, unweighted and noised, see
central_dp.py), checkpoint, then ask every client for its global and
personalized accuracy on its own test split. A failed or silent client is reported
and skipped; a round with too few replies keeps the previous global model. The
server's state is saved atomically every round, so a stopped run resumes.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from edgemri.core.checkpoint import Checkpoint, save_checkpoint
from edgemri.core.config import Config, ConfigError
from edgemri.core.data import ArraySplit
from edgemri.core.io import save_torch
from edgemri.core.personalize import State, evaluate_state, merge_shared
from edgemri.server.central_dp import CentralDP

log = logging.getLogger(__name__)

SERVER_STATE = "server-state.pt"


@dataclass
class NodeInfo:
    node_id: int
    client: str
    kind: str
    site: str
    num_examples: int


@dataclass
class RoundRecord:
    round: int
    sampled: list[str]
    trained: list[str]
    failed: dict[str, str]  # client -> reason
    aggregated: bool
    seconds: float
    declined: dict[str, str] = field(default_factory=dict)  # client -> "status: reason" (DP budget, ...)
    train_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    central: dict[str, float] = field(default_factory=dict)
    central_epsilon: float | None = None  # client-level (central) DP: cumulative epsilon after this round


@dataclass
class ServerState:
    round: int
    global_state: State
    start_state: State
    history: list[dict[str, Any]]
    retired: dict[str, str] = field(default_factory=dict)
    central_accountant: dict[str, Any] | None = None  # client-level DP: Flower's RdpAccountant state


class FederationServer:
    def __init__(self, grid: Grid, config: Config, run_dir: Path, start_state: State,
                 central_test: ArraySplit | None, expected_clients: int, resume: bool) -> None:
        self.grid = grid
        self.config = config
        self.fed = config.federation
        self.run_dir = run_dir
        self.start_state = start_state
        self.central_test = central_test
        self.expected_clients = expected_clients
        self.resume = resume
        self.nodes: dict[int, NodeInfo] = {}
        # Clients that will not train again (DP budget exhausted, DP infeasible): never sampled.
        self.retired: dict[str, str] = {}
        self.central_dp: CentralDP | None = None  # client-level DP, set up once the clients are known

    # -- messages ------------------------------------------------------------

    def _round_config(self, node: NodeInfo, server_round: int, **extra: Any) -> ConfigRecord:
        tier = self.fed.tier(node.kind)
        federation = {k: v for k, v in asdict(self.fed).items() if k != "start_checkpoint"}
        return ConfigRecord({"server-round": server_round, "seed": self.config.seed,
                             "federation-json": json.dumps(federation),
                             "privacy-json": json.dumps(asdict(self.config.privacy)), "local-epochs": tier.local_epochs,
                             "batch-size": tier.batch_size, "lr": tier.lr, **extra})

    def _send(self, node_ids: list[int], message_type: str, records: dict[int, RecordDict]) -> dict[int, Message]:
        messages = [Message(records[n], dst_node_id=n, message_type=message_type) for n in node_ids]
        replies = self.grid.send_and_receive(messages, timeout=self.fed.round_timeout_s)
        return {r.metadata.src_node_id: r for r in replies}

    def _failures(self, node_ids: list[int], replies: dict[int, Message]) -> dict[str, str]:
        failed = {}
        for n in node_ids:
            name = self.nodes[n].client if n in self.nodes else str(n)
            if n not in replies:
                failed[name] = f"no reply within {self.fed.round_timeout_s:.0f} s"
            elif replies[n].has_error():
                failed[name] = replies[n].error.reason.strip().splitlines()[-1][:300]
        for name, reason in failed.items():
            log.warning("client %s failed: %s", name, reason)
        return failed

    def discover(self, wait_s: float = 120.0) -> None:
        """Wait for the expected nodes, then ask each who it is."""
        deadline = time.monotonic() + wait_s
        node_ids = list(self.grid.get_node_ids())
        while len(node_ids) < self.expected_clients and time.monotonic() < deadline:
            time.sleep(1.0)
            node_ids = list(self.grid.get_node_ids())
        replies = self._send(node_ids, MessageType.QUERY, {n: RecordDict() for n in node_ids})
        self._failures(node_ids, replies)
        for n, reply in replies.items():
            if reply.has_error():
                continue
            info, metrics = reply.content["info"], reply.content["metrics"]
            self.nodes[n] = NodeInfo(n, str(info["client"]), str(info["kind"]), str(info["site"]),
                                     int(metrics["num-examples"]))
        if len(self.nodes) < self.fed.min_clients:
            raise RuntimeError(f"only {len(self.nodes)} clients answered; federation.min_clients is "
                               f"{self.fed.min_clients}")
        log.info("clients: %s", ", ".join(sorted(f"{n.client} ({n.num_examples})" for n in self.nodes.values())))

    # -- rounds --------------------------------------------------------------

    def _available(self, node: NodeInfo, server_round: int) -> bool:
        """Seeded per-round availability draw (a phone is offline, charging, on a train)."""
        seed = (self.config.seed, server_round, zlib.crc32(node.client.encode()))
        return np.random.default_rng(seed).random() < self.fed.tier(node.kind).availability

    def train_round(self, server_round: int, global_state: State) -> tuple[State, RoundRecord]:
        started = time.perf_counter()
        sampled = [n for n, node in sorted(self.nodes.items())
                   if node.client not in self.retired and self._available(node, server_round)]
        arrays = ArrayRecord(global_state)
        central_config = self.central_dp.train_config() if self.central_dp else {}
        replies = self._send(sampled, MessageType.TRAIN, {
            n: RecordDict({"arrays": arrays, "config": self._round_config(self.nodes[n], server_round,
                                                                          **central_config)})
            for n in sampled})
        failed = self._failures(sampled, replies)
        answered = [r for r in replies.values() if not r.has_error()]
        good = [r for r in answered if r.content["info"]["status"] == "trained"]
        declined = {}
        for reply in answered:
            status, reason = str(reply.content["info"]["status"]), str(reply.content["info"]["reason"])
            if status != "trained":
                name = self.nodes[reply.metadata.src_node_id].client
                declined[name] = f"{status}: {reason}"
                if status in ("budget-exhausted", "dp-infeasible"):
                    self.retired[name] = f"round {server_round}: {status}: {reason}"
                    log.warning("client %s stops training: %s", name, reason)
        if self.central_dp is not None:
            for reply in list(good):
                if refusal := self.central_dp.refusal(global_state, reply):
                    failed[self.nodes[reply.metadata.src_node_id].client] = refusal
                    good.remove(reply)
        aggregated = len(good) >= self.fed.min_clients
        if aggregated and self.central_dp is not None:
            global_state = self.central_dp.aggregate(server_round, global_state, good, len(sampled))
        elif aggregated:
            # FedAvg sees only arrays and weights: clients' metric keys differ (DP or not),
            # and metrics are reported per client, never averaged across tiers.
            weighted = [RecordDict({"arrays": r.content["arrays"], "metrics": MetricRecord(
                {"num-examples": r.content["metrics"]["num-examples"]})}) for r in good]
            shared = aggregate_arrayrecords(weighted, "num-examples")
            global_state = merge_shared(global_state, shared.to_torch_state_dict())
        else:
            log.warning("round %d: %d replies < federation.min_clients=%d; global model unchanged",
                        server_round, len(good), self.fed.min_clients)
        record = RoundRecord(
            round=server_round, sampled=[self.nodes[n].client for n in sampled],
            trained=[self.nodes[r.metadata.src_node_id].client for r in good], failed=failed,
            aggregated=aggregated, seconds=0.0, declined=declined,
            train_metrics={self.nodes[r.metadata.src_node_id].client: dict(r.content["metrics"]) for r in answered},
            central_epsilon=self.central_dp.epsilon if self.central_dp else None,
        )
        record.seconds = time.perf_counter() - started
        return global_state, record

    def evaluate_round(self, server_round: int, global_state: State, final: bool = False
                       ) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
        node_ids = sorted(self.nodes)
        arrays = ArrayRecord(global_state)
        records = {}
        for n in node_ids:
            content = RecordDict({"arrays": arrays,
                                  "config": self._round_config(self.nodes[n], server_round, final=final)})
            if final:
                content["start"] = ArrayRecord(self.start_state)
            records[n] = content
        replies = self._send(node_ids, MessageType.EVALUATE, records)
        failed = self._failures(node_ids, replies)
        metrics = {self.nodes[n].client: dict(r.content["metrics"]) for n, r in replies.items()
                   if not r.has_error()}
        return metrics, failed

    def central_metrics(self, global_state: State) -> dict[str, float]:
        if self.central_test is None:
            return {}
        return {k: float(v) for k, v in evaluate_state(global_state, self.central_test).items()}

    # -- persistence ---------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.run_dir / "server" / SERVER_STATE

    def _save(self, state: ServerState) -> None:
        save_torch(self.state_path, asdict(state))
        save_checkpoint(self.run_dir / "server" / f"global-round-{state.round:03d}.pt", Checkpoint(
            model="student", state_dict=state.global_state, role=f"global (round {state.round})",
            config=self.config.to_dict(), seed=self.config.seed,
            metrics=state.history[-1]["central"] if state.history else {}))

    def _load(self) -> ServerState | None:
        if not (self.resume and self.state_path.is_file()):
            return None
        saved = torch.load(self.state_path, weights_only=False)
        return ServerState(**saved)

    def _start_central_dp(self, state: ServerState) -> None:
        """Client-level DP's accountant; a resumed run continues its epsilon."""
        central = self.config.privacy.central
        if not central.enabled:
            return
        # The population is the federation's size, not who answered today: a resumed accountant must match it.
        self.central_dp = CentralDP(central, self.expected_clients)
        if state.central_accountant is not None:
            self.central_dp.load_state_dict(state.central_accountant)
        elif state.round:
            raise ConfigError(f"privacy.central is enabled, but rounds 1-{state.round} of this run released "
                              "global models without it; start a new run")

    def run(self) -> dict[str, Any]:
        self.discover()
        state = self._load() or ServerState(0, self.start_state, self.start_state, [])
        self.retired = dict(state.retired)
        self._start_central_dp(state)
        if state.round:
            log.info("resuming after round %d", state.round)
        global_state = state.global_state
        stopped_at, stop_reason = None, None
        for server_round in range(state.round + 1, self.fed.rounds + 1):
            # Checked before the clients train: a round whose release would exceed max_epsilon never starts.
            stop_reason = self.central_dp.stop_reason(server_round) if self.central_dp else None
            if stop_reason:
                stopped_at = server_round - 1
                log.warning("client-level DP: the run stops after round %d: %s", stopped_at, stop_reason)
                break
            global_state, record = self.train_round(server_round, global_state)
            record.eval_metrics, eval_failed = self.evaluate_round(server_round, global_state)
            record.failed.update({k: v for k, v in eval_failed.items() if k not in record.failed})
            record.central = self.central_metrics(global_state)
            state = ServerState(server_round, global_state, self.start_state, [*state.history, asdict(record)],
                                dict(self.retired), self.central_dp.state_dict() if self.central_dp else None)
            self._save(state)
            log.info("round %d/%d: %d/%d trained, central accuracy %s", server_round, self.fed.rounds,
                     len(record.trained), len(record.sampled), record.central.get("accuracy"))
        final, final_failed = self.evaluate_round(self.fed.rounds, global_state, final=True)
        return {
            "clients": {n.client: asdict(n) for n in self.nodes.values()},
            "history": state.history,
            "final": final,
            "final_failed": final_failed,
            "retired": self.retired,
            "central_start": self.central_metrics(self.start_state),
            "central_final": self.central_metrics(global_state),
            "central_dp": (self.central_dp.summary(state.history, stopped_at, stop_reason) if self.central_dp
                           else {"enabled": False}),
        }
