"""`edgemri privacy attack RUN_DIR`: what an honest-but-curious server gets out of a finished federation run.

For sampled clients and rounds it rebuilds exactly what each client sent: the global model it received
(``server/global-round-(r-1).pt``; round 1: the start model the run recorded), its own scans through its
manifest, and its local training as the run's config says, through the client's own code path
(``Client.trainer`` and ``Client.dp_plan``, ``core.privacy.opacus_wrap``, the method's ``train_round``).
Each replay is checked against the training loss and step count the client reported for that round.
Then, with ``core.attacks``:

- **the update it sent** (trained - received): the analytic linear-layer attack on the head;
- **a single-image step of that client**: one plain SGD step on one of its scans from the same model,
  clipped and noised as its DP-SGD plan says (and, for a DP client, the same step without DP): the
  analytic attack and gradient inversion with the known global model. This is the worst case of what one
  update can carry, not what the client sent (it sent several Adam steps over batches);
- **its personalized model** (``clients/<name>/personalized.pt``): loss-threshold and calibrated membership
  inference, members = its training scans, non-members = held-out scans of its site.

Every reconstruction is scored against the client's own images and against what random held-out images of
the same site score: two unrelated slices of one scanner already look alike. The run folder is untrusted:
every file is validated, every path confined to it (the data folder and the start model may lie
elsewhere), errors are one-line ``EdgemriError``s. reports/privacy_attacks.py writes the results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import logging.config
import math
import time
import tomllib
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from edgemri.clients.runtime import Client, ClientSetup
from edgemri.core.config import Config, ConfigError, TrainSpec
from edgemri.core.data.dataset import ArraySplit
from edgemri.core.data.images import CLASS_NAMES, IMAGE_SIZE, MEAN, STD, normalize, parse_preprocessing
from edgemri.core.data.partition import manifest_paths, read_manifest
from edgemri.core.errors import EdgemriError
from edgemri.core.federation.personalize import Method, RoundOutput, State, create_method, evaluate_state, student_from
from edgemri.core.federation.protocol import (
    CLIENT_NAME,
    PERSONAL_DP,
    START_ACCURACY,
    FederationResult,
    ProtocolError,
    RoundInstructions,
    check_client_name,
)
from edgemri.core.privacy import attacks
from edgemri.core.privacy.dp import ACCOUNTANTS, DPPlan, opacus_wrap
from edgemri.core.privacy.ledger import Ledger
from edgemri.core.registries import load_config
from edgemri.core.training.checkpoint import check_state_dict, load_checkpoint
from edgemri.core.training.evaluate import predict_logits
from edgemri.core.training.losses import cross_entropy
from edgemri.core.training.train import TrainData, fit
from edgemri.models import Student
from edgemri.reports.common import machine, package_versions

REPORT_KIND = "edgemri.privacy-attacks/1"
DEFAULT_CLIENTS = 4
MAX_CLIENTS = 1000
DEFAULT_INVERSION_STEPS = 300  # about 4 s per inversion on one CPU thread for this student
MAX_INVERSION_STEPS = 5000
INVERSION_LR, INVERSION_TV = 0.1, 1e-2  # Geiping et al.'s step size; their strongest total-variation prior
BASELINE_IMAGES = 8  # random held-out images of the client's site: what an unrelated image scores
MIN_LEARNED_MEMBERS = 8  # per half: the learned attack fits on one half of the members, scores the other
MAX_NONMEMBERS = 1000  # held-out scans per membership attack: more only narrows an interval already narrow
PSNR_CAP_DB = 100.0  # identical up to float rounding; keeps the JSON finite
REPLAY_RTOL = 1e-4  # the replayed train loss against the reported one: float noise passes, another run does not
MAX_JSON_BYTES = 64 * 2**20
SAMPLE_UNIT = "one scan of this client (add/remove one record of its training set)"
SYNTH_GENERATOR = "edgemri.core.synth"
# Methods whose personalized model is DP-SGD's own output (or the global model): the ledger's epsilon covers it.
# The others fine-tune on the raw scans without noise on the device (Ditto's personal model, the fine-tuning and
# calibration recipes), so epsilon says nothing about that model.
PERSONAL_MODEL_UNDER_DP = frozenset({"fedavg", "fedper", "lg-fedavg", "fedbn"})
# The range of a normalized pixel: what a reconstruction is clamped to.
INPUT_BOUNDS = (min((0 - m) / s for m, s in zip(MEAN, STD, strict=True)),
                max((1 - m) / s for m, s in zip(MEAN, STD, strict=True)))


class PrivacyAttackError(EdgemriError):
    """A run folder that cannot be attacked as asked; the message names the file or value and what is allowed."""


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class AttackSettings:
    clients: int = DEFAULT_CLIENTS
    rounds: tuple[int, ...] | None = None  # None: each sampled client's first trained round
    seed: int = 0
    inversion_steps: int = DEFAULT_INVERSION_STEPS
    write_reconstructions: bool = False  # real scans' reconstructions only on request; synthetic data always
    data_root: Path | None = None  # None: the data folder the run recorded
    start: Path | None = None  # None: the start model the run recorded

    def check(self, rounds_in_run: int) -> None:
        for name, value, low, high in (("--clients", self.clients, 1, MAX_CLIENTS),
                                       ("--seed", self.seed, 0, 2**31 - 1),
                                       ("--inversion-steps", self.inversion_steps, 1, MAX_INVERSION_STEPS)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise PrivacyAttackError(f"{name} is {value!r}; allowed: an integer in [{low}, {high}]")
        for r in self.rounds or ():
            if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= rounds_in_run:
                raise PrivacyAttackError(f"--rounds holds {r!r}; allowed: rounds 1-{rounds_in_run} of this run")


# ---------------------------------------------------------------- the run folder (untrusted)


def _inside(root: Path, *parts: str) -> Path:
    """``root / parts``, refused unless it resolves (symlinks too) inside the run folder."""
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root):
        raise PrivacyAttackError(f"{root.joinpath(*parts)} resolves outside the run folder {root}; refusing to "
                                 f"follow it")
    return path


def _json(path: Path) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise PrivacyAttackError(f"{path} is {size:,} bytes; a run's JSON files are at most {MAX_JSON_BYTES:,}")
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise PrivacyAttackError(f"{path} is not readable JSON ({err.__class__.__name__})") from None


def _number(value: Any, where: str, low: float = -math.inf, high: float = math.inf, *, nan: bool = False
            ) -> float | None:
    """A finite number in [low, high] (None for NaN when ``nan``); anything else names ``where``."""
    if nan and isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low <= value <= high:
        raise PrivacyAttackError(f"{where} is {str(value)[:60]!r}; allowed: a finite number in [{low}, {high}]")
    return float(value)


def _text(value: Any, where: str, limit: int = 200) -> str:
    """A short printable one-line string, safe in a Markdown table."""
    if not isinstance(value, str) or len(value) > limit or not value.isprintable() or "|" in value:
        raise PrivacyAttackError(f"{where} is {str(value)[:60]!r}; allowed: printable text of at most {limit} "
                                 f"characters without '|'")
    return value


@dataclass
class RunFolder:
    """A finished federation run, read and checked."""

    root: Path
    config: Config
    result: FederationResult
    trained: dict[str, list[int]]  # client -> the rounds it trained, ascending
    manifests: dict[str, Path]
    data_root: Path
    start_path: Path
    start: State
    federation: dict[str, Any] | None
    privacy: dict[str, Any] | None
    _clients: dict[str, Client] = field(default_factory=dict)

    def received(self, server_round: int) -> State:
        """The global model the server sent in ``server_round``."""
        if server_round == 1:
            return self.start
        path = _inside(self.root, "server", f"global-round-{server_round - 1:03d}.pt")
        checkpoint = load_checkpoint(path)
        if checkpoint.model != "student":
            raise PrivacyAttackError(f"{path} holds a {checkpoint.model!r}; a federation's global model is a student")
        return check_state_dict(Student(), checkpoint.state_dict, str(path))

    def client(self, name: str) -> Client:
        """The client as its own code sees itself: manifest, data folder, state folder (confined to the run)."""
        if name not in self._clients:
            state_dir = _inside(self.root, "clients", check_client_name(name))
            for entry in state_dir.iterdir() if state_dir.is_dir() else ():  # its ledger, cache, models
                _inside(self.root, "clients", name, entry.name)
            self._clients[name] = Client(ClientSetup(self.manifests[name], self.data_root, state_dir))
        return self._clients[name]

    def reported(self, name: str, server_round: int) -> dict[str, Any]:
        return next(h.train_metrics.get(name, {}) for h in self.result.history if h.round == server_round)

    @property
    def synthetic(self) -> bool:
        """The data folder is edgemri's synthetic set (its generator's synth.json), so no real person's scans."""
        marker = self.data_root / "synth.json"
        try:
            info = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(info, dict) and info.get("generator") == SYNTH_GENERATOR


