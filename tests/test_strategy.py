"""The server's strategy without a Flower run: sampling, declines, shared-key merging, reply screening,
discovery, and client-level DP through Flower's wrapper. Messages are built by hand, as a client would."""

from __future__ import annotations

import time

import dp_accounting
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.task_identity import TaskIdentity

from edgemri.core.config import ConfigError
from edgemri.core.federation import protocol as p
from edgemri.core.federation.personalize import State
from edgemri.core.registries import REGISTRIES, parse_config
from edgemri.models import Student
from edgemri.server.app import discover
from edgemri.server.strategy import (
    CentralAccountant,
    FederationStrategy,
    RoundState,
    available,
    sample_clients,
    with_central_dp,
)

NODES = {1: p.ClientInfo("hospital-a", "hospital", "site1", 100),
         2: p.ClientInfo("hospital-b", "hospital", "site2", 50),
         3: p.ClientInfo("phone-a", "phone", "site1", 10)}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps messages with the run's id; outside a run the test sets one."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _config(**federation: object):
    return parse_config({"seed": 3, "federation": {"min_clients": 1, "method": "fedavg", **federation}})


def _start() -> State:
    torch.manual_seed(0)
    return Student().state_dict()


def _reply(node: int, *, arrays: State | None = None, metrics: dict | None = None, status: str | None = "trained",
           message_type: str = MessageType.TRAIN) -> Message:
    content = RecordDict({p.METRICS: MetricRecord(metrics if metrics is not None else {p.NUM_EXAMPLES: 10})})
    if arrays is not None:
        content[p.ARRAYS] = ArrayRecord(arrays)
    if status is not None:
        content[p.INFO] = ConfigRecord({"status": status})
    metadata = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=600.0, message_type=message_type)
    return Message(content, metadata=metadata)


def _moved(state: State, norm: float, seed: int) -> State:
    rng = np.random.default_rng(seed)
    update = {k: rng.normal(size=v.shape) for k, v in state.items()}
    scale = norm / np.sqrt(sum(float((u**2).sum()) for u in update.values()))
    return {k: v + torch.from_numpy(scale * update[k]).to(v.dtype) for k, v in state.items()}


def _flat(state: State) -> np.ndarray:
    return np.concatenate([v.numpy().ravel().astype(np.float64) for v in state.values()])


def _round(strategy, replies: list[Message], server_round: int = 1):
    """configure_train, then aggregate the given replies; returns (sent messages, new global state)."""
    inner = getattr(strategy, "strategy", strategy)  # a DP wrapper holds the strategy
    sent = list(strategy.configure_train(server_round, ArrayRecord(inner.global_state), ConfigRecord(), None))
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return sent, (None if arrays is None else arrays.to_torch_state_dict())


def test_sampling_skips_retired_and_offline_clients_and_sends_each_tier_its_spec() -> None:
    config = _config(tiers={"phone": {"availability": 0.5, "local_epochs": 3}})
    strategy = FederationStrategy(config, dict(NODES), _start(), state=RoundState(retired={"hospital-b": "x"}))
    online = {r: available(config, NODES[3], r) for r in range(1, 30)}
    assert set(online.values()) == {True, False}  # the seeded draw varies by round
    for server_round in (1, 2, 3):
        sent, _ = _round(strategy, [], server_round)
        names = [NODES[m.metadata.dst_node_id].client for m in sent]
        assert names == ["hospital-a"] + (["phone-a"] if online[server_round] else [])
        for message in sent:
            spec = p.RoundInstructions.from_config(dict(message.content[p.CONFIG]), REGISTRIES).spec
            assert spec == config.federation.tier(NODES[message.metadata.dst_node_id].kind).train_spec()


# Two hospitals and twenty phones, under node ids Flower could have drawn.
POPULATION = {**{n: c for n, c in NODES.items() if c.kind == "hospital"},
              **{100 + 7 * i: p.ClientInfo(f"phone-{i:02d}", "phone", f"site{i % 2 + 1}", 10) for i in range(20)}}
HOSPITALS = {"hospital-a", "hospital-b"}


def _online_phones(config, retired: set[str], server_round: int) -> set[str]:
    return {c.client for c in POPULATION.values()
            if c.kind == "phone" and c.client not in retired and available(config, c, server_round)}


