"""YAML configuration, loaded once into frozen dataclasses and validated.

Unknown keys and bad values raise ``ConfigError`` naming the key (dotted path) and
what is allowed, before any work starts. Every number is finite and bounded (the bound
is in the message); names of teachers, scenarios, client kinds, methods, accountants and
synthetic presets are checked against the ``Registries`` the caller hands in
(``edgemri.core.registries`` holds the project's), so this module imports none of them.
Client tiers are data: a mapping of tier name to settings, where a tier not listed keeps
its defaults and a listed one changes only the keys it gives.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from edgemri.core.errors import EdgemriError
from edgemri.core.untrusted import MAX_INT_DIGITS  # one bound on integer digits for YAML and JSON

MAX_SEED = 2**31 - 1  # every seed derived from it stays within torch's and numpy's ranges
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 65_536
MAX_LR = 10.0
MAX_ROUNDS = 10_000
MAX_TIMEOUT_S = 86_400.0  # one day
MAX_EPSILON = 1_000.0  # far beyond any meaningful privacy guarantee, still a number
MAX_WEIGHT = 10_000.0  # proximal mu, Ditto lambda, Dirichlet alpha, clipping norms
MAX_CLIENTS = 100_000
MAX_EXAMPLES = 10_000_000
MAX_TEMPERATURE = 100.0
MAX_LIST = 16
# The optional step on each decoded scan before normalization (core/data/images.py, ``preprocessing["head"]``).
HEAD_STEPS = ("none", "standardize-crop")
MAX_VIEWS = 64  # augmented views per image with cached teacher logits: the teacher's cost is images x views
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")
# What distillation trains beside the config's KD student: nothing, the paper's KD recipe, or that plus one
# leave-one-ingredient-out student per way the recipe differs from the paper's (KD_INGREDIENTS).
DISTILL_COMPARISONS = ("none", "paper", "ablation")
KD_INGREDIENTS = ("views", "transfer", "temperature-alpha", "schedule")
SELECTIONS = ("val", "last")


@dataclass(frozen=True)
class Registries:
    """The names a config may use, each the key set of the registry that owns it."""

    teachers: tuple[str, ...]
    synth_presets: tuple[str, ...]
    scenarios: tuple[str, ...]  # how Training is shared between the server and the clients
    client_kinds: tuple[str, ...]  # the tiers the partition carves from each site
    methods: tuple[str, ...]  # personalization methods
    after_round_methods: tuple[str, ...]  # those whose personal model is made only after the rounds
    accountants: tuple[str, ...]


class ConfigError(EdgemriError):
    """A configuration key is unknown or its value is not allowed."""


@dataclass(frozen=True)
class TrainSpec:
    """One run of the training loop."""

    # The students' spec in the quickstart and Kaggle configs: 15 epochs at batch 16, Adam at 1e-3, constant.
    epochs: int = 15
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam | sgd (with momentum)
    momentum: float = 0.9  # sgd only
    schedule: str = "constant"  # constant | cosine (the learning rate annealed to 0 over the epochs)
    # Train in channels-last memory layout: about 2x faster on CPU from batch 32 up (benchmarks/train_speed.py),
    # slower for small batches; the saved weights are the same model either way.
    channels_last: bool = False

    def validate(self, where: str) -> None:
        _in_range(f"{where}.epochs", self.epochs, 1, MAX_EPOCHS, integer=True)
        _one_of(f"{where}.schedule", self.schedule, SCHEDULES)
        _in_range(f"{where}.batch_size", self.batch_size, 1, MAX_BATCH_SIZE, integer=True)
        _in_range(f"{where}.lr", self.lr, 0, MAX_LR, low_open=True)
        _in_range(f"{where}.weight_decay", self.weight_decay, 0, MAX_LR)
        _one_of(f"{where}.optimizer", self.optimizer, OPTIMIZERS)
        _in_range(f"{where}.momentum", self.momentum, 0, 1, high_open=True)


@dataclass(frozen=True)
class DataConfig:
    root: str | None = None  # a folder in the Kaggle layout; None: the synthetic set of the run
    synth_preset: str = "quickstart"  # a name in edgemri.core.data.synth.PRESETS
    val_fraction: float = 0.15  # carved from Training, stratified; Testing is for final reports
    # Share of Training held by the federation's clients and never seen by distillation, so
    # the clients' local tests measure new data (0: clients reuse the distillation data).
    client_fraction: float = 0.5
    # Seed of that server/client split alone: runs with other seeds (training, partition
    # among clients) keep the same split, so no seed's clients test on distillation data.
    split_seed: int = 0
    # Decoded-image cache; None: the user's cache folder ($EDGEMRI_CACHE_DIR, else $XDG_CACHE_HOME/edgemri, else
    # ~/.cache/edgemri), never inside the data folder, which may be read-only or shared.
    cache_dir: str | None = None
    # Leakage control (core/data/audit.py): duplicate groups (exact and near) never straddle the train/validation
    # split, and Testing images that duplicate a Training image are left out of the primary test metrics (the
    # full Testing numbers, the paper's protocol, are reported beside them).
    dedup: bool = False
    # A step on every decoded scan before normalization, recorded in each checkpoint and export and applied by
    # predict: none, or standardize-crop (the head's intensities standardized, the frame cropped to the head;
    # it reduces the collection shortcut at a few points of accuracy: docs/REAL-DATA.md, docs/DECISIONS.md).
    head: str = "none"

    def validate(self, where: str, names: Registries) -> None:
        _one_of(f"{where}.head", self.head, HEAD_STEPS)
        _one_of(f"{where}.synth_preset", self.synth_preset, names.synth_presets)
        _in_range(f"{where}.val_fraction", self.val_fraction, 0, 0.5, low_open=True, high_open=True)
        _in_range(f"{where}.client_fraction", self.client_fraction, 0, 0.9)
        _in_range(f"{where}.split_seed", self.split_seed, 0, MAX_SEED, integer=True)


@dataclass(frozen=True)
class AugmentConfig:
    """Random views of an MRI slice: mild geometry and intensity changes a scanner or a patient could make."""

    flip: bool = True  # left-right (the brain is roughly symmetric; the classes are not sided)
    rotate_deg: float = 10.0  # rotation drawn in [-rotate_deg, rotate_deg]
    scale: float = 0.1  # zoom drawn in [1 - scale, 1 + scale]
    translate: float = 0.05  # shift drawn in [-translate, translate] of the image size, per axis
    contrast: float = 0.15  # intensity multiplied by a factor in [1 - contrast, 1 + contrast]
    gamma: float = 0.2  # intensity gamma drawn log-uniformly in [exp(-gamma), exp(gamma)]

    def validate(self, where: str) -> None:
        _in_range(f"{where}.rotate_deg", self.rotate_deg, 0, 45)
        _in_range(f"{where}.scale", self.scale, 0, 0.5)
        _in_range(f"{where}.translate", self.translate, 0, 0.3)
        _in_range(f"{where}.contrast", self.contrast, 0, 0.9)
        _in_range(f"{where}.gamma", self.gamma, 0, 1)


@dataclass(frozen=True)
class TeacherConfig:
    name: str = "vgg16-slim"  # a teacher in edgemri.models' registry
    width: float = 0.125  # vgg16-slim only: channel width relative to VGG16
    checkpoint: str | None = None  # a trained teacher to load instead of training one
    # Weight decay 1e-4: the shipped configs' slim teacher (the real-data teacher sweep's spec).
    train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=8, batch_size=32, weight_decay=1e-4))
    # Augmented training (a teacher trained from scratch): each epoch an image is one of `views` seeded random
    # views (core/training/augment.py; view 0 is the image itself). 0: the images as they are (the paper's).
    views: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def model_options(self) -> dict[str, Any]:
        """Builder options for the registry (the ImageNet teacher has a fixed width)."""
        return {"width": self.width} if self.name == "vgg16-slim" else {}

    def validate(self, where: str, names: Registries) -> None:
        _one_of(f"{where}.name", self.name, names.teachers)
        _in_range(f"{where}.width", self.width, 0, 1, low_open=True)
        self.train.validate(f"{where}.train")
        _in_range(f"{where}.views", self.views, 0, MAX_VIEWS, integer=True)
        self.augment.validate(f"{where}.augment")


@dataclass(frozen=True)
class KDConfig:
    # The defaults are the paper's recipe; the recipe that wins depends on the data (the shipped configs give
    # the synthetic sets' and the real set's, each chosen on validation).
    temperature: float = 1.0
    alpha: float = 0.5  # weight of the soft (teacher) term, the paper's Eq. 1
    train: TrainSpec = field(default_factory=TrainSpec)
    # Consistent teaching: the student sees one of `views` augmented views of an image per epoch, and the
    # teacher's logits for exactly that view, cached once per view (view 0 is the image itself). 0: the paper's
    # un-augmented images, one teacher pass each.
    views: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # A folder of unlabeled images the teacher also scores (its soft labels are their only target); relative
    # paths are inside data.root (the synthetic set writes Unlabeled/<site>/). null: labelled images only.
    transfer_root: str | None = None

    def validate(self, where: str) -> None:
        _in_range(f"{where}.temperature", self.temperature, 0, MAX_TEMPERATURE, low_open=True)
        _in_range(f"{where}.alpha", self.alpha, 0, 1)
        self.train.validate(f"{where}.train")
        _in_range(f"{where}.views", self.views, 0, MAX_VIEWS, integer=True)
        self.augment.validate(f"{where}.augment")
        if self.transfer_root is not None:
            relative = Path(self.transfer_root)
            _require(bool(self.transfer_root.strip()) and (relative.is_absolute() or ".." not in relative.parts),
                     f"{where}.transfer_root", self.transfer_root,
                     "an absolute folder, or a folder inside data.root without '..'")


@dataclass(frozen=True)
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    baseline: TrainSpec = field(default_factory=lambda: TrainSpec(weight_decay=0.01))
    kd: KDConfig = field(default_factory=KDConfig)
    # The paper's KD recipe (T=1, alpha=0.5, no views, no transfer set), what `compare` trains beside `kd`.
    paper_kd: KDConfig = field(default_factory=KDConfig)
    compare: str = "none"  # none | paper | ablation (DISTILL_COMPARISONS)
    # Reproduce the paper code's choices: KL with 'mean' reduction and checkpoint
    # selection on the Testing split. Every number it produces is marked as such.
    paper_compat: bool = False
    # Temperature scaling of each student on validation (Guo et al. 2017), stored in its checkpoint and exports;
    # it changes confidences, never the predicted class.
    calibrate: bool = True

    def validate(self, where: str, names: Registries) -> None:
        self.teacher.validate(f"{where}.teacher", names)
        self.baseline.validate(f"{where}.baseline")
        self.kd.validate(f"{where}.kd")
        self.paper_kd.validate(f"{where}.paper_kd")
        _one_of(f"{where}.compare", self.compare, DISTILL_COMPARISONS)

    def kd_recipes(self) -> dict[str, KDConfig]:
        """Stage name -> KD recipe: ``kd`` first, then what ``compare`` asks for. An ablation student is ``kd``
        with one ingredient set back to the paper's (one per ingredient in which the two differ)."""
        recipes = {"kd": self.kd}
        if self.compare == "none":
            return recipes
        recipes["paper-kd"] = self.paper_kd
        if self.compare == "ablation":
            paper = self.paper_kd
            without = {
                "views": {"views": paper.views, "augment": paper.augment},
                "transfer": {"transfer_root": paper.transfer_root},
                "temperature-alpha": {"temperature": paper.temperature, "alpha": paper.alpha},
                "schedule": {"train": paper.train},
            }
            for ingredient in KD_INGREDIENTS:
                ablated = dataclasses.replace(self.kd, **without[ingredient])
                if ablated != self.kd:
                    recipes[f"kd-without-{ingredient}"] = ablated
        return recipes