def _check_result(result: FederationResult, config: Config, where: Path) -> dict[str, list[int]]:
    """The parts of result.json the attack relies on, typed and bounded; the rounds each client trained."""
    for name, info in result.clients.items():
        try:
            check_client_name(name)
        except ProtocolError as err:
            raise PrivacyAttackError(f"{where}: {err}") from None
        if info.kind not in config.federation.tier_names or not isinstance(info.site, str) \
                or not CLIENT_NAME.fullmatch(info.site):
            raise PrivacyAttackError(f"{where}: client {name!r} has kind {str(info.kind)[:40]!r}, site "
                                     f"{str(info.site)[:40]!r}; allowed: a kind of federation.tiers "
                                     f"({', '.join(config.federation.tier_names)}) and a plain site name")
        _number(info.num_examples, f"{where}: num_examples of {name}", 1, 10_000_000)
    trained: dict[str, list[int]] = {name: [] for name in result.clients}
    last = 0
    for record in result.history:
        r = record.round
        if isinstance(r, bool) or not isinstance(r, int) or not last < r <= config.federation.rounds:
            raise PrivacyAttackError(f"{where}: history round {str(r)[:20]!r} is not a round after {last} and at "
                                     f"most federation.rounds = {config.federation.rounds}")
        last = r
        if not isinstance(record.trained, list) or not isinstance(record.train_metrics, dict):
            raise PrivacyAttackError(f"{where}: round {r} lacks its list of trained clients or their metrics")
        for name in record.trained:
            if not isinstance(name, str) or name not in trained:
                raise PrivacyAttackError(f"{where}: round {r} names a trained client {str(name)[:64]!r} that is not "
                                         f"one of the run's clients")
            metrics = record.train_metrics.get(name, {})
            if not isinstance(metrics, dict):
                raise PrivacyAttackError(f"{where}: round {r}: the metrics of {name} are not a mapping")
            for key in ("train-loss", "steps"):
                if key in metrics:
                    _number(metrics[key], f"{where}: round {r}: {name}'s {key}", 0, 1e9)
            trained[name].append(r)
    if not isinstance(result.final, dict) or not all(isinstance(v, dict) for v in result.final.values()):
        raise PrivacyAttackError(f"{where}: 'final' is not a mapping of clients to their metrics")
    return trained