def test_a_tiers_sample_is_seeded_and_drawn_among_the_online_clients_that_are_not_retired() -> None:
    config = _config(tiers={"phone": {"availability": 0.7, "sample_per_round": 5}})
    retired = {"phone-03", "phone-11"}
    samples = []
    for server_round in range(1, 9):
        chosen = sample_clients(config, POPULATION.values(), retired, server_round)
        online = _online_phones(config, retired, server_round)
        assert len(online) > 5 and chosen >= HOSPITALS  # hospitals (sample_per_round null): every one trains
        assert len(chosen - HOSPITALS) == 5 and chosen - HOSPITALS <= online
        samples.append(chosen)
    assert len(set(map(frozenset, samples))) == len(samples)  # another round, another sample
    # The same seed, round and clients give the same sample whatever node ids Flower gave them, in any order.
    renumbered = [POPULATION[n] for n in sorted(POPULATION, reverse=True)]
    assert [sample_clients(config, renumbered, retired, r) for r in range(1, 9)] == samples
    reseeded = config.replace(seed=config.seed + 1)
    assert [sample_clients(reseeded, POPULATION.values(), retired, r) for r in range(1, 9)] != samples


def test_a_fraction_is_of_the_tiers_clients_rounded_up_and_never_more_than_are_online() -> None:
    fraction = _config(tiers={"phone": {"availability": 0.7, "sample_per_round": 0.07}})
    for server_round in range(1, 6):  # 0.07 x 20 phones = 1.4: 2 per round
        assert len(sample_clients(fraction, POPULATION.values(), set(), server_round) - HOSPITALS) == 2
    most = _config(tiers={"phone": {"availability": 0.5, "sample_per_round": 18}})
    for server_round in range(1, 6):  # fewer than 18 online: every online phone trains
        online = _online_phones(most, set(), server_round)
        assert len(online) < 18 and sample_clients(most, POPULATION.values(), set(), server_round) == online | HOSPITALS
    everyone = _config(tiers={"phone": {"availability": 0.7}})  # the default: no sample, every online client
    assert sample_clients(everyone, POPULATION.values(), set(), 1) == _online_phones(everyone, set(), 1) | HOSPITALS


def test_the_strategy_sends_the_sample_and_client_level_dp_records_its_real_rate() -> None:
    config = parse_config({"seed": 3, "federation": {"min_clients": 1, "method": "fedavg",
                                                     "tiers": {"phone": {"availability": 0.7, "sample_per_round": 4}}},
                           "privacy": {"central": {"enabled": True}}})
    strategy = FederationStrategy(config, dict(POPULATION), _start(), state=RoundState(retired={"phone-05": "x"}))
    accountant = CentralAccountant(config.privacy.central, population=len(POPULATION))
    wrapper = with_central_dp(strategy, config.privacy.central, accountant)
    for server_round in (1, 2):
        sent, _ = _round(wrapper, [], server_round)
        names = {POPULATION[m.metadata.dst_node_id].client for m in sent}
        assert names == set(strategy.record.sampled) == sample_clients(config, POPULATION.values(), {"phone-05"},
                                                                       server_round)
        strategy.after_round(server_round, ArrayRecord(strategy.global_state))
    rates = [r["sample_rate"] for r in accountant.summary(strategy.state.history, None)["epsilon_per_round"]]
    assert rates == [6 / 22, 6 / 22]  # 2 hospitals + 4 phones of the 22 clients, not every online one
    assert accountant.summary([], None)["accountant"]["sampling"] == "no-amplification"


def test_a_sampled_tier_evaluates_only_its_rounds_cohort_and_only_those_asked_can_miss_a_reply() -> None:
    config = _config(tiers={"phone": {"availability": 0.7, "sample_per_round": 3}})
    strategy = FederationStrategy(config, dict(POPULATION), _start())
    for server_round in (1, 2):
        cohort = [n for n, c in POPULATION.items() if c.client in sample_clients(config, POPULATION.values(), set(),
                                                                                   server_round)]
        _round(strategy, [_reply(n, arrays=strategy.global_state) for n in cohort], server_round)
        asked = list(strategy.configure_evaluate(server_round, ArrayRecord(strategy.global_state), ConfigRecord(),
                                                 None))
        names = {POPULATION[m.metadata.dst_node_id].client for m in asked}
        assert names == set(strategy.record.sampled) and names >= HOSPITALS and len(names - HOSPITALS) == 3
        answered = next(m.metadata.dst_node_id for m in asked if POPULATION[m.metadata.dst_node_id].kind == "phone")
        reply = _reply(answered, metrics={p.NUM_EXAMPLES: 5}, status=None, message_type=MessageType.EVALUATE)
        strategy.aggregate_evaluate(server_round, [reply])
        missing = names - {POPULATION[answered].client}
        assert set(strategy.record.eval_metrics) == {POPULATION[answered].client}
        assert strategy.record.failed == dict.fromkeys(missing, p.FailureCode.NO_REPLY.value)
    # Without a sample every client is asked, as before.
    everyone = FederationStrategy(_config(), dict(POPULATION), _start())
    _round(everyone, [], 1)
    assert len(list(everyone.configure_evaluate(1, ArrayRecord(everyone.global_state), ConfigRecord(), None))) == 22