@dataclass(frozen=True)
class PersonalConfig:
    """How a client trains what never leaves it: a fine-tuned model, Ditto's personal model, local-only."""

    epochs: int = 5  # the budget; with select "val" the best epoch, or the unchanged start, is kept
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.9  # sgd only
    # Learning without forgetting: (1 - w) CE + w T^2 KL(start || model), where "start" is the model the
    # personal training began from; it keeps what distillation taught on a client's few scans. 0: plain CE.
    distill_weight: float = 0.5
    distill_temperature: float = 2.0
    select: str = "val"  # val: best epoch on the client's validation split (needs val_fraction > 0); last

    def validate(self, where: str) -> None:
        _in_range(f"{where}.epochs", self.epochs, 1, MAX_EPOCHS, integer=True)
        _in_range(f"{where}.lr", self.lr, 0, MAX_LR, low_open=True)
        _one_of(f"{where}.optimizer", self.optimizer, OPTIMIZERS)
        _in_range(f"{where}.momentum", self.momentum, 0, 1, high_open=True)
        _in_range(f"{where}.distill_weight", self.distill_weight, 0, 1)
        _in_range(f"{where}.distill_temperature", self.distill_temperature, 0, MAX_TEMPERATURE, low_open=True)
        _one_of(f"{where}.select", self.select, SELECTIONS)

    def train_spec(self, batch_size: int) -> TrainSpec:
        return TrainSpec(epochs=self.epochs, batch_size=batch_size, lr=self.lr, optimizer=self.optimizer,
                         momentum=self.momentum)


