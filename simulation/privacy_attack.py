"""`edgemri privacy attack RUN_DIR`: what an honest-but-curious server gets out of a finished federation run.

For sampled clients and rounds it rebuilds exactly what each client sent (``simulation.replay``: the global
model it received, its own scans through its manifest, its local training through the client's own code path),
checked against the training loss and step count the client reported for that round. Then it attacks:

- **the update it sent** (trained - received): the analytic linear-layer attack on the head
  (``core.privacy.reconstruction``);
- **a single-image step of that client**: one plain SGD step on one of its scans from the same model,
  clipped and noised as its DP-SGD plan says (and, for a DP client, the same step without DP): the
  analytic attack and gradient inversion with the known global model. This is the worst case of what one
  update can carry, not what the client sent (it sent several Adam steps over batches);
- **its personalized model** (``clients/<name>/personalized.pt``): loss-threshold, calibrated and learned
  membership inference (``core.privacy.membership``), members = its training scans, non-members = held-out
  scans of its site.

Every reconstruction is scored against the client's own images and against what random held-out images of
the same site score: two unrelated slices of one scanner already look alike. The run folder is untrusted
(``simulation.run_folder``); reports/privacy_attacks.py writes the results. This module is the wiring: the
settings, which clients, one model card per client, and the report.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from edgemri.clients.runtime import Client
from edgemri.core.data.dataset import ArraySplit
from edgemri.core.data.images import CLASS_NAMES
from edgemri.core.federation.personalize import Method, create_method, evaluate_state, student_from
from edgemri.core.federation.protocol import PERSONAL_DP
from edgemri.core.privacy.ledger import Ledger
from edgemri.core.privacy.membership import membership_attack
from edgemri.core.privacy.reconstruction import (
    INPUT_BOUNDS,
    INVERSION_LR,
    INVERSION_TV,
    PSNR_CAP_DB,
    analytic_attack,
    feature_maps,
    inversion_attack,
    single_image_step,
    site_baseline,
)
from edgemri.reports.common import machine, package_versions
from edgemri.reports.privacy_attacks import summarize
from edgemri.simulation.replay import REPLAY_RTOL, Replay, one_thread, replay_check, replay_client, round_instructions
from edgemri.simulation.run_folder import PrivacyAttackError, RunFolder, read_run

REPORT_KIND = "edgemri.privacy-attacks/1"
DEFAULT_CLIENTS = 4
MAX_CLIENTS = 1000
DEFAULT_INVERSION_STEPS = 300  # about 4 s per inversion on one CPU thread for this student
MAX_INVERSION_STEPS = 5000
BASELINE_IMAGES = 8  # random held-out images of the client's site: what an unrelated image scores
MAX_NONMEMBERS = 1000  # held-out scans per membership attack: more only narrows an interval already narrow
SAMPLE_UNIT = "one scan of this client (add/remove one record of its training set)"
# Methods whose personalized model is DP-SGD's own output (or the global model): the ledger's epsilon covers it.
# The others fine-tune on the raw scans without noise on the device (Ditto's personal model, the fine-tuning and
# calibration recipes), so epsilon says nothing about that model.
PERSONAL_MODEL_UNDER_DP = frozenset({"fedavg", "fedper", "lg-fedavg", "fedbn"})


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


@dataclass
class ClientScans:
    """What one client's reconstructions are scored against."""

    train: ArraySplit  # its training scans
    sample: ArraySplit | None  # random held-out scans of its site: what an unrelated scan scores
    pixels: Tensor  # its training scans in [0, 1]
    pixel_baseline: dict[str, float] | None  # the sample's best-match scores in pixels
    majority: int  # its most frequent class


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


def _check_start(run: RunFolder, client: Client) -> None:
    """The start model must be the run's: it reproduces the start accuracy the client reported."""
    recorded = run.start_accuracy(client.name)
    if recorded is None or not len(client.data().test):
        return
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


