"""Server-side distillation: teacher, baseline student (CE), KD student (the paper's Eq. 1, or a better recipe).

The teacher runs once per image and view for distillation: its logits for every training image
(and every cached augmented view of it, ``kd.views``; and every image of an unlabeled transfer set,
``kd.transfer_root``) are computed once and cached, and the student trains on exactly the views the
teacher scored (consistent teaching). With the frozen ImageNet VGG16, its conv features are computed
once per image too, so training its Linear head costs one conv pass per image in total.
Checkpoints are selected on the validation split carved from Training, and each student's
calibration temperature is fitted on it; Testing is touched only for the final metrics
(``paper_compat`` selects on Testing, as the paper's code did, and marks every number as such).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from edgemri.core.config import Config, KDConfig, TrainSpec, from_dict
from edgemri.core.data.audit import audit_dataset
from edgemri.core.data.dataset import UNKNOWN_LABEL, ArraySplit, Dataset, load_unlabeled
from edgemri.core.data.images import CLASS_NAMES, HEAD_KEY, PREPROCESSING, DataError, normalize
from edgemri.core.data.splits import scenario_split, stratified_split
from edgemri.core.errors import EdgemriError
from edgemri.core.io import ArtefactError, load_npz, save_npz
from edgemri.core.progress import track
from edgemri.core.training.augment import ViewData, draw_views, view_logits
from edgemri.core.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    calibrated_probabilities,
    load_checkpoint,
    save_checkpoint,
)
from edgemri.core.training.evaluate import (
    classification_metrics,
    coverage_curve,
    ece_noise_floor,
    fit_temperature,
    predict_logits,
    refer_threshold,
    selective_accuracy,
)
from edgemri.core.training.losses import cross_entropy, make_kd_loss
from edgemri.core.training.shortcut import apply_head_step
from edgemri.core.training.train import Checkpointing, FitResult, TrainData, as_float, check_same_settings, fit
from edgemri.models import Teacher, WeightsUnavailableError, build_model, model_spec

log = logging.getLogger(__name__)

REFER_COVERAGE = 0.9  # the coverage whose validation threshold each student records (``predict --refer-below``)


class TeacherUnavailableError(EdgemriError):
    """The teacher's pretrained weights are neither cached nor downloadable (models' error, for the CLI)."""


def build_teacher(name: str, options: dict[str, Any]) -> nn.Module:
    """The registered teacher; missing pretrained weights become a one-line EdgemriError."""
    try:
        return build_model(name, **options)
    except WeightsUnavailableError as err:
        raise TeacherUnavailableError(" ".join(line.strip() for line in str(err).splitlines())) from None


def resume_settings(config: dict[str, Any], distill: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a finished stage depends on: the data split (with the scenario) and the distillation settings
    (``distill``: the part of them one stage depends on, ``stage_settings``; by default all of them).

    Paths (data.root, cache_dir) may move; of the federation's settings only the scenario touches distillation.
    """
    data = {k: v for k, v in config.get("data", {}).items() if k not in ("root", "cache_dir")}
    federation = config.get("federation", {})
    # Checkpoints from before scenarios existed were seen-sites; source_sites matters only under new-sites.
    split = {"scenario": federation.get("scenario", "seen-sites")}
    if split["scenario"] == "new-sites":
        split["source_sites"] = federation.get("source_sites")
        # Data without site metadata is clustered into this many appearance sites before the split.
        split["pseudo_sites"] = federation.get("partition", {}).get("pseudo_sites")
    return {"data": data, "distill": config.get("distill") if distill is None else distill, "federation": split}


