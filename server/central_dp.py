"""Client-level (central) differential privacy for the server's round loop, with Flower's DP code.

Per aggregated round: each trained client's update (its shared arrays minus the global ones) is clipped to
the clipping norm C, the clipped updates are averaged *unweighted*, and Gaussian noise of standard deviation
sigma * C / m is added to the mean of the m clients. Clipping, averaging and noise are Flower's strategy
wrappers over Flower's FedAvg: ``DifferentialPrivacyServerSideFixedClipping`` (side: server) or
``DifferentialPrivacyClientSideFixedClipping`` (side: client; the clients clip, see clients/client_app.py).
Epsilon is Flower's ``RdpAccountant`` (Google's dp-accounting RDP underneath).

Our loop samples the nodes itself (availability draws, retired clients), so it does not run a wrapper as
a strategy: it builds one per round for the clients that trained and calls its public ``aggregate_train``,
after setting ``current_arrays`` (the global arrays, which ``configure_train`` would have set). The
wrapper's own accountant hook is not used because it lives in ``configure_train``: it lets the inner
strategy sample the nodes, fixes the number of clients when the wrapper is built, and in accounted mode
drops the whole round as soon as one sampled client did not send arrays (ours decline for their
sample-level budget, or fail). The same accountant is driven here through its public API instead:
``would_exceed`` before a round, ``compose`` after each noisy release.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_stdv, get_norm

from edgemri.core.config import CentralDPConfig, ConfigError
from edgemri.core.personalize import State, merge_shared

log = logging.getLogger(__name__)

AGGREGATION = "unweighted mean of the clipped updates (each client counts once)"


class CentralDP:
    """Clip, average, noise and account the clients' shared arrays, one aggregated round at a time."""

    def __init__(self, config: CentralDPConfig, population: int) -> None:
        if config.noise_multiplier <= 0:
            raise ConfigError(f"config key 'privacy.central.noise_multiplier' has value {config.noise_multiplier!r}; "
                              "allowed: a number > 0 when privacy.central is enabled (without noise there is no "
                              "client-level guarantee)")
        self.config = config
        self.population = population
        # No amplification by sampling: which clients train is decided by seeded availability draws and by
        # retirement, not by secret uniform sampling, so the sampling rate cannot lower epsilon. Flower's
        # fixed-clipping wrappers accept only this mode for accounting, too.
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=config.delta, population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=config.max_epsilon))

    # -- accounting ----------------------------------------------------------

    def _event(self, sampled: int) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(noise_multiplier=self.config.noise_multiplier, sample_size=sampled,
                                    population_size=self.population)

    @property
    def epsilon(self) -> float:
        """Cumulative client-level epsilon at the configured delta, over every noisy release so far."""
        return self.accountant.get_privacy_spent().epsilon

    def stop_reason(self, server_round: int) -> str | None:
        """Why round ``server_round`` must not run (its release would exceed max_epsilon), or None."""
        # Without amplification a round costs one Gaussian release whoever is sampled: any sample size will do.
        if not self.accountant.would_exceed(self._event(self.population)):
            return None
        return (f"round {server_round} would take client-level epsilon above max_epsilon="
                f"{self.config.max_epsilon} (epsilon {self.epsilon:.3f} at delta {self.config.delta:g} after "
                f"{self.accountant.num_releases} noisy rounds)")

    def state_dict(self) -> dict[str, object]:
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Continue a resumed run's epsilon (raises ValueError if the DP settings changed)."""
        self.accountant.load_state_dict(state)

    # -- one round -----------------------------------------------------------

    def train_config(self) -> dict[str, float]:
        """Extra TRAIN config: with side: client, the clipping norm under the key Flower's client mods read."""
        return {KEY_CLIPPING_NORM: self.config.clipping_norm} if self.config.side == "client" else {}

    def refusal(self, global_state: State, reply: Message) -> str | None:
        """Why a trained reply must not be aggregated, or None.

        A zero update: Flower's clipping divides by the update's norm and would stop the server. With
        side: client, an update above the clipping norm: the noise is calibrated to C, so a client that did
        not clip (an old app, a bug) would void the guarantee; the server checks instead of trusting.
        """
        arrays = reply.content["arrays"]
        reference = [global_state[k].numpy() for k in arrays]
        norm = get_norm([arrays[k].numpy() - ref for k, ref in zip(arrays, reference, strict=True)])
        if norm == 0:
            return "its update is zero (the model did not change), which Flower's clipping cannot scale"
        # The client sends global + clipped update in float32: rounding adds up to eps32 * |global| to the norm.
        slack = 2 * float(np.finfo(np.float32).eps) * get_norm(reference) + 1e-6 * self.config.clipping_norm
        if self.config.side == "server" or norm <= self.config.clipping_norm + slack:
            return None
        return f"update norm {norm:.4g} exceeds privacy.central.clipping_norm={self.config.clipping_norm}: not clipped"

    def aggregate(self, server_round: int, global_state: State, replies: list[Message], sampled: int) -> State:
        """The global state with the noisy mean of the replies' clipped updates; the release is accounted."""
        keys = list(replies[0].content["arrays"])
        wrapper_type = (DifferentialPrivacyServerSideFixedClipping if self.config.side == "server"
                        else DifferentialPrivacyClientSideFixedClipping)
        # Noise std sigma * C / m: the mean's sensitivity to adding or removing one client is C / m.
        wrapper = wrapper_type(FedAvg(), self.config.noise_multiplier, self.config.clipping_norm, len(replies))
        if isinstance(wrapper, DifferentialPrivacyServerSideFixedClipping):
            # The wrapper clips each reply against these arrays position by position: same keys, same order.
            wrapper.current_arrays = ArrayRecord({k: global_state[k] for k in keys})
        # Client-level DP averages unweighted: every client counts once. Weighting by num-examples would let a
        # large client move the mean by more than C / m, which the noise does not cover.
        # Fresh messages (made with Flower's reply constructor: they are never sent) because the wrapper
        # rewrites their arrays and FedAvg wants one MetricRecord with the same keys in every reply.
        unweighted = [Message(RecordDict({"arrays": ArrayRecord({k: r.content["arrays"][k] for k in keys}),
                                          "metrics": MetricRecord({"num-examples": 1})}), reply_to=r)
                      for r in replies]
        arrays, _ = wrapper.aggregate_train(server_round, unweighted)
        if arrays is None:
            raise RuntimeError(f"round {server_round}: Flower's DP wrapper aggregated nothing from "
                               f"{len(replies)} replies")
        self.accountant.compose(self._event(sampled))
        log.info("round %d: client-level DP, %d clients, noise std %.4g, epsilon %.3f", server_round, len(replies),
                 compute_stdv(self.config.noise_multiplier, self.config.clipping_norm, len(replies)), self.epsilon)
        return merge_shared(global_state, arrays.to_torch_state_dict())

    # -- the run's result ----------------------------------------------------

    def summary(self, history: list[dict[str, Any]], stopped_at_round: int | None, stop_reason: str | None
                ) -> dict[str, Any]:
        """The result's ``central_dp`` section: settings, epsilon per round, why the run stopped."""
        c = self.config
        per_round = []
        for h in history:
            clients = len(h["trained"]) if h["aggregated"] else 0
            per_round.append({
                "round": h["round"], "epsilon": h["central_epsilon"], "clients": clients,
                "sample_rate": len(h["sampled"]) / self.population,
                "noise_std": compute_stdv(c.noise_multiplier, c.clipping_norm, clients) if clients else None})
        return {
            "enabled": True, "side": c.side, "noise_multiplier": c.noise_multiplier,
            "clipping_norm": c.clipping_norm, "delta": c.delta, "max_epsilon": c.max_epsilon,
            "epsilon": self.epsilon, "epsilon_per_round": per_round, "aggregation": AGGREGATION,
            "stopped_at_round": stopped_at_round, "stop_reason": stop_reason,
            "accountant": {"name": "rdp", "implementation": "flwr.serverapp.RdpAccountant (Google dp-accounting)",
                           "sampling": SamplingMethod.NO_AMPLIFICATION.value,
                           "neighboring_relation": NeighboringRelation.ADD_OR_REMOVE_ONE.value,
                           "population": self.population, "noisy_rounds": self.accountant.num_releases},
        }
