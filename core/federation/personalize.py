"""Personalization methods: one small interface, a registry, the one training loop.

Every method starts from the distilled student and overrides only the steps that
differ (which parameters are shared, how a round trains locally, what the personal
model is); the round loop itself lives in the Flower apps. States are plain
``{name: tensor}`` dicts, so they travel as Flower ArrayRecords and save as files.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgemri.core.config import FederationConfig, PersonalConfig, TrainSpec
from edgemri.core.data.dataset import ArraySplit
from edgemri.core.data.images import CLASS_NAMES, PREPROCESSING, calibrated_preprocessing, normalize
from edgemri.core.privacy.dp import PrivacyError
from edgemri.core.training.evaluate import classification_metrics, predict_logits
from edgemri.core.training.losses import cross_entropy, make_kd_loss
from edgemri.core.training.train import Batch, TrainData, Wrap, fit
from edgemri.models import NormStudent, Student, build_model, fold_norms

State = dict[str, Tensor]
LossFn = Callable[[Tensor, Batch], Tensor]


def student_from(state: State) -> Student:
    model = build_model("student")
    model.load_state_dict(state, strict=True)
    return model


def with_proximal(loss: LossFn, model: nn.Module, anchor: State, weight: float) -> LossFn:
    """loss + weight/2 * ||w - anchor||^2 over the parameters ``anchor`` holds (FedProx's and Ditto's pull
    toward the global model: a client's own layers, which the server never sees, are not pulled)."""
    if weight == 0:
        return loss
    pairs = [(p, anchor[name].detach()) for name, p in model.named_parameters() if name in anchor]

    def proximal_loss(logits: Tensor, batch: Batch) -> Tensor:
        pull = sum(((p - a) ** 2).sum() for p, a in pairs)
        return loss(logits, batch) + 0.5 * weight * pull

    return proximal_loss


def evaluate_state(state: State, split: ArraySplit) -> dict[str, Any]:
    """Metrics of a (personal) state on one split (a pool's class-mixed accuracy: ``pool_accuracy``)."""
    if len(split) == 0:
        return {"n": 0, "accuracy": float("nan")}
    logits = predict_logits(personal_model(state), split.images, normalize)
    metrics = classification_metrics(logits, split.labels, CLASS_NAMES)
    return {k: metrics[k] for k in ("n", "accuracy", "macro_f1", "nll")}


def predicted_classes(state: State, split: ArraySplit) -> Tensor:
    """A (personal) state's predicted class for every image of ``split``."""
    return predict_logits(personal_model(state), split.images, normalize).argmax(1)


def pool_accuracy(predictions: Tensor, labels: Tensor, class_weights: Tensor | None = None) -> float:
    """Accuracy of ``predictions``; with ``class_weights`` (one per class, summing to 1), the per-class
    accuracies mixed as a client's own class mix would see them (``class_weighted_accuracy``)."""
    if class_weights is not None:
        return class_weighted_accuracy(predictions, labels, class_weights)
    return float((predictions == labels).float().mean())


def state_digest(state: State) -> str:
    """A digest of a state's names and values: equal states, equal digests."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def class_weighted_accuracy(predictions: Tensor, labels: Tensor, class_weights: Tensor) -> float:
    """Per-class accuracies mixed by ``class_weights`` (renormalized over the classes present)."""
    correct = (predictions == labels).float()
    present = [c for c in range(len(class_weights)) if bool((labels == c).any())]
    weights = class_weights[present] / class_weights[present].sum()
    return float(sum(w * correct[labels == c].mean() for c, w in zip(present, weights, strict=True)))


@dataclass
class LocalTrainer:
    """How one client trains: its data, its tier's specs, and a hook for DP-SGD.

    ``spec`` is the federated local training (its result leaves the client); ``personal`` is the
    recipe for what never leaves it (fine-tuning, local-only, a personal calibration).
    """

    train: ArraySplit
    spec: TrainSpec
    seed: int
    personal: PersonalConfig = field(default_factory=PersonalConfig)
    val: ArraySplit | None = None  # the client's validation split, for the personal recipe's selection
    wrap: Wrap | None = None  # DP-SGD (Opacus) for training whose result leaves the client
    personal_wrap: Wrap | None = None  # DP-SGD for the personal recipe too (privacy.tiers.<kind>.personal_epsilon)

    def run(self, model: nn.Module, loss: LossFn, spec: TrainSpec | None = None, *, shared: bool = True
            ) -> dict[str, float]:
        """Train in place for the round. ``shared=False`` marks training whose result never leaves
        the device (Ditto's personal model): it needs no DP noise."""
        result = fit(model, TrainData.from_split(self.train), loss=loss, spec=spec or self.spec, seed=self.seed,
                     select="last", wrap=self.wrap if shared else None)
        last = result.history[-1]
        return {"train-loss": last.train_loss, "train-accuracy": last.train_accuracy,
                "steps": float(result.optimizer_steps), "train-seconds": result.train_seconds}

    @property
    def personal_spec(self) -> TrainSpec:
        return self.personal.train_spec(self.spec.batch_size)

    def personalize(self, model: nn.Module, *, epochs: int | None = None, loss: LossFn | None = None,
                    labelled: bool = True) -> dict[str, float]:
        """The personal recipe, in place: the tier's optimizer and budget, a distillation term toward the
        model as it came in (learning without forgetting), and selection on validation where the tier has
        it (the unchanged model is a candidate: a fine-tuning that only hurts is not kept).

        Only parameters with ``requires_grad`` train. ``labelled=False`` (label-free methods) gives the
        loop no labels at all, and never selects on labels."""
        recipe = self.personal
        spec = dataclasses.replace(self.personal_spec, epochs=epochs or recipe.epochs)
        images = self.train.images
        labels = self.train.labels if labelled else torch.zeros_like(self.train.labels)
        extras: tuple[Tensor, ...] = ()
        if loss is None:
            if recipe.distill_weight > 0:
                extras = (predict_logits(model, images, normalize),)
                loss = make_kd_loss(recipe.distill_temperature, recipe.distill_weight)
            else:
                loss = cross_entropy
        select_val = labelled and recipe.select == "val" and self.val is not None and len(self.val) > 0
        if self.personal_wrap is not None and select_val:
            raise PrivacyError("a DP personal fine-tune cannot select on the validation scans (no epsilon covers "
                               "them); set the tier's personal.select to last")
        result = fit(model, TrainData(images, labels, extras, transform=normalize), loss=loss, spec=spec,
                     seed=self.seed, select="val" if select_val else "last",
                     val=TrainData(self.val.images, self.val.labels, transform=normalize) if select_val else None,
                     keep_start=True, wrap=self.personal_wrap)
        return {"personal-epochs": float(result.best_epoch if select_val else spec.epochs),
                "personal-seconds": result.train_seconds}


# -- a per-client input calibration: a per-channel affine on the normalized input ----------------------
# It folds exactly into the exported model's preprocessing constants (core.data.images.calibrated_preprocessing),
# so the exported model stays the paper's student.
INPUT_SCALE, INPUT_SHIFT = "input.scale", "input.shift"


class Calibrated(nn.Module):
    """A student behind a per-channel input affine ``x * scale + shift`` (identity at creation).

    The scale is learnt as its logarithm: it stays positive, as folding it into a standard deviation needs.
    """

    def __init__(self, student: Student) -> None:
        super().__init__()
        self.student = student
        self.log_scale = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.shift = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x * self.log_scale.exp() + self.shift)

    def personal_state(self) -> State:
        return {**self.student.state_dict(), INPUT_SCALE: self.log_scale.detach().exp(),
                INPUT_SHIFT: self.shift.detach().clone()}


def personal_model(state: State) -> nn.Module:
    """The model a personal state describes: a student, behind its input calibration if it has one."""
    calibration = {k: state[k] for k in (INPUT_SCALE, INPUT_SHIFT) if k in state}
    student = student_from({k: v for k, v in state.items() if k not in calibration})
    if not calibration:
        return student
    if len(calibration) != 2 or any(v.shape != (1, 3, 1, 1) for v in calibration.values()) \
            or not bool((calibration[INPUT_SCALE] > 0).all()):
        raise ValueError(f"a calibrated state needs {INPUT_SCALE} (positive) and {INPUT_SHIFT} of shape (1, 3, 1, 1)")
    model = Calibrated(student)
    with torch.no_grad():
        model.log_scale.copy_(calibration[INPUT_SCALE].log())
        model.shift.copy_(calibration[INPUT_SHIFT])
    return model


def exportable(state: State) -> tuple[State, dict[str, Any]]:
    """(the plain student's state, its preprocessing): a calibration folds into the preprocessing constants."""
    if INPUT_SCALE not in state:
        return state, dict(PREPROCESSING)
    student = {k: v for k, v in state.items() if k not in (INPUT_SCALE, INPUT_SHIFT)}
    return student, calibrated_preprocessing(state[INPUT_SCALE].flatten(), state[INPUT_SHIFT].flatten())


def _train_only(model: nn.Module, keep: Callable[[str], bool]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(keep(name))


def _calibration_and_biases(name: str) -> bool:
    """A few dozen parameters a handful of scans can fit: the input affine and every bias."""
    return name in ("log_scale", "shift") or name.endswith(".bias")


def information_maximization(logits: Tensor, batch: Batch) -> Tensor:
    """Label-free adaptation (SHOT's IM loss): confident per-scan predictions, diverse over the batch."""
    probs = F.softmax(logits, dim=1)
    per_scan = -(probs * F.log_softmax(logits, dim=1)).sum(1).mean()
    mean = probs.mean(0)
    return per_scan + (mean * torch.log(mean + 1e-8)).sum()


@dataclass
class RoundOutput:
    shared: State  # what goes to the server
    personal: State | None  # what stays on the client
    metrics: dict[str, float] = field(default_factory=dict)


class Method:
    """FedAvg: one global model; the personal model is the global one."""

    name: ClassVar[str] = "fedavg"
    keeps_personal_state: ClassVar[bool] = False  # a personal part trained every round (FedPer, Ditto)
    fine_tunes: ClassVar[bool] = False  # its personal model is one run of the personal recipe (DP-able as one)
    labelled: ClassVar[bool] = True  # False: personalizes from unlabelled scans (reported separately)
    selects_on_validation: ClassVar[bool] = False  # its personal model is chosen on the validation split

    def __init__(self, config: FederationConfig) -> None:
        self.config = config

    def shared_keys(self, keys: list[str]) -> list[str]:
        return list(keys)

    def local_start(self, global_state: State, personal: State | None) -> State:
        return global_state

    def _train_global(self, global_state: State, personal: State | None, trainer: LocalTrainer
                      ) -> tuple[Student, dict[str, float]]:
        model = student_from(self.local_start(global_state, personal))
        metrics = trainer.run(model, with_proximal(cross_entropy, model, self._shared(global_state),
                                                   self.config.proximal_mu))
        return model, metrics

    def _shared(self, state: State) -> State:
        return {k: state[k] for k in self.shared_keys(list(state))}

    def train_round(self, global_state: State, personal: State | None, trainer: LocalTrainer) -> RoundOutput:
        model, metrics = self._train_global(global_state, personal, trainer)
        state = model.state_dict()
        return RoundOutput({k: state[k] for k in self.shared_keys(list(state))}, personal, metrics)

    def personalize(self, global_state: State, personal: State | None, trainer: LocalTrainer) -> State:
        """The client's final model, from the global model the server chose and the client's personal state."""
        return global_state


class FedAvgFineTune(Method):
    """FedAvg, then each client fine-tunes the chosen global model with the personal recipe."""

    name = "fedavg-ft"
    selects_on_validation = True
    fine_tunes = True

    def personalize(self, global_state: State, personal: State | None, trainer: LocalTrainer) -> State:
        model = student_from(global_state)
        trainer.personalize(model)
        return model.state_dict()


class FedAvgCalibrate(Method):
    """FedAvg, then each client fits only an input calibration and the biases (a few dozen parameters),
    the personalization a phone's handful of scans can afford; it folds into the export's preprocessing."""

    name = "fedavg-cal"
    selects_on_validation = True

    def personalize(self, global_state: State, personal: State | None, trainer: LocalTrainer) -> State:
        model = Calibrated(student_from(global_state))
        _train_only(model, _calibration_and_biases)
        trainer.personalize(model, labelled=self.labelled, loss=None if self.labelled else information_maximization)
        return model.personal_state()


class FedAvgLabelFree(FedAvgCalibrate):
    """FedAvg, then the calibration and biases adapt to the client's scans without their labels
    (information maximization); for phones, whose scans rarely come with a diagnosis."""

    name = "label-free"
    labelled = False
    selects_on_validation = False  # no labels: it never looks at the validation split


class FedPer(Method):
    """Shared conv blocks; each client keeps its own classifier head (Arivazhagan et al. 2019)."""

    name = "fedper"
    keeps_personal_state = True

    @staticmethod
    def is_personal(key: str) -> bool:
        return key.startswith(Student.HEAD_PREFIX)

    def shared_keys(self, keys: list[str]) -> list[str]:
        return [k for k in keys if not self.is_personal(k)]

    def local_start(self, global_state: State, personal: State | None) -> State:
        # Only this method's personal keys: a stale or edited state file cannot replace shared weights.
        return {**global_state, **{k: v for k, v in (personal or {}).items() if self.is_personal(k)}}

    def train_round(self, global_state: State, personal: State | None, trainer: LocalTrainer) -> RoundOutput:
        model, metrics = self._train_global(global_state, personal, trainer)
        state = model.state_dict()
        own = {k: v for k, v in state.items() if self.is_personal(k)}
        return RoundOutput({k: state[k] for k in self.shared_keys(list(state))}, own, metrics)

    def personalize(self, global_state: State, personal: State | None, trainer: LocalTrainer) -> State:
        return self.local_start(global_state, personal)


class LGFedAvg(FedPer):
    """FedPer inverted (LG-FedAvg, Liang et al. 2020): each client keeps its 336 conv parameters, the
    feature extractor its scanner needs, and shares the 12,292-parameter head."""

    name = "lg-fedavg"

    @staticmethod
    def is_personal(key: str) -> bool:
        return not key.startswith(Student.HEAD_PREFIX)


class Ditto(Method):
    """Global model as FedAvg plus a personal model pulled toward it (Li et al. 2021), trained with its own
    plain SGD at ``ditto_lr``, as in the paper: under Adam the pull would be negligible next to the CE
    gradient (Adam rescales every step to the learning rate, whatever the gradient's size)."""

    name = "ditto"
    keeps_personal_state = True

    def train_round(self, global_state: State, personal: State | None, trainer: LocalTrainer) -> RoundOutput:
        model, metrics = self._train_global(global_state, personal, trainer)
        own = student_from(personal if personal is not None else global_state)
        spec = dataclasses.replace(trainer.spec, optimizer="sgd", momentum=0.0, lr=self.config.ditto_lr)
        personal_metrics = trainer.run(own, with_proximal(cross_entropy, own, global_state, self.config.ditto_lambda),
                                       spec, shared=False)
        metrics.update({f"personal-{k}": v for k, v in personal_metrics.items()})
        return RoundOutput(model.state_dict(), own.state_dict(), metrics)

    def personalize(self, global_state: State, personal: State | None, trainer: LocalTrainer) -> State:
        return personal if personal is not None else global_state


def start_preserving_norms(global_state: State, images: Tensor) -> NormStudent:
    """A NormStudent whose norms start as the identity *in training mode* on this client's scans.

    A freshly built BatchNorm normalizes by batch statistics at once, which would throw away what
    the start model knows; with gamma and beta set to each channel's own standard deviation and mean
    over the client's scans (and the same running statistics), the model first computes what the
    student computed, in both modes, and FedBN's local norms then adapt to the scanner.
    """
    model = NormStudent.from_student_state(global_state)
    convs = [model.get_submodule(name) for name in NormStudent.NORMED_CONVS]
    outputs: list[Tensor] = []
    hooks = [conv.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach())) for conv in convs]
    try:
        predict_logits(model, images, normalize)  # eval mode: the identity norms pass the student's signal
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        for index, norm in enumerate(model.norms):
            y = torch.cat(outputs[index::len(convs)])
            mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            norm.weight.copy_(torch.sqrt(var + norm.eps))
            norm.bias.copy_(mean)
    return model


