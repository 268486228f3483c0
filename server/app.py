"""The Flower ServerApp: settings, discovery, the strategy's rounds, the final evaluation, the reports.

The same app runs under ``edgemri federate`` and a plain ``flwr run .``. What it needs that is
missing (client manifests) it prepares from the data folder; what it cannot prepare (data, the
distilled start model) stops the run at once with a one-line message naming the command to run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from edgemri.core.config import Config
from edgemri.core.data.dataset import ArraySplit, Dataset, load_dataset
from edgemri.core.data.partition import ensure_manifests
from edgemri.core.errors import EdgemriError
from edgemri.core.federation import protocol as p
from edgemri.core.federation.personalize import State, evaluate_state
from edgemri.core.io import owner_lock, write_json
from edgemri.core.registries import load_config
from edgemri.core.training.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from edgemri.core.untrusted import check_record, mapping_of, number, text
from edgemri.reports.federation import build_federation_report, write_federation_report
from edgemri.reports.privacy import build_privacy_report, write_privacy_report
from edgemri.server.strategy import CentralAccountant, FederationStrategy, PhaseClock, RoundState, with_central_dp

app = ServerApp()
log = logging.getLogger("edgemri.server")

STATE_FILE = "state.pt"
BEST_FILE = "global-best.pt"  # the global model of the round federated validation preferred
PROGRESS_FILE = "progress.log"
SERVERAPP_LOCK = "serverapp.lock"  # held by the ServerApp working in the run folder (core/io.owner_lock)
SERVERAPP_WAIT_MARGIN_S = 60  # beyond a round's timeout, for the ServerApp before this one to end
TIMINGS_FILE = "timings.json"  # where the server's time went, per stage and phase (PhaseClock)
DISCOVERY_WAIT_S = 120.0


def _log_through_flower() -> None:
    """Send edgemri's log lines where Flower sends its own (streamed to `flwr run`)."""
    ours, flower = logging.getLogger("edgemri"), logging.getLogger("flwr")
    ours.setLevel(logging.INFO)
    for handler in flower.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.propagate = False


def prepare(settings: p.RunSettings, config: Config) -> tuple[Checkpoint, Dataset | None]:
    """The start model and the server's data; in simulation, the client manifests (written when missing)."""
    if not settings.start_checkpoint.is_file():
        raise EdgemriError(f"no start model at {settings.start_checkpoint}: run `make demo` (or `edgemri distill`) "
                           "first, or pass --run-config \"start-checkpoint='PATH'\"")
    start = load_checkpoint(settings.start_checkpoint)
    if start.model != "student":
        raise CheckpointError(f"the federation starts from a student; {settings.start_checkpoint} holds "
                              f"{start.model!r}")
    if settings.data_root is None:
        return start, None  # a deployment: the server holds no data; each device's node config names its manifest
    if not (settings.data_root / "Training").is_dir():
        raise EdgemriError(f"no data at {settings.data_root}: run `make demo` (or `edgemri data synth --out DIR`), "
                           "or pass --run-config \"data-root=''\" for a deployment")
    dataset = load_dataset(settings.data_root, cache_dir=config.data.cache_dir)
    if settings.manifests is not None:
        ensure_manifests(settings.manifests, dataset, settings.data_root, config)
    return start, dataset


def discover(grid: Grid, expected: int, kinds: tuple[str, ...], round_timeout_s: float,
             wait_s: float = DISCOVERY_WAIT_S) -> tuple[dict[int, p.ClientInfo], dict[str, str]]:
    """Wait up to ``wait_s`` for the expected nodes, ask each who it is; refuse bad answers and duplicated names.

    The answers are awaited as long as a round's replies (at least ``wait_s``): a device's first answer starts its
    ClientApp, and a cold one on a loaded machine takes as long as a round's reply can (30 cold devices on 2 cores:
    3 answered within 120 s). Flower returns once every answer is in, so a healthy federation waits no longer.
    """
    deadline = time.monotonic() + wait_s
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) < expected:
        log.warning("%d of %d expected nodes connected (in simulation: flwr run . --federation-config "
                    "\"num-supernodes=%d\")", len(node_ids), expected, expected)
    replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
                                     for n in node_ids], timeout=max(wait_s, round_timeout_s))
    answers: dict[int, p.ClientInfo] = {}
    excluded: dict[str, str] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        try:
            if reply.has_error():
                raise p.ProtocolError("the node's app raised")
            info, metrics = reply.content.config_records.get(p.INFO), reply.content.metric_records.get(p.METRICS)
            if info is None or metrics is None:
                raise p.ProtocolError("no info or metrics record")
            answers[node] = p.ClientInfo.from_record(dict(info), dict(metrics), kinds)
        except p.ProtocolError as err:
            excluded[f"node-{node}"] = f"{p.FailureCode.BAD_REPLY.value}: {err}"
    names = [c.client for c in answers.values()]
    for node, client in list(answers.items()):
        if names.count(client.client) > 1:  # neither can be trusted to be the real one
            excluded[f"node-{node}"] = f"duplicate client name {client.client!r}"
            del answers[node]
    for name, why in excluded.items():
        log.warning("%s excluded: %s", name, why)
    return answers, excluded