def test_fedavg_weights_by_examples_and_a_decline_retires_the_client() -> None:
    start = _start()
    strategy = FederationStrategy(_config(), dict(NODES), start)
    a, b = _moved(start, 1.0, 1), _moved(start, 1.0, 2)
    _, new = _round(strategy, [_reply(1, arrays=a, metrics={p.NUM_EXAMPLES: 30}),
                               _reply(2, arrays=b, metrics={p.NUM_EXAMPLES: 10}),
                               _reply(3, metrics={p.NUM_EXAMPLES: 5, p.EPSILON: 8.1}, status="budget-exhausted")])
    np.testing.assert_allclose(_flat(new), 0.75 * _flat(a) + 0.25 * _flat(b), atol=1e-6)
    record = strategy.record
    assert record.trained == ["hospital-a", "hospital-b"] and record.declined == {"phone-a": "budget-exhausted"}
    assert "phone-a" in strategy.state.retired
    sent, _ = _round(strategy, [], 2)
    assert 3 not in {m.metadata.dst_node_id for m in sent}


def test_fedper_keeps_the_global_head_and_averages_the_shared_convs() -> None:
    start = _start()
    strategy = FederationStrategy(_config(method="fedper"), dict(NODES), start)
    a, b = _moved(start, 1.0, 1), _moved(start, 1.0, 2)
    _, new = _round(strategy, [_reply(1, arrays=a), _reply(2, arrays=b)])
    for key, value in new.items():
        expected = start[key] if key.startswith(Student.HEAD_PREFIX) else (a[key] + b[key]) / 2
        torch.testing.assert_close(value, expected.to(value.dtype), atol=1e-6, rtol=0)


def _poisoned(start: State) -> dict[str, Message]:
    """One bad reply per finding of the hardening issue, all from node 2."""
    bias = next(k for k in start if k.endswith("bias"))
    wrong_shape = {**start, bias: start[bias][:1]}  # broadcastable: would have been averaged in
    nan = {k: v.clone() for k, v in start.items()}
    next(iter(nan.values())).view(-1)[0] = float("nan")
    missing = dict(list(start.items())[1:])
    extra = {**start, "extra.weight": torch.zeros(2)}
    return {
        "nan": _reply(2, arrays=nan), "inf-examples": _reply(2, arrays=start, metrics={p.NUM_EXAMPLES: float("inf")}),
        "missing-array": _reply(2, arrays=missing), "wrong-shape": _reply(2, arrays=wrong_shape),
        "extra-key": _reply(2, arrays=extra), "trained-without-arrays": _reply(2),
        "negative-examples": _reply(2, arrays=start, metrics={p.NUM_EXAMPLES: -5}),
        "more-examples-than-declared": _reply(2, arrays=start, metrics={p.NUM_EXAMPLES: 10**6}),
        "nan-examples": _reply(2, arrays=start, metrics={p.NUM_EXAMPLES: float("nan")}),
        "no-info": _reply(2, arrays=start, status=None), "unknown-status": _reply(2, arrays=start, status="pwned"),
        "negative-epsilon": _reply(2, arrays=start, metrics={p.NUM_EXAMPLES: 10, p.EPSILON: -1.0}),
        "integer-arrays": _reply(2, arrays={k: torch.zeros(v.shape, dtype=torch.int64) for k, v in start.items()}),
    }