@dataclass(frozen=True)
class TierConfig:
    """One kind of client: how much data it holds and how it trains each round."""

    per_site: int = 1  # clients of this kind carved from each scanner site
    min_examples: int = 8  # phones: a handful of scans; hospitals: what is left of the site
    max_examples: int = 40
    local_epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-3
    availability: float = 1.0  # probability of being online in a round
    # Clients drawn each round among the tier's online, not retired ones (seeded by seed, round and tier; the
    # cross-device pattern, e.g. 0.05-0.1 of 1,000 phones): null: every one of them trains; an integer >= 1:
    # that many; a number in (0, 1): that fraction of the tier's clients, rounded up, at least 1.
    sample_per_round: int | float | None = None
    test_fraction: float = 0.3  # of the client's own scans, for its local test split
    val_fraction: float = 0.0
    optimizer: str = "adam"  # of the federated local training: adam | sgd
    momentum: float = 0.9  # sgd only
    personal: PersonalConfig = field(default_factory=lambda: PersonalConfig(select="last"))

    def validate(self, where: str) -> None:
        _in_range(f"{where}.per_site", self.per_site, 0, 1_000, integer=True)
        _in_range(f"{where}.max_examples", self.max_examples, 1, MAX_EXAMPLES, integer=True)
        _in_range(f"{where}.min_examples", self.min_examples, 1, self.max_examples, integer=True)
        _in_range(f"{where}.local_epochs", self.local_epochs, 1, MAX_EPOCHS, integer=True)
        _in_range(f"{where}.batch_size", self.batch_size, 1, MAX_BATCH_SIZE, integer=True)
        _in_range(f"{where}.lr", self.lr, 0, MAX_LR, low_open=True)
        _in_range(f"{where}.availability", self.availability, 0, 1, low_open=True)
        sample = self.sample_per_round
        _require(sample is None or (1 <= sample <= MAX_CLIENTS if isinstance(sample, int) else 0 < sample < 1),
                 f"{where}.sample_per_round", sample,
                 f"null (every online client), an integer in [1, {MAX_CLIENTS}] or a fraction in (0, 1)")
        _in_range(f"{where}.test_fraction", self.test_fraction, 0, 1, low_open=True, high_open=True)
        _in_range(f"{where}.val_fraction", self.val_fraction, 0, 1 - self.test_fraction, high_open=True)
        _one_of(f"{where}.optimizer", self.optimizer, OPTIMIZERS)
        _in_range(f"{where}.momentum", self.momentum, 0, 1, high_open=True)
        self.personal.validate(f"{where}.personal")
        _require(self.personal.select != "val" or self.val_fraction > 0, f"{where}.personal.select",
                 self.personal.select, f"'last' when {where}.val_fraction is 0 (no validation split to select on)")

    def sample_size(self, clients: int) -> int | None:
        """How many of the tier's ``clients`` train in a round (fewer if fewer are online); None: all online."""
        if isinstance(self.sample_per_round, float):
            # The tolerance keeps 0.07 x 100 at 7 (the float product is 7.000000000000001).
            return max(1, math.ceil(self.sample_per_round * clients - 1e-9))
        return self.sample_per_round

    def train_spec(self) -> TrainSpec:
        return TrainSpec(epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr, optimizer=self.optimizer,
                         momentum=self.momentum)

    def personal_spec(self) -> TrainSpec:
        return self.personal.train_spec(self.batch_size)