def _central_eval(test: ArraySplit) -> Callable[[State], dict[str, float]]:
    def evaluate(state: State) -> dict[str, float]:
        return {k: float(v) for k, v in evaluate_state(state, test).items()}

    return evaluate


def run(grid: Grid, settings: p.RunSettings, config: Config, clock: PhaseClock) -> p.FederationResult:
    """Discovery, the rounds and the final evaluation; ``clock`` times each (server/timings.json)."""
    with clock.phase("prepare"):
        start, dataset = prepare(settings, config)
    server_dir = settings.run_dir / "server"
    central_eval = _central_eval(dataset.test) if dataset is not None else None
    with clock.phase("discovery"):
        nodes, excluded = discover(grid, settings.num_clients, config.federation.tier_names,
                                   config.federation.round_timeout_s)
    if len(nodes) < config.federation.min_clients:
        raise EdgemriError(f"only {len(nodes)} clients answered; federation.min_clients is "
                           f"{config.federation.min_clients}")
    log.info("clients: %s", ", ".join(sorted(f"{c.client} ({c.num_examples})" for c in nodes.values())))

    saved = _load_state(server_dir / STATE_FILE) if settings.resume else None
    done = saved.step if saved else 0
    global_state = saved.state_dict if saved else start.state_dict
    round_state = _round_state(saved) if saved else RoundState()
    central = config.privacy.central
    accountant = CentralAccountant(central, settings.num_clients, saved.extra.get("accountant") if saved else None) \
        if central.enabled else None
    if saved and central.enabled and saved.extra.get("accountant") is None and done:
        raise EdgemriError(f"privacy.central is enabled, but rounds 1-{done} of this run released global models "
                           "without it; start a new run")

    def on_round(record: p.RoundRecord, state: State) -> None:
        # A round its owner did not live through is not saved: its clients, seeing the owner gone, refused it, and
        # saved it would count as played when the run is resumed.
        p.check_owner(settings.owner_lock)
        _save_state(server_dir, config, state, strategy.state, accountant)
        if strategy.state.best_round == record.round:
            save_checkpoint(server_dir / BEST_FILE, Checkpoint(
                model="student", state_dict=state, role=f"global (round {record.round}, best federated validation)",
                config=config.to_dict(), seed=config.seed, step=record.round,
                metrics={**record.central, "federated_val": record.federated_val}))
        line = (f"round {record.round}/{config.federation.rounds}: {len(record.trained)}/{len(record.sampled)} "
                f"trained, {len(record.failed)} failed, {len(record.declined)} declined, central accuracy "
                f"{record.central.get('accuracy', float('nan')):.3f}, {record.seconds:.0f} s")
        log.info(line)
        with (server_dir / PROGRESS_FILE).open("a") as fh:
            fh.write(line + "\n")

    best_file = server_dir / BEST_FILE
    best_state = load_checkpoint(best_file).state_dict if saved and round_state.best_round and best_file.is_file() \
        else None
    strategy = FederationStrategy(config, nodes, global_state, state=round_state, best_state=best_state,
                                  round_offset=done,
                                  central_eval=central_eval, on_round=on_round,
                                  before_round=lambda: p.check_owner(settings.owner_lock), clock=clock)
    runner = with_central_dp(strategy, central, accountant) if accountant else strategy
    if done:
        log.info("resuming after round %d", done)
    server_dir.mkdir(parents=True, exist_ok=True)
    if done < config.federation.rounds:
        runner.start(grid=grid, initial_arrays=ArrayRecord(global_state), num_rounds=config.federation.rounds - done,
                     timeout=config.federation.round_timeout_s, train_config=ConfigRecord(),
                     evaluate_fn=strategy.after_round)
    p.check_owner(settings.owner_lock)  # the final evaluation spends the DP personal fine-tune's budget
    clock.begin("final")
    final, final_failed = final_evaluate(grid, strategy, start.state_dict, strategy.best_state, config)
    with clock.phase("central_evaluation"):
        central_start = central_eval(start.state_dict) if central_eval else {}
        central_final = central_eval(strategy.global_state) if central_eval else {}
    return p.FederationResult(
        clients={c.client: c for c in nodes.values()}, history=strategy.state.history, final=final,
        final_failed=final_failed, retired=strategy.state.retired, central_start=central_start,
        central_final=central_final,
        central_dp=accountant.summary(strategy.state.history, strategy.stop_reason) if accountant
        else {"enabled": False},
        excluded=excluded, best_round=strategy.state.best_round, epsilon_seen=dict(strategy.state.epsilon))