def stage_settings(distill: dict[str, Any], stage: str, recipe: dict[str, Any] | None) -> dict[str, Any]:
    """The distillation settings one stage depends on: a teacher its own, the baseline its own, a KD student the
    teacher's and its ``recipe``; so a run that adds compared students (or changes one recipe) keeps the rest."""
    common = {"paper_compat": distill.get("paper_compat", False)}
    if stage == "teacher":
        return {**common, "teacher": distill.get("teacher")}
    common["calibrate"] = distill.get("calibrate", False)  # stages saved before calibration existed: uncalibrated
    if stage == "baseline":
        return {**common, "baseline": distill.get("baseline")}
    return {**common, "teacher": distill.get("teacher"), "kd": recipe}


@dataclass
class StageResult:
    """One trained model of one seed: its checkpoint, curves and test metrics."""

    name: str
    checkpoint: Path
    history: list[dict[str, Any]]
    best_epoch: int
    test: dict[str, Any]
    train_seconds: float
    images_seen: int
    teacher_passes: int = 0  # KD students: the teacher's passes over the images and views it taught on
    transfer_images: int = 0  # KD students: unlabeled images only the teacher labelled
    wall_seconds: float = 0.0  # the whole stage: training, the teacher's view scoring, evaluation, saving
    # Students: calibrated class probabilities per primary Testing image (the report's example scans).
    test_probabilities: Tensor | None = None


@dataclass
class SeedResult:
    seed: int
    stages: dict[str, StageResult]
    teacher_forward_images: int  # teacher passes made for distillation (each image and view once, shared by recipes)
    teacher_conv_passes: int  # frozen-body passes (vgg16-imagenet), 0 when trained end to end
    train_images: int  # the Training split less validation: what the students learn from
    test_indices: Tensor  # the primary Testing images in dataset.test (all of it unless data.dedup leaves some out)
    wall_seconds: float = 0.0  # every stage of the seed, start to end