def _default_tiers() -> dict[str, TierConfig]:
    """A hospital keeps what is left of its site; phones hold a handful of scans and are often offline.

    The personal recipes are the ones chosen on the hospitals' validation splits (docs/DECISIONS.md): a hospital
    fine-tunes without the pull toward its start (distill_weight 0) and keeps its best epoch; a phone, with no
    validation split, keeps the pull and a fixed 3-epoch budget.
    """
    return {
        "hospital": TierConfig(per_site=1, min_examples=100, max_examples=100_000, local_epochs=2, batch_size=16,
                               availability=1.0, test_fraction=0.2, val_fraction=0.2,
                               personal=PersonalConfig(distill_weight=0.0, select="val")),
        "phone": TierConfig(per_site=4, min_examples=8, max_examples=40, local_epochs=1, batch_size=8,
                            availability=0.7, test_fraction=0.4, personal=PersonalConfig(epochs=3, select="last")),
    }


@dataclass(frozen=True)
class PartitionConfig:
    # Dirichlet concentration of class mixes: each phone's, and each class's cut among a site's hospitals (label
    # skew); None: every client has its site's mix
    label_skew_alpha: float | None = None
    quantity_skew: bool = True  # phone sizes drawn in [min, max]; False: all at the midpoint
    # Data without metadata.csv (the real Kaggle set): appearance sites, each keeping every class
    # (core/data/sites.py); null: the count with the highest silhouette (2 on the real set; docs/DATA.md
    # "The real sites")
    pseudo_sites: int | None = None

    def validate(self, where: str) -> None:
        _in_range(f"{where}.label_skew_alpha", self.label_skew_alpha, 0, MAX_WEIGHT, low_open=True, nullable=True)
        # 50: core.data.sites.MAX_SITES
        _in_range(f"{where}.pseudo_sites", self.pseudo_sites, 1, 50, integer=True, nullable=True)