@pytest.mark.parametrize("case", list(_poisoned(_start())))
def test_a_bad_reply_is_that_clients_failure_and_never_averaged(case: str) -> None:
    start = _start()
    strategy = FederationStrategy(_config(), dict(NODES), start)
    honest = _moved(start, 1.0, 1)
    _, new = _round(strategy, [_reply(1, arrays=honest, metrics={p.NUM_EXAMPLES: 40}), _poisoned(start)[case]])
    record = strategy.record
    assert record.failed["hospital-b"] == p.FailureCode.BAD_REPLY.value
    assert record.trained == ["hospital-a"]
    np.testing.assert_allclose(_flat(new), _flat(honest), atol=1e-6)  # the honest client alone


def test_an_update_above_the_norm_bound_is_refused() -> None:
    start = _start()
    strategy = FederationStrategy(_config(max_update_norm=5.0), dict(NODES), start)
    honest = _moved(start, 1.0, 1)
    _, new = _round(strategy, [_reply(1, arrays=honest), _reply(2, arrays=_moved(start, 1e6, 2))])
    assert strategy.record.failed["hospital-b"] == p.FailureCode.UPDATE_TOO_LARGE.value
    np.testing.assert_allclose(_flat(new), _flat(honest), atol=1e-6)


def test_a_client_whose_epsilon_goes_down_is_refused_and_retired() -> None:
    start = _start()
    strategy = FederationStrategy(_config(), dict(NODES), start)
    _round(strategy, [_reply(1, arrays=start, metrics={p.NUM_EXAMPLES: 10, p.EPSILON: 2.0, p.LEDGER_RECORDS: 2})])
    strategy.after_round(1, ArrayRecord(strategy.global_state))
    _round(strategy, [_reply(1, arrays=start, metrics={p.NUM_EXAMPLES: 10, p.EPSILON: 1.0, p.LEDGER_RECORDS: 1})], 2)
    assert strategy.record.failed["hospital-a"] == p.FailureCode.LEDGER_ROLLBACK.value
    assert "hospital-a" in strategy.state.retired


def test_a_reply_from_an_unknown_node_or_a_second_reply_is_ignored() -> None:
    start = _start()
    strategy = FederationStrategy(_config(), dict(NODES), start)
    honest = _moved(start, 1.0, 1)
    _, new = _round(strategy, [_reply(1, arrays=honest), _reply(1, arrays=_moved(start, 50.0, 2)),
                               _reply(99, arrays=_moved(start, 50.0, 3))])
    np.testing.assert_allclose(_flat(new), _flat(honest), atol=1e-6)


class _Grid:
    def __init__(self, replies: list[Message]) -> None:
        self.replies = replies
        self.timeouts: list[float] = []

    def get_node_ids(self) -> list[int]:
        return [r.metadata.src_node_id for r in self.replies]

    def send_and_receive(self, messages, timeout: float):
        self.timeouts.append(timeout)
        return self.replies


def _info(node: int, name: str, kind: str = "phone", n: object = 10) -> Message:
    reply = _reply(node, metrics={p.NUM_EXAMPLES: n}, status=None, message_type=MessageType.QUERY)
    reply.content[p.INFO] = ConfigRecord({"client": name, "kind": kind, "site": "site1"})
    return reply


def test_discovery_refuses_duplicate_names_unknown_kinds_and_bad_sizes() -> None:
    grid = _Grid([_info(1, "phone-a"), _info(2, "phone-a"), _info(3, "hospital-a", "hospital", 50),
                  _info(4, "x", kind="satellite"), _info(5, "phone-b", n=-3), _info(6, "../../etc")])
    nodes, excluded = discover(grid, expected=6, kinds=("hospital", "phone"), round_timeout_s=7, wait_s=1)
    discover(grid, expected=6, kinds=("hospital", "phone"), round_timeout_s=0.5, wait_s=1)
    assert grid.timeouts == [7, 1]  # answers are awaited as long as a round's replies, at least as long as nodes
    assert {c.client for c in nodes.values()} == {"hospital-a"}
    assert set(excluded) == {"node-1", "node-2", "node-4", "node-5", "node-6"}
    assert "duplicate" in excluded["node-1"] and "kind" in excluded["node-4"]


# -- client-level DP: Flower's wrapper around the strategy -----------------------------------------


def _central_dp(side: str = "server", **settings: object):
    config = parse_config({"seed": 0, "federation": {"min_clients": 1, "method": "fedavg"},
                           "privacy": {"central": {"enabled": True, "side": side, **settings}}})
    start = _start()
    strategy = FederationStrategy(config, dict(NODES), start)
    accountant = CentralAccountant(config.privacy.central, population=len(NODES))
    return with_central_dp(strategy, config.privacy.central, accountant), strategy, accountant, start