def _recorded_run_config(root: Path) -> dict[str, Any]:
    """The Flower run config the runner wrote (logs/run_config.toml): where the data and the start model were."""
    path = _inside(root, "logs", "run_config.toml")
    if not path.is_file():
        return {}
    try:
        if path.stat().st_size > 1 << 20:
            raise ValueError("over 1 MiB")
        recorded = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise PrivacyAttackError(f"{path} is not a readable run config ({err.__class__.__name__})") from None
    for key in ("data-root", "start-checkpoint"):
        if key in recorded and not (isinstance(recorded[key], str) and recorded[key].isprintable()):
            raise PrivacyAttackError(f"{path}: {key!r} must be a path string")
    return recorded


def read_run(run_dir: Path, *, data_root: Path | None = None, start: Path | None = None) -> RunFolder:
    """A finished run folder, checked; ``data_root`` and ``start`` override what the run recorded."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PrivacyAttackError(f"{run_dir} is not a folder; expected a finished federation run "
                                 f"(the --out of `edgemri federate`)")
    root = run_dir.resolve()
    result_path = _inside(root, "server", "result.json")
    if not result_path.is_file():
        raise PrivacyAttackError(f"{run_dir} is not a finished federation run: it has no server/result.json")
    try:
        config = load_config(_inside(root, "config.yaml"))
    except ConfigError as err:  # e.g. a run of an older edgemri: its training cannot be replayed exactly
        raise PrivacyAttackError(f"{err}; this edgemri cannot replay the run's training from that config "
                                 f"(a run made by another version?): run the federation again") from None
    result = FederationResult.from_dict(_json(result_path))
    trained = _check_result(result, config, result_path)
    manifests = {}
    for path in manifest_paths(_inside(root, "manifests")):
        manifest = read_manifest(_inside(root, "manifests", path.name))
        info = result.clients.get(manifest.client)
        if info is not None and (info.kind, info.site) != (manifest.kind, manifest.site):
            raise PrivacyAttackError(f"{path}: client {manifest.client} is a {manifest.kind} at {manifest.site} "
                                     f"here but a {info.kind} at {info.site} in server/result.json")
        manifests[manifest.client] = _inside(root, "manifests", path.name)
    if not manifests:
        raise PrivacyAttackError(f"{run_dir}/manifests holds no client manifests: the replay needs each client's "
                                 f"manifest and data (a simulation's run folder)")
    recorded = _recorded_run_config(root)
    data = data_root or recorded.get("data-root") or config.data.root
    if not data:
        raise PrivacyAttackError(f"{run_dir} records no data folder; pass --data-root DIR")
    start_path = start or recorded.get("start-checkpoint") or config.federation.start_checkpoint
    if not start_path:
        raise PrivacyAttackError(f"{run_dir} does not record its start model (no logs/run_config.toml); "
                                 f"pass --start PATH (the student the federation started from)")
    checkpoint = load_checkpoint(Path(start_path))
    if checkpoint.model != "student":
        raise PrivacyAttackError(f"{start_path} holds a {checkpoint.model!r}; the federation starts from a student")
    optional = {name: _json(path) if (path := _inside(root, f"{name}.json")).is_file() else None
                for name in ("federation", "privacy")}
    for name, value in optional.items():
        if value is not None and not isinstance(value, dict):
            raise PrivacyAttackError(f"{root / name}.json is not a JSON object")
    return RunFolder(root, config, result, trained, manifests, Path(data), Path(start_path),
                     check_state_dict(Student(), checkpoint.state_dict, str(start_path)),
                     optional["federation"], optional["privacy"])


# ---------------------------------------------------------------- replay


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
    """What the server sent this client's tier in ``server_round`` (``FederationStrategy._messages``)."""
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


# ---------------------------------------------------------------- reconstruction attacks


def single_image_step(local_start: State, image: Tensor, label: int, plan: DPPlan | None, seed: int) -> State:
    """The update one plain SGD step at rate 1 on one scan sends: minus its gradient, or under DP-SGD minus its
    clipped gradient plus noise of the plan's multiplier times its clipping norm (Opacus, through the training
    loop's own hook; Poisson rate 1, so the scan is in the step). ``image``: uint8 (3, H, W)."""
    model = student_from(local_start)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    wrap = None
    if plan is not None:
        wrap = opacus_wrap(dataclasses.replace(plan, sample_rate=1.0, steps_per_epoch=1, steps_per_round=1), seed)
    fit(model, TrainData(image[None], torch.tensor([label])), loss=cross_entropy, seed=seed, select="last",
        spec=TrainSpec(epochs=1, batch_size=1, lr=1.0, optimizer="sgd", momentum=0.0), wrap=wrap)
    return {k: v.detach() - before[k] for k, v in model.state_dict().items()}


def head_names(state: State) -> tuple[str, str] | None:
    """The weight and bias keys of the student's Linear head."""
    weight, bias = f"{Student.HEAD_PREFIX}1.weight", f"{Student.HEAD_PREFIX}1.bias"
    return (weight, bias) if weight in state and bias in state else None


@torch.no_grad()
def feature_maps(state: State, images: Tensor) -> Tensor:
    """The head's input for uint8 images: the (N, 3, 32, 32) maps of the second conv block, a downsampled scan."""
    model = student_from(state).eval()
    return torch.cat([model.conv_block_2(model.conv_block_1(normalize(images[i:i + 256])))
                      for i in range(0, len(images), 256)])


def _psnr(value: float) -> float:
    return min(value, PSNR_CAP_DB)


def _baseline(baseline: Tensor | None, candidates: Tensor, data_range: float) -> dict[str, float] | None:
    """What random held-out images of the site score against the client's images (the mean of their best matches)."""
    if baseline is None or not len(baseline):
        return None
    scores = [attacks.best_match(b, candidates, data_range=data_range) for b in baseline]
    return {"psnr": float(np.mean([_psnr(s[1]) for s in scores])), "ssim": float(np.mean([s[2] for s in scores])),
            "images": len(scores)}


