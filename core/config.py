"""YAML configuration, loaded once into frozen dataclasses and validated.

Unknown keys and bad values raise ``ConfigError`` naming the key (dotted path) and
what is allowed, before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from edgemri.core.errors import EdgemriError


class ConfigError(EdgemriError):
    """A configuration key is unknown or its value is not allowed."""


@dataclass(frozen=True)
class TrainSpec:
    """One run of the training loop."""

    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0

    def validate(self, where: str) -> None:
        _require(self.epochs >= 1, f"{where}.epochs", self.epochs, "an integer >= 1")
        _require(self.batch_size >= 1, f"{where}.batch_size", self.batch_size, "an integer >= 1")
        _require(self.lr > 0, f"{where}.lr", self.lr, "a number > 0")
        _require(self.weight_decay >= 0, f"{where}.weight_decay", self.weight_decay, "a number >= 0")


@dataclass(frozen=True)
class DataConfig:
    root: str | None = None  # a folder in the Kaggle layout; None: the synthetic set of the run
    synth_preset: Literal["quickstart", "kaggle"] = "quickstart"
    val_fraction: float = 0.15  # carved from Training, stratified; Testing is for final reports
    # Share of Training held by the federation's clients and never seen by distillation, so
    # the clients' local tests measure new data (0: clients reuse the distillation data).
    client_fraction: float = 0.5
    # Seed of that server/client split alone: runs with other seeds (training, partition
    # among clients) keep the same split, so no seed's clients test on distillation data.
    split_seed: int = 0
    cache_dir: str | None = None  # decoded-image cache; None: <root>/.edgemri-cache

    def validate(self, where: str) -> None:
        _require(0 < self.val_fraction < 0.5, f"{where}.val_fraction", self.val_fraction,
                 "a number in (0, 0.5)")
        _require(0 <= self.client_fraction <= 0.9, f"{where}.client_fraction", self.client_fraction,
                 "a number in [0, 0.9]")
        _require(self.split_seed >= 0, f"{where}.split_seed", self.split_seed, "an integer >= 0")


@dataclass(frozen=True)
class TeacherConfig:
    name: Literal["vgg16-slim", "vgg16-imagenet"] = "vgg16-slim"
    width: float = 0.125  # vgg16-slim only: channel width relative to VGG16
    checkpoint: str | None = None  # a trained teacher to load instead of training one
    train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=8, batch_size=32, weight_decay=0.01))

    def model_options(self) -> dict[str, Any]:
        """Builder options for the registry (the ImageNet teacher has a fixed width)."""
        return {"width": self.width} if self.name == "vgg16-slim" else {}

    def validate(self, where: str) -> None:
        _require(0 < self.width <= 1, f"{where}.width", self.width, "a number in (0, 1]")
        self.train.validate(f"{where}.train")


@dataclass(frozen=True)
class KDConfig:
    temperature: float = 1.0
    alpha: float = 0.5  # weight of the soft (teacher) term, the paper's Eq. 1
    train: TrainSpec = field(default_factory=TrainSpec)

    def validate(self, where: str) -> None:
        _require(self.temperature > 0, f"{where}.temperature", self.temperature, "a number > 0")
        _require(0 <= self.alpha <= 1, f"{where}.alpha", self.alpha, "a number in [0, 1]")
        self.train.validate(f"{where}.train")


@dataclass(frozen=True)
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    baseline: TrainSpec = field(default_factory=lambda: TrainSpec(weight_decay=0.01))
    kd: KDConfig = field(default_factory=KDConfig)
    # Reproduce the paper code's choices: KL with 'mean' reduction and checkpoint
    # selection on the Testing split. Every number it produces is marked as such.
    paper_compat: bool = False

    def validate(self, where: str) -> None:
        self.teacher.validate(f"{where}.teacher")
        self.baseline.validate(f"{where}.baseline")
        self.kd.validate(f"{where}.kd")


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
    test_fraction: float = 0.3  # of the client's own scans, for its local test split
    val_fraction: float = 0.0

    def validate(self, where: str) -> None:
        _require(self.per_site >= 0, f"{where}.per_site", self.per_site, "an integer >= 0")
        _require(1 <= self.min_examples <= self.max_examples, f"{where}.min_examples", self.min_examples,
                 f"an integer in [1, max_examples={self.max_examples}]")
        _require(self.local_epochs >= 1, f"{where}.local_epochs", self.local_epochs, "an integer >= 1")
        _require(self.batch_size >= 1, f"{where}.batch_size", self.batch_size, "an integer >= 1")
        _require(self.lr > 0, f"{where}.lr", self.lr, "a number > 0")
        _require(0 < self.availability <= 1, f"{where}.availability", self.availability, "a number in (0, 1]")
        _require(0 < self.test_fraction < 1, f"{where}.test_fraction", self.test_fraction, "a number in (0, 1)")
        _require(0 <= self.val_fraction < 1 - self.test_fraction, f"{where}.val_fraction", self.val_fraction,
                 "a number in [0, 1 - test_fraction)")

    def train_spec(self) -> TrainSpec:
        return TrainSpec(epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr)


def _hospital_tier() -> TierConfig:
    return TierConfig(per_site=1, min_examples=100, max_examples=100_000, local_epochs=2, batch_size=16,
                      availability=1.0, test_fraction=0.2, val_fraction=0.1)


def _phone_tier() -> TierConfig:
    return TierConfig(per_site=2, min_examples=8, max_examples=40, local_epochs=1, batch_size=8,
                      availability=0.7, test_fraction=0.4)


@dataclass(frozen=True)
class PartitionConfig:
    label_skew_alpha: float | None = None  # Dirichlet concentration of phone class mixes; None: site's mix
    quantity_skew: bool = True  # phone sizes drawn in [min, max]; False: all at the midpoint
    pseudo_sites: int = 4  # data without metadata.csv (the real Kaggle set): random site buckets

    def validate(self, where: str) -> None:
        if self.label_skew_alpha is not None:
            _require(self.label_skew_alpha > 0, f"{where}.label_skew_alpha", self.label_skew_alpha,
                     "a number > 0 or null")
        _require(self.pseudo_sites >= 1, f"{where}.pseudo_sites", self.pseudo_sites, "an integer >= 1")


@dataclass(frozen=True)
class FederationConfig:
    method: Literal["fedavg", "fedavg-ft", "fedper", "ditto"] = "ditto"
    rounds: int = 5
    proximal_mu: float = 0.0  # > 0: FedProx term on the global part
    ditto_lambda: float = 0.1  # pull of a Ditto personal model toward the global one
    finetune_epochs: int = 2  # fedavg-ft: local epochs on top of the final global model
    min_clients: int = 2  # a round needs at least this many replies to aggregate
    round_timeout_s: float = 600.0  # a client that has not answered by then is skipped
    start_checkpoint: str | None = None  # None: the distilled student of the run
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    hospital: TierConfig = field(default_factory=_hospital_tier)
    phone: TierConfig = field(default_factory=_phone_tier)

    def validate(self, where: str) -> None:
        _require(self.rounds >= 1, f"{where}.rounds", self.rounds, "an integer >= 1")
        _require(self.proximal_mu >= 0, f"{where}.proximal_mu", self.proximal_mu, "a number >= 0")
        _require(self.ditto_lambda >= 0, f"{where}.ditto_lambda", self.ditto_lambda, "a number >= 0")
        _require(self.finetune_epochs >= 1, f"{where}.finetune_epochs", self.finetune_epochs, "an integer >= 1")
        _require(self.min_clients >= 1, f"{where}.min_clients", self.min_clients, "an integer >= 1")
        _require(self.round_timeout_s > 0, f"{where}.round_timeout_s", self.round_timeout_s, "a number > 0")
        self.partition.validate(f"{where}.partition")
        self.hospital.validate(f"{where}.hospital")
        self.phone.validate(f"{where}.phone")
        _require(self.hospital.per_site + self.phone.per_site >= 1, f"{where}.hospital.per_site",
                 self.hospital.per_site, "at least one client per site over both tiers")

    def tier(self, kind: str) -> TierConfig:
        return {"hospital": self.hospital, "phone": self.phone}[kind]


@dataclass(frozen=True)
class DPTierConfig:
    """Sample-level DP-SGD (Opacus) for one kind of client."""

    enabled: bool = False
    noise_multiplier: float | None = None  # fixed sigma; or derive it from target_epsilon
    target_epsilon: float | None = 8.0  # over federation.rounds, used when noise_multiplier is null
    budget_epsilon: float = 10.0  # hard cap: a client never trains past it
    delta: float | None = None  # null: min(1e-5, 0.1/n), below 1/n (docs/PRIVACY.md)
    max_grad_norm: float = 1.0  # per-sample clipping norm C

    def validate(self, where: str) -> None:
        _require(self.budget_epsilon > 0, f"{where}.budget_epsilon", self.budget_epsilon, "a number > 0")
        if self.noise_multiplier is not None:
            _require(self.noise_multiplier >= 0, f"{where}.noise_multiplier", self.noise_multiplier,
                     "a number >= 0 or null")
        else:
            _require(self.target_epsilon is not None and 0 < self.target_epsilon <= self.budget_epsilon,
                     f"{where}.target_epsilon", self.target_epsilon,
                     f"a number in (0, budget_epsilon={self.budget_epsilon}] when noise_multiplier is null")
        if self.delta is not None:
            _require(0 < self.delta < 1, f"{where}.delta", self.delta, "a number in (0, 1) or null")
        _require(self.max_grad_norm > 0, f"{where}.max_grad_norm", self.max_grad_norm, "a number > 0")


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
        _require(self.noise_multiplier >= 0, f"{where}.noise_multiplier", self.noise_multiplier, "a number >= 0")
        _require(self.clipping_norm > 0, f"{where}.clipping_norm", self.clipping_norm, "a number > 0")
        _require(0 < self.delta < 1, f"{where}.delta", self.delta, "a number in (0, 1)")
        _require(self.max_epsilon > 0, f"{where}.max_epsilon", self.max_epsilon, "a number > 0")


@dataclass(frozen=True)
class PrivacyConfig:
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"
    hospital: DPTierConfig = field(default_factory=DPTierConfig)
    phone: DPTierConfig = field(default_factory=DPTierConfig)
    budget_overrides: dict[str, float] = field(default_factory=dict)  # client name -> budget epsilon
    central: CentralDPConfig = field(default_factory=CentralDPConfig)

    def validate(self, where: str) -> None:
        self.hospital.validate(f"{where}.hospital")
        self.phone.validate(f"{where}.phone")
        self.central.validate(f"{where}.central")
        for client, budget in self.budget_overrides.items():
            _require(budget > 0, f"{where}.budget_overrides.{client}", budget, "a number > 0")

    def tier(self, kind: str, client: str) -> DPTierConfig:
        """The tier's DP settings with this client's budget override applied."""
        tier = {"hospital": self.hospital, "phone": self.phone}[kind]
        if client in self.budget_overrides:
            tier = dataclasses.replace(tier, budget_epsilon=self.budget_overrides[client])
        return tier


@dataclass(frozen=True)
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def validate(self) -> Config:
        _require(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        self.data.validate("data")
        self.distill.validate("distill")
        self.federation.validate("federation")
        self.privacy.validate("privacy")
        dp_on = self.privacy.hospital.enabled or self.privacy.phone.enabled
        _require(not (dp_on and self.federation.proximal_mu > 0), "federation.proximal_mu",
                 self.federation.proximal_mu, "0 when DP-SGD is on (the proximal term bypasses per-sample clipping)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' has value {value!r}; allowed: {allowed}")


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
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' has value {value!r}; allowed: a mapping")
        return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' has value {value!r}; allowed: true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' has value {value!r}; allowed: an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' has value {value!r}; allowed: a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' has value {value!r}; allowed: a string")
        return value
    raise TypeError(f"unsupported config type {hint!r} for '{key}'")


def from_dict(cls: type, data: Any, prefix: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys by name.

    Keys not given keep the value of ``base`` (default: ``cls()``), so a partial
    section such as ``hospital: {local_epochs: 3}`` keeps the hospital's other defaults.
    """
    base = cls() if base is None else base
    where = prefix or "<top level>"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{where}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key '{key}'; allowed keys in {where}: {', '.join(names)}")
    kwargs = {
        name: _convert(data[name], hints[name], f"{prefix}.{name}" if prefix else name, getattr(base, name))
        for name in names
        if name in data
    }
    return dataclasses.replace(base, **kwargs)


def parse_config(data: Any) -> Config:
    return from_dict(Config, data).validate()


def apply_overrides(data: dict[str, Any] | None, overrides: typing.Sequence[str]) -> dict[str, Any]:
    """``data`` with each ``dotted.key=value`` set (value parsed as YAML), e.g. ``federation.method=fedper``."""
    data = {} if data is None else data
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like dotted.key=value, e.g. federation.method=fedper")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from None
        *sections, leaf = key.strip().split(".")
        node = data
        for depth, name in enumerate(sections):
            if node.get(name) is None:
                node[name] = {}
            node = node[name]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{'.'.join(sections[:depth + 1])}' is not a section")
        node[leaf] = value
    return data


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read and validate a YAML config, then ``overrides``; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if overrides and not isinstance(data, dict | None):
        raise ConfigError(f"{path}: the top level must be a mapping")
    data = apply_overrides(data, overrides)
    try:
        return parse_config(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
