"""The client side of the contract: the device's privacy floor, coded failures, untrusted server messages."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from edgemri.clients.client_app import app, coded_failures
from edgemri.clients.runtime import SENT_FILE, Client, ClientState, resolve_setup
from edgemri.core.data.dataset import load_dataset
from edgemri.core.data.partition import ManifestError, partition, read_manifest, write_manifests
from edgemri.core.errors import EdgemriError
from edgemri.core.federation import protocol as p
from edgemri.core.federation.personalize import create_method
from edgemri.core.privacy.ledger import LEDGER_FILE, Ledger, LedgerRollback
from edgemri.core.privacy.policy import DevicePolicy
from edgemri.core.registries import REGISTRIES, parse_config
from edgemri.core.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from edgemri.models import Student

CONFIG = parse_config({"seed": 0, "data": {"client_fraction": 0.0}, "federation": {"method": "fedavg", "tiers": {
    "hospital": {"min_examples": 20, "local_epochs": 1},
    "phone": {"per_site": 1, "min_examples": 8, "max_examples": 12}}}})


@pytest.fixture(scope="module")
def hospital(sited_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("client")
    manifests = write_manifests(partition(load_dataset(sited_data).train, sited_data, CONFIG), folder / "m")
    manifest = next(m for m in manifests if read_manifest(m).kind == "hospital")
    return {"manifest": str(manifest), "data-dir": str(sited_data), "state-dir": str(folder / "state")}


def test_a_server_asking_for_no_dp_is_refused_by_a_device_that_requires_it(hospital: dict[str, str]) -> None:
    client = Client(resolve_setup(hospital, {}), DevicePolicy.from_node_config({"dp-required": True, **hospital}))
    reply = client.train_round(create_method(CONFIG.federation), Student().state_dict(), ClientState(),
                               p.RoundInstructions.for_tier(CONFIG, "hospital", 1))
    assert reply.status is p.Status.POLICY_REFUSED and reply.shared is None and reply.status.retires
    assert not (Path(hospital["state-dir"]) / LEDGER_FILE).exists()


def test_a_malformed_global_model_from_the_server_is_refused(hospital: dict[str, str]) -> None:
    bad = {k: v[..., :1] if v.ndim else v for k, v in Student().state_dict().items()}
    with pytest.raises(EdgemriError, match="shape"):
        Client(resolve_setup(hospital, {})).train_round(create_method(CONFIG.federation), bad, ClientState(),
                                                        p.RoundInstructions.for_tier(CONFIG, "hospital", 1))


def test_malformed_round_instructions_are_a_protocol_error() -> None:
    good = p.RoundInstructions.for_tier(CONFIG, "phone", 2).to_config()
    assert p.RoundInstructions.from_config(good, REGISTRIES).server_round == 2
    for broken in ({**good, "federation-json": "{not json"}, {**good, "server-round": -1},
                   {**good, "spec-json": '{"epochs": 1e20}'}, {k: v for k, v in good.items() if k != "seed"}):
        with pytest.raises(p.ProtocolError):
            p.RoundInstructions.from_config(broken, REGISTRIES)


def test_a_device_whose_ledger_is_below_the_servers_floor_refuses_before_it_trains(
        hospital: dict[str, str], tmp_path: Path) -> None:
    """A device restored from a backup (ledger and head together) learns from the floor the server sends back
    that its ledger is behind: it trains nothing, writes nothing, and its failure travels as ledger-rollback."""
    config = CONFIG.replace(privacy=parse_config({"privacy": {"tiers": {"hospital": {
        "enabled": True, "target_epsilon": 6.0, "budget_epsilon": 8.0}}}}).privacy)
    setup = {**hospital, "state-dir": str(tmp_path / "state")}
    client, method = Client(resolve_setup(setup, {})), create_method(config.federation)
    first = client.train_round(method, Student().state_dict(), ClientState(),
                               p.RoundInstructions.for_tier(config, "hospital", 1))
    assert first.status is p.Status.TRAINED
    seen = p.LedgerFloor(int(first.metrics[p.LEDGER_RECORDS]), first.metrics[p.EPSILON])
    sent = p.RoundInstructions.for_tier(config, "hospital", 2, ledger_floor=seen).to_config()
    instructions = p.RoundInstructions.from_config(sent, REGISTRIES)  # the floor travels in the round config
    assert instructions.ledger_floor == seen
    for name in (LEDGER_FILE, Path(LEDGER_FILE).with_suffix(".head").name):  # both deleted (or restored)
        (tmp_path / "state" / name).unlink()
    with pytest.raises(LedgerRollback, match="holds 0 records .* less than the 1 records"):
        client.train_round(method, Student().state_dict(), first.state, instructions)
    assert not (tmp_path / "state" / LEDGER_FILE).exists()  # nothing trained, nothing recorded
    reply = coded_failures(lambda msg, context: client.train_round(
        method, Student().state_dict(), first.state, instructions))(_message(), None)
    assert reply.content[p.INFO]["code"] == p.FailureCode.LEDGER_ROLLBACK.value
    for bad in (-1, 1.5, 10**9):
        with pytest.raises(p.ProtocolError, match="ledger-floor-records"):
            p.RoundInstructions.from_config({**sent, p.FLOOR_RECORDS_KEY: bad}, REGISTRIES)


@pytest.mark.parametrize("method_name", ["fedavg", "fedper"])  # FedPer sends only its shared keys
def test_a_dp_round_asked_again_gets_the_same_update_only_for_the_same_model_and_instructions(
        method_name: str, hospital: dict[str, str], tmp_path: Path) -> None:
    """A reply lost after the ledger was written (a SuperLink restarted mid-round; a resumed run asks the round
    again): the device sends the very update it sent, spending nothing; any other model for that round is refused."""
    config = CONFIG.replace(privacy=parse_config({"privacy": {"tiers": {"hospital": {
        "enabled": True, "target_epsilon": 6.0, "budget_epsilon": 8.0}}}}).privacy,
        federation=dataclasses.replace(CONFIG.federation, method=method_name))
    setup = resolve_setup({**hospital, "state-dir": str(tmp_path / "state")}, {})
    method, start = create_method(config.federation), Student().state_dict()
    instructions = p.RoundInstructions.for_tier(config, "hospital", 1)
    first = Client(setup).train_round(method, start, ClientState(), instructions)
    assert first.status is p.Status.TRAINED
    ledger_before = (tmp_path / "state" / LEDGER_FILE).read_bytes()
    floor = p.LedgerFloor(int(first.metrics[p.LEDGER_RECORDS]), first.metrics[p.EPSILON])  # the server saw round 1
    again = Client(setup).train_round(method, start, first.state,  # a new process, as on a SuperNode
                                      dataclasses.replace(instructions, ledger_floor=floor))
    assert again.status is p.Status.TRAINED and again.reason == "round 1 sent again"
    assert again.shared.keys() == first.shared.keys() and (len(first.shared) < len(start)) == (method_name == "fedper")
    assert all(torch.equal(again.shared[k], first.shared[k]) for k in first.shared)
    assert again.metrics == first.metrics
    assert (tmp_path / "state" / LEDGER_FILE).read_bytes() == ledger_before  # no privacy spent twice
    other = {k: v + 1 if v.is_floating_point() else v for k, v in start.items()}
    for model, asked in ((other, instructions), (start, dataclasses.replace(instructions, seed=instructions.seed + 1))):
        refused = Client(setup).train_round(method, model, first.state, asked)
        assert refused.status is p.Status.ALREADY_TRAINED and refused.shared is None
    sent = tmp_path / "state" / SENT_FILE
    saved = load_checkpoint(sent, kind="client")
    saved.extra["sent"]["fingerprint"] = ["not", "text"]
    save_checkpoint(sent, saved)
    with pytest.raises(CheckpointError, match="fingerprint"):
        Client(setup).train_round(method, start, first.state, instructions)


def test_a_client_sampled_in_rounds_1_and_3_only_has_just_those_rounds_in_its_ledger(
        hospital: dict[str, str], tmp_path: Path) -> None:
    """Cross-device sampling: nothing assumes a client trains every round; the ledger counts the rounds it
    trained, and its epsilon stays below the target the plan spreads over all federation.rounds."""
    config = CONFIG.replace(privacy=parse_config({"privacy": {"tiers": {"hospital": {
        "enabled": True, "target_epsilon": 6.0, "budget_epsilon": 8.0}}}}).privacy)
    client = Client(resolve_setup({**hospital, "state-dir": str(tmp_path / "state")}, {}))
    method, state, floor = create_method(config.federation), ClientState(), p.LedgerFloor(0, 0.0)
    for server_round in (1, 3):  # not sampled in rounds 2, 4 and 5
        reply = client.train_round(method, Student().state_dict(), state,
                                   p.RoundInstructions.for_tier(config, "hospital", server_round, ledger_floor=floor))
        assert reply.status is p.Status.TRAINED
        state, floor = reply.state, p.LedgerFloor(int(reply.metrics[p.LEDGER_RECORDS]), reply.metrics[p.EPSILON])
    assert Ledger.open(tmp_path / "state" / LEDGER_FILE, client.name).rounds == [1, 3]
    assert (state.rounds_trained, state.last_round) == (2, 3)
    assert 0 < floor.epsilon < 6.0 and config.federation.rounds == 5


def _message(message_type: str = MessageType.TRAIN, config: ConfigRecord | None = None) -> Message:
    metadata = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=5, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=600.0, message_type=message_type)
    return Message(RecordDict({p.CONFIG: config or ConfigRecord({}), p.ARRAYS: ArrayRecord(Student().state_dict())}),
                   metadata=metadata)


@pytest.mark.parametrize(("error", "code"), [
    (ManifestError("/home/alice/scans/x.jpg is missing"), p.FailureCode.DATA),
    (OSError(13, "Permission denied", "/secret/path"), p.FailureCode.DATA),
    (RuntimeError("bug at /opt/site-packages/x.py"), p.FailureCode.INTERNAL),
])
def test_a_failure_travels_as_a_code_without_its_text(error: Exception, code: p.FailureCode) -> None:
    def handler(msg: Message, context: Context) -> Message:
        raise error

    reply = coded_failures(handler)(_message(), None)
    assert not reply.has_error()
    assert dict(reply.content[p.INFO]) == {"status": p.Status.FAILED.value, "code": code.value}
    assert p.ARRAYS not in reply.content and all("/" not in str(v) for v in reply.content[p.METRICS].values())
    assert reply.content[p.METRICS][p.NUM_EXAMPLES] == 0


def test_the_final_evaluation_scores_every_model_on_the_site_pool_its_clients_decode_and_score_once(
        sited_data: Path, tmp_path: Path, user_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from edgemri.clients import runtime

    root = tmp_path / "data"
    shutil.copytree(sited_data, root)
    for image in sorted(root.glob("Testing/*/*.jpg"))[::2]:  # a few scans per class as site-a's pool
        target = root / "Pools" / "site-a" / image.parent.name / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
    pool_size = len(list(root.glob("Pools/site-a/*/*.jpg")))
    manifests = write_manifests(partition(load_dataset(root).train, root, CONFIG), tmp_path / "m")
    at_site = [m for m in manifests if read_manifest(m).site == "site-a"]
    assert {read_manifest(m).kind for m in at_site} == {"hospital", "phone"}
    run_config = {"manifests": str(tmp_path / "m"), "data-root": str(root), "state-root": str(tmp_path / "clients"),
                  "pool-cache": str(tmp_path / "pools")}
    scored: list[int] = []
    predict = runtime.predicted_classes
    monkeypatch.setattr(runtime, "predicted_classes", lambda state, split: scored.append(len(split)) or
                        predict(state, split))
    start, results = Student().state_dict(), []
    for manifest in at_site:
        setup = resolve_setup({"partition-id": manifests.index(manifest)}, run_config)
        client = Client(setup)
        results.append(client.final_evaluate(
            create_method(CONFIG.federation), start, start, start, ClientState(),
            p.RoundInstructions.for_tier(CONFIG, client.kind, 1, final=True)))
        assert not list(setup.state_dir.glob("pool-*.npz"))  # not in each client's own folder
    (cache,) = (tmp_path / "pools").glob("pool-*.npz")  # one decoded pool for the site's clients
    for metrics in results:
        assert metrics[p.POOL_EXAMPLES] == pool_size
        assert metrics[p.POOL_PREFIX + p.START_ACCURACY] == metrics[p.POOL_PREFIX + p.BEST_GLOBAL_ACCURACY]
        assert all(0 <= metrics[p.POOL_PREFIX + k] <= 1 for k in (p.GLOBAL_ACCURACY, p.PERSONAL_ACCURACY,
                                                                  p.LOCAL_ONLY_ACCURACY))
    assert results[0][p.POOL_PREFIX + p.START_ACCURACY] == results[1][p.POOL_PREFIX + p.START_ACCURACY]
    # The shared start model is scored on the pool once in this process; each client's own models once each.
    assert scored.count(pool_size) == 1 + 2 * len(at_site)
    # A cache that lists other scans is not used: the pool is decoded again from the client's manifest.
    other = tmp_path / "other.npz"
    runtime.save_pool(other, runtime.load_pool_cache(cache, read_manifest(at_site[0])).subset([0]))
    shutil.copy(other, cache)
    again = Client(resolve_setup({"partition-id": manifests.index(at_site[0])}, run_config))
    assert len(again.site_pool()) == pool_size


@pytest.mark.parametrize(("message_type", "steps"), [
    (MessageType.TRAIN, ["train-round"]),
    (MessageType.EVALUATE, ["evaluate", "privacy-status"]),
])
def test_an_audited_round_message_writes_when_each_step_ended(
        message_type: str, steps: list[str], hospital: dict[str, str], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    instructions = ConfigRecord(p.RoundInstructions.for_tier(CONFIG, "hospital", 1).to_config())
    context = Context(run_id=1, node_id=5, node_config={**hospital, "state-dir": str(tmp_path / "state")},
                      state=RecordDict(), run_config={"audit-dir": str(tmp_path)})
    caplog.handler.setLevel(logging.NOTSET)  # whatever reaches the root logger's handlers is captured
    reply = app(_message(message_type, instructions), context)
    assert p.INFO not in reply.content or reply.content[p.INFO]["status"] != p.Status.FAILED.value
    (written,) = (tmp_path / "timings").glob("node-5-*.json")
    timeline = json.loads(written.read_text())
    assert timeline["message_type"] == message_type
    assert [mark["step"] for mark in timeline["marks"]] == [
        "app-called", "manifest", "message-and-state", *steps, "reply-and-audit"]
    times = [mark["time"] for mark in timeline["marks"]]
    assert timeline["app_import_started"] <= times[0] and times == sorted(times)
    assert not [r for r in caplog.records if hasattr(r, "step")]  # the device's log stays at its own level
    assert logging.getLogger("edgemri.client").level == logging.NOTSET  # the timeline restored the logger


def test_the_timeline_clock_starts_before_the_client_app_loads_its_stack() -> None:
    """The timeline's import time is when the app's import began: client_app imports it before torch."""
    code = ("import json, sys\n"
            "order = []\n"
            "sys.addaudithook(lambda event, args: order.append(args[0]) if event == 'import' else None)\n"
            "import edgemri.clients.client_app\n"
            "print(json.dumps(order))")
    order = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout)
    assert order.index("edgemri.clients.timeline") < order.index("torch")