def score(reconstruction: Tensor, candidates: Tensor, baseline: dict[str, float] | None, data_range: float,
          true_index: int | None = None) -> dict[str, Any]:
    """Best match among the client's images (PSNR, SSIM), against the site baseline; and the true image's, if known."""
    index, psnr, ssim = attacks.best_match(reconstruction, candidates, data_range=data_range)
    out: dict[str, Any] = {"best_match_index": index, "psnr": _psnr(psnr), "ssim": ssim}
    if true_index is not None:
        out.update({"matches_true_image": index == true_index,
                    "psnr_true": _psnr(attacks.psnr(reconstruction, candidates[true_index], data_range)),
                    "ssim_true": attacks.ssim(reconstruction, candidates[true_index], data_range)})
    if baseline is not None:
        out.update({"baseline_psnr": baseline["psnr"], "baseline_ssim": baseline["ssim"],
                    "margin_db": out["psnr"] - baseline["psnr"],
                    "within_1db_of_random": out["psnr"] - baseline["psnr"] <= 1.0})
    return out


def analytic_attack(grads: State, candidates: Tensor, baseline: Tensor | None, *, update: bool,
                    true_index: int | None = None, true_label: int | None = None
                    ) -> tuple[dict[str, Any], Tensor | None]:
    """``linear_leakage`` on the head's gradient (or update), scored on feature maps; each class row scored too
    (for several images per step every row is a mix: row k leans towards the images of class k)."""
    head = head_names(grads)
    if head is None:
        return {"applicable": False, "why": "the head is not sent (the method keeps it on the client)"}, None
    weight, bias = grads[head[0]].double(), grads[head[1]].double()
    try:
        flat, label = attacks.linear_leakage(weight, bias, update=update)
    except attacks.AttackError as err:
        return {"applicable": False, "why": str(err)}, None
    shape = candidates.shape[1:]
    data_range = float(candidates.max() - candidates.min()) or 1.0
    reference = _baseline(baseline, candidates, data_range)
    reconstruction = flat.reshape(shape).float()
    out: dict[str, Any] = {"applicable": True, "label": CLASS_NAMES[label],
                           **score(reconstruction, candidates, reference, data_range, true_index)}
    if true_label is not None:
        out["label_recovered"] = label == true_label
    out["rows"] = [{"class": CLASS_NAMES[k],
                    "psnr": _psnr(attacks.best_match((weight[k] / bias[k]).reshape(shape).float(), candidates,
                                                     data_range=data_range)[1])}
                   for k in range(len(bias)) if bias[k] != 0]
    return out, reconstruction


def to_pixels(normalized: Tensor) -> Tensor:
    """A normalized (1, 3, H, W) input back in [0, 1] pixel space, (3, H, W)."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (normalized[0] * std + mean).clamp(0, 1)


def inversion_attack(received: State, grads: State, label: int, candidates: Tensor, baseline: dict[str, float] | None,
                     true_index: int, *, steps: int, seed: int) -> tuple[dict[str, Any], Tensor]:
    """``invert_gradients`` with the global model the server sent; scored in [0, 1] pixels against the client's scans.
    The label comes off the head's gradient where the head is sent; else the attacker is given it."""
    given = head_names(grads) is None
    started = time.perf_counter()
    image = attacks.invert_gradients(student_from(received), grads, (1, *candidates.shape[1:]),
                                     label if given else None, steps=steps, lr=INVERSION_LR, seed=seed,
                                     tv_weight=INVERSION_TV, bounds=INPUT_BOUNDS)
    seconds = time.perf_counter() - started
    pixels = to_pixels(image)
    out = {"steps": steps, "seconds": seconds, "label_given": given,
           **score(pixels, candidates, baseline, 1.0, true_index)}
    if not given:
        head = head_names(grads)
        out["label_recovered"] = attacks.linear_leakage(grads[head[0]], grads[head[1]])[1] == label
    return out, pixels


# ---------------------------------------------------------------- membership


def losses_and_accuracy(logits: Tensor, split: ArraySplit) -> tuple[Tensor, float]:
    """Each example's cross-entropy loss from a model's ``logits`` for ``split`` and the accuracy."""
    accuracy = float((logits.argmax(1) == split.labels).float().mean())
    return F.cross_entropy(logits, split.labels, reduction="none"), accuracy


def art_membership_classes() -> tuple[Any, Any]:
    """ART's ``MembershipInferenceBlackBox`` and ``PyTorchClassifier``; ImportError without the ``attacks`` extra.

    ART's package import calls ``logging.config.dictConfig``, which closes every logging handler open in the
    process (a log file, pytest's own handlers); all its config adds is a NullHandler on the "art" logger, so
    the import runs with ``dictConfig`` a no-op, and ART's INFO chatter stays out of the progress output."""
    configure = logging.config.dictConfig
    logging.config.dictConfig = lambda _config: None
    try:
        from art.attacks.inference.membership_inference import MembershipInferenceBlackBox
        from art.estimators.classification import PyTorchClassifier
    finally:
        logging.config.dictConfig = configure
    logging.getLogger("art").setLevel(logging.WARNING)
    return MembershipInferenceBlackBox, PyTorchClassifier