def _tier(tiers: dict[str, Any], kind: str, where: str) -> Any:
    try:
        return tiers[kind]
    except KeyError:
        raise ConfigError(f"unknown client kind {kind!r}; {where} has: {', '.join(tiers)}") from None


@dataclass(frozen=True)
class FederationConfig:
    # A name in edgemri.core.federation.personalize.METHODS; fedavg-ft: the one that helped at sites the server
    # never saw on the real scans (docs/DECISIONS.md)
    method: str = "fedavg-ft"
    rounds: int = 5
    proximal_mu: float = 0.0  # > 0: FedProx term on the global part
    ditto_lambda: float = 1.0  # pull of a Ditto personal model toward the global one (the sweep's best)
    ditto_lr: float = 0.01  # the learning rate of a Ditto personal model's own SGD
    min_clients: int = 2  # a round needs at least this many replies to aggregate
    round_timeout_s: float = 600.0  # a client that has not answered by then is skipped
    start_checkpoint: str | None = None  # None: the distilled student of the run
    # How Training is shared between distillation and the clients (edgemri.core.data.splits.SCENARIOS):
    # "seen-sites": the server distills on a share of every site, the clients hold data.client_fraction of it;
    # "new-sites": the server distills only on source sites, every client is at a site it never saw (sites from
    # metadata.csv, else appearance sites; data.client_fraction is not used). seen-sites is the default: it is
    # distillation as the paper does it, on every site (configs/kaggle.yaml, paper.yaml); the federation configs
    # choose new-sites.
    scenario: str = "seen-sites"
    # new-sites: how many sites are source sites, chosen with data.split_seed; None: half, rounded down, at least 1.
    source_sites: int | None = None
    # The server refuses a trained reply whose update (its arrays minus the global model's) has a larger
    # L2 norm: one client cannot drag the global model arbitrarily far. None: no bound.
    max_update_norm: float | None = None
    # Methods whose personal model is made only after the rounds (fedavg-ft, fedavg-cal, label-free) can also
    # be scored in the same run, from the same global model, on the same images: a paired comparison at no
    # extra federation. Their accuracies are reported as "personal-accuracy@NAME".
    compare_methods: tuple[str, ...] = ()
    # The references a client's personal model is compared with beyond start and global: each client's local-only
    # model (trained and scored on the device at the end), and in simulation the pooled and site-oracle models
    # (simulation/baselines.py), fine-tuned centrally on the clients' data. They cost a model per client and as
    # much as that data; a population run switches them off and pays only for what a deployment needs.
    references: bool = True
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    tiers: dict[str, TierConfig] = field(default_factory=_default_tiers)  # client kind -> its settings

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(self.tiers)

    def tier(self, kind: str) -> TierConfig:
        return _tier(self.tiers, kind, "federation.tiers")

    def validate(self, where: str, names: Registries) -> None:
        _one_of(f"{where}.method", self.method, names.methods)
        for name in self.compare_methods:
            _one_of(f"{where}.compare_methods", name, names.after_round_methods)
        _require(len(set(self.compare_methods)) == len(self.compare_methods), f"{where}.compare_methods",
                 list(self.compare_methods), "each method at most once")
        _one_of(f"{where}.scenario", self.scenario, names.scenarios)
        _in_range(f"{where}.source_sites", self.source_sites, 1, 1_000, integer=True, nullable=True)
        _in_range(f"{where}.rounds", self.rounds, 1, MAX_ROUNDS, integer=True)
        _in_range(f"{where}.proximal_mu", self.proximal_mu, 0, MAX_WEIGHT)
        _in_range(f"{where}.ditto_lambda", self.ditto_lambda, 0, MAX_WEIGHT)
        _in_range(f"{where}.ditto_lr", self.ditto_lr, 0, MAX_LR, low_open=True)
        _in_range(f"{where}.min_clients", self.min_clients, 1, MAX_CLIENTS, integer=True)
        _in_range(f"{where}.round_timeout_s", self.round_timeout_s, 0, MAX_TIMEOUT_S, low_open=True)
        if self.max_update_norm is not None:
            _in_range(f"{where}.max_update_norm", self.max_update_norm, 0, MAX_WEIGHT, low_open=True)
        self.partition.validate(f"{where}.partition")
        for name, tier in self.tiers.items():
            if name not in names.client_kinds:
                raise ConfigError(f"config key '{where}.tiers.{name}' is not a client kind; allowed: "
                                  f"{', '.join(names.client_kinds)} (the kinds the partition carves from each site)")
            tier.validate(f"{where}.tiers.{name}")
        _require(sum(t.per_site for t in self.tiers.values()) >= 1, f"{where}.tiers",
                 {k: t.per_site for k, t in self.tiers.items()}, "at least one client per site over all tiers")


