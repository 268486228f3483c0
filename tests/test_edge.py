"""On-device export and prediction: parity, int8 accuracy, every image kind, the commands."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import make_kaggle_folder, one_error_line
from PIL import Image

from edgemri.core.config import TrainSpec
from edgemri.core.data.dataset import Dataset, load_dataset
from edgemri.core.data.images import CLASS_NAMES, PREPROCESSING, load_image_uint8, normalize
from edgemri.core.errors import EdgemriError
from edgemri.core.training.checkpoint import FORMAT, Checkpoint, save_checkpoint
from edgemri.core.training.train import TrainData, fit
from edgemri.edge.contract import METADATA_FILE
from edgemri.edge.errors import INSTALL_HINT, EdgeDependencyError, EdgeError
from edgemri.edge.int8 import export_onnx_int8
from edgemri.edge.onnx import export_onnx
from edgemri.edge.predict import predict_paths
from edgemri.edge.runtime import load_model, onnx_session, run_onnx
from edgemri.edge.torchscript import export_torchscript, load_torchscript
from edgemri.main import build_parser, main
from edgemri.models import Student, build_model

GLIOMA, MENINGIOMA = CLASS_NAMES.index("glioma"), CLASS_NAMES.index("meningioma")
TEMPERATURE = 4.0  # far enough from 1 that the trained student's probabilities visibly soften


@dataclass
class Trained:
    root: Path
    path: Path
    checkpoint: Checkpoint
    model: Student
    data: Dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A student that really learns the blob classes (a few seconds), with 100 test images per class."""
    root = tmp_path_factory.mktemp("edge")
    data = load_dataset(make_kaggle_folder(root / "data", {"Training": 40, "Testing": 100}), workers=1)
    torch.manual_seed(0)
    model = Student()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this tiny net trains 4x faster on one thread than on two busy ones
    try:
        fit(model, TrainData.from_split(data.train), loss=lambda logits, batch: F.cross_entropy(logits, batch.labels),
            spec=TrainSpec(epochs=6, batch_size=16, lr=3e-3), seed=0, select="last")
    finally:
        torch.set_num_threads(threads)
    checkpoint = Checkpoint(model="student", state_dict=model.state_dict(), role="kd", seed=7,
                            data_fingerprint=data.fingerprint)
    save_checkpoint(root / "student.pt", checkpoint)
    return Trained(root, root / "student.pt", checkpoint, model.eval(), data)


@pytest.fixture(scope="module")
def exported(trained: Trained) -> dict[str, Path]:
    return {
        "onnx": export_onnx(trained.checkpoint, trained.root / "student.onnx"),
        "torchscript": export_torchscript(trained.checkpoint, trained.root / "student.torchscript.pt"),
    }


def run_command(*argv: str) -> int:
    """Run an `edgemri` subcommand's function through the real parser (exceptions propagate)."""
    args = build_parser().parse_args(list(argv))
    return args.func(args)


# ---------------------------------------------------------------- export


def test_exported_logits_equal_pytorch(trained: Trained, exported: dict[str, Path]) -> None:
    batch = normalize(trained.data.test.images[:48])
    with torch.no_grad():
        expected = trained.model(batch)
    onnx_logits = torch.from_numpy(run_onnx(onnx_session(exported["onnx"]), batch))
    scripted, _ = load_torchscript(exported["torchscript"])
    with torch.no_grad():
        script_logits = scripted(batch)
    assert expected.abs().max() > 1  # real logits, not a degenerate all-zero model
    assert (onnx_logits - expected).abs().max() <= 1e-4
    assert (script_logits - expected).abs().max() <= 1e-4
    # The batch axis is dynamic: one image gives the same logits as inside the batch.
    single = torch.from_numpy(run_onnx(onnx_session(exported["onnx"]), batch[:1]))
    assert (single - expected[:1]).abs().max() <= 1e-4


def test_exported_files_carry_metadata(trained: Trained, exported: dict[str, Path]) -> None:
    model = onnx.load(str(exported["onnx"]))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["class_names"]) == list(CLASS_NAMES)
    assert json.loads(props["preprocessing"]) == PREPROCESSING
    assert (props["source_role"], props["source_seed"]) == ("kd", "7")
    assert props["source_data_fingerprint"] == trained.data.fingerprint
    assert model.opset_import[0].version >= 17
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    _, meta = load_torchscript(exported["torchscript"])
    assert meta["class_names"] == list(CLASS_NAMES) and meta["preprocessing"] == PREPROCESSING
    assert meta["source_data_fingerprint"] == trained.data.fingerprint