def learned_attack(model: torch.nn.Module, member_logits: Tensor, members: ArraySplit, nonmember_logits: Tensor,
                   nonmembers: ArraySplit, seed: int) -> dict[str, Any]:
    """The Adversarial Robustness Toolbox's black-box membership attack (its default attack model, a small
    network on the model's probabilities and the true label, trained under ``seed``): fitted on half of the
    members and non-members, scored on the other half. Needs the ``attacks`` extra; too few members to split is
    a reason, not a number."""
    try:
        MembershipInferenceBlackBox, PyTorchClassifier = art_membership_classes()  # noqa: N806 - classes
    except ImportError:
        return {"skipped": "the Adversarial Robustness Toolbox is not installed (pip install 'edgemri[attacks]')"}
    if min(len(members), len(nonmembers)) < 2 * MIN_LEARNED_MEMBERS:
        return {"skipped": f"{len(members)} members: at least {2 * MIN_LEARNED_MEMBERS} needed to fit on half "
                           "and score the other half"}
    rng = np.random.default_rng(seed)
    halves = [np.array_split(rng.permutation(n), 2) for n in (len(members), len(nonmembers))]
    probabilities = [F.softmax(logits, 1).numpy() for logits in (member_logits, nonmember_logits)]
    labels = [split.labels.numpy() for split in (members, nonmembers)]
    classifier = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(3, IMAGE_SIZE,
                                   IMAGE_SIZE), nb_classes=len(CLASS_NAMES))
    attack = MembershipInferenceBlackBox(classifier, input_type="prediction", attack_model_type="nn")
    (member_fit, member_score), (nonmember_fit, nonmember_score) = halves
    with torch.random.fork_rng():  # the attack network's initialization and batches come from torch's RNG
        torch.manual_seed(seed)
        attack.fit(x=None, y=labels[0][member_fit], test_x=None, test_y=labels[1][nonmember_fit],
                   pred=probabilities[0][member_fit], test_pred=probabilities[1][nonmember_fit])
        member_scores, nonmember_scores = (
            attack.infer(x=None, y=labels[which][index], pred=probabilities[which][index],
                         probabilities=True).reshape(-1)
            for which, index in ((0, member_score), (1, nonmember_score)))
    return {"attack": "ART MembershipInferenceBlackBox, its attack network on (probabilities, label)",
            **attacks.membership_metrics(member_scores, nonmember_scores)}


def membership_attack(personalized: Path, start: State, members: ArraySplit, nonmembers: ArraySplit,
                      seed: int = 0) -> dict[str, Any]:
    """Loss-threshold, start-calibrated and learned (ART) membership inference against a client's personalized
    model (raw logits, its own preprocessing; the start model, which never saw a candidate, is the calibration
    reference)."""
    checkpoint = load_checkpoint(personalized)
    if checkpoint.model != "student":
        raise PrivacyAttackError(f"{personalized} holds a {checkpoint.model!r}; a personalized model is a student")
    preprocessing = parse_preprocessing(checkpoint.preprocessing, str(personalized))
    model, reference = checkpoint.build(), student_from(start)
    member_logits, nonmember_logits = (
        predict_logits(model, split.images, lambda x: normalize(x, preprocessing["mean"], preprocessing["std"]))
        for split in (members, nonmembers))
    (member_losses, member_accuracy), (nonmember_losses, nonmember_accuracy) = (
        losses_and_accuracy(logits, split) for logits, split in ((member_logits, members),
                                                                 (nonmember_logits, nonmembers)))
    calibration = [losses_and_accuracy(predict_logits(reference, split.images, normalize), split)[0]
                   for split in (members, nonmembers)]
    return {"loss_threshold": attacks.loss_threshold_attack(member_losses, nonmember_losses),
            "calibrated": attacks.calibrated_loss_attack(member_losses, nonmember_losses, *calibration),
            "learned": learned_attack(model, member_logits, members, nonmember_logits, nonmembers, seed),
            "member_loss": float(member_losses.mean()), "nonmember_loss": float(nonmember_losses.mean()),
            "member_accuracy": member_accuracy, "nonmember_accuracy": nonmember_accuracy}


# ---------------------------------------------------------------- model card parts


def _accuracy_card(run: RunFolder, name: str, kind: str) -> dict[str, Any] | None:
    """The client's personalized gain over the start and global models, and its tier's paired CI (federation.json)."""
    if run.federation is None:
        return None
    where = f"{run.root}/federation.json"
    pool = run.federation.get("pool")
    section = pool if isinstance(pool, dict) else run.federation
    rows = section.get("clients")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise PrivacyAttackError(f"{where}: 'clients' is not a list of rows")
    row = next((r for r in rows if r.get("client") == name), None)
    if row is None:
        return None
    values = {k: _number(row.get(k), f"{where}: {name}'s {k} accuracy", 0, 1, nan=True)
              for k in ("personalized", "start", "global")}
    groups = (section.get("paired") or {}).get("groups", {}) if isinstance(section.get("paired"), dict) else {}
    if not isinstance(groups, dict):
        raise PrivacyAttackError(f"{where}: 'paired.groups' is not a mapping")
    tier: dict[str, Any] = {}
    for key in ("personalized - start", "personalized - global"):
        interval = groups.get(kind, {}).get(key) if isinstance(groups.get(kind), dict) else None
        if interval is None:
            continue
        if not isinstance(interval, dict):
            raise PrivacyAttackError(f"{where}: the {kind} interval {key!r} is not a mapping")
        tier[key] = {k: _number(interval.get(k), f"{where}: {kind} {key} {k}", -1, 1, nan=True)
                     for k in ("mean", "low", "high")}
        tier[key]["n"] = int(_number(interval.get("n"), f"{where}: {kind} {key} n", 0, 1e6))

    def gain(other: str) -> float | None:
        first, second = values["personalized"], values[other]
        return None if first is None or second is None else first - second

    return {"where": "site pool" if section is pool else "local test split", **values,
            "gain_over_start": gain("start"), "gain_over_global": gain("global"), "tier_paired": tier}