def _attack_round(replay: Replay, scans: ClientScans, method: Method, target: int, seed: int, inversion_steps: int,
                  title: str) -> tuple[dict[str, Any], ReconstructionExample]:
    """The attacks on one replayed round: the analytic attack on the update it sent, and on a single-image step
    of scan ``target`` (as configured and, for a DP client, without DP) the analytic attack and inversion."""
    train = scans.train
    features = feature_maps(student_from(replay.local_start), train.images)
    baseline_features = feature_maps(student_from(replay.local_start), scans.sample.images) \
        if scans.sample is not None else None
    shared = set(method.shared_keys(list(replay.received)))  # the keys whose update carries information
    analytic_update, update_map = analytic_attack({k: v for k, v in replay.update.items() if k in shared},
                                                  features, baseline_features, update=True)
    if analytic_update.get("applicable"):
        analytic_update["label_is_majority_class"] = analytic_update["label"] == CLASS_NAMES[scans.majority]
    label = int(train.labels[target])
    variants: dict[str, Any] = {}
    pictures: dict[str, tuple[Tensor | None, Tensor]] = {}
    for variant, plan in (("as_configured", replay.plan), ("without_dp", None)):
        if variant == "without_dp" and replay.plan is None:
            continue
        step = single_image_step(student_from(replay.local_start), train.images[target], label, plan, seed)
        grads = {k: -v for k, v in step.items() if k in shared}  # a positive multiple of the gradient
        analytic, step_map = analytic_attack(grads, features, baseline_features, update=False,
                                             true_index=target, true_label=label)
        inversion, image = inversion_attack(student_from(replay.received), grads, label, scans.pixels,
                                            scans.pixel_baseline, target, steps=inversion_steps, seed=seed)
        variants[variant] = {"dp": plan is not None, "analytic": analytic, "inversion": inversion}
        pictures[variant] = (step_map, image)
    update = {"steps": replay.metrics["steps"], "images": len(train),
              "norm": float(torch.sqrt(sum((v.double() ** 2).sum() for v in replay.update.values()))),
              "analytic": analytic_update}
    example = ReconstructionExample(
        title, scans.pixels[target], pictures["as_configured"][1],
        pictures["without_dp"][1] if "without_dp" in pictures else None, features[target],
        pictures["as_configured"][0], update_map)
    return {"sent_update": update, "single_image": {"image_index": target, "label": CLASS_NAMES[label],
                                                    **variants}}, example


def _client_scans(client: Client, rng: np.random.Generator) -> tuple[ClientScans, ArraySplit | None]:
    """The client's scans to score against, and its site pool (held-out scans of its site, none a copy of a
    Training scan)."""
    train = client.data().train
    pool = client.site_pool()
    sample = pool.subset(sorted(rng.choice(len(pool), min(BASELINE_IMAGES, len(pool)), replace=False).tolist())) \
        if pool is not None and len(pool) else None
    pixels = train.images.float() / 255
    pixel_baseline = site_baseline(sample.images.float() / 255 if sample is not None else None, pixels, 1.0)
    majority = int(torch.bincount(train.labels, minlength=len(CLASS_NAMES)).argmax())
    return ClientScans(train, sample, pixels, pixel_baseline, majority), pool