def test_int8_accuracy_stays_within_one_point(trained: Trained, exported: dict[str, Path]) -> None:
    data = trained.data
    calibrated = dataclasses.replace(trained.checkpoint, temperature=TEMPERATURE)  # the same weights
    result = export_onnx_int8(calibrated, trained.root / "student.int8.onnx",
                              data.train.images, data.test.images, data.test.labels)
    assert result.fp32_accuracy >= 0.9  # the model is good, so the comparison means something
    assert result.test_images == 400 and result.calibration_images == len(data.train) == 160
    assert abs(result.int8_accuracy - result.fp32_accuracy) <= 0.01
    model = onnx.load(str(result.path))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really quantized, QDQ format
    quantization = json.loads({p.key: p.value for p in model.metadata_props}["quantization"])
    assert quantization["test_accuracy_int8"] == result.int8_accuracy
    assert result.path.stat().st_size < exported["onnx"].stat().st_size
    assert load_model(result.path).temperature == TEMPERATURE  # calibration is recorded, never quantized


def test_int8_refuses_data_with_other_classes(trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A 2-class model calibrated and scored on 4-class data printed "fp32 25.00 % -> int8 25.00 %", no warning."""
    two_class = Checkpoint(model="student", state_dict=Student(num_classes=2).state_dict(),
                           model_options={"num_classes": 2}, class_names=["glioma", "notumor"])
    path = save_checkpoint(tmp_path / "two-class.pt", two_class)
    out = tmp_path / "two-class.int8.onnx"
    assert main(["export", str(path), "--int8", "--data-root", str(trained.root / "data"), "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert "the model's classes [glioma, notumor] are not the data's class folders " \
           "[glioma, meningioma, notumor, pituitary]" in line, line
    data = trained.data
    reordered = dataclasses.replace(trained.checkpoint, class_names=list(reversed(CLASS_NAMES)))
    with pytest.raises(EdgeError, match=r"classes \[pituitary, notumor, meningioma, glioma\] are not"):
        export_onnx_int8(reordered, out, data.train.images, data.test.images, data.test.labels)
    assert not out.exists()


def test_onnx_export_without_onnx_says_how_to_install(trained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    with pytest.raises(EdgeDependencyError, match=INSTALL_HINT.replace("[", r"\[").replace("]", r"\]")):
        export_onnx(trained.checkpoint, trained.root / "never.onnx")
    assert not (trained.root / "never.onnx").exists()
    # TorchScript needs only torch.
    assert export_torchscript(trained.checkpoint, trained.root / "no-onnx.pt").stat().st_size > 0


def test_export_command_refuses_bad_requests(trained: Trained, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "student.pt"
    source.write_bytes(trained.path.read_bytes())
    assert run_command("export", str(source)) == 0
    assert (tmp_path / "student.onnx").is_file() and "opset 17" in capsys.readouterr().out
    with pytest.raises(EdgeError, match="--overwrite"):
        run_command("export", str(source))
    with pytest.raises(EdgeError, match="is a folder"):
        run_command("export", str(source), "--out", str(tmp_path), "--overwrite")
    assert run_command("export", str(source), "--overwrite") == 0
    with pytest.raises(EdgeError, match="--format onnx"):
        run_command("export", str(source), "--format", "torchscript", "--int8")
    with pytest.raises(EdgeError, match="--data-root"):
        run_command("export", str(source), "--int8", "--out", str(tmp_path / "x.onnx"))
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, Checkpoint(model="vgg16-slim", state_dict=build_model("vgg16-slim").state_dict()))
    with pytest.raises(EdgemriError, match="only the student"):
        run_command("export", str(teacher))


# ---------------------------------------------------------------- the paper's state dict


PAPER_KEYS = [f"conv_block_{b}.{i}.{p}" for b in (1, 2) for i in (0, 2) for p in ("weight", "bias")] + [
    "classifier.1.weight", "classifier.1.bias"]


def test_paper_state_dict_exports_and_predicts(trained: Trained, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    weights = trained.model.state_dict()
    paper = {key: weights[key].clone() for key in PAPER_KEYS}  # the published layout, nothing else
    assert len(paper) == 10
    path = tmp_path / "paper_student.pt"
    torch.save(paper, path)
    files = [trained.data.root / "Testing" / name / f"Te-{name[:2]}_0000.jpg" for name in CLASS_NAMES]

    assert run_command("export", str(path), "--out", str(tmp_path / "paper.onnx")) == 0
    assert run_command("export", str(path), "--format", "torchscript") == 0
    capsys.readouterr()
    lines = {}
    for model in (path, tmp_path / "paper.onnx", tmp_path / "paper_student.torchscript.pt"):
        assert run_command("predict", str(model), *map(str, files)) == 0
        lines[model.name] = [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()]
    assert lines["paper_student.pt"] == list(CLASS_NAMES)  # right on one image of each class
    assert lines["paper.onnx"] == lines["paper_student.torchscript.pt"] == lines["paper_student.pt"]


# ---------------------------------------------------------------- predict


def _upright(trained: Trained) -> Image.Image:
    """A test image of the glioma class: its blob sits top-left."""
    return Image.open(trained.data.root / "Testing" / "glioma" / "Te-gl_0003.jpg").convert("L")


def _image_kinds(trained: Trained, folder: Path) -> dict[str, Path]:
    gray = _upright(trained)
    rgb = gray.convert("RGB")
    kinds = {
        "rgb.jpg": (rgb, {"quality": 95}),
        "rgb.png": (rgb, {}),
        "gray.png": (gray, {}),
        "rgba.png": (rgb.convert("RGBA"), {}),
        "palette.png": (rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256), {}),
        "cmyk.jpg": (rgb.convert("CMYK"), {"quality": 95}),
        "deep16.png": (Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257), {}),
        "large.jpg": (rgb.resize((4000, 3000), Image.Resampling.BILINEAR), {"quality": 90}),
    }
    paths = {}
    for name, (image, options) in kinds.items():
        paths[name] = folder / name
        image.save(paths[name], **options)
    assert Image.open(paths["deep16.png"]).mode == "I;16" and Image.open(paths["palette.png"]).mode == "P"
    assert Image.open(paths["cmyk.jpg"]).mode == "CMYK"
    return paths


@pytest.mark.parametrize("kind", ["checkpoint", "onnx", "torchscript"])
def test_every_image_kind_is_predicted(trained: Trained, exported: dict[str, Path], tmp_path: Path,
                                       kind: str) -> None:
    paths = _image_kinds(trained, tmp_path)
    model = load_model(trained.path if kind == "checkpoint" else exported[kind])
    assert model.kind == kind and model.class_names == list(CLASS_NAMES)
    results = predict_paths(model, [tmp_path], top_k=3, batch_size=3)  # several batches, one partial
    assert sorted(Path(r.file).name for r in results) == sorted(paths)
    for r in results:
        assert r.ok and r.label == "glioma", (r.file, r.label, r.error)
        assert [name for name, _ in r.top_k][0] == r.label and len(r.top_k) == 3
        probabilities = [p for _, p in r.top_k]
        assert probabilities == sorted(probabilities, reverse=True) and 0.5 < r.probability <= 1


def test_exif_orientation_is_applied_before_predicting(trained: Trained, tmp_path: Path) -> None:
    upright = _upright(trained).convert("RGB")
    upright.save(tmp_path / "upright.jpg", quality=95)
    # Stored turned 90 degrees clockwise: the glioma blob sits where meningioma's does;
    # orientation 8 tells viewers (and open_image) to turn it back.
    stored = upright.transpose(Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = 8
    stored.save(tmp_path / "tagged.jpg", quality=95, exif=exif)
    stored.save(tmp_path / "untagged.jpg", quality=95)
    model = load_model(trained.path)
    labels = {Path(r.file).name: r.label for r in predict_paths(model, [tmp_path])}
    assert labels == {"upright.jpg": "glioma", "tagged.jpg": "glioma", "untagged.jpg": "meningioma"}
    tagged = load_image_uint8(tmp_path / "tagged.jpg").astype(float)
    assert np.abs(tagged - load_image_uint8(tmp_path / "upright.jpg")).mean() < 2  # same pixels, JPEG noise aside


def test_small_images_below_the_training_minimum_are_reported(trained: Trained, tmp_path: Path) -> None:
    gray = _upright(trained)
    gray.resize((16, 16), Image.Resampling.BILINEAR).save(tmp_path / "small16.png")
    gray.resize((12, 12), Image.Resampling.BILINEAR).save(tmp_path / "tiny12.png")
    results = {Path(r.file).name: r for r in predict_paths(load_model(trained.path), [tmp_path])}
    assert results["small16.png"].ok and results["small16.png"].label in CLASS_NAMES
    assert not results["tiny12.png"].ok and "too small: 12x12 px" in results["tiny12.png"].error


def test_corrupt_files_are_reported_and_the_rest_predicted(trained: Trained, exported: dict[str, Path],
                                                           tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "scans"
    (folder / "nested").mkdir(parents=True)
    good = sorted((trained.data.root / "Testing" / "pituitary").glob("*.jpg"))[:3]
    for i, source in enumerate(good):
        (folder / ("nested" if i else "") / source.name).write_bytes(source.read_bytes())
    (folder / "truncated.jpg").write_bytes(good[0].read_bytes()[:300])
    (folder / "notes.txt").write_text("not an image extension: not collected from a folder")
    (folder / ".hidden.jpg").write_text("hidden: skipped, as in training")

    assert run_command("predict", str(exported["onnx"]), str(folder), str(tmp_path / "missing.png")) == 1
    out, err = capsys.readouterr()
    assert [line.split("\t")[1] for line in out.splitlines()] == ["pituitary"] * 3
    assert "truncated.jpg\terror:" in err and "missing.png\terror: no such file" in err
    assert "notes.txt" not in out + err and ".hidden" not in out + err

    assert run_command("predict", str(trained.path), str(folder), "--json", "--top-k", "2") == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["predicted"], report["failed"]) == (3, 1)
    failed = [r for r in report["results"] if "error" in r]
    assert [Path(r["file"]).name for r in failed] == ["truncated.jpg"]
    assert all(len(r["top_k"]) == 2 for r in report["results"] if "error" not in r)
    assert run_command("predict", str(exported["onnx"]), *map(str, good)) == 0


def test_predict_refuses_models_it_cannot_read_correctly(trained: Trained, exported: dict[str, Path],
                                                         tmp_path: Path) -> None:
    bare = onnx.load(str(exported["onnx"]))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(EdgeError, match="no edgemri metadata"):
        load_model(tmp_path / "bare.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(EdgeError, match="not a usable ONNX model"):
        load_model(tmp_path / "junk.onnx")
    with pytest.raises(EdgeError, match="top-k"):
        predict_paths(load_model(exported["onnx"]), [tmp_path], top_k=0)


# ---------------------------------------------------------------- broken and untrusted inputs: one line, exit 2


def _raw_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], **fields: object) -> Path:
    """A checkpoint file as an older or foreign writer could leave it: save_checkpoint's checks bypassed."""
    torch.save({"format": "edgemri.checkpoint/1", "model": "student", "state_dict": state_dict, **fields}, path)
    return path


def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("edgemri: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _weights(trained: Trained, key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**trained.model.state_dict(), key: value}


BROKEN_CHECKPOINTS = {
    "wrong-shape": (lambda t: {"state_dict": _weights(t, "classifier.1.weight", torch.zeros(4, 10))}, "shape"),
    "unknown-option": (lambda t: {"state_dict": t.model.state_dict(), "model_options": {"depth": 3}}, "depth"),
    "class-names": (lambda t: {"state_dict": t.model.state_dict(), "class_names": ["a", "b", "c"]}, "class"),
    "control-characters": (lambda t: {"state_dict": t.model.state_dict(),
                                      "class_names": ["glioma\n\x1b[2J", "b", "c", "d"]}, "printable"),
    "non-finite": (lambda t: {"state_dict": _weights(t, "conv_block_1.0.bias", torch.full((3,), float("nan")))},
                   "finite"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CHECKPOINTS))
def test_broken_checkpoints_are_refused_by_export_and_predict(trained: Trained, tmp_path: Path, case: str,
                                                              capsys: pytest.CaptureFixture) -> None:
    fields, reason = BROKEN_CHECKPOINTS[case]
    fields = fields(trained)
    path = _raw_checkpoint(tmp_path / "student.pt", fields.pop("state_dict"), **fields)
    image = trained.data.root / "Testing" / "glioma" / "Te-gl_0000.jpg"
    for fmt in ("onnx", "torchscript"):
        assert main(["export", str(path), "--format", fmt, "--out", str(tmp_path / f"out.{fmt}")]) == 2
        assert reason in _one_line_error(capsys)
        assert not (tmp_path / f"out.{fmt}").exists()  # refused before anything is written
    assert main(["predict", str(path), str(image)]) == 2
    assert reason in _one_line_error(capsys)


def _edited_onnx(source: Path, out: Path, edit: Callable[[onnx.ModelProto], None]) -> Path:
    model = onnx.load(str(source))
    edit(model)
    out.write_bytes(model.SerializeToString())
    return out


def _three_class_names(model: onnx.ModelProto) -> None:
    next(p for p in model.metadata_props if p.key == "class_names").value = json.dumps(["a", "b", "c"])


def _metadata(key: str, value: str) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        next(p for p in model.metadata_props if p.key == key).value = value
    return edit


def _second_output(model: onnx.ModelProto) -> None:
    model.graph.output.append(onnx.helper.make_tensor_value_info(model.graph.node[0].output[0],
                                                                 onnx.TensorProto.FLOAT, None))


def _nan_weight(model: onnx.ModelProto) -> None:
    weight = model.graph.initializer[0]
    array = onnx.numpy_helper.to_array(weight).copy()
    array.flat[0] = np.nan
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))


