"""What the devices of a deployment hold after a run, set against what the server counted.

A device's privacy ledger records each round it trained before its update leaves it. After a run,
crashes and restarts included, every ledger must verify (``Ledger.open``: its hash chain and head),
stay within its budget, and agree with the server's history. A round in the ledger that the server
did not count is an update lost on the way (the device spent privacy, the federation got nothing); a
round the server counted that the ledger lacks is privacy spent without a record. For
``tests/test_deploy.py`` and ``benchmarks/load.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgemri.core.federation import protocol as p
from edgemri.core.privacy.ledger import LEDGER_FILE, Ledger, LedgerError
from edgemri.core.training.checkpoint import load_checkpoint
from edgemri.core.untrusted import read_json

RESULT_FILE = Path("server") / "result.json"  # in the run folder (server/app.py, write_reports)
SERVER_STATE_FILE = Path("server") / "state.pt"  # saved after every round (server/app.py, _save_state)
# Failure codes by which the server refuses a client's ledger (rolled back, or broken on the device).
LEDGER_REFUSALS = (p.FailureCode.LEDGER_ROLLBACK.value, p.FailureCode.PRIVACY.value)


@dataclass(frozen=True)
class DeviceLedger:
    client: str
    rounds: tuple[int, ...]  # the federated rounds recorded (personal fine-tunes left out)
    epsilon: float  # cumulative, after the last record; 0 with none
    over_budget: tuple[int, ...]  # records whose cumulative epsilon exceeds the budget they were trained under
    error: str = ""  # why the ledger did not verify, or that there is none; "" when it verified

    @property
    def ok(self) -> bool:
        return not self.error and not self.over_budget


def read_ledger(client: str, state_dir: Path) -> DeviceLedger:
    """The device's ledger in ``state_dir``, verified; a missing or failing one says why in ``error``."""
    path = Path(state_dir) / LEDGER_FILE
    if not path.is_file():
        return DeviceLedger(client, (), 0.0, (), f"{path} does not exist")
    try:
        ledger = Ledger.open(path, client)
    except LedgerError as err:
        return DeviceLedger(client, (), 0.0, (), str(err).splitlines()[0])
    return DeviceLedger(client, tuple(ledger.rounds), ledger.records[-1]["epsilon"] if ledger.records else 0.0,
                        tuple(r["seq"] for r in ledger.records if r["epsilon"] > r["budget_epsilon"]))


def read_result(run_dir: Path) -> p.FederationResult:
    """The run's ``server/result.json`` (written when a run, resumed or not, ends), checked."""
    return p.FederationResult.from_dict(read_json(Path(run_dir) / RESULT_FILE, p.ProtocolError, nonfinite=True))


def read_unfinished_result(run_dir: Path) -> p.FederationResult:
    """For a run stopped before it ended (no ``result.json``): what the server saved after its last round, the
    rounds and who retired, without a final evaluation; no rounds if it saved none."""
    path = Path(run_dir) / SERVER_STATE_FILE
    saved = load_checkpoint(path, kind="server") if path.is_file() else None
    clients = saved.extra.get("clients") if saved else None
    return p.FederationResult.from_dict({
        "clients": {}, "history": saved.history if saved else [], "final": {}, "final_failed": {},
        "retired": clients.get("retired", {}) if isinstance(clients, dict) else {}, "central_start": {},
        "central_final": {}, "central_dp": {}})


@dataclass(frozen=True)
class RoundsCompared:
    not_counted: tuple[int, ...]  # in the device's ledger; the server did not count it as trained
    not_recorded: tuple[int, ...]  # the server counted it as trained; the ledger lacks it

    @property
    def lost(self) -> int:
        return len(self.not_counted) + len(self.not_recorded)


def compare_rounds(ledgers: dict[str, DeviceLedger], history: list[p.RoundRecord]) -> dict[str, RoundsCompared]:
    """Per device: its ledger's rounds against the rounds the server's history counts it as trained in."""
    counted: dict[str, set[int]] = {client: set() for client in ledgers}
    for record in history:
        for client in record.trained:
            counted.setdefault(client, set()).add(record.round)
    compared = {}
    for client, rounds in counted.items():
        recorded = set(ledgers[client].rounds) if client in ledgers else set()
        compared[client] = RoundsCompared(tuple(sorted(recorded - rounds)), tuple(sorted(rounds - recorded)))
    return compared


def ledger_refusals(result: p.FederationResult) -> list[str]:
    """Every place the server refused a client's ledger: a round's failure, the final evaluation's, a retirement."""
    found = [f"round {h.round}: {client}: {code}" for h in result.history for client, code in h.failed.items()
             if code in LEDGER_REFUSALS]
    found += [f"final: {client}: {code}" for client, code in result.final_failed.items() if code in LEDGER_REFUSALS]
    return found + [f"retired: {client}: {why}" for client, why in result.retired.items()
                    if any(code in why for code in LEDGER_REFUSALS)]