def test_server_side_clips_each_update_and_averages_unweighted() -> None:
    wrapper, strategy, accountant, start = _central_dp(noise_multiplier=1e-9, clipping_norm=1.0)
    big, small = _moved(start, 10.0, 1), _moved(start, 0.5, 2)
    _, new = _round(wrapper, [_reply(1, arrays=big, metrics={p.NUM_EXAMPLES: 100}),
                              _reply(2, arrays=small, metrics={p.NUM_EXAMPLES: 10})])
    expected = ((_flat(big) - _flat(start)) / 10.0 + (_flat(small) - _flat(start))) / 2  # each client counts once
    np.testing.assert_allclose(_flat(new) - _flat(start), expected, atol=1e-5)
    assert strategy.record.central_epsilon == accountant.epsilon > 0


def test_noise_std_is_sigma_times_c_over_the_clients_averaged_and_fedper_heads_get_none() -> None:
    wrapper, strategy, _, start = _central_dp(noise_multiplier=2.0, clipping_norm=0.5)
    strategy.shared = [k for k in start if not k.startswith(Student.HEAD_PREFIX)]  # as FedPer shares
    moved = [_moved(start, 5.0, s) for s in (1, 2)]
    np.random.seed(0)  # Flower draws the noise from NumPy's global generator
    _, new = _round(wrapper, [_reply(n, arrays=m) for n, m in zip((1, 2), moved, strict=True)])
    shared = strategy.shared
    clipped = np.mean([np.concatenate([((m[k] - start[k]) * 0.1).numpy().ravel() for k in shared]) for m in moved], 0)
    noise = np.concatenate([(new[k] - start[k]).numpy().ravel() for k in shared]) - clipped
    # 336 shared values: the sample std is within ~4% (one standard error) of sigma * C / m.
    assert noise.std() == pytest.approx(2.0 * 0.5 / 2, rel=0.12)  # two clients averaged, not three known
    assert all(torch.equal(new[k], start[k]) for k in start if k.startswith(Student.HEAD_PREFIX))


def test_client_side_mode_asks_clients_to_clip_and_refuses_an_unclipped_update() -> None:
    assert p.CLIPPING_NORM_KEY == KEY_CLIPPING_NORM  # the one constant taken from Flower's internals
    wrapper, strategy, _, start = _central_dp(side="client", clipping_norm=0.3)
    clipped = {k: start[k] + (v - start[k]) * (0.3 / 2.0) for k, v in _moved(start, 2.0, 3).items()}
    sent, _ = _round(wrapper, [_reply(1, arrays=clipped), _reply(2, arrays=_moved(start, 2.0, 4))])
    sent_norms = [p.RoundInstructions.from_config(dict(m.content[p.CONFIG]), REGISTRIES).clipping_norm for m in sent]
    assert sent_norms and all(norm == 0.3 for norm in sent_norms)
    assert strategy.record.trained == ["hospital-a"]
    assert strategy.record.failed["hospital-b"] == p.FailureCode.NOT_CLIPPED.value


def test_epsilon_matches_dp_accounting_resumes_and_the_stop_rule_ends_training() -> None:
    wrapper, strategy, accountant, start = _central_dp(noise_multiplier=1.0, delta=1e-3, max_epsilon=6.0)
    for server_round in (1, 2):
        _round(wrapper, [_reply(1, arrays=_moved(start, 1.0, server_round))], server_round)
        strategy.after_round(server_round, ArrayRecord(strategy.global_state))
    reference = dp_accounting.rdp.RdpAccountant()  # two Gaussian releases, no amplification
    reference.compose(dp_accounting.GaussianDpEvent(1.0), 2)
    assert accountant.epsilon == pytest.approx(reference.get_epsilon(1e-3), rel=1e-6)
    sent, new = _round(wrapper, [], 3)
    assert sent == [] and new is None and "max_epsilon=6.0" in strategy.stop_reason
    resumed = CentralAccountant(accountant.config, len(NODES), accountant.accountant.state_dict())
    assert resumed.epsilon == pytest.approx(accountant.epsilon) and resumed.stop_reason(3)


def test_no_noise_is_refused() -> None:
    with pytest.raises(ConfigError, match="noise_multiplier"):
        _central_dp(noise_multiplier=0.0)