def _external_weight(model: onnx.ModelProto) -> None:
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.external_data.add(key="location", value="../../../etc/hostname")  # a file outside the model's folder
    weight.data_location = onnx.TensorProto.EXTERNAL


@pytest.mark.parametrize(("edit", "reason"), [
    (_three_class_names, "3 class_names need one output logits"),
    (_metadata("class_names", "[" * 10_000 + "]" * 10_000), "class_names' is not valid JSON"),
    (_metadata("temperature", "9" * 5_000), "an integer of 5000 digits"),
    (_metadata("preprocessing", "{}" + " " * 1_000_000), "allowed: at most 1,000,000"),
    (_second_output, "need one output logits"),
    (_nan_weight, "non-finite"),
    (_external_weight, "external files"),
])
def test_onnx_files_that_break_the_contract_are_refused_at_load(exported: dict[str, Path], tmp_path: Path,
                                                                edit: Callable[[onnx.ModelProto], None],
                                                                reason: str) -> None:
    with pytest.raises(EdgeError, match=reason):
        load_model(_edited_onnx(exported["onnx"], tmp_path / "edited.onnx", edit))


def test_a_corrupt_torchscript_file_is_a_one_line_error_and_named_code(trained: Trained, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "student.torchscript.pt"
    with zipfile.ZipFile(path, "w") as archive:  # edgemri's metadata entry, but no TorchScript code
        archive.writestr("student/extra/edgemri.json", json.dumps({"class_names": list(CLASS_NAMES)}))
    image = trained.data.root / "Testing" / "glioma" / "Te-gl_0000.jpg"
    assert main(["predict", str(path), str(image)]) == 2
    captured = capsys.readouterr().err
    assert "TorchScript file is code" in captured and "not a loadable TorchScript file" in captured


def test_odd_paths_are_reported_per_file_and_never_crash_printing(trained: Trained, exported: dict[str, Path],
                                                                  tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    good = trained.data.root / "Testing" / "notumor" / "Te-no_0000.jpg"
    (folder / os.fsdecode(b"scan-\xff.jpg")).write_bytes(good.read_bytes())  # not UTF-8: a Latin-1 name
    too_long = tmp_path / ("x" * 300 + ".jpg")
    assert main(["predict", str(exported["onnx"]), str(folder), str(too_long)]) == 1
    out, err = capsys.readouterr()
    assert out.split("\t")[:2] == [str(folder / "scan-\\xff.jpg"), "notumor"]
    assert "File name too long" in err
    assert main(["predict", str(exported["onnx"]), str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["file"].endswith("scan-\\xff.jpg")
    assert main(["predict", str(tmp_path), str(folder)]) == 2
    assert "is a folder" in _one_line_error(capsys)


# ---------------------------------------------------------------- calibration temperature and selective prediction


@pytest.fixture(scope="module")
def calibrated(trained: Trained) -> dict[str, Path]:
    """The trained student saved with calibration temperature TEMPERATURE, and exported from that file."""
    path = save_checkpoint(trained.root / "calibrated.pt",
                           dataclasses.replace(trained.checkpoint, temperature=TEMPERATURE))
    onnx_path, script_path = trained.root / "calibrated.onnx", trained.root / "calibrated.torchscript.pt"
    assert run_command("export", str(path), "--out", str(onnx_path)) == 0
    assert run_command("export", str(path), "--format", "torchscript", "--out", str(script_path)) == 0
    return {"checkpoint": path, "onnx": onnx_path, "torchscript": script_path}


def _scans(trained: Trained, per_class: int) -> list[Path]:
    return [path for name in CLASS_NAMES
            for path in sorted((trained.data.root / "Testing" / name).glob("*.jpg"))[:per_class]]


def _reference_probabilities(trained: Trained, files: list[Path], temperature: float) -> torch.Tensor:
    """softmax(logits / T) of the PyTorch student itself, on the training preprocessing of ``files``."""
    images = torch.from_numpy(np.stack([load_image_uint8(path) for path in files]))
    with torch.no_grad():
        return torch.softmax(trained.model(normalize(images)) / temperature, dim=1)


def _torchscript_with_metadata(source: Path, out: Path, **changes: object) -> Path:
    """``source`` saved again with its edgemri.json changed (a key set to None is removed)."""
    module, meta = load_torchscript(source)
    meta = {k: v for k, v in {**meta, **changes}.items() if v is not None}
    torch.jit.save(module, str(out), _extra_files={METADATA_FILE: json.dumps(meta)})
    return out


JIT_DEPRECATION = r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning"


def test_exports_record_the_temperature_and_keep_the_raw_logits(trained: Trained,
                                                                calibrated: dict[str, Path]) -> None:
    props = {p.key: p.value for p in onnx.load(str(calibrated["onnx"])).metadata_props}
    assert json.loads(props["temperature"]) == TEMPERATURE
    assert load_torchscript(calibrated["torchscript"])[1]["temperature"] == TEMPERATURE
    batch = normalize(trained.data.test.images[:8])
    with torch.no_grad():
        expected = trained.model(batch)
    # The graph is the raw student: its logits are not divided by T (the parity check compares them as before).
    assert (torch.from_numpy(run_onnx(onnx_session(calibrated["onnx"]), batch)) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["checkpoint", "onnx", "torchscript"])
def test_predict_reports_softmax_of_logits_over_the_temperature(trained: Trained, calibrated: dict[str, Path],
                                                                kind: str) -> None:
    files = _scans(trained, 2)
    model = load_model(calibrated[kind])
    assert model.temperature == TEMPERATURE
    results = predict_paths(model, files, top_k=len(CLASS_NAMES))
    expected = _reference_probabilities(trained, files, TEMPERATURE)
    for result, row in zip(results, expected, strict=True):
        got = torch.tensor([dict(result.top_k)[name] for name in CLASS_NAMES])
        assert torch.allclose(got, row, atol=1e-4), (result.file, got, row)
        assert result.probability == max(got.tolist())
    assert (expected - _reference_probabilities(trained, files, 1.0)).abs().max() > 0.05  # T changed them


@pytest.mark.filterwarnings(JIT_DEPRECATION)
def test_files_without_a_temperature_load_uncalibrated(trained: Trained, calibrated: dict[str, Path],
                                                       tmp_path: Path) -> None:
    def drop_temperature(model: onnx.ModelProto) -> None:
        kept = [p for p in model.metadata_props if p.key != "temperature"]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)

    older = [  # as edgemri wrote them before calibration existed
        _edited_onnx(calibrated["onnx"], tmp_path / "old.onnx", drop_temperature),
        _torchscript_with_metadata(calibrated["torchscript"], tmp_path / "old.torchscript.pt", temperature=None),
        _raw_checkpoint(tmp_path / "old.pt", trained.model.state_dict()),
    ]
    files = _scans(trained, 1)
    plain = _reference_probabilities(trained, files, 1.0).max(dim=1).values
    for path in older:
        model = load_model(path)
        assert model.temperature == 1.0, path.name
        assert torch.allclose(torch.tensor([r.probability for r in predict_paths(model, files)]), plain, atol=1e-4)


BAD_TEMPERATURES = ["0", "-1", "NaN", "1e6", '"hot"']  # as JSON in the metadata


@pytest.mark.filterwarnings(JIT_DEPRECATION)
@pytest.mark.parametrize("kind", ["onnx", "torchscript"])
@pytest.mark.parametrize("value", BAD_TEMPERATURES)
def test_a_bad_temperature_in_export_metadata_is_a_one_line_error(trained: Trained, calibrated: dict[str, Path],
                                                                  tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                  kind: str, value: str) -> None:
    def set_temperature(model: onnx.ModelProto) -> None:
        next(p for p in model.metadata_props if p.key == "temperature").value = value

    if kind == "onnx":
        path = _edited_onnx(calibrated["onnx"], tmp_path / "bad.onnx", set_temperature)
    else:
        path = _torchscript_with_metadata(calibrated["torchscript"], tmp_path / "bad.torchscript.pt",
                                          temperature=json.loads(value))
    assert main(["predict", str(path), str(_scans(trained, 1)[0])]) == 2
    line = _one_line_error(capsys)
    assert "calibration temperature is" in line and "allowed: a finite number in [0.05, 20.0]" in line


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), 1e6])
def test_a_bad_temperature_in_a_checkpoint_is_refused_by_export_and_predict(trained: Trained, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture,
                                                                            temperature: float) -> None:
    bad = dataclasses.replace(trained.checkpoint, temperature=temperature)  # save_checkpoint would refuse it
    path = tmp_path / "student.pt"
    torch.save({"format": FORMAT, **vars(bad)}, path)
    assert main(["export", str(path), "--out", str(tmp_path / "out.onnx")]) == 2
    assert f"calibration temperature is {temperature}" in _one_line_error(capsys)
    assert main(["predict", str(path), str(_scans(trained, 1)[0])]) == 2
    assert f"calibration temperature is {temperature}" in _one_line_error(capsys)
    with pytest.raises(EdgeError, match="calibration temperature is"):  # a Checkpoint built in Python, never saved
        export_torchscript(bad, tmp_path / "out.torchscript.pt")
    assert not list(tmp_path.glob("out.*"))


