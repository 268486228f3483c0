"""Probe the command line with malicious and careless inputs: each must end in one ``edgemri: ...`` line with
exit 2 (130/143 for signals), never a traceback, a MemoryError or a hang.

    python -m benchmarks.probe_untrusted [--out DIR]

Each probe runs ``python -m edgemri ...`` in a fresh process and prints its exit code and last line; the run
fails (exit 1) if any output holds "Traceback" or an exit code other than the expected one. The unit tests
and the fuzz targets (tests/test_fuzz.py) cover the readers one by one; this checks what a user sees.
"""

from __future__ import annotations

import argparse
import io
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEEP = "[" * 10_000 + "]" * 10_000
HUGE_INT = "9" * 5_000


def _edgemri(*args: str, signum: int | None = None, after_s: float = 0.0) -> tuple[int, str]:
    process = subprocess.Popen([sys.executable, "-m", "edgemri", *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if signum is not None:
        time.sleep(after_s)
        process.send_signal(signum)
        time.sleep(0.05)
        process.send_signal(signum)
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


def _checkpoint(work: Path, **changes: object) -> Path:
    from edgemri.core.training.checkpoint import Checkpoint, save_checkpoint
    from edgemri.models import build_model

    path = save_checkpoint(work / "student.pt", Checkpoint(model="student",
                                                           state_dict=build_model("student").state_dict()))
    raw = torch.load(path, weights_only=True)
    raw.update(changes)
    bad = work / f"bad-{len(list(work.glob('bad-*.pt')))}.pt"
    torch.save(raw, bad)
    return bad


def _onnx_with(work: Path, key: str, value: str) -> Path:
    import onnx

    student = work / "student.pt"
    if not (work / "student.onnx").exists():
        _edgemri("export", str(student), "--out", str(work / "student.onnx"))
    model = onnx.load(str(work / "student.onnx"))
    next(p for p in model.metadata_props if p.key == key).value = value
    out = work / f"meta-{key}-{len(value)}.onnx"
    out.write_bytes(model.SerializeToString())
    return out


def _huge_npz(path: Path) -> Path:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 750)})
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("images.npy", header.getvalue() + bytes(64))
    return path


def probes(work: Path) -> list[tuple[str, list[str], int, dict]]:
    """(name, edgemri arguments, expected exit code, signal options)."""
    (work / "deep.yaml").write_text(f"distill: {{compare: {DEEP}}}\n")
    (work / "digits.yaml").write_text(f"seed: {HUGE_INT}\n")
    (work / "laughs.yaml").write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)))
    (work / "dupe.yaml").write_text("seed: 1\nseed: 2\n")
    (work / "binary.yaml").write_bytes(b"\xff\xfe\x00seed")
    image = work / "scan.png"
    from PIL import Image

    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(image)
    distill = ["distill", "--data-root", str(work), "--out", str(work / "run")]
    width = _checkpoint(work, model="vgg16-slim", model_options={"width": -1})
    size = _checkpoint(work, model_options={"image_size": -128})
    classes = _checkpoint(work, model_options={"num_classes": 10**9})
    data = work / "data"  # a folder with one scan per class, its decode cache replaced by a forged one
    for split in ("Training", "Testing"):
        for name in ("glioma", "meningioma", "notumor", "pituitary"):
            (data / split / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((64, 64, 3), len(name), np.uint8)).save(data / split / name / "1.png")
    from edgemri.core.data.dataset import cache_path, scan_folder

    scan = scan_folder(data)
    for split in ("Training", "Testing"):
        _huge_npz(cache_path(scan, split, work / "cache"))
    return [
        ("config nested 10,000 deep", [*distill, "--config", str(work / "deep.yaml")], 2, {}),
        ("--set nested 10,000 deep", [*distill, "--config", "configs/quickstart.yaml",
                                      "--set", f"distill.compare={DEEP}"], 2, {}),
        ("config integer of 5,000 digits", [*distill, "--config", str(work / "digits.yaml")], 2, {}),
        ("--set integer of 5,000 digits", [*distill, "--config", "configs/quickstart.yaml",
                                           "--set", f"seed={HUGE_INT}"], 2, {}),
        ("config billion laughs", [*distill, "--config", str(work / "laughs.yaml")], 2, {}),
        ("config key given twice", [*distill, "--config", str(work / "dupe.yaml")], 2, {}),
        ("config not UTF-8", [*distill, "--config", str(work / "binary.yaml")], 2, {}),
        ("checkpoint width -1: predict", ["predict", str(width), str(image)], 2, {}),
        ("checkpoint width -1: export", ["export", str(width), "--out", str(work / "w.onnx")], 2, {}),
        ("checkpoint width -1: executorch", ["export", str(width), "--format", "executorch",
                                             "--out", str(work / "w.pte")], 2, {}),
        ("checkpoint image_size -128: predict", ["predict", str(size), str(image)], 2, {}),
        ("checkpoint 10^9 classes: predict", ["predict", str(classes), str(image)], 2, {}),
        ("ONNX metadata nested 10,000 deep", ["predict", str(_onnx_with(work, "class_names", DEEP)), str(image)],
         2, {}),
        ("ONNX metadata integer of 5,000 digits",
         ["predict", str(_onnx_with(work, "temperature", HUGE_INT)), str(image)], 2, {}),
        # a cache that cannot be read is decoded again: exit 0, and no 6 GB allocated
        ("decode cache with a 6 GB .npz header", ["data", "info", str(data), "--cache-dir", str(work / "cache")], 0,
         {}),
        ("a run folder that is a file", ["privacy", "report", str(image)], 2, {}),
        ("Ctrl-C twice during start-up", ["data", "synth", "--out", str(work / "s1"), "--preset", "kaggle"], 130,
         {"signum": signal.SIGINT, "after_s": 0.05}),
        ("Ctrl-C twice while working", ["data", "synth", "--out", str(work / "s2"), "--preset", "kaggle"], 130,
         {"signum": signal.SIGINT, "after_s": 4.0}),
        ("SIGTERM while working", ["data", "synth", "--out", str(work / "s3"), "--preset", "kaggle"], 143,
         {"signum": signal.SIGTERM, "after_s": 4.0}),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        failures = 0
        for name, command, expected, options in probes(work):
            code, output = _edgemri(*command, **options)
            last = output.strip().splitlines()[-1] if output.strip() else ""
            ok = code == expected and "Traceback" not in output and "MemoryError" not in output
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name}: exit {code} (expected {expected}): {last[:150]}", flush=True)
    print(f"{failures} of the probes failed" if failures else "every probe ended in one line, no traceback")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
