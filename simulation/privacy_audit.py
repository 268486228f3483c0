"""`edgemri privacy audit`: an empirical lower bound on epsilon for DP-SGD exactly as the project configures it.

The one-run audit of Steinke, Nasr and Jagielski (2023, arXiv:2305.08846). For each audited tier:

- **the client**: the tier's client with the most training scans, from the partition a federation makes of the
  config (``core.data.partition.partition``), its scans read through its manifest as the client reads them;
- **the mechanism**: that client's DP-SGD plan as ``Client.dp_plan`` makes it (``plan_dp`` for its n, its tier's
  batch size and local epochs, the config's rounds and accountant) and its local training as
  ``Client.local_training`` runs it for the FedAvg family (``LocalTrainer.run`` with ``opacus_wrap``: Poisson
  sampling at the plan's rate for the plan's steps, per-sample clipping at max_grad_norm, Gaussian noise of the
  planned multiplier, Adam at the tier's rate), round after round for the planned rounds, each from the model the
  last one left (one client alone: the server's averaging in between is post-processing for its data);
- **the canaries**: m uniform-noise images with random labels (``core.privacy.attacks.noise_canaries``), each
  added to the client's training scans by a seeded fair coin (``canary_coins``). The plan stays the client's own
  (its rate and steps from its real n): Poisson sampling at rate q protects every record, canaries too, whatever
  the number of records, so each canary is covered by exactly the plan's epsilon;
- **the guesses**: each canary's score is how far training raised its logit margin, centred per label
  (``margin_gain_scores``); "in" for the m/4 highest, "out" for the m/4 lowest, fixed before any run;
- **the bound**: ``one_run_epsilon_lower_bound`` at beta = 0.05 beside the accountant's epsilon for the same
  noise, rate, steps and delta.

Each tier is audited as configured, at a weak setting (noise multiplier 0.1) and with DP off (noise 0, clipping at
a norm no gradient reaches; the same sampling and steps), so that the bound's response to the noise is visible.
A tier whose DP is off in the config is audited with its DP settings switched on, and the report says so.
reports/privacy_audit.py writes the report.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgemri.core.config import Config, DPTierConfig, TrainSpec
from edgemri.core.data.dataset import ArraySplit, load_dataset
from edgemri.core.data.images import CLASS_NAMES, normalize
from edgemri.core.data.partition import Manifest, load_local_data, partition
from edgemri.core.errors import EdgemriError
from edgemri.core.federation.personalize import LocalTrainer, State, student_from
from edgemri.core.privacy import attacks
from edgemri.core.privacy.dp import DPPlan, epsilon_of, opacus_wrap, plan_dp
from edgemri.core.training.checkpoint import check_state_dict, load_checkpoint
from edgemri.core.training.evaluate import predict_logits
from edgemri.core.training.losses import cross_entropy
from edgemri.models import Student
from edgemri.reports.common import machine, package_versions
from edgemri.reports.privacy_audit import clipping_text, noise_text
from edgemri.simulation.replay import one_thread

REPORT_KIND = "edgemri.privacy-audit/1"
DEFAULT_CANARIES = 500
MIN_CANARIES, MAX_CANARIES = 20, 2000  # fewer than 20 leaves 5 guesses a side: no bound above 0 at beta 0.05
BETA = 0.05
GUESS_SHARE = 4  # k_positive = k_negative = m // 4, fixed in advance (no search over k, so no union bound)
WEAK_NOISE_MULTIPLIER = 0.1  # epsilon in the thousands: a setting where the bound must rise off zero
NO_CLIPPING = 1e12  # a clipping norm no per-sample gradient reaches: Opacus's clipping then changes nothing
CANARY_STREAM = 2**31  # the canaries' generator seed is the audit's seed plus this: a stream apart from the coins'
UNINFORMATIVE_BOUND = 0.5  # a DP-off bound below this: the training leaves too little trace for the audit to read
SETTINGS = ("as_configured", "weak", "dp_off")
CANARIES = ("uniform-noise uint8 images of the scans' shape, each with a uniformly random label, each included "
            "by a seeded fair coin (core.privacy.attacks.noise_canaries, canary_coins)")
SCORE = ("gain of the canary's logit margin (its label's logit minus the mean of the others) from the start model "
         "to the trained one, centred per label (core.privacy.attacks.margin_gain_scores)")


class PrivacyAuditError(EdgemriError):
    """An audit asked for with impossible settings; the message names the value and what is allowed."""


@dataclass(frozen=True)
class AuditSettings:
    tiers: tuple[str, ...] | None = None  # None: every tier of the config
    canaries: int = DEFAULT_CANARIES
    seed: int = 0
    start: Path | None = None  # None: federation.start_checkpoint, else a fresh student seeded with ``seed``

    def check(self, config: Config) -> None:
        for name, value, low, high in (("--canaries", self.canaries, MIN_CANARIES, MAX_CANARIES),
                                       ("--seed", self.seed, 0, 2**31 - 1)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise PrivacyAuditError(f"{name} is {value!r}; allowed: an integer in [{low}, {high}]")
        allowed = [t for t in config.federation.tier_names if t in config.privacy.tier_names]
        for tier in self.tiers or ():
            if tier not in allowed:
                raise PrivacyAuditError(f"--tier is {tier!r}; allowed: {', '.join(allowed)} (the config's tiers "
                                        f"with DP settings)")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def setting_plans(tier: DPTierConfig, *, n: int, spec: TrainSpec, rounds: int, accountant: str
                  ) -> dict[str, DPPlan]:
    """The three audited plans for a client of ``n`` scans: its tier's own (``plan_dp``, DP switched on), the same
    sampling and steps at noise ``WEAK_NOISE_MULTIPLIER``, and at noise 0 without clipping (DP off)."""
    enabled = dataclasses.replace(tier, enabled=True)
    configured = plan_dp(enabled, n=n, batch_size=spec.batch_size, local_epochs=spec.epochs, rounds=rounds,
                         accountant=accountant)
    weak_tier = dataclasses.replace(enabled, noise_multiplier=WEAK_NOISE_MULTIPLIER, budget_epsilon=math.inf)
    weak = plan_dp(weak_tier, n=n, batch_size=spec.batch_size, local_epochs=spec.epochs, rounds=rounds,
                   accountant=accountant)
    off = dataclasses.replace(configured, noise_multiplier=0.0, max_grad_norm=NO_CLIPPING, planned_epsilon=math.inf,
                              one_round_epsilon=math.inf, signal_to_noise=math.inf, budget_epsilon=math.inf,
                              feasible=True, reason="")
    return {"as_configured": configured, "weak": weak, "dp_off": off}


def _round_seed(seed: int, server_round: int) -> int:
    return (seed * 1_000_003 + server_round * 7919) % 2**31


def train_with_canaries(train: ArraySplit, canary_images: torch.Tensor, canary_labels: torch.Tensor,
                        included: torch.Tensor, plan: DPPlan, spec: TrainSpec, start: State, seed: int
                        ) -> tuple[State, int]:
    """The client's DP-SGD local training (``LocalTrainer.run`` through ``opacus_wrap``) on its scans plus the
    included canaries, for the plan's rounds, each from the last one's model; the final state and the steps taken."""
    data = ArraySplit(torch.cat([train.images, canary_images[included]]),
                      torch.cat([train.labels, canary_labels[included]]),
                      [*train.files, *(f"canary-{int(i)}" for i in included.nonzero().flatten())])
    state, steps = start, 0
    for server_round in range(1, plan.planned_rounds + 1):
        round_seed = _round_seed(seed, server_round)
        model = student_from(state)
        trainer = LocalTrainer(data, spec, round_seed, wrap=opacus_wrap(plan, round_seed))
        steps += int(trainer.run(model, cross_entropy)["steps"])
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, steps


@torch.no_grad()
def _logits(state: State, images: torch.Tensor) -> torch.Tensor:
    return predict_logits(student_from(state), images, normalize)


def audit_plan(train: ArraySplit, plan: DPPlan, spec: TrainSpec, *, start: State, canaries: int, seed: int,
               beta: float = BETA) -> dict[str, Any]:
    """One one-run audit of ``plan``'s DP-SGD on ``train`` plus ``canaries`` coin-included canaries.

    Returns the empirical epsilon (a lower bound at confidence 1 - ``beta``), the accounted epsilon for the
    steps taken (None where there is no noise: infinite), and what they rest on (guesses, steps, plan).
    """
    if not plan.feasible:  # the client would not train: nothing leaves it to audit
        return {"trained": False, "why": plan.reason, **_plan_fields(plan)}
    started = time.perf_counter()
    images, labels = attacks.noise_canaries(canaries, seed + CANARY_STREAM,
                                            shape=tuple(train.images.shape[1:]), classes=len(CLASS_NAMES))
    included = attacks.canary_coins(canaries, seed)
    trained, steps = train_with_canaries(train, images, labels, included, plan, spec, start, seed)
    if steps != plan.steps_per_round * plan.planned_rounds:
        raise PrivacyAuditError(f"the audited training took {steps} noisy steps, the plan "
                                f"{plan.steps_per_round * plan.planned_rounds}: the audit would not be of the plan")
    scores = attacks.margin_gain_scores(_logits(start, images), _logits(trained, images), labels)
    k = canaries // GUESS_SHARE
    correct, guesses = attacks.audit_guesses(scores, included, k, k)
    empirical = attacks.one_run_epsilon_lower_bound(correct, guesses, canaries, plan.delta, beta)
    accounted = epsilon_of([(plan.noise_multiplier, plan.sample_rate, steps)], plan.delta, plan.accountant) \
        if plan.noise_multiplier > 0 else math.inf
    separation = attacks.membership_metrics(scores[included], scores[~included])
    return {"trained": True, **_plan_fields(plan), "steps": steps, "accounted_epsilon": _finite(accounted),
            "empirical_epsilon": empirical, "beta": beta, "canaries": canaries, "included": int(included.sum()),
            "k_positive": k, "k_negative": k, "correct": correct, "guesses": guesses,
            "ceiling_epsilon": attacks.one_run_epsilon_lower_bound(guesses, guesses, canaries, plan.delta, beta),
            "scores_auc": separation["auc"], "empirical_at_or_below_accounted": empirical <= accounted,
            "seconds": time.perf_counter() - started}


def _plan_fields(plan: DPPlan) -> dict[str, Any]:
    dp = plan.noise_multiplier > 0
    return {"dp": dp, "noise_multiplier": _finite(plan.noise_multiplier),
            "max_grad_norm": plan.max_grad_norm if plan.max_grad_norm < NO_CLIPPING else None,
            "sample_rate": plan.sample_rate, "steps_per_round": plan.steps_per_round, "rounds": plan.planned_rounds,
            "delta": plan.delta, "accountant": plan.accountant,
            "planned_epsilon": _finite(plan.planned_epsilon) if dp else None}


def audit_client(train: ArraySplit, tier: DPTierConfig, spec: TrainSpec, *, rounds: int, accountant: str,
                 start: State, canaries: int = DEFAULT_CANARIES, seed: int = 0, settings: tuple[str, ...] = SETTINGS,
                 progress: Callable[[str], None] = lambda _line: None) -> dict[str, dict[str, Any]]:
    """The audit of one client's DP-SGD (its scans ``train``, its tier's DP settings and training ``spec``) for each
    of ``settings`` (``SETTINGS``): per setting, ``audit_plan``'s result."""
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        raise PrivacyAuditError(f"audit settings {unknown or list(settings)!r}; allowed: some of {', '.join(SETTINGS)}")
    plans = setting_plans(tier, n=len(train), spec=spec, rounds=rounds, accountant=accountant)
    results = {}
    with one_thread():
        for name in settings:
            results[name] = audit_plan(train, plans[name], spec, start=start, canaries=canaries, seed=seed)
            progress(_setting_line(name, results[name]))
    return results