@dataclass(frozen=True)
class DPTierConfig:
    """Sample-level DP-SGD (Opacus) for one kind of client."""

    enabled: bool = False
    noise_multiplier: float | None = None  # fixed sigma; or derive it from target_epsilon
    target_epsilon: float | None = 8.0  # over federation.rounds, used when noise_multiplier is null
    budget_epsilon: float = 10.0  # hard cap: a client never trains past it
    delta: float | None = None  # null: min(1e-5, 0.1/n), below 1/n (docs/PRIVACY.md)
    max_grad_norm: float = 1.0  # per-sample clipping norm C
    # The personal fine-tune under DP-SGD too, at the noise that spends this epsilon on its own (one more ledger
    # entry, stage "personal"; the ledger's total stays under budget_epsilon); null: it runs outside DP-SGD
    # (the personal model never leaves the device, but then no epsilon covers it: docs/PRIVACY.md)
    personal_epsilon: float | None = None

    def validate(self, where: str) -> None:
        _in_range(f"{where}.budget_epsilon", self.budget_epsilon, 0, MAX_EPSILON, low_open=True)
        _in_range(f"{where}.personal_epsilon", self.personal_epsilon, 0, self.budget_epsilon, low_open=True,
                  nullable=True)
        _in_range(f"{where}.noise_multiplier", self.noise_multiplier, 0, MAX_EPSILON, nullable=True)
        if self.noise_multiplier is None:
            _require(self.target_epsilon is not None, f"{where}.target_epsilon", self.target_epsilon,
                     f"a number in (0, budget_epsilon={self.budget_epsilon}] when noise_multiplier is null")
            _in_range(f"{where}.target_epsilon", self.target_epsilon, 0, self.budget_epsilon, low_open=True)
        else:
            _in_range(f"{where}.target_epsilon", self.target_epsilon, 0, MAX_EPSILON, low_open=True, nullable=True)
        _in_range(f"{where}.delta", self.delta, 0, 1, low_open=True, high_open=True, nullable=True)
        _in_range(f"{where}.max_grad_norm", self.max_grad_norm, 0, MAX_WEIGHT, low_open=True)


@dataclass(frozen=True)
class CentralDPConfig:
    """Client-level DP with Flower's fixed-clipping strategy wrappers."""

    enabled: bool = False
    side: Literal["server", "client"] = "server"  # where updates are clipped
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-3
    max_epsilon: float = 50.0  # the run stops once the federation reaches it

    def validate(self, where: str) -> None:
        _in_range(f"{where}.noise_multiplier", self.noise_multiplier, 0, MAX_EPSILON)
        _in_range(f"{where}.clipping_norm", self.clipping_norm, 0, MAX_WEIGHT, low_open=True)
        _in_range(f"{where}.delta", self.delta, 0, 1, low_open=True, high_open=True)
        _in_range(f"{where}.max_epsilon", self.max_epsilon, 0, MAX_EPSILON, low_open=True)


def _default_dp_tiers() -> dict[str, DPTierConfig]:
    return {"hospital": DPTierConfig(), "phone": DPTierConfig()}


