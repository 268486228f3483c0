"""Personalization methods: one small interface, a registry, the one training loop.

Every method starts from the distilled student and overrides only the steps that
differ (which parameters are shared, how a round trains locally, what the personal
model is); the round loop itself lives in the Flower apps. States are plain
``{name: tensor}`` dicts, so they travel as Flower ArrayRecords and save as files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from edgemri.core.config import FederationConfig, TrainSpec
from edgemri.core.data import CLASS_NAMES, ArraySplit, normalize
from edgemri.core.evaluate import classification_metrics, predict_logits
from edgemri.core.losses import cross_entropy
from edgemri.core.train import Batch, TrainData, Wrap, fit
from edgemri.models import Student, build_model

State = dict[str, Tensor]
LossFn = Callable[[Tensor, Batch], Tensor]


def student_from(state: State) -> Student:
    model = build_model("student")
    model.load_state_dict(state, strict=True)
    return model


def with_proximal(loss: LossFn, model: nn.Module, anchor: State, weight: float) -> LossFn:
    """loss + weight/2 * ||w - anchor||^2 (FedProx's and Ditto's pull toward the global model)."""
    if weight == 0:
        return loss
    pairs = [(p, anchor[name].detach()) for name, p in model.named_parameters()]

    def proximal_loss(logits: Tensor, batch: Batch) -> Tensor:
        pull = sum(((p - a) ** 2).sum() for p, a in pairs)
        return loss(logits, batch) + 0.5 * weight * pull

    return proximal_loss


def evaluate_state(state: State, split: ArraySplit) -> dict[str, Any]:
    """Per-image metrics of a student state on one local split."""
    if len(split) == 0:
        return {"n": 0, "accuracy": float("nan")}
    model = student_from(state)
    metrics = classification_metrics(predict_logits(model, split.images, normalize), split.labels, CLASS_NAMES)
    return {k: metrics[k] for k in ("n", "accuracy", "macro_f1", "nll")}


@dataclass
class RoundOutput:
    shared: State  # what goes to the server
    personal: State | None  # what stays on the client
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class LocalTrainer:
    """How one client trains: its data, its tier's spec, and a hook for DP-SGD."""

    train: ArraySplit
    spec: TrainSpec
    seed: int
    wrap: Wrap | None = None  # DP-SGD (Opacus) for training whose result leaves the client

    def run(self, model: nn.Module, loss: LossFn, epochs: int | None = None, *, shared: bool = True
            ) -> dict[str, float]:
        """Train in place. ``shared=False`` marks training whose result never leaves the
        device (Ditto's personal model, fine-tuning, baselines): it needs no DP noise."""
        spec = self.spec if epochs is None else dataclasses.replace(self.spec, epochs=epochs)
        result = fit(model, TrainData.from_split(self.train), loss=loss, spec=spec, seed=self.seed,
                     select="last", wrap=self.wrap if shared else None)
        last = result.history[-1]
        return {"train-loss": last.train_loss, "train-accuracy": last.train_accuracy,
                "steps": float(result.optimizer_steps), "train-seconds": result.train_seconds}


class Method:
    """FedAvg: one global model; the personal model is the global one."""

    name: ClassVar[str] = "fedavg"

    def __init__(self, config: FederationConfig) -> None:
        self.config = config

    def shared_keys(self, keys: list[str]) -> list[str]:
        return list(keys)

    def local_start(self, global_state: State, personal: State | None) -> State:
        return global_state

    def _train_global(self, global_state: State, personal: State | None, trainer: LocalTrainer
                      ) -> tuple[Student, dict[str, float]]:
        model = student_from(self.local_start(global_state, personal))
        metrics = trainer.run(model, with_proximal(cross_entropy, model, global_state, self.config.proximal_mu))
        return model, metrics

    def train_round(self, global_state: State, personal: State | None, trainer: LocalTrainer) -> RoundOutput:
        model, metrics = self._train_global(global_state, personal, trainer)
        state = model.state_dict()
        return RoundOutput({k: state[k] for k in self.shared_keys(list(state))}, personal, metrics)

    def personalize(self, global_state: State, personal: State | None, trainer: LocalTrainer) -> State:
        return global_state


class FedAvgFineTune(Method):
    """FedAvg, then each client fine-tunes the final global model on its own data."""

    name = "fedavg-ft"

    def personalize(self, global_state: State, personal: State | None, trainer: LocalTrainer) -> State:
        model = student_from(global_state)
        trainer.run(model, cross_entropy, epochs=self.config.finetune_epochs, shared=False)
        return model.state_dict()


class FedPer(Method):
    """Shared conv blocks; each client keeps its own classifier head (Arivazhagan et al. 2019)."""

    name = "fedper"

    def shared_keys(self, keys: list[str]) -> list[str]:
        return [k for k in keys if not k.startswith(Student.HEAD_PREFIX)]

    def local_start(self, global_state: State, personal: State | None) -> State:
        return {**global_state, **(personal or {})}

    def train_round(self, global_state: State, personal: State | None, trainer: LocalTrainer) -> RoundOutput:
        model, metrics = self._train_global(global_state, personal, trainer)
        state = model.state_dict()
        head = {k: v for k, v in state.items() if k.startswith(Student.HEAD_PREFIX)}
        return RoundOutput({k: state[k] for k in self.shared_keys(list(state))}, head, metrics)

    def personalize(self, global_state: State, personal: State | None, trainer: LocalTrainer) -> State:
        return self.local_start(global_state, personal)


class Ditto(Method):
    """Global model as FedAvg plus a personal model pulled toward it (Li et al. 2021)."""

    name = "ditto"

    def train_round(self, global_state: State, personal: State | None, trainer: LocalTrainer) -> RoundOutput:
        model, metrics = self._train_global(global_state, personal, trainer)
        own = student_from(personal if personal is not None else global_state)
        personal_metrics = trainer.run(own, with_proximal(cross_entropy, own, global_state, self.config.ditto_lambda),
                                       shared=False)
        metrics.update({f"personal-{k}": v for k, v in personal_metrics.items()})
        return RoundOutput(model.state_dict(), own.state_dict(), metrics)

    def personalize(self, global_state: State, personal: State | None, trainer: LocalTrainer) -> State:
        return personal if personal is not None else global_state


METHODS: dict[str, type[Method]] = {m.name: m for m in (Method, FedAvgFineTune, FedPer, Ditto)}


def create_method(config: FederationConfig) -> Method:
    """The configured personalization method (names as in ``federation.method``)."""
    try:
        return METHODS[config.method](config)
    except KeyError:
        raise ValueError(f"unknown personalization method {config.method!r}; "
                         f"allowed: {', '.join(METHODS)}") from None


def local_only(start: State, trainer: LocalTrainer, rounds: int) -> State:
    """The no-federation baseline: the same local budget from the same start."""
    model = student_from(start)
    trainer.run(model, cross_entropy, epochs=rounds * trainer.spec.epochs, shared=False)
    return model.state_dict()


def merge_shared(global_state: State, shared: State) -> State:
    """The server's full global state after aggregating only the shared keys."""
    return {**global_state, **{k: v.to(global_state[k].dtype) for k, v in shared.items()}}