def _setting_line(name: str, result: dict[str, Any]) -> str:
    noise = f"noise {noise_text(result)}, clipping {clipping_text(result)}"
    if not result["trained"]:
        return f"  {name} ({noise}): the client would not train ({result['why']})"
    accounted = result["accounted_epsilon"]
    return (f"  {name} ({noise}, {result['steps']} steps): accounted epsilon "
            f"{'infinite' if accounted is None else f'{accounted:.3g}'}, "
            f"empirical >= {result['empirical_epsilon']:.2f} "
            f"({result['correct']}/{result['guesses']} guesses right), {result['seconds']:.0f} s")


def tier_client(manifests: list[Manifest], kind: str) -> Manifest:
    """The tier's client with the most training scans (the most noisy steps: the most the audit can see)."""
    clients = [m for m in manifests if m.kind == kind]
    if not clients:
        raise PrivacyAuditError(f"the config's partition has no {kind} client; allowed: a tier with clients "
                                f"({', '.join(sorted({m.kind for m in manifests}))})")
    return min(clients, key=lambda m: (-m.num_examples("train"), m.client))


def _start(config: Config, settings: AuditSettings) -> tuple[State, str]:
    path = settings.start or (Path(config.federation.start_checkpoint) if config.federation.start_checkpoint
                              else None)
    if path is None:
        with torch.random.fork_rng():
            torch.manual_seed(settings.seed)
            return Student().state_dict(), f"a fresh student (seed {settings.seed})"
    checkpoint = load_checkpoint(path)
    if checkpoint.model != "student":
        raise PrivacyAuditError(f"{path} holds a {checkpoint.model!r}; the audited clients train a student")
    return check_state_dict(Student(), checkpoint.state_dict, str(path)), str(path)


