"""``edgemri export`` and ``edgemri predict``: thin commands over edgemri.edge."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from edgemri.arguments import BoundedInt

Command = Callable[[argparse.Namespace], int]
AddCommand = Callable[[argparse._SubParsersAction, str, Command, str], argparse.ArgumentParser]

TOP_K = BoundedInt(1, 100)  # more than the model has classes lists them all
BATCH_SIZE = BoundedInt(1, 1024)  # 1024 images are 200 MB as float32: more only costs memory
_SUFFIXES = {("onnx", False): ".onnx", ("onnx", True): ".int8.onnx", ("executorch", False): ".pte",
             ("torchscript", False): ".torchscript.pt"}


def default_output(source: str, fmt: str, int8: bool) -> Path:
    """Next to the checkpoint: student.pt -> student.onnx, student.int8.onnx, student.pte, student.torchscript.pt.

    A shipped model's name goes to the current folder (kaggle-student -> ./kaggle-student.onnx), never into the
    installed package.
    """
    from edgemri.edge.pretrained import is_pretrained_name

    if is_pretrained_name(source):
        return Path(f"{source}{_SUFFIXES[fmt, int8]}")
    checkpoint = Path(source)
    return checkpoint.parent / f"{checkpoint.stem}{_SUFFIXES[fmt, int8]}"


def cmd_export(args: argparse.Namespace) -> int:
    from edgemri.core.data.dataset import load_dataset
    from edgemri.core.errors import printable
    from edgemri.edge.contract import load_student
    from edgemri.edge.errors import EdgeError
    from edgemri.edge.executorch import export_executorch
    from edgemri.edge.int8 import check_data_classes, export_onnx_int8
    from edgemri.edge.onnx import ONNX_OPSET, export_onnx
    from edgemri.edge.pretrained import resolve_model
    from edgemri.edge.torchscript import export_torchscript

    if args.int8 and args.format != "onnx":
        raise EdgeError("--int8 quantizes ONNX models only; use --format onnx")
    if args.int8 and not args.data_root:
        raise EdgeError("--int8 needs --data-root DIR: ~200 of its Training images calibrate the int8 ranges "
                        "and its Testing split measures the accuracy change")
    source = resolve_model(args.checkpoint)
    out = Path(args.out) if args.out else default_output(args.checkpoint, args.format, args.int8)
    if out.resolve() == source.resolve():
        raise EdgeError(f"--out {printable(str(out))} is the checkpoint itself; choose another file")
    checkpoint = load_student(source)
    if args.int8:  # before the data is decoded
        check_data_classes(checkpoint.class_names)
    shown = printable(str(out))
    if args.format == "torchscript":
        export_torchscript(checkpoint, out, overwrite=args.overwrite)
        print(f"wrote {shown} (TorchScript, {out.stat().st_size:,} bytes)")
        return 0
    if args.format == "executorch":
        export_executorch(checkpoint, out, overwrite=args.overwrite)
        print(f"wrote {shown} (ExecuTorch program, XNNPACK, one image a call, {out.stat().st_size:,} bytes)")
        return 0
    if not args.int8:
        export_onnx(checkpoint, out, overwrite=args.overwrite)
        print(f"wrote {shown} (ONNX opset {ONNX_OPSET}, fp32, {out.stat().st_size:,} bytes)")
        return 0
    dataset = load_dataset(args.data_root, progress=not args.quiet)
    result = export_onnx_int8(checkpoint, out, dataset.train.images, dataset.test.images, dataset.test.labels,
                              overwrite=args.overwrite)
    print(f"wrote {shown} (ONNX opset {ONNX_OPSET}, static int8 QDQ, per-channel weights, "
          f"{out.stat().st_size:,} bytes; calibrated on {result.calibration_images} Training images)")
    print(f"test accuracy on {result.test_images} Testing images: fp32 {100 * result.fp32_accuracy:.2f} % -> "
          f"int8 {100 * result.int8_accuracy:.2f} % ({result.change_points:+.2f} points)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from edgemri.core.errors import printable
    from edgemri.edge.errors import EdgeError
    from edgemri.edge.predict import check_refer_below, predict_paths
    from edgemri.edge.pretrained import resolve_model
    from edgemri.edge.runtime import load_model, model_kind
    from edgemri.edge.torchscript import CODE_NOTICE

    refer_below = None if args.refer_below is None else check_refer_below(args.refer_below)  # before any loading
    # `predict MODEL PATH...` or `predict --model MODEL PATH...`: without --model the first word is the model.
    given, paths = (args.model, args.paths) if args.model else (args.paths[0], args.paths[1:])
    if not paths:
        raise EdgeError(f"no image to predict after the model {printable(given)}: "
                        f"edgemri predict [--model] MODEL PATH...")
    source = resolve_model(given)
    if model_kind(source) == "torchscript":
        print(f"edgemri: note: {CODE_NOTICE}", file=sys.stderr)
    model = load_model(source)
    results = predict_paths(model, paths, top_k=args.top_k, batch_size=args.batch_size, refer_below=refer_below)
    failed = sum(not r.ok for r in results)
    referred = sum(bool(r.refer) for r in results)
    if args.json:
        summary = {} if refer_below is None else {"refer_below": refer_below, "referred": referred}
        print(json.dumps({"model": printable(str(model.path)), "kind": model.kind, "class_names": model.class_names,
                          "temperature": model.temperature, "predicted": len(results) - failed, "failed": failed,
                          **summary, "results": [r.as_dict() for r in results]}, indent=2))
    else:
        for r in results:
            if not r.ok:
                print(f"{r.file}\terror: {r.error}", file=sys.stderr)
                continue
            ranked = "\t" + "  ".join(f"{name} {p:.4f}" for name, p in r.top_k) if args.top_k > 1 else ""
            mark = "\tREFER" if r.refer else ""
            print(f"{r.file}\t{r.label}\t{r.probability:.4f}{ranked}{mark}")
        if refer_below is not None:
            print(f"edgemri: {referred} of {len(results) - failed} predicted scans referred to a doctor "
                  f"(top probability below {refer_below})", file=sys.stderr)
        if failed:
            print(f"edgemri: {failed} of {len(results)} could not be predicted", file=sys.stderr)
    return 1 if failed else 0


def register(commands: argparse._SubParsersAction, add: AddCommand) -> None:
    """Add ``export`` and ``predict`` to the ``edgemri`` command line."""
    export = add(commands, "export", cmd_export,
                 "export a student checkpoint for devices: ONNX (fp32 or static int8), ExecuTorch or TorchScript")
    export.add_argument("checkpoint", metavar="NAME_OR_CHECKPOINT",
                        help="a shipped pretrained model (e.g. kaggle-student), an edgemri checkpoint or the "
                             "paper's student state dict (.pt)")
    export.add_argument("--format", choices=["onnx", "executorch", "torchscript"], default="onnx",
                        help="default: onnx; executorch writes a .pte for ExecuTorch's XNNPACK backend")
    export.add_argument("--int8", action="store_true",
                        help="static int8 quantization (ONNX); needs --data-root for calibration and accuracy")
    export.add_argument("--data-root", default=None,
                        help="Kaggle-layout folder: Training calibrates --int8, Testing measures its accuracy")
    export.add_argument("--out", default=None,
                        help="output file (default: next to CHECKPOINT as .onnx, .int8.onnx, .pte or .torchscript.pt; "
                             "for a pretrained NAME, NAME.onnx ... in the current folder)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    predict = add(commands, "predict", cmd_predict,
                  "classify image files with a shipped model, a checkpoint, or an exported .onnx, .pte or TorchScript "
                  "model")
    predict.usage = "%(prog)s [options] {MODEL PATH... | --model MODEL PATH...}"
    # Help names one example, not the registry: building the parser must not import torch.
    model_help = ("a shipped pretrained model (e.g. kaggle-student), a checkpoint (.pt), an exported .onnx or "
                  "ExecuTorch .pte, or an exported TorchScript file (TorchScript is code: load only your own)")
    predict.add_argument("paths", nargs="+", metavar="[MODEL] PATH",
                         help=f"without --model the first is the MODEL: {model_help}; then image files or folders "
                              f"(searched recursively)")
    predict.add_argument("--model", default=None, metavar="NAME_OR_FILE", help=f"the MODEL: {model_help}")
    predict.add_argument("--json", action="store_true", help="one JSON document instead of one line per image")
    predict.add_argument("--top-k", type=TOP_K, default=1, metavar="K",
                         help=f"also list the K most probable classes ({TOP_K}, default 1)")
    predict.add_argument("--batch-size", type=BATCH_SIZE, default=64,
                         help=f"images per forward pass ({BATCH_SIZE}, default 64)")
    predict.add_argument("--refer-below", type=float, default=None, metavar="P",
                         help="selective prediction: mark every scan whose top (calibrated) probability is below P "
                              "(0 < P < 1) as REFER, to send to a doctor, and say how many were")
