"""A client's hash-chained privacy ledger: every DP-SGD round (and personal fine-tune) it trained.

The ledger is a hash chain with a separate head file, so deleting records or restoring an older copy is
refused instead of silently lowering epsilon (docs/PRIVACY.md, threat model).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgemri.core.errors import EdgemriError
from edgemri.core.io import write_text
from edgemri.core.privacy.dp import ACCOUNTANTS, DPPlan, PrivacyError, epsilon_of
from edgemri.core.untrusted import SHA256, Check, check_record, number, one_of, parse_json, text

LEDGER_FORMAT = "edgemri.privacy-ledger/3"  # 3: each record's stage
LEDGER_FORMAT_V2 = "edgemri.privacy-ledger/2"  # read and extended (round records only), never rewritten
STAGES = ("round", "personal")  # a federated round's training; the personal fine-tune (personal_epsilon)
HEAD_FORMAT = "edgemri.privacy-ledger-head/1"
LEDGER_FILE = "privacy-ledger.jsonl"


class LedgerError(EdgemriError):
    """A privacy ledger is corrupt or rolled back; it is never silently treated as empty."""


class LedgerRollback(LedgerError):
    """A ledger that is consistent in itself but behind what the server saw this client spend."""


PLAN_KEYS = ("noise_multiplier", "sample_rate", "max_grad_norm")  # what may change between stretches of rounds


def plan_stretches(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive rounds (each a dict with "round" and PLAN_KEYS) grouped by their DP-SGD parameters.

    A resumed run to more rounds re-plans its noise, so one noise multiplier cannot describe a whole
    ledger: each stretch is stated with the parameters its rounds were trained under.
    """
    stretches: list[dict[str, Any]] = []
    for entry in rounds:
        plan = {k: entry[k] for k in PLAN_KEYS}
        if stretches and {k: stretches[-1][k] for k in PLAN_KEYS} == plan:
            stretches[-1]["rounds"].append(entry["round"])
        else:
            stretches.append({"rounds": [entry["round"]], **plan})
    return stretches


def span(rounds: list[int]) -> str:
    """'rounds 1-4' for a run of consecutive rounds, else 'rounds 1, 3, 5'."""
    if not rounds:
        return "no round"
    if rounds == list(range(rounds[0], rounds[-1] + 1)):
        return f"round {rounds[0]}" if len(rounds) == 1 else f"rounds {rounds[0]}-{rounds[-1]}"
    return "rounds " + ", ".join(map(str, rounds))


# ---------------------------------------------------------------- the ledger

_COUNT = number(0, integer=True)
# Every key of a round record, with what its value must be; "seq", "prev", "hash" chain the records.
_RECORD_V2 = {  # a /2 ledger's records: every one a round
    "seq": _COUNT,
    "prev": SHA256,
    "round": _COUNT,
    "noise_multiplier": number(0),
    "sample_rate": number(0, 1, open_low=True),
    "steps": _COUNT,
    "max_grad_norm": number(0, open_low=True),
    "delta": number(0, 1, open_low=True, open_high=True),
    "accountant": one_of(ACCOUNTANTS),
    "budget_epsilon": number(0, open_low=True),
    "epsilon": number(0),
    "hash": SHA256,
}
_RECORD = {**_RECORD_V2, "stage": one_of(STAGES)}
_GENESIS = {
    "format": one_of((LEDGER_FORMAT, LEDGER_FORMAT_V2)),
    "seq": Check(number(0, 0, integer=True), "0"),
    "client": text(200, re.compile(r".+"), allowed="a client name"),
    "ledger_id": Check(SHA256, "a random 256-bit hex id"),
    "hash": SHA256,
}
_HEAD = {
    "format": one_of((HEAD_FORMAT,)),
    "ledger_id": Check(SHA256, "the ledger's id"),
    "count": _COUNT,
    "head": SHA256,
}


def _hash(record: dict[str, Any]) -> str:
    """SHA-256 of a record's canonical JSON without its own hash; the record holds its predecessor's."""
    body = json.dumps({k: v for k, v in record.items() if k != "hash"}, sort_keys=True, separators=(",", ":"),
                      allow_nan=False)
    return hashlib.sha256(body.encode()).hexdigest()


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, allow_nan=False) + "\n"


def _parse(raw: bytes, schema: Mapping[str, Check], where: str) -> dict[str, Any]:
    """One JSON object with exactly ``schema``'s keys, each value allowed; else LedgerError naming ``where``."""
    try:
        return check_record(parse_json(raw, where, LedgerError), schema, where, LedgerError)
    except LedgerError as err:
        raise LedgerError(f"{err}; the ledger is corrupt, restore it from a backup") from None