def audit(config: Config, settings: AuditSettings, progress: Callable[[str], None] = lambda _line: None
          ) -> dict[str, Any]:
    """The audit report: per tier, its largest client's DP-SGD as configured, weak and off (``audit_client``)."""
    settings.check(config)
    started = time.perf_counter()
    if not config.data.root:
        raise PrivacyAuditError("no data folder: pass --data-root DIR (a Kaggle-layout folder)")
    root = Path(config.data.root)
    dataset = load_dataset(root, cache_dir=config.data.cache_dir)
    manifests = partition(dataset.train, root, config)
    start, start_from = _start(config, settings)
    tiers = settings.tiers or tuple(t for t in config.federation.tier_names  # default: each tier with DP and clients
                                    if t in config.privacy.tier_names and any(m.kind == t for m in manifests))
    report_tiers = {}
    for kind in tiers:
        manifest = tier_client(manifests, kind)
        train = load_local_data(manifest, root).train
        dp_tier = config.privacy.tier(kind, manifest.client)
        spec = config.federation.tier(kind).train_spec()
        progress(f"privacy audit, {kind}: {manifest.client} ({len(train)} training scans), {settings.canaries} "
                 f"canaries, seed {settings.seed}; DP {'on' if dp_tier.enabled else 'off (audited as if on)'} in the "
                 f"config")
        results = audit_client(train, dp_tier, spec, rounds=config.federation.rounds,
                               accountant=config.privacy.accountant, start=start, canaries=settings.canaries,
                               seed=settings.seed, progress=progress)
        report_tiers[kind] = {"client": manifest.client, "site": manifest.site, "n_train": len(train),
                              "dp_enabled_in_config": dp_tier.enabled,
                              "tier_dp": dataclasses.asdict(dp_tier), "train_spec": dataclasses.asdict(spec),
                              "settings": results, "reading": reading(results)}
    return {"kind": REPORT_KIND, "method": "one-run audit (Steinke, Nasr, Jagielski 2023, arXiv:2305.08846)",
            "seed": settings.seed, "canaries": settings.canaries, "canary_kind": CANARIES, "score": SCORE,
            "guesses": f"k_positive = k_negative = canaries // {GUESS_SHARE}, fixed in advance", "beta": BETA,
            "weak_noise_multiplier": WEAK_NOISE_MULTIPLIER, "start_model": start_from, "data_root": str(root),
            "config": config.to_dict(), "tiers": report_tiers, "seconds": time.perf_counter() - started,
            "versions": package_versions(), "machine": machine()}