def final_evaluate(grid: Grid, strategy: FederationStrategy, start: State, best: State, config: Config
                   ) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Every client's report columns: start, global, best global, personalized and local-only accuracy."""
    with strategy.clock.phase("evaluate_messages"):
        messages = strategy.configure_final_evaluate(start, best)
    replies = grid.send_and_receive(messages, timeout=config.federation.round_timeout_s)
    with strategy.clock.phase("evaluate_collect", waited="evaluate_wait"):
        return strategy.collect_evaluate(replies, sorted(strategy.nodes))


def _save_state(server_dir: Path, config: Config, state: State, rounds: RoundState,
                accountant: CentralAccountant | None) -> None:
    """The server's state after a round (the one checkpoint format, kind "server"), and the round's global model."""
    history = [vars(h) for h in rounds.history]
    last = rounds.history[-1]
    save_checkpoint(server_dir / STATE_FILE, Checkpoint(
        model="student", kind="server", state_dict=state, config=config.to_dict(), seed=config.seed,
        step=last.round, history=history,
        extra={"clients": {"retired": rounds.retired, "epsilon": rounds.epsilon,
                           "ledger_records": rounds.ledger_records, "best_round": rounds.best_round,
                           "best_val": rounds.best_val},
               "accountant": accountant.accountant.state_dict() if accountant else None}))
    save_checkpoint(server_dir / f"global-round-{last.round:03d}.pt", Checkpoint(
        model="student", state_dict=state, role=f"global (round {last.round})", config=config.to_dict(),
        seed=config.seed, metrics=last.central))


# What the strategy knew about the clients, as _save_state writes it (each key may be missing: older runs).
_CLIENT_STATE = {
    "retired": mapping_of(p.VALID_CLIENT_NAME, text()),
    "epsilon": mapping_of(p.VALID_CLIENT_NAME, number(0, p.MAX_EPSILON_REPORTED)),
    "ledger_records": mapping_of(p.VALID_CLIENT_NAME, number(0, p.MAX_EPSILON_REPORTED)),
    "best_round": number(0, integer=True).nullable(),
    "best_val": number().nullable(),
}


def _round_state(saved: Checkpoint) -> RoundState:
    """What the strategy knew after the saved round (a run folder is untrusted: any oddity is one clear error)."""
    where = "the server state of this run"
    try:
        clients = check_record(saved.extra.get("clients"), _CLIENT_STATE, where, CheckpointError,
                               optional=tuple(_CLIENT_STATE))
        history = [p.RoundRecord(**h) for h in saved.history]
    except TypeError as err:  # a history record that is not one
        raise CheckpointError(f"{where} is malformed ({err.__class__.__name__}); start a new run folder") from None
    except CheckpointError as err:
        raise CheckpointError(f"{err}; start a new run folder") from None
    return RoundState(history=history, **clients)


def _load_state(path: Path) -> Checkpoint | None:
    return load_checkpoint(path, kind="server") if path.is_file() else None


def write_reports(result: p.FederationResult, config: Config, run_dir: Path) -> dict[str, Path]:
    """result.json and the federation and privacy reports, once per run (with the runner's references, if any)."""
    write_json(run_dir / "server" / "result.json", result.to_dict())
    references_file = run_dir / p.REFERENCES_FILE
    references = p.read_references(references_file) if references_file.is_file() else None
    paths = write_federation_report(build_federation_report(result, config, references), run_dir)
    paths.update({f"privacy_{k}": v for k, v in
                  write_privacy_report(build_privacy_report(result, config), run_dir).items()})
    return paths


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_through_flower()
    try:
        settings = p.RunSettings.from_run_config(dict(context.run_config))
        config = load_config(settings.config)
        # One ServerApp a run folder: a run resumed while the one before still runs (its SuperLink too busy to
        # say so, or restarted under it) would otherwise play the same rounds beside it and write the same state.
        # It waits for that one instead: within a round's timeout the old ServerApp finds its run gone and ends.
        with owner_lock(settings.run_dir / "server" / SERVERAPP_LOCK, EdgemriError, holder="ServerApp",
                        wait_s=config.federation.round_timeout_s + SERVERAPP_WAIT_MARGIN_S):
            clock = PhaseClock()
            result = run(grid, settings, config, clock)
            with clock.phase("reports"):
                write_reports(result, config, settings.run_dir)
            write_json(settings.run_dir / "server" / TIMINGS_FILE, clock.stages)
        if failures := result.all_failed():  # the reports say who and when; the run must not look like a success
            raise EdgemriError(f"no client trained in any round ({failures}); see {settings.run_dir / 'federation.md'}"
                               f" and each client's log")
    except EdgemriError as err:
        # One line, where `flwr run` streams it; the run then ends without a result.
        log.error("edgemri: error: %s", str(err).splitlines()[0])
        raise SystemExit(2) from None