def _refuse_old_format(path: Path, first_line: bytes) -> None:
    """A /1 ledger (CRC lines anyone can recompute) is refused, not migrated: nothing proves it was never cut."""
    try:
        header = parse_json(first_line, str(path), LedgerError)
    except LedgerError:
        return  # not JSON at all: _parse says so
    if isinstance(header, dict) and header.get("format") == "edgemri.privacy-ledger/1":
        raise LedgerError(f"{path} is an edgemri.privacy-ledger/1 ledger (no hash chain, cannot be verified against "
                          f"rollback) and is not migrated; finish this client's federation with the edgemri release "
                          f"that wrote it, or enrol the device under a new client name with a new state folder")


class Ledger:
    """Append-only, hash-chained record of every DP round a client trained, in its own folder.

    Line 1 is a genesis record binding the client name and a random ledger id; every later
    line is one round holding its sequence number and the SHA-256 of the line before. A
    second file, ``<ledger>.head``, holds the record count and the last hash, rewritten after
    each append: a ledger shorter than its head, or another one, is a rollback and refused.
    """

    def __init__(self, path: Path, header: dict[str, Any], records: list[dict[str, Any]]) -> None:
        self.path = path
        self.header = header
        self.records = records

    @property
    def head_path(self) -> Path:
        return self.path.with_suffix(".head")

    @classmethod
    def open(cls, path: Path, client: str) -> Ledger:
        """Read and verify the ledger (or start one); anything torn, broken or rolled back is a LedgerError."""
        path = Path(path)
        head_path = path.with_suffix(".head")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if head_path.exists():
                raise LedgerError(f"{path} is missing but {head_path.name} says rounds were recorded: the ledger "
                                  f"was deleted; refusing to reset epsilon to zero (restore both from a backup)"
                                  ) from None
            genesis: dict[str, Any] = {"format": LEDGER_FORMAT, "seq": 0, "client": client,
                                       "ledger_id": secrets.token_hex(32)}
            genesis["hash"] = _hash(genesis)
            return cls(path, genesis, [])
        except OSError as err:
            raise LedgerError(f"{path}: cannot read the privacy ledger ({err.strerror or err}); it must be a "
                              f"readable file") from None
        ledger = cls(path, *cls._verify_chain(path, data, client))
        ledger._verify_head()
        return ledger

    @staticmethod
    def _verify_chain(path: Path, data: bytes, client: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if not data:
            raise LedgerError(f"{path}: the ledger is empty; refusing to reset epsilon to zero "
                              f"(restore it from a backup)")
        lines = data.split(b"\n")
        if lines[-1]:
            raise LedgerError(f"{path}: line {len(lines)} is torn (no line end: an interrupted write or a "
                              f"truncated copy); refusing to guess, restore the ledger from a backup")
        parsed: list[dict[str, Any]] = []
        for line_number, raw in enumerate(lines[:-1], start=1):
            where = f"{path}: line {line_number}"
            if line_number == 1:
                _refuse_old_format(path, raw)
                record = _parse(raw, _GENESIS, where)
                if record["client"] != client:
                    raise LedgerError(f"{where}: the ledger belongs to client {record['client'][:64]!r}, not "
                                      f"{client!r}; a ledger cannot be copied between clients")
            else:
                record = _parse(raw, _RECORD if parsed[0]["format"] == LEDGER_FORMAT else _RECORD_V2, where)
                if record["seq"] != line_number - 1:
                    raise LedgerError(f"{where} has sequence number {record['seq']}, expected {line_number - 1}: "
                                      f"records were removed, reordered or duplicated")
                if record["prev"] != parsed[-1]["hash"]:
                    raise LedgerError(f"{where} does not chain to line {line_number - 1}: a record before it was "
                                      f"changed or removed")
            if record["hash"] != _hash(record):
                raise LedgerError(f"{where} fails its hash: the record was changed; the ledger is corrupt")
            parsed.append(record)
        return parsed[0], parsed[1:]

    def _verify_head(self) -> None:
        """The head file must agree, or lag by the one record a crash between the two writes leaves."""
        count = len(self.records)
        try:
            raw = self.head_path.read_bytes()
        except FileNotFoundError:
            if count > 1:
                raise LedgerError(f"{self.head_path} is missing while {self.path.name} has {count} records: the "
                                  f"ledger may have been truncated with it; restore both from a backup") from None
            return  # a crash after the first round's ledger write, before its head
        except OSError as err:
            raise LedgerError(f"{self.head_path}: cannot read the ledger head ({err.strerror or err}); it must be a "
                              f"readable file") from None
        head = _parse(raw, _HEAD, str(self.head_path))
        chain = [self.header, *self.records]
        if head["ledger_id"] != self.header["ledger_id"]:
            raise LedgerError(f"{self.path} is not the ledger its head {self.head_path.name} records (another "
                              f"ledger id): the ledger was replaced")
        if head["count"] > count:
            raise LedgerError(f"{self.path} has {count} records but its head {self.head_path.name} recorded "
                              f"{head['count']}: records were removed or an older copy restored (rolled back)")
        if count - head["count"] > 1 or chain[head["count"]]["hash"] != head["head"]:
            raise LedgerError(f"{self.path} does not match its head {self.head_path.name} (record "
                              f"{head['count']} differs): the ledger was replaced or edited")

    def check_floor(self, records: int, epsilon: float, delta: float, accountant: str) -> None:
        """Refuse a ledger below what the server saw it report (``records`` records, cumulative ``epsilon``).

        A device restored from a backup holds a ledger and head that agree with each other; only a
        second place that the restore does not roll back can tell. The server is that place: it
        sends back the most each client ever reported, and nothing is trained below it.
        """
        spent = self.epsilon(delta, accountant) if self.records else 0.0
        if len(self.records) < records or spent < epsilon * (1 - 1e-9) - 1e-12:
            raise LedgerRollback(
                f"{self.path} holds {len(self.records)} records (epsilon {spent:.3f}), less than the {records} "
                f"records (epsilon {epsilon:.3f}) the server saw this client report: the ledger was restored from "
                f"a backup, deleted or rebuilt; refusing to train (a new budget needs a new enrolment)")

    def head(self) -> tuple[int, int]:
        """(record count, first 48 bits of the last record's hash): for the client's reply metrics.

        The server remembers both; a count that goes down, or a different hash at an unchanged
        count, is a ledger rolled back on the device. 48 bits stay exact as a float metric.
        """
        last = self.records[-1] if self.records else self.header
        return len(self.records), int(last["hash"][:12], 16)

    @staticmethod
    def stage(record: dict[str, Any]) -> str:
        return record.get("stage", "round")  # a /2 ledger's records are all rounds

    def stretches(self) -> list[dict[str, Any]]:
        """The recorded federated rounds grouped by their DP-SGD parameters (``plan_stretches``)."""
        return plan_stretches([r for r in self.records if self.stage(r) == "round"])

    def history(self) -> list[tuple[float, float, int]]:
        return [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in self.records]

    def _delta(self, delta: float) -> float:
        """The smallest delta this ledger ever promised: a server raising delta cannot lower epsilon."""
        return min([delta, *(r["delta"] for r in self.records)])

    def epsilon(self, delta: float, accountant: str) -> float:
        return epsilon_of(self.history(), self._delta(delta), accountant)

    def epsilon_after(self, plan: DPPlan) -> float:
        """The epsilon this client would reach if it trained one more round of ``plan`` (its steps are a bound)."""
        return epsilon_of([*self.history(), (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)],
                          self._delta(plan.delta), plan.accountant)

    @property
    def rounds(self) -> list[int]:
        """The federated rounds recorded (not the personal fine-tunes)."""
        return [r["round"] for r in self.records if self.stage(r) == "round"]

    def append(self, server_round: int, plan: DPPlan, steps: int, stage: str = "round") -> dict[str, Any]:
        """Record a trained round (or, ``stage`` "personal", the personal fine-tune after round
        ``server_round``): the ledger file atomically, then its head.

        The record is written whatever happens (a ledger may over-count, never under-count);
        then a round that took more steps than planned, or ended above the budget, raises
        PrivacyError so that its update never leaves the device.
        """
        if not _COUNT(server_round) or not _COUNT(steps):
            raise PrivacyError(f"a ledger record needs a round and steps >= 0, got round {server_round!r}, "
                               f"steps {steps!r}")
        if stage not in STAGES:
            raise PrivacyError(f"a ledger record's stage is one of {', '.join(STAGES)}, got {stage!r}")
        v2 = self.header["format"] == LEDGER_FORMAT_V2
        if v2 and stage != "round":
            raise PrivacyError(f"{self.path} is an {LEDGER_FORMAT_V2} ledger, which records rounds only; a DP personal "
                               f"fine-tune needs a new client name and state folder (an {LEDGER_FORMAT} ledger)")
        previous = self.records[-1] if self.records else self.header
        record: dict[str, Any] = {
            "seq": len(self.records) + 1, "prev": previous["hash"], "round": server_round,
            "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate, "steps": steps,
            "max_grad_norm": plan.max_grad_norm, "delta": plan.delta, "accountant": plan.accountant,
            "budget_epsilon": plan.budget_epsilon, **({} if v2 else {"stage": stage}),
        }
        self.records.append(record)
        record["epsilon"] = self.epsilon(plan.delta, plan.accountant)
        record["hash"] = _hash(record)
        write_text(self.path, "".join(_line(r) for r in [self.header, *self.records]))
        # A crash here leaves the head one record behind: open() accepts that (it over-counts only).
        write_text(self.head_path, _line({"format": HEAD_FORMAT, "ledger_id": self.header["ledger_id"],
                                          "count": len(self.records), "head": record["hash"]}))
        if steps > plan.steps_per_round:
            raise PrivacyError(f"round {server_round} took {steps} noisy steps, more than the plan's "
                               f"{plan.steps_per_round}; recorded, and its update must not be sent")
        if record["epsilon"] > plan.budget_epsilon:
            raise PrivacyError(f"round {server_round} took epsilon to {record['epsilon']:.2f} > budget "
                               f"{plan.budget_epsilon}; recorded, and its update must not be sent")
        return record