def attack_client(run: RunFolder, name: str, settings: AttackSettings, keep_examples: bool,
                  progress: Callable[[str], None]) -> tuple[dict[str, Any], list[ReconstructionExample]]:
    """One client's model card: its accuracy gain, its privacy, the attacks on its updates and on its model."""
    client = run.client(name)
    info = run.result.clients[name]
    _check_start(run, client)
    seed = (settings.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31
    rng = np.random.default_rng(seed)
    scans, pool = _client_scans(client, rng)
    rounds = list(settings.rounds) if settings.rounds else run.trained[name][:1]
    method = create_method(run.config.federation)
    under_dp = personal_model_under_dp(method.name, run.result.final.get(name, {}))
    privacy = _privacy_card(run, client)
    card: dict[str, Any] = {
        "client": name, "kind": info.kind, "site": info.site, "n_train": len(scans.train), "method": method.name,
        "accuracy": run.accuracy(name, info.kind), "privacy": privacy,
        "personal_model_under_dp": under_dp if privacy["dp"] else None,
        "updates": [], "skipped_rounds": {str(r): "did not train in this round" for r in rounds
                                          if r not in run.trained[name]}}
    examples = []
    for r, replay in replay_client(run, name, rounds).items():
        check = replay_check(replay, run.reported(name, r))
        target = int(rng.integers(len(scans.train)))
        title = f"{name}, round {r}" + (" (DP)" if replay.plan is not None else "")
        attacked, example = _attack_round(replay, scans, method, target, (seed + 7919 * r) % 2**31,
                                          settings.inversion_steps, title)
        epsilon = privacy["epsilon_after_round"].get(str(r)) if privacy["dp"] else None
        card["updates"].append({"round": r, "replay": check, "dp": replay.plan is not None,
                                "epsilon_after_round": epsilon, **attacked})
        progress(_update_line(name, r, card["updates"][-1]))
        if keep_examples:
            examples.append(example)
    card["membership"] = _membership(run, client, pool, rng)
    card["not_protected"] = _not_protected(run, name, under_dp if privacy["dp"] else None)
    progress(_membership_line(name, card["membership"]))
    return card, examples


def _membership(run: RunFolder, client: Client, pool: ArraySplit | None, rng: np.random.Generator
                ) -> dict[str, Any]:
    """Membership inference on the client's personalized model: its training scans against held-out scans of its
    site, the start model (which never saw either) as the calibration reference."""
    personalized = run.personalized(client.name)
    if personalized is None:
        return {"skipped": "no personalized model (the client missed the final evaluation)"}
    if pool is None or not len(pool):
        return {"skipped": f"no held-out scans of site {client.manifest.site}"}
    nonmembers = pool if len(pool) <= MAX_NONMEMBERS else \
        pool.subset(sorted(rng.choice(len(pool), MAX_NONMEMBERS, replace=False).tolist()))
    model, transform = personalized
    return membership_attack(model, student_from(run.start), client.data().train, nonmembers,
                             int(rng.integers(2**31)), transform=transform)


def _privacy_card(run: RunFolder, client: Client) -> dict[str, Any]:
    """Cumulative (epsilon, delta), unit and accountant: recomputed from the client's hash-chained ledger, checked
    against privacy.json where it has them."""
    name = client.name
    if not run.config.privacy.tier(client.kind, name).enabled:
        return {"dp": False, "unit": None, "epsilon": None, "delta": None, "accountant": None}
    ledger = Ledger.open(client.ledger_path, name)
    plan = client.dp_plan(round_instructions(run.config, client.kind, 1))
    card: dict[str, Any] = {
        "dp": True, "unit": SAMPLE_UNIT, "accountant": run.config.privacy.accountant, "delta": plan.delta,
        "epsilon": ledger.epsilon(plan.delta, run.config.privacy.accountant) if ledger.records else 0.0,
        "source": "privacy ledger (hash chain checked), recomputed", "budget_epsilon": plan.budget_epsilon,
        "stretches": ledger.stretches(), "rounds_trained": ledger.rounds,
        "epsilon_after_round": {str(r["round"]): r["epsilon"] for r in ledger.records}, "privacy_json_agrees": None}
    entry = run.sample_level(name)
    if entry is not None:
        card["unit"] = entry.get("unit", SAMPLE_UNIT)
        card["privacy_json_agrees"] = math.isclose(float(entry.get("epsilon", 0.0)), card["epsilon"], rel_tol=1e-6,
                                                   abs_tol=1e-9)
    return card


def _not_protected(run: RunFolder, name: str, under_dp: bool | None) -> str:
    rounds = run.trained[name]
    reported = sorted({k for r in rounds for k in run.reported(name, r)})
    model = ("its personalized model's behaviour (answers to queries, as the membership attack on this card uses; "
             + ("DP-SGD's output, so covered by its epsilon" if under_dp else
                "trained on its raw scans without DP noise, so not covered by any epsilon here") + ")")
    return (f"the {len(reported)} metrics it sent with every update ({', '.join(reported[:6])}"
            f"{', ...' if len(reported) > 6 else ''}), its number of scans, that it took part in rounds "
            f"{', '.join(map(str, rounds)) or 'none'}, and {model}")


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
        "client_level": run.client_level(),
        "reconstructions_written": bool(examples),
        "seconds": time.perf_counter() - started,
        "versions": package_versions(),
        "machine": machine(),
    }
    return AttackOutcome(report, examples)