@dataclass(frozen=True)
class PrivacyConfig:
    accountant: str = "rdp"  # a name in edgemri.core.privacy.dp.ACCOUNTANTS
    tiers: dict[str, DPTierConfig] = field(default_factory=_default_dp_tiers)  # client kind -> DP-SGD settings
    budget_overrides: dict[str, float] = field(default_factory=dict)  # client name -> budget epsilon
    central: CentralDPConfig = field(default_factory=CentralDPConfig)

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(self.tiers)

    def validate(self, where: str, names: Registries) -> None:
        _one_of(f"{where}.accountant", self.accountant, names.accountants)
        for name, tier in self.tiers.items():
            tier.validate(f"{where}.tiers.{name}")
        self.central.validate(f"{where}.central")
        for client, budget in self.budget_overrides.items():
            _in_range(f"{where}.budget_overrides.{client}", budget, 0, MAX_EPSILON, low_open=True)

    def tier(self, kind: str, client: str) -> DPTierConfig:
        """The tier's DP settings with this client's budget override applied."""
        tier = _tier(self.tiers, kind, "privacy.tiers")
        if client in self.budget_overrides:
            tier = dataclasses.replace(tier, budget_epsilon=self.budget_overrides[client])
        return tier


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking: a finished run's reports logged into MLflow's local file store (reports/tracking.py)."""

    enabled: bool = False  # `--track` turns it on for one command; the demo tracks unless `--no-track`
    # The store's folder; null: mlruns beside the run folder, so a distillation and the federations started from
    # its student share one store (runs/demo/mlruns for the demo). A folder, never a server: tracking is offline.
    dir: str | None = None

    def validate(self, where: str) -> None:
        if self.dir is not None:
            _require(bool(self.dir.strip()) and "://" not in self.dir, f"{where}.dir", self.dir,
                     "null or a local folder (MLflow's file store; no server URI)")


@dataclass(frozen=True)
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self, names: Registries) -> Config:
        _in_range("seed", self.seed, 0, MAX_SEED, integer=True)
        self.data.validate("data", names)
        self.distill.validate("distill", names)
        self.federation.validate("federation", names)
        self.privacy.validate("privacy", names)
        self.tracking.validate("tracking")
        stray = [name for name in self.privacy.tiers if name not in self.federation.tiers]
        if stray:
            raise ConfigError(f"config key 'privacy.tiers.{stray[0]}' names no federation tier; allowed: "
                              f"{', '.join(self.federation.tier_names)} (the names under federation.tiers)")
        for name, tier in self.privacy.tiers.items():
            if tier.enabled and tier.personal_epsilon is not None:
                select = self.federation.tier(name).personal.select
                _require(select == "last", f"federation.tiers.{name}.personal.select", select,
                         f"last while privacy.tiers.{name}.personal_epsilon is set (choosing the personal model on "
                         f"the validation scans would use scans no epsilon covers)")
                _require(not self.federation.compare_methods, "federation.compare_methods",
                         list(self.federation.compare_methods), f"[] while privacy.tiers.{name}.personal_epsilon is "
                         f"set (each compared fine-tune would spend privacy the ledger does not record)")
        dp_on = any(tier.enabled for tier in self.privacy.tiers.values())
        _require(not (dp_on and self.federation.proximal_mu > 0), "federation.proximal_mu",
                 self.federation.proximal_mu, "0 when DP-SGD is on (the proximal term bypasses per-sample clipping)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON data (lists, never tuples)."""
        return dataclasses.asdict(self, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v
                                                                    for k, v in items})

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' has value {value!r}; allowed: {allowed}")


def _in_range(key: str, value: float | int | None, low: float, high: float, *, integer: bool = False,
              low_open: bool = False, high_open: bool = False, nullable: bool = False) -> None:
    """A finite number within [low, high] (or open ends); NaN compares False, so it is tested first."""
    if value is None and nullable:
        return
    allowed = (f"{'an integer' if integer else 'a number'} in {'(' if low_open else '['}{_number(low)}, "
               f"{_number(high)}{')' if high_open else ']'}{' or null' if nullable else ''}")
    ok = isinstance(value, int | float) and math.isfinite(value)
    ok = ok and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    _require(ok, key, value, allowed)


def _number(x: float) -> str:
    """A bound as people write it: 10000, 0.5, 0.3 (not 1e+04 or 0.30000000000000004)."""
    return str(int(x)) if float(x).is_integer() else f"{x:.6g}"


def _one_of(key: str, value: str, names: Collection[str]) -> None:
    _require(value in names, key, value, ", ".join(map(repr, names)))