class FedBN(Method):
    """FedBN (Li et al. 2021): a norm layer after each conv, kept on the client; the student's weights
    are shared. The client's model folds its norms into the convs: it exports as the plain student.
    A DP client trains the plain student (Opacus has no per-sample gradients through batch statistics)."""

    name = "fedbn"
    keeps_personal_state = True

    def train_round(self, global_state: State, personal: State | None, trainer: LocalTrainer) -> RoundOutput:
        if trainer.wrap is not None:
            return super().train_round(global_state, personal, trainer)
        model = start_preserving_norms(global_state, trainer.train.images)
        if personal is not None:  # its own norms from earlier rounds, over the new shared weights
            model.load_state_dict({**model.state_dict(), **_norms(personal)}, strict=True)
        metrics = trainer.run(model, with_proximal(cross_entropy, model, global_state, self.config.proximal_mu))
        state = model.state_dict()
        return RoundOutput({k: state[k] for k in global_state}, _norms(state), metrics)

    def personalize(self, global_state: State, personal: State | None, trainer: LocalTrainer) -> State:
        return global_state if personal is None else fold_norms({**global_state, **_norms(personal)})


def _norms(state: State) -> State:
    return {k: v for k, v in state.items() if k.startswith(NormStudent.NORM_PREFIX)}


METHODS: dict[str, type[Method]] = {m.name: m for m in (Method, FedAvgFineTune, FedAvgCalibrate, FedAvgLabelFree,
                                                        FedPer, LGFedAvg, Ditto, FedBN)}


def create_method(config: FederationConfig) -> Method:
    """The configured personalization method (names as in ``federation.method``)."""
    try:
        return METHODS[config.method](config)
    except KeyError:
        raise ValueError(f"unknown personalization method {config.method!r}; "
                         f"allowed: {', '.join(METHODS)}") from None


def local_only(start: State, trainer: LocalTrainer, rounds: int) -> State:
    """The no-federation baseline: the personal recipe from the same start, with the federation's local
    budget (rounds x local epochs) added to it, so it never trains less than a personalized model."""
    model = student_from(start)
    trainer.personalize(model, epochs=trainer.personal.epochs + rounds * trainer.spec.epochs)
    return model.state_dict()


def merge_shared(global_state: State, shared: State) -> State:
    """The server's full global state after aggregating only the shared keys."""
    return {**global_state, **{k: v.to(global_state[k].dtype) for k, v in shared.items()}}