def _privacy_card(run: RunFolder, client: Client) -> dict[str, Any]:
    """Cumulative (epsilon, delta), unit and accountant: recomputed from the client's hash-chained ledger, checked
    against privacy.json where it has them."""
    name = client.name
    tier = run.config.privacy.tier(client.kind, name)
    where = f"{run.root}/privacy.json"
    sample_level = run.privacy.get("sample_level", {}) if run.privacy is not None else {}
    entry = sample_level.get(name) if isinstance(sample_level, dict) else None
    if (entry is not None and not isinstance(entry, dict)) or not isinstance(sample_level, dict):
        raise PrivacyAttackError(f"{where}: 'sample_level' is not a mapping of clients to entries")
    if not tier.enabled:
        return {"dp": False, "unit": None, "epsilon": None, "delta": None, "accountant": None}
    ledger = Ledger.open(client.ledger_path, name)
    plan = client.dp_plan(round_instructions(run.config, client.kind, 1))
    card: dict[str, Any] = {
        "dp": True, "unit": SAMPLE_UNIT, "accountant": run.config.privacy.accountant, "delta": plan.delta,
        "epsilon": ledger.epsilon(plan.delta, run.config.privacy.accountant) if ledger.records else 0.0,
        "source": "privacy ledger (hash chain checked), recomputed", "budget_epsilon": plan.budget_epsilon,
        "noise_multiplier": plan.noise_multiplier, "max_grad_norm": plan.max_grad_norm,
        "sample_rate": plan.sample_rate, "rounds_trained": ledger.rounds,
        "epsilon_after_round": {str(r["round"]): r["epsilon"] for r in ledger.records}, "privacy_json_agrees": None}
    if entry:
        reported = _number(entry.get("epsilon", 0.0), f"{where}: {name}'s epsilon", 0, 1e6)
        accountant = entry.get("accountant")
        if accountant not in ACCOUNTANTS:
            raise PrivacyAttackError(f"{where}: {name}'s accountant is {str(accountant)[:40]!r}; allowed: "
                                     f"{', '.join(ACCOUNTANTS)}")
        card["unit"] = _text(entry.get("unit", SAMPLE_UNIT), f"{where}: {name}'s unit")
        card["privacy_json_agrees"] = math.isclose(reported, card["epsilon"], rel_tol=1e-6, abs_tol=1e-9)
    return card


def _client_level(run: RunFolder) -> dict[str, Any]:
    """Client-level (central) DP as privacy.json reports what the server did; else as the config asked."""
    central = run.privacy.get("client_level") if run.privacy is not None else None
    if central is None:
        return {"enabled": run.config.privacy.central.enabled, "source": "config.yaml (no privacy.json)"}
    where = f"{run.root}/privacy.json: client_level"
    if not isinstance(central, dict) or not isinstance(central.get("enabled"), bool):
        raise PrivacyAttackError(f"{where} is not a mapping with 'enabled' true or false")
    if not central["enabled"]:
        return {"enabled": False, "source": "privacy.json"}
    return {"enabled": True, "source": "privacy.json",
            "epsilon": _number(central.get("epsilon"), f"{where} epsilon", 0, 1e6),
            "delta": _number(central.get("delta"), f"{where} delta", 0, 1),
            "side": _text(central.get("side", ""), f"{where} side", 20)}


def _not_protected(run: RunFolder, name: str, under_dp: bool | None) -> str:
    rounds = run.trained[name]
    reported = sorted({k for r in rounds for k in run.reported(name, r)})
    model = ("its personalized model's behaviour (answers to queries, as the membership attack on this card uses; "
             + ("DP-SGD's output, so covered by its epsilon" if under_dp else
                "trained on its raw scans without DP noise, so not covered by any epsilon here") + ")")
    return (f"the {len(reported)} metrics it sent with every update ({', '.join(reported[:6])}"
            f"{', ...' if len(reported) > 6 else ''}), its number of scans, that it took part in rounds "
            f"{', '.join(map(str, rounds)) or 'none'}, and {model}")


# ---------------------------------------------------------------- the whole attack


@dataclass
class ReconstructionExample:
    """One attacked round's pictures, for the grid (kept only where reconstructions may be written)."""

    title: str
    image: Tensor  # the attacked scan, (3, H, W) in [0, 1]
    inversion: Tensor
    inversion_without_dp: Tensor | None
    feature_map: Tensor  # the scan's true head input, (3, 32, 32)
    analytic_step: Tensor | None
    analytic_update: Tensor | None


@dataclass
class AttackOutcome:
    report: dict[str, Any]
    examples: list[ReconstructionExample]  # empty unless reconstructions may be written


def sample_clients(run: RunFolder, count: int, seed: int) -> list[str]:
    """Up to ``count`` clients that trained, seeded, alternating between tiers so every tier is attacked."""
    rng = np.random.default_rng(seed)
    eligible = sorted(n for n, rounds in run.trained.items() if rounds and n in run.manifests)
    queues = []
    for kind in sorted({run.result.clients[n].kind for n in eligible}):
        names = [n for n in eligible if run.result.clients[n].kind == kind]
        queues.append([names[i] for i in rng.permutation(len(names))])
    picked: list[str] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


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


def _check_start(run: RunFolder, client: Client) -> None:
    """The start model must be the run's: it reproduces the start accuracy the client reported."""
    recorded = run.result.final.get(client.name, {}).get(START_ACCURACY)
    if recorded is None or not len(client.data().test):
        return
    recorded = _number(recorded, f"server/result.json: {client.name}'s {START_ACCURACY}", 0, 1)
    measured = evaluate_state(run.start, client.data().test)["accuracy"]
    if not math.isclose(measured, recorded, abs_tol=1e-6):
        raise PrivacyAttackError(f"the start model {run.start_path} is not the one this run started from: it scores "
                                 f"{measured:.4f} on {client.name}'s test split, the run recorded {recorded:.4f}; "
                                 f"pass --start with the run's start model")