def test_an_evaluation_that_failed_on_the_device_is_a_failure_not_a_result() -> None:
    strategy = FederationStrategy(_config(), dict(NODES), _start())
    failed = _reply(2, metrics={p.NUM_EXAMPLES: 0}, status=None, message_type=MessageType.EVALUATE)
    failed.content[p.INFO] = ConfigRecord({"status": "failed", "code": "data-error"})
    good = _reply(1, metrics={p.NUM_EXAMPLES: 5, p.PERSONAL_ACCURACY: 0.8}, status=None,
                  message_type=MessageType.EVALUATE)
    metrics, failures = strategy.collect_evaluate([good, failed], sorted(NODES))
    assert metrics == {"hospital-a": {p.NUM_EXAMPLES: 5.0, p.PERSONAL_ACCURACY: 0.8}}
    assert failures == {"hospital-b": "data-error", "phone-a": p.FailureCode.NO_REPLY.value}


def _pushed(messages: list[Message]) -> list[Message]:
    """What Flower's Grid does when it pushes instructions: each gets its message id (Metadata has no setter)."""
    for i, message in enumerate(messages):
        message.metadata.__dict__["_message_id"] = f"instruction-{i}"
    return messages


def _flower_error(answered: str, src_node_id: int, code: int, reason: str) -> Message:
    """An error reply Flower writes in a client's place, to the instruction with id ``answered``: from the
    SuperLink (node 1) or from the ServerApp's own node (the Grid)."""
    metadata = Metadata(run_id=1, message_id="", src_node_id=src_node_id, dst_node_id=src_node_id,
                        reply_to_message_id=answered, group_id="", created_at=time.time(), ttl=0.0,
                        message_type="system")  # Flower's SYSTEM_MESSAGE_TYPE
    return Message(Error(code=code, reason=reason), metadata=metadata)


def test_an_error_flower_sends_for_an_unreachable_client_is_that_clients_failure_not_its_apps() -> None:
    """Flower 1.42 answers for a node whose heartbeat lapsed (SuperLink, src node 1) and for a reply whose objects
    were lost (the Grid, src the ServerApp's node): the failure belongs to the client the instruction went to."""
    nodes = {n + 10: c for n, c in NODES.items()}  # Flower keeps node id 1 for the SuperLink itself
    strategy = FederationStrategy(_config(tiers={"phone": {"availability": 1.0}}), nodes, _start())
    sent = _pushed(list(strategy.configure_train(1, ArrayRecord(strategy.global_state), ConfigRecord(), None)))
    by_node = {m.metadata.dst_node_id: m.metadata.message_id for m in sent}
    crashed = _reply(11, arrays=strategy.global_state)
    crashed = Message(Error(code=0, reason="ClientApp raised"), metadata=crashed.metadata)  # its own app raised
    replies = [crashed, _flower_error(by_node[12], 1, 5, "Node unavailable: heartbeat lapsed"),
               _flower_error(by_node[13], 0, 3, "Reply message objects are unavailable.\nsecond line"),
               _flower_error(by_node[13], 1, 5, "a second answer for the same instruction"),
               _flower_error("no-such-instruction", 0, 3, "")]
    strategy.aggregate_train(1, replies)
    assert strategy.record.failed == {"hospital-a": p.FailureCode.INTERNAL.value,
                                      "hospital-b": p.FailureCode.UNAVAILABLE.value,
                                      "phone-a": p.FailureCode.UNAVAILABLE.value}
    asked = _pushed(list(strategy.configure_evaluate(1, ArrayRecord(strategy.global_state), ConfigRecord(), None)))
    answered = _reply(11, metrics={p.NUM_EXAMPLES: 5}, status=None, message_type=MessageType.EVALUATE)
    metrics, failed = strategy.collect_evaluate([answered, _flower_error(asked[1].metadata.message_id, 1, 5, "gone")],
                                                sorted(nodes))
    assert set(metrics) == {"hospital-a"}
    assert failed == {nodes[asked[1].metadata.dst_node_id].client: p.FailureCode.UNAVAILABLE.value,
                      nodes[asked[2].metadata.dst_node_id].client: p.FailureCode.NO_REPLY.value}


def _evaluation(node: int, val_accuracy: float, val_n: int) -> Message:
    return _reply(node, metrics={p.NUM_EXAMPLES: 5, p.GLOBAL_VAL_ACCURACY: val_accuracy, p.VAL_EXAMPLES: val_n},
                  status=None, message_type=MessageType.EVALUATE)