class ForwardCounter:
    """Counts images passed through a module's forward (the teacher-once guarantee)."""

    def __init__(self, module: nn.Module) -> None:
        self.images = 0
        self._handle = module.register_forward_hook(self._count)

    def _count(self, _module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
        self.images += len(inputs[0])

    def close(self) -> int:
        self._handle.remove()
        return self.images


@torch.no_grad()
def conv_features(teacher: Teacher, images: Tensor, batch_size: int = 32, progress: bool = False) -> Tensor:
    """Frozen conv body output for every image, once, stored as float16."""
    teacher.eval()
    chunks = [
        teacher.features(normalize(images[i : i + batch_size])).half()
        for i in track(range(0, len(images), batch_size), "teacher conv features", enabled=progress, unit="batches")
    ]
    return torch.cat(chunks)


class Distiller:
    """Runs the three stages for one seed inside ``seed_dir``; resumable per epoch."""

    def __init__(self, config: Config, dataset: Dataset, seed: int, seed_dir: Path,
                 *, resume: bool, progress: bool) -> None:
        self.config = config
        self.seed = seed
        self.dir = seed_dir
        self.resume = resume
        self.progress = progress
        self.paper_compat = config.distill.paper_compat
        # The server's share of Training (the clients' share is for the federation), fixed
        # across seeds; then a validation split of it per seed.
        server, _ = scenario_split(dataset.train, config, progress=progress)
        # data.dedup: copies of one scan stay on one side of train/validation, and Testing's copies of Training
        # scans leave the primary test metrics (the full Testing ones are kept beside them: the paper's protocol).
        audit = audit_dataset(dataset, config.data.cache_dir, progress) if config.data.dedup else None
        groups = None if audit is None else [audit.train_groups()[i] for i in server.tolist()]
        train_part, val_part = stratified_split(dataset.train.labels[server], config.data.val_fraction, seed, groups)
        self.train_idx, self.val_idx = server[train_part], server[val_part]
        # The head step (data.head) after the audit, which hashes the scans as they were decoded.
        self.dataset = with_head_step(dataset, config.data.head)
        self.preprocessing = {**PREPROCESSING, **({HEAD_KEY: config.data.head} if config.data.head != "none" else {})}
        self.train_split: ArraySplit = self.dataset.train.subset(self.train_idx)
        self.val_split: ArraySplit = self.dataset.train.subset(self.val_idx)
        missing = [name for name, count in self.train_split.class_counts().items() if count == 0]
        if missing:
            raise DataError(f"the server's share of Training has no {', '.join(missing)} image under "
                            f"federation.scenario {config.federation.scenario!r}; a student cannot learn a class it "
                            f"never sees (use federation.scenario seen-sites, or data with every class at the "
                            f"source sites)")
        kept = range(len(dataset.test)) if audit is None else audit.kept_test()
        self.test_keep = torch.tensor(kept, dtype=torch.long)
        self.test_split: ArraySplit = self.dataset.test.subset(self.test_keep)
        # paper_compat reproduces the paper code's selection on the Testing split.
        self.select_split = self.dataset.test if self.paper_compat else self.val_split
        self.selected_on = "Testing (paper-compat)" if self.paper_compat else "validation"

    # -- shared helpers ---------------------------------------------------------

    def _checkpoint(self, name: str, model_name: str, model: nn.Module, options: dict[str, Any],
                    fit_result: FitResult | None, done: Checkpoint | None, test: dict[str, Any],
                    temperature: float = 1.0, calibration: dict[str, Any] | None = None) -> Path:
        """The stage's model with its curves (kept from ``done`` when it was loaded, not trained)."""
        path = self.dir / f"{name}.pt"
        history, best_epoch = _curves(fit_result, done)
        save_checkpoint(path, Checkpoint(
            model=model_name, state_dict=model.state_dict(), model_options=options, role=name,
            preprocessing=dict(self.preprocessing),
            config=self.config.to_dict(), seed=self.seed, data_fingerprint=self.dataset.fingerprint,
            metrics={"test": _scalar_metrics(test), "selected_on": self.selected_on,
                     "best_epoch": best_epoch, "paper_compat": self.paper_compat, **(calibration or {})},
            history=history, temperature=temperature,
        ))
        return path

    def _fit(self, name: str, model: nn.Module, train: TrainData, select: TrainData, loss: Callable,
             spec: TrainSpec, saved_as: tuple[str, dict[str, Any], nn.Module | None]) -> FitResult:
        """``saved_as``: the registered model the resume state holds (name, options, module or None)."""
        model_name, options, module = saved_as
        checkpointing = Checkpointing(self.dir / f"{name}.state.pt", model_name, options, module, self.resume)
        return fit(
            model, train, loss=loss, spec=spec, seed=self.seed, val=select, select="val",
            selected_on=self.selected_on, checkpointing=checkpointing, progress=self.progress, desc=name,
        )

    def _done(self, name: str, model_name: str, recipe: KDConfig | None = None) -> Checkpoint | None:
        """A stage finished by an earlier, interrupted run (only with --resume) with this run's settings."""
        path = self.dir / f"{name}.pt"
        if not (self.resume and path.is_file()):
            return None
        try:
            done = load_checkpoint(path)
        except CheckpointError:
            return None  # a stage checkpoint that did not finish writing: redo the stage
        saved_config = _with_defaults(done.config)
        saved_distill = saved_config.get("distill", {})
        # A KD stage records its recipe; one saved before recipes were recorded was the config's kd.
        saved_recipe = done.metrics.get("recipe", saved_distill.get("kd") if name == "kd" else None)
        check_same_settings(
            path,
            {"model": done.model, "seed": done.seed, "data": done.data_fingerprint,
             **resume_settings(saved_config, stage_settings(saved_distill, name, saved_recipe))},
            {"model": model_name, "seed": self.seed, "data": self.dataset.fingerprint,
             **resume_settings(self.config.to_dict(), stage_settings(
                 self.config.to_dict()["distill"], name, None if recipe is None else dataclasses.asdict(recipe)))},
        )
        return done

    # -- stages -----------------------------------------------------------------

    def teacher(self) -> tuple[StageResult, nn.Module, Tensor, int, int]:
        """Train (or load) the teacher; return it with its cached train-set logits and its passes so far."""
        cfg = self.config.distill.teacher
        torch.manual_seed(self.seed)
        done = None
        if cfg.checkpoint:
            loaded = load_checkpoint(cfg.checkpoint)
            if model_spec(loaded.model).role != "teacher":
                raise CheckpointError(f"{cfg.checkpoint} holds a {loaded.model!r}, not a teacher model")
            model_name, options, model = loaded.model, loaded.model_options, loaded.build()
        else:
            model_name = cfg.name
            options = cfg.model_options()
            model = build_teacher(model_name, options)
            done = self._done("teacher", model_name)
            if done is not None:
                model.load_state_dict(done.state_dict)
        train = not cfg.checkpoint and done is None
        if model_name == "vgg16-imagenet":
            logits_train, test_logits, conv_passes, fit_result = self._frozen_teacher(model, train)
            forward_images = len(logits_train)  # head passes over cached features
            options = {"pretrained": False}  # the checkpoint itself carries the weights
        else:
            fit_result = (self._fit("teacher", model, self._teacher_data(), TrainData.from_split(self.select_split),
                                    cross_entropy, cfg.train, (model_name, options, None))
                          if train else None)
            counter = ForwardCounter(model)
            logits_train = predict_logits(model, self.train_split.images, normalize)
            forward_images, conv_passes = counter.close(), 0
            test_logits = predict_logits(model, self.dataset.test.images, normalize)
        test = self._test_metrics(test_logits)
        path = self._checkpoint("teacher", model_name, model, options, fit_result, done, test)
        return (_stage("teacher", path, fit_result, test, done), model.eval(), logits_train, forward_images,
                conv_passes)

    def _teacher_data(self) -> TrainData:
        """The teacher's training rows: the images, or each epoch one of their seeded views (``teacher.views``)."""
        cfg = self.config.distill.teacher
        if cfg.views == 0:
            return TrainData.from_split(self.train_split)
        views = draw_views(len(self.train_split), cfg.views, cfg.augment, self.seed)
        return ViewData(self.train_split.images, self.train_split.labels, view_params=views)

    def _test_metrics(self, logits: Tensor, temperature: float = 1.0) -> dict[str, Any]:
        """Metrics on the primary Testing images (deduplicated under ``data.dedup``) from logits of all of Testing,
        with the full Testing's accuracy and per-image correctness beside them when the two differ."""
        labels = self.dataset.test.labels
        test = classification_metrics(logits[self.test_keep] / temperature, labels[self.test_keep], CLASS_NAMES)
        test["testing_images"] = len(self.test_keep)
        if len(self.test_keep) < len(labels):
            correct = logits.argmax(1) == labels
            test.update({"full_testing_accuracy": float(correct.float().mean()), "full_testing_images": len(labels),
                         "full_testing_correct": correct.int().tolist()})
        return test

    def _frozen_teacher(self, model: Teacher, train_head: bool) -> tuple[Tensor, Tensor, int, FitResult | None]:
        """The paper's teacher: conv features once per image, then the Linear head on them."""
        counter = ForwardCounter(model.features)
        all_images = torch.cat([self.dataset.train.images, self.dataset.test.images])
        all_features = conv_features(model, all_images, progress=self.progress)
        conv_passes = counter.close()
        features_train, features_test = all_features[: len(self.dataset.train)], all_features[len(self.dataset.train):]
        head = nn.Sequential(model.avgpool, nn.Flatten(), model.classifier)
        train = TrainData(features_train[self.train_idx], self.train_split.labels, transform=as_float)
        select = (TrainData(features_test, self.dataset.test.labels, transform=as_float) if self.paper_compat
                  else TrainData(features_train[self.val_idx], self.val_split.labels, transform=as_float))
        # The resume state holds the whole teacher (its head's parameters are the trained ones).
        fit_result = (self._fit("teacher", head, train, select, cross_entropy, self.config.distill.teacher.train,
                                ("vgg16-imagenet", {"pretrained": False}, model))
                      if train_head else None)
        return predict_logits(head, train.inputs, as_float), predict_logits(head, features_test, as_float), \
            conv_passes, fit_result

    def transfer_set(self, kd: KDConfig) -> ArraySplit | None:
        """The recipe's unlabeled images, less those of sites the server must not see (the clients' new sites)."""
        if kd.transfer_root is None:
            return None
        root = Path(kd.transfer_root)
        if not root.is_absolute():
            root = self.dataset.root / root
        sites = self.dataset.train.sites
        server = set(self.train_idx.tolist()) | set(self.val_idx.tolist())
        client_sites = ({sites[i] for i in range(len(sites)) if i not in server}
                        - {sites[i] for i in server}) if sites else set()
        try:
            transfer = load_unlabeled(root, self.config.data.cache_dir, exclude_sites=client_sites,
                                      progress=self.progress)
            return dataclasses.replace(transfer, images=apply_head_step(transfer.images, self.config.data.head))
        except DataError as err:  # name the setting: on data without a transfer folder it is the fix
            raise DataError(f"distill.kd.transfer_root {kd.transfer_root!r}: {err}; point it at a folder of "
                            f"unlabeled images or set it to null") from None

    def teaching(self, kd: KDConfig, teacher: nn.Module, teacher_logits: Tensor,
                 cache: dict[Any, Tensor]) -> tuple[TrainData, int, int, int]:
        """The KD student's training data (train images, then transfer images, each with its cached views and
        the teacher's logits for exactly those views), the teacher passes it needs (as if alone), those made
        now, and the transfer set's size.

        ``cache`` holds the teacher's view logits of earlier recipes of this seed: a recipe with the same
        views of the same images reuses them, so every (image, view) is scored once per seed.
        """
        transfer = self.transfer_set(kd)
        if kd.views == 0 and transfer is None:  # the paper's recipe: each image once, the teacher's cached logits
            return TrainData.from_split(self.train_split, extras=(teacher_logits,)), len(teacher_logits), 0, 0
        images, labels = self.train_split.images, self.train_split.labels
        if transfer is not None:
            images = torch.cat([images, transfer.images])
            labels = torch.cat([labels, torch.full((len(transfer),), UNKNOWN_LABEL, dtype=labels.dtype)])
        views = draw_views(len(images), max(kd.views, 1), kd.augment, self.seed)
        key = (kd.views, kd.augment, kd.transfer_root)
        made = 0
        if key not in cache:
            # On disk too, keyed by the teacher's weights, the images and the views: a resumed run reuses them.
            digest = hashlib.sha256(repr((self.seed, kd.views, kd.augment, len(images))).encode())
            for tensor in [*teacher.state_dict().values(), images, teacher_logits]:
                digest.update(tensor.detach().contiguous().numpy().tobytes())
            path = self.dir / f"teacher-views-{digest.hexdigest()[:16]}.npz"
            cache[key] = _read_view_logits(path, (len(images), views.shape[1], teacher_logits.shape[1]))
            if cache[key] is None:
                # View 0 is the image itself: the train images' teacher logits are the ones already cached.
                counter = ForwardCounter(teacher)
                cache[key] = view_logits(teacher, images, views, normalize, known=teacher_logits,
                                         progress=self.progress)
                made = counter.close()
                save_npz(path, {"logits": cache[key].numpy()})
        data = ViewData(images, labels, extras=(cache[key],), view_params=views)
        return data, len(images) * max(kd.views, 1), made, 0 if transfer is None else len(transfer)

    def _calibrated(self, model: nn.Module, name: str) -> tuple[dict[str, Any], float, dict[str, Any], Tensor]:
        """Testing metrics of a student after temperature scaling on validation (when ``distill.calibrate``), with
        the uncalibrated ECE and NLL beside them, the validation threshold that refers 1 - REFER_COVERAGE, and the
        calibrated probabilities of the primary Testing images."""
        val_logits = predict_logits(model, self.val_split.images, normalize)
        temperature = fit_temperature(val_logits, self.val_split.labels) if self.config.distill.calibrate else 1.0
        all_logits = predict_logits(model, self.dataset.test.images, normalize)
        test_logits, labels = all_logits[self.test_keep], self.test_split.labels
        raw = classification_metrics(test_logits, labels, CLASS_NAMES)
        test = self._test_metrics(all_logits, temperature)
        probs = calibrated_probabilities(test_logits, temperature)
        threshold = refer_threshold(calibrated_probabilities(val_logits, temperature), REFER_COVERAGE)
        coverage, accepted = selective_accuracy(probs, labels, threshold)
        test.update({
            "temperature": temperature, "ece_uncalibrated": raw["ece"], "nll_uncalibrated": raw["nll"],
            "ece_noise_floor": ece_noise_floor(probs),
            "reliability_uncalibrated": raw["reliability"],
            # At exactly REFER_COVERAGE of Testing (an oracle threshold) and at the one chosen on validation.
            "accuracy_at_90_coverage": selective_accuracy(probs, labels, refer_threshold(probs, REFER_COVERAGE))[1],
            "refer_threshold": threshold, "refer_coverage": coverage, "refer_accuracy": accepted,
            "coverage_curve": coverage_curve(probs, labels),
            # Per Testing image, for paired comparisons between students on the same images.
            "correct": (test_logits.argmax(1) == labels).int().tolist(),
        })
        log.info("%s: calibration temperature %.3f (ECE %.3f -> %.3f)", name, temperature, raw["ece"], test["ece"])
        calibration = {"calibration": {"temperature": temperature, "fitted_on": "validation" if
                                       self.config.distill.calibrate else "none",
                                       "refer_below": {"coverage": REFER_COVERAGE, "threshold": threshold}}}
        return test, temperature, calibration, probs

    def student(self, name: str, kd: KDConfig | None = None, teaching: TrainData | None = None) -> StageResult:
        """Baseline (CE, ``kd`` None) or a KD student taught on ``teaching``, from the same seeded initialization."""
        distill = self.config.distill
        torch.manual_seed(self.seed)
        model = build_model("student")
        done = self._done(name, "student", kd)
        fit_result = None
        if done is not None:
            model.load_state_dict(done.state_dict)
        elif kd is None:
            fit_result = self._fit(name, model, TrainData.from_split(self.train_split),
                                   TrainData.from_split(self.select_split), cross_entropy, distill.baseline,
                                   ("student", {}, None))
        else:
            assert teaching is not None
            loss = make_kd_loss(kd.temperature, kd.alpha, "mean" if self.paper_compat else "batchmean")
            fit_result = self._fit(name, model, teaching, TrainData.from_split(self.select_split), loss, kd.train,
                                   ("student", {}, None))
        test, temperature, calibration, probabilities = self._calibrated(model, name)
        if kd is not None:
            calibration["recipe"] = dataclasses.asdict(kd)
        path = self._checkpoint(name, "student", model, {}, fit_result, done, test, temperature, calibration)
        return dataclasses.replace(_stage(name, path, fit_result, test, done), test_probabilities=probabilities)

    def preflight(self) -> None:
        """Find config and data errors before the first epoch: the teacher's weights or checkpoint, and every
        recipe's transfer set (decoded and cached now, so training reads it from the cache)."""
        cfg = self.config.distill.teacher
        if cfg.checkpoint:
            load_checkpoint(cfg.checkpoint)
        else:
            build_teacher(cfg.name, cfg.model_options())
        for kd in self.config.distill.kd_recipes().values():
            self.transfer_set(kd)

    def run(self) -> SeedResult:
        self.dir.mkdir(parents=True, exist_ok=True)
        started = clock = time.perf_counter()

        def lap() -> float:
            nonlocal clock
            clock, before = time.perf_counter(), clock
            return clock - before

        teacher, teacher_model, teacher_logits, forward_images, conv_passes = self.teacher()
        teacher.wall_seconds = lap()
        stages = {"teacher": teacher, "baseline": self.student("baseline")}
        stages["baseline"].wall_seconds = lap()
        cache: dict[Any, Tensor] = {}
        for name, kd in self.config.distill.kd_recipes().items():
            teaching, passes, made, transfer = self.teaching(kd, teacher_model, teacher_logits, cache)
            forward_images += made
            stage = self.student(name, kd, teaching)
            stage.teacher_passes, stage.transfer_images, stage.wall_seconds = passes, transfer, lap()
            stages[name] = stage
        return SeedResult(self.seed, stages, teacher_forward_images=forward_images,
                          teacher_conv_passes=conv_passes, train_images=len(self.train_split),
                          test_indices=self.test_keep,
                          wall_seconds=time.perf_counter() - started)


def with_head_step(dataset: Dataset, step: str) -> Dataset:
    """Both splits after the head step ``step`` (data.head); the dataset itself when there is none."""
    if step == "none":
        return dataset
    return dataclasses.replace(dataset, **{split: dataclasses.replace(
        getattr(dataset, split), images=apply_head_step(getattr(dataset, split).images, step))
        for split in ("train", "test")})


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the defaults of settings added since (so they compare equal), if it still parses."""
    try:
        return from_dict(Config, config).to_dict()
    except EdgemriError:
        return config


def _read_view_logits(path: Path, shape: tuple[int, int, int]) -> Tensor | None:
    """Cached teacher view logits, if the file is whole and holds finite logits of this shape (else None: recompute)."""
    if not path.is_file():
        return None
    try:
        logits = torch.from_numpy(load_npz(path)["logits"].astype(np.float32))
    except (ArtefactError, KeyError, ValueError):
        return None
    return logits if tuple(logits.shape) == shape and bool(torch.isfinite(logits).all()) else None


def _curves(fit_result: FitResult | None, done: Checkpoint | None) -> tuple[list[dict[str, Any]], int]:
    """A stage's epoch history and best epoch: trained now, or kept in the checkpoint an earlier run saved."""
    if fit_result is not None:
        return fit_result.history_dicts(), fit_result.best_epoch
    if done is not None:
        best = done.metrics.get("best_epoch")
        return done.history, best if isinstance(best, int) else 0
    return [], 0


def _stage(name: str, path: Path, fit_result: FitResult | None, test: dict[str, Any],
           done: Checkpoint | None) -> StageResult:
    history, best_epoch = _curves(fit_result, done)
    seconds, images = (fit_result.train_seconds, fit_result.images_seen) if fit_result else (0.0, 0)
    return StageResult(name, path, history, best_epoch, test, seconds, images)


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint keeps of the test metrics: the numbers and per-class recalls, not per-image lists."""
    return {k: v for k, v in metrics.items() if not isinstance(v, list)}


def run_distillation(config: Config, dataset: Dataset, out: Path, *, seeds: int = 1,
                     resume: bool = False, progress: bool = False) -> tuple[list[SeedResult], float]:
    """Train every stage for ``seeds`` consecutive seeds starting at ``config.seed``."""
    started = time.perf_counter()
    # Every seed's split (and the duplicate audit) and the preflight checks run before any training starts.
    distillers = [Distiller(config, dataset, config.seed + k, out / f"seed-{config.seed + k}", resume=resume,
                            progress=progress) for k in range(seeds)]
    distillers[0].preflight()
    results = []
    for k, distiller in enumerate(distillers):
        log.info("distillation seed %d (%d/%d)", distiller.seed, k + 1, seeds)
        results.append(distiller.run())
    return results, time.perf_counter() - started