# YAML 1.1 reads 1e-4 and 5e3 as strings (it wants a dot): for float fields they are numbers.
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _convert(value: Any, hint: Any, key: str, default: Any = None) -> Any:
    """Check and convert one YAML value to the field's type hint."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key, base=default)
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"config key '{key}' has value {value!r}; allowed: {', '.join(map(repr, args))}"
            )
        return value
    if origin is dict:
        # Named entries (tiers, budget overrides): a listed name changes only the keys it gives,
        # starting from its default entry (or the type's defaults for a new name); others keep theirs.
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' has value {value!r}; allowed: a mapping")
        merged = dict(default or {})
        for name, item in value.items():
            merged[str(name)] = _convert(item, args[1], f"{key}.{name}", merged.get(str(name)))
        return merged
    if origin is tuple:  # a YAML list of names, e.g. compare_methods
        if not isinstance(value, list | tuple) or len(value) > MAX_LIST:
            raise ConfigError(f"config key '{key}' has value {value!r}; allowed: a list of at most {MAX_LIST} items")
        return tuple(_convert(item, args[0], key) for item in value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if inner == [int, float]:  # a count or a fraction (sample_per_round): an integer stays a count
            return _convert(value, int if isinstance(value, int) and not isinstance(value, bool) else float, key)
        return _convert(value, inner[0], key, default)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' has value {value!r}; allowed: true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' has value {value!r}; allowed: an integer")
        return value
    if hint is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"config key '{key}' has value {value!r}; allowed: a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' has value {value!r}; allowed: a string")
        return value
    raise TypeError(f"unsupported config type {hint!r} for '{key}'")


def from_dict(cls: type, data: Any, prefix: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys by name.

    Keys not given keep the value of ``base`` (default: ``cls()``), so a partial
    section such as ``tiers: {hospital: {local_epochs: 3}}`` keeps the hospital's other defaults.
    """
    base = cls() if base is None else base
    where = prefix or "<top level>"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{where}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(map(str, data)) - set(names))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key '{key}'; allowed keys in {where}: {', '.join(names)}")
    kwargs = {
        name: _convert(data[name], hints[name], f"{prefix}.{name}" if prefix else name, getattr(base, name))
        for name in names
        if name in data
    }
    return dataclasses.replace(base, **kwargs)


def parse_config(data: Any, names: Registries) -> Config:
    """A validated Config from plain data (parsed YAML or JSON), its names checked against ``names``."""
    return from_dict(Config, data).validate(names)


# Bounds on a config's YAML, checked while it is read: a small file must not make the loader recurse,
# allocate or compute without bound (deep nesting, alias expansion, integers of thousands of digits).
MAX_CONFIG_BYTES = 1_000_000
MAX_YAML_DEPTH = 32  # a config nests 5 levels; anything this deep is an attack or a mistake


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last), aliases
    (``*name``: the "billion laughs" expansion), nesting deeper than MAX_YAML_DEPTH and huge integers."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ConfigError(f"YAML aliases (*name) are not allowed in a config (line {mark.line + 1}); "
                              f"write the value out")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(f"YAML nested deeper than {MAX_YAML_DEPTH} levels at line {mark.line + 1}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        digits = sum(c.isdigit() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise ConfigError(f"an integer of {digits} digits at line {node.start_mark.line + 1}; "
                              f"allowed: at most {MAX_INT_DIGITS} digits")
        return super().construct_yaml_int(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in first_line
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                break
            if duplicate:
                raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                                  f"(first given at line {first_line[key]}); give each key once")
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)


def _yaml(text: str) -> Any:
    """Parsed YAML; errors as one line (PyYAML's span several)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{len(text):,} characters of YAML; allowed: at most {MAX_CONFIG_BYTES:,}")
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"not valid YAML: {err.problem or err.context}{where}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {' '.join(str(err).split())}") from None


def apply_overrides(data: dict[str, Any] | None, overrides: typing.Sequence[str]) -> dict[str, Any]:
    """``data`` with each ``dotted.key=value`` set (value parsed as YAML), e.g. ``federation.method=fedper``."""
    data = {} if data is None else data
    for item in overrides:
        shown = item if len(item) <= 100 else item[:100] + "..."  # an override is echoed, not reproduced
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {shown!r} must look like dotted.key=value, e.g. federation.method=fedper")
        try:
            value = _yaml(text)
        except ConfigError as err:
            raise ConfigError(f"override {shown!r}: value is {err}") from None
        *sections, leaf = key.strip().split(".")
        node = data
        for depth, name in enumerate(sections):
            if node.get(name) is None:
                node[name] = {}
            node = node[name]
            if not isinstance(node, dict):
                raise ConfigError(f"override {shown!r}: '{'.'.join(sections[:depth + 1])}' is not a section")
        node[leaf] = value
    return data


def load_config(path: str | Path, names: Registries, overrides: typing.Sequence[str] = ()) -> Config:
    """Read and validate a YAML config, then ``overrides``; errors name the file and the key."""
    path = Path(path)
    try:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size:,} bytes; a config may have at most {MAX_CONFIG_BYTES:,}")
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                          f"save it as UTF-8") from None
    try:
        data = _yaml(text)
        if data is None:
            raise ConfigError("the file is empty; give at least one section (seed, data, distill, federation, "
                              "privacy), e.g. copy configs/quickstart.yaml")
        if not isinstance(data, dict):
            raise ConfigError(f"the top level is a {type(data).__name__}; it must be a mapping of sections "
                              f"({', '.join(f.name for f in dataclasses.fields(Config))})")
        return parse_config(apply_overrides(data, overrides), names)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