def personal_model_under_dp(method: str, final_metrics: dict[str, float]) -> bool:
    """Whether the ledger's epsilon covers a DP client's personalized model: the method's personal model is
    DP-SGD's own output (or the global model), or the client's tier has ``personal_epsilon`` (``personal-dp``
    in its final metrics): 1, fine-tuned under DP-SGD; 0, not fine-tuned at all (the global model)."""
    return method in PERSONAL_MODEL_UNDER_DP or PERSONAL_DP in final_metrics


def attack_client(run: RunFolder, name: str, settings: AttackSettings, keep_examples: bool,
                  progress: Callable[[str], None]) -> tuple[dict[str, Any], list[ReconstructionExample]]:
    """One client's model card: its accuracy gain, its privacy, the attacks on its updates and on its model."""
    client = run.client(name)
    info = run.result.clients[name]
    _check_start(run, client)
    seed = (settings.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31
    rng = np.random.default_rng(seed)
    train = client.data().train
    pool = client.site_pool()  # held-out scans of its site, none a copy of a Training scan
    sample = pool.subset(sorted(rng.choice(len(pool), min(BASELINE_IMAGES, len(pool)), replace=False).tolist())) \
        if pool is not None and len(pool) else None
    rounds = list(settings.rounds) if settings.rounds else run.trained[name][:1]
    method = create_method(run.config.federation)
    under_dp = personal_model_under_dp(method.name, run.result.final.get(name, {}))
    privacy = _privacy_card(run, client)
    card: dict[str, Any] = {
        "client": name, "kind": info.kind, "site": info.site, "n_train": len(train), "method": method.name,
        "accuracy": _accuracy_card(run, name, info.kind), "privacy": privacy,
        "personal_model_under_dp": under_dp if privacy["dp"] else None,
        "updates": [], "skipped_rounds": {str(r): "did not train in this round" for r in rounds
                                          if r not in run.trained[name]}}
    examples = []
    pixels = train.images.float() / 255
    pixel_baseline = _baseline(sample.images.float() / 255 if sample is not None else None, pixels, 1.0)
    majority = int(torch.bincount(train.labels, minlength=len(CLASS_NAMES)).argmax())
    for r, replay in replay_client(run, name, rounds).items():
        check = replay_check(replay, run.reported(name, r))
        features = feature_maps(replay.local_start, train.images)
        baseline_features = feature_maps(replay.local_start, sample.images) if sample is not None else None
        shared = set(method.shared_keys(list(replay.received)))  # the keys whose update carries information
        analytic_update, update_map = analytic_attack({k: v for k, v in replay.update.items() if k in shared},
                                                      features, baseline_features, update=True)
        if analytic_update.get("applicable"):
            analytic_update["label_is_majority_class"] = analytic_update["label"] == CLASS_NAMES[majority]
        target = int(rng.integers(len(train)))
        label = int(train.labels[target])
        step_seed = (seed + 7919 * r) % 2**31
        variants: dict[str, Any] = {}
        pictures: dict[str, tuple[Tensor | None, Tensor]] = {}
        for variant, plan in (("as_configured", replay.plan), ("without_dp", None)):
            if variant == "without_dp" and replay.plan is None:
                continue
            step = single_image_step(replay.local_start, train.images[target], label, plan, step_seed)
            grads = {k: -v for k, v in step.items() if k in shared}  # a positive multiple of the gradient
            analytic, step_map = analytic_attack(grads, features, baseline_features, update=False,
                                                 true_index=target, true_label=label)
            inversion, image = inversion_attack(replay.received, grads, label, pixels, pixel_baseline, target,
                                                steps=settings.inversion_steps, seed=step_seed)
            variants[variant] = {"dp": plan is not None, "analytic": analytic, "inversion": inversion}
            pictures[variant] = (step_map, image)
        epsilon = privacy["epsilon_after_round"].get(str(r)) if privacy["dp"] else None
        card["updates"].append({
            "round": r, "replay": check, "dp": replay.plan is not None, "epsilon_after_round": epsilon,
            "sent_update": {"steps": replay.metrics["steps"], "images": len(train),
                            "norm": float(torch.sqrt(sum((v.double() ** 2).sum() for v in replay.update.values()))),
                            "analytic": analytic_update},
            "single_image": {"image_index": target, "label": CLASS_NAMES[label], **variants}})
        progress(_update_line(name, r, card["updates"][-1]))
        if keep_examples:
            examples.append(ReconstructionExample(
                f"{name}, round {r}" + (" (DP)" if replay.plan is not None else ""), pixels[target],
                pictures["as_configured"][1], pictures["without_dp"][1] if "without_dp" in pictures else None,
                features[target], pictures["as_configured"][0], update_map))
    card["membership"] = _membership(run, client, pool, rng)
    card["not_protected"] = _not_protected(run, name, under_dp if privacy["dp"] else None)
    progress(_membership_line(name, card["membership"]))
    return card, examples


def _membership(run: RunFolder, client: Client, pool: ArraySplit | None, rng: np.random.Generator
                ) -> dict[str, Any]:
    path = _inside(run.root, "clients", client.name, "personalized.pt")
    if not path.is_file():
        return {"skipped": "no personalized model (the client missed the final evaluation)"}
    if pool is None or not len(pool):
        return {"skipped": f"no held-out scans of site {client.manifest.site}"}
    nonmembers = pool if len(pool) <= MAX_NONMEMBERS else \
        pool.subset(sorted(rng.choice(len(pool), MAX_NONMEMBERS, replace=False).tolist()))
    return membership_attack(path, run.start, client.data().train, nonmembers, int(rng.integers(2**31)))


def _update_line(name: str, r: int, update: dict[str, Any]) -> str:
    check = update["replay"]
    replay = {True: "matches the reported train loss", False: "DIFFERS from the reported train loss",
              None: "no reported loss to check"}[check["matches"]]
    step = update["single_image"]["as_configured"]
    inversion = step["inversion"]
    base = f" (random same-site image {inversion['baseline_psnr']:.1f})" if "baseline_psnr" in inversion else ""
    analytic = update["sent_update"]["analytic"]
    sent = f"{analytic['psnr']:.1f} dB" if analytic.get("applicable") else "n/a"
    return (f"  {name} round {r}{' (DP)' if update['dp'] else ''}: replayed in {check['seconds']:.1f} s "
            f"({replay}); sent update, analytic best match {sent}; single-image inversion {inversion['steps']} "
            f"steps, {inversion['seconds']:.1f} s: {inversion['psnr']:.1f} dB{base}")


def _membership_line(name: str, membership: dict[str, Any]) -> str:
    if "skipped" in membership:
        return f"  {name} model: membership attack skipped ({membership['skipped']})"
    loss, calibrated, learned = membership["loss_threshold"], membership["calibrated"], membership["learned"]
    learned_auc = f"{learned['auc']:.2f}" if "auc" in learned else "n/a"
    return (f"  {name} model: membership AUC {loss['auc']:.2f} (loss), {calibrated['auc']:.2f} (calibrated), "
            f"{learned_auc} (learned, ART), {loss['members']} members vs {loss['nonmembers']} non-members")


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _steps_summary(steps: list[tuple[dict[str, Any], int]]) -> dict[str, Any]:
    """How often the single-image attacks single out the attacked scan among the client's (chance: 1/n each),
    recover its label, and their mean margins over the site baseline."""
    return {"steps": len(steps),
            "analytic_identified": sum(bool(s["analytic"].get("matches_true_image")) for s, _ in steps),
            "inversion_identified": sum(bool(s["inversion"]["matches_true_image"]) for s, _ in steps),
            "identified_by_chance": sum(1 / n for _, n in steps),
            "inversion_label_recovered": sum(bool(s["inversion"].get("label_recovered")) for s, _ in steps),
            "inversion_margin_db": _mean([s["inversion"].get("margin_db") for s, _ in steps]),
            "analytic_margin_db": _mean([s["analytic"].get("margin_db") for s, _ in steps])}


def summarize(cards: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per tier and overall: the single-image attacks as configured and, for DP clients, without DP; the analytic
    attack on the sent updates; membership AUCs; how many replays matched what the clients reported."""
    out = {}
    for group in ("all", *sorted({c["kind"] for c in cards.values()})):
        members = [c for c in cards.values() if group in ("all", c["kind"])]
        updates = [(u, c["n_train"]) for c in members for u in c["updates"]]
        models = [c["membership"] for c in members if "skipped" not in c["membership"]]
        single = {variant: _steps_summary([(u["single_image"][variant], n) for u, n in updates
                                           if variant in u["single_image"]])
                  for variant in ("as_configured", "without_dp")}
        out[group] = {
            "clients": len(members), "updates": len(updates),
            "single_image": {k: v for k, v in single.items() if v["steps"]},
            "analytic_sent_margin_db": _mean([u["sent_update"]["analytic"].get("margin_db") for u, _ in updates]),
            "membership_auc": _mean([m["loss_threshold"]["auc"] for m in models]),
            "calibrated_membership_auc": _mean([m["calibrated"]["auc"] for m in models]),
            "learned_membership_auc": _mean([m["learned"].get("auc") for m in models]),
            "replays_matching": sum(bool(u["replay"]["matches"]) for u, _ in updates)}
    return out


def attack_run(run_dir: Path, settings: AttackSettings, progress: Callable[[str], None] = lambda _line: None
               ) -> AttackOutcome:
    """Replay and attack ``settings.clients`` clients of a finished run; the report with one card per client."""
    started = time.perf_counter()
    run = read_run(run_dir, data_root=settings.data_root, start=settings.start)
    settings.check(run.config.federation.rounds)
    names = sample_clients(run, settings.clients, settings.seed)
    if not names:
        raise PrivacyAttackError(f"no client of {run_dir} trained a round (and has a manifest): nothing to attack")
    keep_examples = settings.write_reconstructions or run.synthetic
    progress(f"privacy attack on {run.root}: {run.config.federation.method}, {run.config.federation.rounds} rounds; "
             f"{len(names)} of {len(run.result.clients)} clients (seed {settings.seed}): {', '.join(names)}")
    cards, examples = {}, []
    with one_thread():
        for name in names:
            cards[name], kept = attack_client(run, name, settings, keep_examples, progress)
            examples += kept
    report = {
        "kind": REPORT_KIND,
        "run": {"dir": str(run.root), "method": run.config.federation.method, "rounds": run.config.federation.rounds,
                "seed": run.config.seed, "data_root": str(run.data_root), "synthetic_data": run.synthetic,
                "start_checkpoint": str(run.start_path), "clients": len(run.result.clients)},
        "settings": {"clients": names, "requested_clients": settings.clients, "rounds": list(settings.rounds or []),
                     "seed": settings.seed, "inversion": {"steps": settings.inversion_steps, "lr": INVERSION_LR,
                                                          "tv_weight": INVERSION_TV, "bounds": list(INPUT_BOUNDS)},
                     "baseline_images": BASELINE_IMAGES, "max_nonmembers": MAX_NONMEMBERS,
                     "nonmembers_from": "the site pool each manifest lists",
                     "torch_threads": 1, "replay_rtol": REPLAY_RTOL,
                     "psnr_cap_db": PSNR_CAP_DB, "write_reconstructions": settings.write_reconstructions},
        "clients": cards,
        "summary": summarize(cards),
        "client_level": _client_level(run),
        "reconstructions_written": bool(examples),
        "seconds": time.perf_counter() - started,
        "versions": package_versions(),
        "machine": machine(),
    }
    return AttackOutcome(report, examples)