def reading(results: dict[str, dict[str, Any]]) -> str:
    """One sentence on what this tier's numbers show, for the Markdown and the command's output."""
    trained = {k: r for k, r in results.items() if r["trained"]}
    above = [k for k, r in trained.items() if not r["empirical_at_or_below_accounted"]]
    if above:
        return (f"the empirical epsilon EXCEEDS the accounted one for {', '.join(above)}: the DP-SGD implementation or "
                f"its accounting is wrong (or a 5% chance event); investigate before trusting the epsilon")
    if not trained:
        return "the client would not train in any audited setting: nothing to audit"
    bounds = ", ".join(f"{k} {r['empirical_epsilon']:.2f}" for k, r in trained.items())
    ceiling = max(r["ceiling_epsilon"] for r in trained.values())
    off = trained.get("dp_off")
    if off is not None and off["empirical_epsilon"] < UNINFORMATIVE_BOUND:
        return (f"even with DP off, {off['steps']} noisy steps leave too little trace of {off['canaries']} canaries "
                f"for this audit to refute more than a tiny epsilon ({bounds}): these bounds say next to nothing "
                f"about the DP settings; read a tier with more steps, or use more canaries")
    rising = [trained[k]["empirical_epsilon"] for k in SETTINGS if k in trained]
    trend = ("the bound rises as the noise shrinks" if rising == sorted(rising) else
             "the bound does not rise steadily as the noise shrinks: at this number of canaries the bounds are "
             "within their own noise")
    return (f"every empirical bound is at or below its accounted epsilon ({bounds}; {ceiling:.2f} if every guess were "
            f"right); {trend}")
