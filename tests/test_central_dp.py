"""Client-level (central) DP: Flower's clipping, noise and RDP accounting driven from our round loop."""

from __future__ import annotations

import json
import time
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from edgemri.clients.client_app import clip_update
from edgemri.core.checkpoint import Checkpoint, save_checkpoint
from edgemri.core.config import CentralDPConfig, ConfigError, parse_config
from edgemri.core.personalize import State
from edgemri.models import Student
from edgemri.server.central_dp import CentralDP
from edgemri.simulation.federate import federate


def _global() -> State:
    torch.manual_seed(0)
    return Student().state_dict()


def _flat(state: State) -> np.ndarray:
    return np.concatenate([v.numpy().ravel().astype(np.float64) for v in state.values()])


def _moved(global_state: State, norm: float, seed: int) -> State:
    """The global state plus an update of exactly ``norm`` in a random direction."""
    rng = np.random.default_rng(seed)
    update = {k: rng.normal(size=v.shape) for k, v in global_state.items()}
    scale = norm / np.sqrt(sum(float((u**2).sum()) for u in update.values()))
    return {k: v + torch.from_numpy(scale * update[k]).to(v.dtype) for k, v in global_state.items()}


def _reply(shared: State, num_examples: int) -> Message:
    """A client's TRAIN reply as the server receives it (metadata set explicitly: no Flower run here)."""
    metadata = Metadata(run_id=1, message_id="", src_node_id=7, dst_node_id=0, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
    return Message(RecordDict({"arrays": ArrayRecord(shared), "metrics": MetricRecord({"num-examples": num_examples})}),
                   metadata=metadata)


def _central(**settings: object) -> CentralDP:
    return CentralDP(CentralDPConfig(enabled=True, **settings), population=4)


def test_server_side_clips_each_update_and_averages_unweighted() -> None:
    start = _global()
    big, small = _moved(start, 10.0, seed=1), _moved(start, 0.5, seed=2)
    dp = _central(side="server", noise_multiplier=1e-9, clipping_norm=1.0)  # noise negligible here
    new = dp.aggregate(1, start, [_reply(big, 1000), _reply(small, 10)], sampled=2)
    expected = ((_flat(big) - _flat(start)) / 10.0 + (_flat(small) - _flat(start))) / 2  # each client counts once
    np.testing.assert_allclose(_flat(new) - _flat(start), expected, atol=1e-5)
    assert np.linalg.norm(_flat(new) - _flat(start)) <= 1.0


def test_noise_std_is_sigma_times_c_over_the_number_of_clients() -> None:
    start = _global()
    moved = [_moved(start, 5.0, seed=s) for s in range(4)]
    dp = _central(side="server", noise_multiplier=2.0, clipping_norm=0.5)
    new = dp.aggregate(1, start, [_reply(m, 7) for m in moved], sampled=4)
    clipped_mean = np.mean([(_flat(m) - _flat(start)) * 0.5 / 5.0 for m in moved], axis=0)
    noise = _flat(new) - _flat(start) - clipped_mean
    assert noise.std() == pytest.approx(2.0 * 0.5 / 4, rel=0.05)
    assert abs(noise.mean()) < 5 * noise.std() / np.sqrt(noise.size)


def test_client_side_clipping_and_the_servers_check() -> None:
    start = _global()
    dp = _central(side="client", clipping_norm=0.3)
    unclipped = _moved(start, 2.0, seed=3)
    clipped = clip_update(unclipped, start, 0.3)
    assert np.linalg.norm(_flat(clipped) - _flat(start)) == pytest.approx(0.3, rel=1e-3)
    small = _moved(start, 0.1, seed=4)
    assert all(torch.equal(clip_update(small, start, 0.3)[k], small[k]) for k in small)
    assert dp.refusal(start, _reply(clipped, 5)) is None
    assert "not clipped" in dp.refusal(start, _reply(unclipped, 5))
    assert "zero" in dp.refusal(start, _reply(start, 5))
    assert dp.train_config() == {"clipping_norm": 0.3}
    assert _central(side="server").train_config() == {}


def test_epsilon_grows_per_round_matches_dp_accounting_and_the_stop_rule_triggers() -> None:
    start = _global()
    dp = _central(noise_multiplier=1.0, delta=1e-3, max_epsilon=6.0)
    epsilons = []
    for server_round in (1, 2):
        assert dp.stop_reason(server_round) is None
        dp.aggregate(server_round, start, [_reply(_moved(start, 1.0, seed=server_round), 3)], sampled=1)
        epsilons.append(dp.epsilon)
    reason = dp.stop_reason(3)
    assert 0 < epsilons[0] < epsilons[1] <= 6.0 and reason and "max_epsilon=6.0" in reason
    reference = dp_accounting.rdp.RdpAccountant()  # two Gaussian releases, no amplification
    reference.compose(dp_accounting.GaussianDpEvent(1.0), 2)
    assert epsilons[1] == pytest.approx(reference.get_epsilon(1e-3), rel=1e-6)
    resumed = _central(noise_multiplier=1.0, delta=1e-3, max_epsilon=6.0)
    resumed.load_state_dict(json.loads(json.dumps(dp.state_dict())))  # persisted with the server state
    assert resumed.epsilon == pytest.approx(epsilons[1]) and resumed.stop_reason(3)


def test_no_noise_is_refused() -> None:
    with pytest.raises(ConfigError, match="noise_multiplier"):
        _central(noise_multiplier=0.0)


@pytest.mark.slow
def test_a_federation_with_client_level_dp_reports_epsilon_and_stops_at_max_epsilon(
        sited_data: Path, tmp_path: Path) -> None:
    start = tmp_path / "student.pt"
    torch.manual_seed(0)
    save_checkpoint(start, Checkpoint(model="student", state_dict=Student().state_dict(), role="kd", seed=0))
    # sigma 1, delta 1e-3: epsilon 3.54 after one round, 5.42 after two, 7.00 after three > 6.
    config = parse_config({"seed": 0, "data": {"client_fraction": 0.0}, "federation": {
        "rounds": 3, "method": "fedavg", "min_clients": 1, "round_timeout_s": 120,
        "hospital": {"min_examples": 20, "local_epochs": 1}, "phone": {"per_site": 0}},
        "privacy": {"central": {"enabled": True, "side": "client", "noise_multiplier": 1.0, "clipping_norm": 0.5,
                                "delta": 1e-3, "max_epsilon": 6.0}}})
    run = federate(config, data_root=sited_data, out=tmp_path / "run", start_checkpoint=start)
    result = json.loads((run.out / "server" / "result.json").read_text())
    central = result["central_dp"]
    assert [h["round"] for h in result["history"]] == [1, 2] and run.report["rounds"] == [1, 2]
    assert all(h["aggregated"] and len(h["trained"]) == 2 for h in result["history"])
    epsilons = [r["epsilon"] for r in central["epsilon_per_round"]]
    assert epsilons == [h["central_epsilon"] for h in result["history"]]
    assert 0 < epsilons[0] < epsilons[1] <= 6.0 == central["max_epsilon"]
    assert central["stopped_at_round"] == 2 and "round 3" in central["stop_reason"]
    assert central["side"] == "client" and central["accountant"]["sampling"] == "no-amplification"
    assert central["epsilon_per_round"][0]["noise_std"] == pytest.approx(1.0 * 0.5 / 2)
    assert not (run.out / "server" / "global-round-003.pt").exists()
    privacy = json.loads((run.out / "privacy.json").read_text())
    assert privacy["client_level"] == central
    text = (run.out / "privacy.md").read_text()
    assert "one whole client" in text and f"({epsilons[1]:.2f}, 1.0e-03)-DP" in text
    assert "adding or removing one client's participation" in text and "stopped after round 2" in text