def test_federated_validation_keeps_the_global_model_of_the_best_round() -> None:
    start = _start()
    strategy = FederationStrategy(_config(), dict(NODES), start)
    # (hospital-a's and hospital-b's validation accuracy, weighted 30:10) per round: round 2 is best.
    rounds = {1: (0.5, 0.9), 2: (0.8, 0.2), 3: (0.6, 0.6)}  # weighted: 0.6, 0.65, 0.6
    models = {}
    for server_round, (a, b) in rounds.items():
        _, models[server_round] = _round(strategy, [_reply(1, arrays=_moved(start, 1.0, server_round))],
                                         server_round)
        strategy.aggregate_evaluate(server_round, [_evaluation(1, a, 30), _evaluation(2, b, 10)])
        strategy.after_round(server_round, ArrayRecord(strategy.global_state))
    assert [h.federated_val for h in strategy.state.history] == pytest.approx([0.6, 0.65, 0.6])
    assert strategy.state.best_round == 2
    assert all(torch.equal(strategy.best_state[k], models[2][k]) for k in start)


def _failed(node: int, code: p.FailureCode) -> Message:
    reply = _reply(node, metrics={p.NUM_EXAMPLES: 0}, status=None)
    reply.content[p.INFO] = ConfigRecord({"status": p.Status.FAILED.value, "code": code.value})
    return reply


def test_each_client_gets_back_the_most_its_ledger_reported_and_a_device_that_finds_its_ledger_below_retires(
        ) -> None:
    """The ledger floor: what the server saw travels back with every round; a device restored from a backup refuses
    to train below it (ledger-rollback), and the server stops sampling it."""
    start = _start()
    strategy = FederationStrategy(_config(), dict(NODES), start)
    _round(strategy, [_reply(1, arrays=start, metrics={p.NUM_EXAMPLES: 10, p.EPSILON: 2.5, p.LEDGER_RECORDS: 2})])
    strategy.after_round(1, ArrayRecord(strategy.global_state))
    sent, _ = _round(strategy, [_failed(1, p.FailureCode.LEDGER_ROLLBACK)], 2)
    floors = {NODES[m.metadata.dst_node_id].client: p.RoundInstructions.from_config(
        dict(m.content[p.CONFIG]), REGISTRIES).ledger_floor for m in sent}
    assert floors["hospital-a"] == p.LedgerFloor(2, 2.5) and floors["hospital-b"] == p.LedgerFloor()
    assert strategy.record.failed["hospital-a"] == p.FailureCode.LEDGER_ROLLBACK.value
    assert "hospital-a" in strategy.state.retired
    strategy.after_round(2, ArrayRecord(strategy.global_state))
    sent, _ = _round(strategy, [], 3)
    assert 1 not in {m.metadata.dst_node_id for m in sent}


def test_a_run_in_which_every_client_failed_every_round_is_a_failure_and_declines_are_not() -> None:
    """The issue's finding: every client failed every round (data-error) and the run exited 0."""
    def result(strategy: FederationStrategy) -> p.FederationResult:
        return p.FederationResult(clients={c.client: c for c in NODES.values()}, history=strategy.state.history,
                                  final={}, final_failed={}, retired={}, central_start={}, central_final={},
                                  central_dp={"enabled": False})

    start = _start()
    broken = FederationStrategy(_config(), dict(NODES), start)
    for server_round in (1, 2):
        sent, _ = _round(broken, [_failed(m, p.FailureCode.DATA) for m in (1, 2, 3)], server_round)
        broken.after_round(server_round, ArrayRecord(broken.global_state))
    failures = sum(len(h.failed) for h in broken.state.history)
    assert failures >= 4 and result(broken).all_failed() == f"data-error x{failures}"
    spent = FederationStrategy(_config(), dict(NODES), start)
    _round(spent, [_reply(m, metrics={p.NUM_EXAMPLES: 5, p.EPSILON: 8.1}, status="budget-exhausted")
                   for m in (1, 2, 3)])
    spent.after_round(1, ArrayRecord(spent.global_state))
    assert result(spent).all_failed() is None  # every client out of budget: declines, not failures
    working = FederationStrategy(_config(), dict(NODES), start)
    _round(working, [_reply(1, arrays=start), _failed(2, p.FailureCode.DATA)])
    working.after_round(1, ArrayRecord(working.global_state))
    assert result(working).all_failed() is None