def test_refer_below_marks_exactly_the_scans_under_the_threshold(trained: Trained, calibrated: dict[str, Path],
                                                                 capsys: pytest.CaptureFixture) -> None:
    files = _scans(trained, 3)
    top = _reference_probabilities(trained, files, TEMPERATURE).max(dim=1).values.tolist()
    ranked = sorted(top)
    # The threshold halfway across the widest gap between two known probabilities, two or more scans each side.
    gap, threshold = max((high - low, (low + high) / 2) for low, high in zip(ranked[1:-2], ranked[2:-1], strict=True))
    assert gap > 1e-3  # far wider than the export's float32 rounding
    expected = {path.name for path, p in zip(files, top, strict=True) if p < threshold}
    model, scans = str(calibrated["onnx"]), list(map(str, files))

    assert main(["predict", model, *scans, "--json", "--refer-below", str(threshold)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {Path(r["file"]).name for r in report["results"] if r["refer"]} == expected
    assert (report["refer_below"], report["referred"], report["temperature"]) == (
        threshold, len(expected), TEMPERATURE)

    assert main(["predict", model, *scans, "--refer-below", str(threshold)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == len(files)
    assert {Path(line.split("\t")[0]).name for line in lines if line.endswith("\tREFER")} == expected
    assert f"edgemri: {len(expected)} of {len(files)} predicted scans referred to a doctor" in err

    assert main(["predict", model, *scans, "--json"]) == 0  # without the flag nothing is marked
    report = json.loads(capsys.readouterr().out)
    assert "referred" not in report and not any("refer" in r for r in report["results"])


@pytest.mark.parametrize("value", ["0", "1", "-0.2", "1.5", "nan"])
def test_refer_below_outside_zero_one_is_a_one_line_error(trained: Trained, capsys: pytest.CaptureFixture,
                                                          value: str) -> None:
    assert main(["predict", str(trained.path), str(_scans(trained, 1)[0]), "--refer-below", value]) == 2
    assert f"--refer-below is {float(value)}; allowed: a probability strictly between 0 and 1" in (
        _one_line_error(capsys))


def test_refer_below_must_be_a_number(trained: Trained, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(trained.path), str(_scans(trained, 1)[0]), "--refer-below", "often"])
    assert exit_.value.code == 2 and "--refer-below: invalid float value: 'often'" in capsys.readouterr().err
    with pytest.raises(EdgeError, match="--refer-below is 1.0"):  # the library checks it too
        predict_paths(load_model(trained.path), _scans(trained, 1), refer_below=1.0)
