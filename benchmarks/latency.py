"""Single-image latency and batch throughput of the student on ONE CPU thread, and `edgemri predict` end to end.

Runs PyTorch eager (NCHW and channels-last), TorchScript, ONNX Runtime fp32 and int8 with
its default session and with edgemri's (the NCHWc layout pass off), the offline-optimized
ONNX file, the same model in onnxruntime's own .ort format, fixed-batch (static-shape) ONNX
files, and ExecuTorch's XNNPACK program; checks every fp32 variant's logits against PyTorch
eager (largest difference at most 1e-4); sweeps the batch size; profiles where the fp32 time
goes per node; and times `edgemri predict` on 100 synthetic JPEGs, split into decoding,
preprocessing and the model, in-process and as the command a user runs. Writes one flat JSON
(units in key names) to benchmarks/results/latency.json. Accuracy is not measured here: the
images are random. Usage: python benchmarks/latency.py [CHECKPOINT] [--out FILE] [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image
from torch import Tensor

from edgemri.core.data.images import IMAGE_SIZE, image_uint8, normalize, read_image_bytes
from edgemri.core.io import write_json
from edgemri.core.training.checkpoint import Checkpoint
from edgemri.edge.contract import INPUT_NAME, load_student
from edgemri.edge.errors import EdgeError
from edgemri.edge.executorch import executorch_bytes, load_executorch
from edgemri.edge.int8 import calibration_sample, quantize
from edgemri.edge.onnx import export_onnx, onnx_bytes
from edgemri.edge.predict import predict_paths
from edgemri.edge.runtime import ORT_DISABLED_OPTIMIZERS, load_model, onnx_session, run_onnx
from edgemri.edge.torchscript import load_torchscript, torchscript_bytes
from edgemri.models import Student

RESULTS = Path(__file__).resolve().parent / "results" / "latency.json"
BATCH = 64
SWEEP = (1, 8, 32, 64, 256)
QUICK_SWEEP = (1, BATCH)
PARITY_MAX_ABS_DIFF = 1e-4  # fp32 variants against PyTorch eager; int8 differs by design and is only recorded
PREDICT_IMAGES = 100
PREDICT_SIDE_PX = 256
# What `edgemri predict MODEL.onnx` imports before it predicts anything.
PREDICT_IMPORTS = "import edgemri.main, edgemri.edge.predict, edgemri.edge.runtime, onnx, onnxruntime"
Runner = Callable[[Tensor], object]


def latencies_ms(variants: dict[str, Runner], image: Tensor, runs: int, rounds: int = 5) -> dict[str, list[float]]:
    """Milliseconds per one-image call, variants taking turns so that load from other
    processes falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():
        for _ in range(20):  # warm-up: allocations, first-run kernel selection
            run(image)
    for _ in range(rounds):
        for name, run in variants.items():
            for _ in range(runs // rounds):
                start = time.perf_counter_ns()
                run(image)
                times[name].append((time.perf_counter_ns() - start) / 1e6)
    return times


def throughputs(jobs: dict[str, tuple[Runner, int]], images: Tensor, seconds: float,
                rounds: int = 5) -> dict[str, float]:
    """Images per second for each (runner, batch size): the best of ``rounds`` windows.

    Jobs take turns window by window; as with timeit, the best window is what the machine
    can do and slower ones measure other processes (the 2-core machine is shared).
    """
    rates: dict[str, list[float]] = {key: [] for key in jobs}
    for _ in range(rounds):
        for key, (run, batch) in jobs.items():
            pool = images.repeat(-(-batch // len(images)), 1, 1, 1)  # enough images for one full batch
            batches = [pool[i:i + batch] for i in range(0, len(pool) - batch + 1, batch)]
            run(batches[0])
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                for chunk in batches:
                    run(chunk)
                    done += len(chunk)
            rates[key].append(done / (time.perf_counter() - start))
    return {key: max(values) for key, values in rates.items()}


def ort_runner(session: ort.InferenceSession) -> Runner:
    return lambda batch: run_onnx(session, batch)


def default_session(model: bytes) -> ort.InferenceSession:
    """What a plain onnxruntime session gives: ORT_ENABLE_ALL, NCHWc layout included."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def offline_optimized(model: bytes, folder: Path) -> bytes:
    """The model after onnxruntime's graph optimizations, saved (what offline optimization ships)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folder / "offline.onnx")
    ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return (folder / "offline.onnx").read_bytes()


def ort_format(model: bytes, folder: Path) -> bytes:
    """The model in onnxruntime's own flatbuffer format (.ort), made as its converter
    (``python -m onnxruntime.tools.convert_onnx_models_to_ort``, fixed style, no target platform)
    makes it: the session's graph at ORT_ENABLE_ALL without the NCHWc pass, saved with a .ort suffix."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.qdqisint8allowed", "0")  # the converter's x86/default setting
    options.optimized_model_filepath = str(folder / "student.ort")
    ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=ORT_DISABLED_OPTIMIZERS)
    return (folder / "student.ort").read_bytes()


def static_runner(sessions: dict[int, ort.InferenceSession]) -> Runner:
    """Fixed-batch files, one per batch size, as a static-shapes deployment ships them."""
    return lambda batch: run_onnx(sessions[len(batch)], batch)


def max_abs_diffs(variants: dict[str, Runner], reference: Runner, batches: list[Tensor]) -> dict[str, float]:
    """Largest absolute logit difference of each variant from ``reference`` over ``batches``."""
    expected = [reference(batch) for batch in batches]
    return {name: max(float((torch.as_tensor(np.asarray(run(batch))) - want).abs().max())
                      for batch, want in zip(batches, expected, strict=True))
            for name, run in variants.items()}


def write_scans(folder: Path, count: int, side: int = PREDICT_SIDE_PX, seed: int = 0) -> Path:
    """``count`` 8-bit grayscale JPEGs shaped like an MRI slice: smooth random texture inside a disc, black around."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side - 0.5
    head = xx ** 2 + yy ** 2 < 0.16
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (side // 8, side // 8), dtype=np.uint8))
        texture = np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
        pixels = np.where(head, 60 + 0.6 * texture, 0).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"scan-{i:03d}.jpg", quality=90)
    return folder


def _timed(times: dict[str, float], step: str, function: Callable, *args: object) -> object:
    """``function(*args)``, its seconds added to ``times[step]``."""
    start = time.perf_counter()
    value = function(*args)
    times[step] += time.perf_counter() - start
    return value


def edgemri_command() -> list[str]:
    """``edgemri`` as a user runs it: the console script next to this interpreter, else ``python -m``."""
    script = Path(sys.executable).with_name("edgemri")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "edgemri"]


def predict_end_to_end(checkpoint: Checkpoint, folder: Path, rounds: int) -> dict[str, float]:
    """`edgemri predict` of PREDICT_IMAGES JPEGs with the fp32 ONNX file: whole, and split into its steps.

    In-process through the functions behind the command (``load_model``, ``predict_paths``), the best of
    ``rounds``; the steps timed apart over the same files (read; decode and resize, ``image_uint8``; then
    normalize and the model in predict's batches); and once as the command itself, interpreter start and
    imports included, next to a bare interpreter importing what the command imports (the part of the wait
    that is not predicting). Both processes inherit this one's single core.
    """
    scans = write_scans(folder / "scans", PREDICT_IMAGES)
    model_path = export_onnx(checkpoint, folder / "student.onnx")
    files = sorted(scans.iterdir())
    started = time.perf_counter()
    model = load_model(model_path)
    load_s = time.perf_counter() - started
    preprocessing = ("read", "decode_resize", "normalize")
    totals, steps = [], {step: [] for step in (*preprocessing, "model")}
    for _ in range(rounds):
        started = time.perf_counter()
        predictions = predict_paths(model, [scans])
        totals.append(time.perf_counter() - started)
        if len(predictions) != PREDICT_IMAGES or not all(p.ok for p in predictions):
            raise EdgeError(f"predict gave {sum(p.ok for p in predictions)} of {PREDICT_IMAGES} predictions")
        times = dict.fromkeys(steps, 0.0)
        arrays = []
        for file in files:
            data = _timed(times, "read", read_image_bytes, file)
            arrays.append(_timed(times, "decode_resize", image_uint8, data))  # decode, EXIF turn, 128 px, 3 channels
        with torch.no_grad():
            for batch in torch.from_numpy(np.stack(arrays)).split(BATCH):  # predict_paths' default batch size
                _timed(times, "model", model.logits, _timed(times, "normalize", model.normalize, batch))
        for step, seconds in times.items():
            steps[step].append(seconds)
    best = {step: min(values) * 1e3 / PREDICT_IMAGES for step, values in steps.items()}
    started = time.perf_counter()
    command = subprocess.run([*edgemri_command(), "predict", str(model_path), str(scans)],
                             capture_output=True, text=True, timeout=300)
    cli_s = time.perf_counter() - started
    if command.returncode or len(command.stdout.splitlines()) != PREDICT_IMAGES:
        raise EdgeError(f"edgemri predict exited {command.returncode}: {command.stderr.strip()[-300:]}")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", PREDICT_IMPORTS], check=True, timeout=300)
    imports_s = time.perf_counter() - started
    return {
        "predict_images": PREDICT_IMAGES,
        "predict_jpeg_side_px": PREDICT_SIDE_PX,
        "predict_model_load_ms": round(load_s * 1e3, 2),
        "predict_read_per_image_ms": round(best["read"], 4),
        "predict_decode_resize_per_image_ms": round(best["decode_resize"], 4),
        "predict_normalize_per_image_ms": round(best["normalize"], 4),
        "predict_decode_preprocess_per_image_ms": round(sum(best[step] for step in preprocessing), 4),
        "predict_model_per_image_ms": round(best["model"], 4),
        "predict_total_s": round(min(totals), 4),
        "predict_img_per_s": round(PREDICT_IMAGES / min(totals), 1),
        "predict_cli_wall_s": round(cli_s, 3),
        "predict_cli_img_per_s": round(PREDICT_IMAGES / cli_s, 1),
        "predict_cli_imports_s": round(imports_s, 3),
    }


def profile_nodes(model: bytes, image: Tensor, folder: Path, runs: int = 200) -> dict[str, float]:
    """Median microseconds per node for one image in edgemri's session (onnxruntime's profiler)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.enable_profiling, options.profile_file_prefix = True, str(folder / "profile")
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=ORT_DISABLED_OPTIMIZERS)
    for _ in range(runs):
        session.run(None, {INPUT_NAME: image.numpy()})
    events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[str, list[float]] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = event["name"].removesuffix("_kernel_time")
            per_node.setdefault(f"{event['args']['op_name']} {node}", []).append(event["dur"])
    return {name: statistics.median(durations) for name, durations in per_node.items()}


def cpu_description() -> dict[str, str]:
    """The CPU's model and SIMD extensions where Linux says them (platform.processor() is often empty)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"machine_cpu_model": platform.processor() or platform.machine()}
    fields = {key.strip(): value.strip() for key, value in
              (line.split(":", 1) for line in info.splitlines() if ":" in line)}
    flags = fields.get("flags", "").split()
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return {"machine_cpu_model": fields.get("model name", ""), "machine_cpu_simd": " ".join(simd)}


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="student checkpoint (default: a random student, seed 0)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON to write (default: {RESULTS})")
    parser.add_argument("--images", type=int, default=None,
                        help=f"synthetic 128 px images, at least {BATCH} (default: 256; --quick: {BATCH})")
    parser.add_argument("--runs", type=int, default=None,
                        help="timed single-image calls per variant (default: 500; --quick: 50)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="seconds per throughput measurement (default: 1.5; --quick: 0.25)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke test: few runs, short windows, batch sizes {QUICK_SWEEP} only")
    args = parser.parse_args(argv)
    quick = args.quick
    count = args.images if args.images is not None else BATCH if quick else 256
    runs = args.runs if args.runs is not None else 50 if quick else 500
    seconds = args.seconds if args.seconds is not None else 0.25 if quick else 1.5
    if not BATCH <= count <= 4096:
        parser.error(f"--images is {count}; allowed: {BATCH} to 4096")
    if not 5 <= runs <= 100_000:
        parser.error(f"--runs is {runs}; allowed: 5 to 100000")
    if not 0.05 <= seconds <= 600:  # NaN fails too
        parser.error(f"--seconds is {seconds}; allowed: 0.05 to 600")
    sweep = QUICK_SWEEP if quick else SWEEP

    torch.set_num_threads(1)
    # Every variant on one core: ExecuTorch's XNNPACK threadpool ignores torch's thread setting (it used both
    # cores here), so "one thread" is enforced for the process, not asked of each runtime.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.manual_seed(0)
    if args.checkpoint:
        checkpoint = load_student(args.checkpoint)
    else:
        checkpoint = Checkpoint(model="student", state_dict=Student().state_dict(), role="random (benchmark)")
    model = checkpoint.build()
    uint8 = torch.randint(0, 256, (count, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    images = normalize(uint8)
    image = images[:1]

    with tempfile.TemporaryDirectory(prefix="edgemri-bench.") as tmp:
        folder = Path(tmp)
        fp32 = onnx_bytes(checkpoint)
        static = {batch: onnx_bytes(checkpoint, static_batch=batch) for batch in (1, BATCH)}
        int8 = quantize(fp32, calibration_sample(uint8))
        offline = offline_optimized(fp32, folder)
        ort_model = ort_format(fp32, folder)
        (folder / "student.torchscript.pt").write_bytes(torchscript_bytes(checkpoint))
        scripted, _ = load_torchscript(folder / "student.torchscript.pt")
        state = io.BytesIO()
        torch.save(checkpoint.state_dict, state)
        channels_last = checkpoint.build().to(memory_format=torch.channels_last)
        pte = executorch_bytes(checkpoint)
        executorch_run, _ = load_executorch(pte, "the benchmark's .pte")  # one image a call; batches loop

        variants: dict[str, Runner] = {
            "pytorch_eager": model,
            "pytorch_channels_last": lambda x: channels_last(x.contiguous(memory_format=torch.channels_last)),
            "torchscript": scripted,
            "onnx_fp32_default_session": ort_runner(default_session(fp32)),
            "onnx_fp32": ort_runner(onnx_session(fp32, threads=1)),
            "onnx_fp32_offline_optimized": ort_runner(onnx_session(offline, threads=1)),
            "onnx_fp32_ort_format": ort_runner(onnx_session(ort_model, threads=1)),
            "onnx_fp32_static": static_runner({b: onnx_session(m, threads=1) for b, m in static.items()}),
            "onnx_int8_default_session": ort_runner(default_session(int8)),
            "onnx_int8": ort_runner(onnx_session(int8, threads=1)),
            "executorch_xnnpack": executorch_run,
        }
        results: dict[str, object] = {
            "model_source": args.checkpoint or "random student (seed 0)",
            "threads": 1,
            "cores": 1,
            "image_size_px": IMAGE_SIZE,
            "single_image_runs": runs,
            "quick": quick,
            "explored_variants": list(variants),
            "state_dict_file_bytes": len(state.getvalue()),
            "torchscript_file_bytes": (folder / "student.torchscript.pt").stat().st_size,
            "onnx_fp32_file_bytes": len(fp32),
            "onnx_fp32_offline_optimized_file_bytes": len(offline),
            "onnx_fp32_ort_format_file_bytes": len(ort_model),
            **{f"onnx_fp32_static_batch{b}_file_bytes": len(m) for b, m in static.items()},
            "onnx_int8_file_bytes": len(int8),
            "executorch_xnnpack_file_bytes": len(pte),
        }
        started = time.perf_counter()
        jobs = {f"{name}_batch{BATCH}_img_per_s": (run, BATCH) for name, run in variants.items()}
        jobs.update({f"onnx_fp32_batch{batch}_img_per_s": (variants["onnx_fp32"], batch) for batch in sweep})
        with torch.inference_mode():
            others = {name: run for name, run in variants.items() if name != "pytorch_eager"}
            for name, diff in max_abs_diffs(others, model, [image, images[:BATCH]]).items():
                results[f"{name}_max_abs_diff"] = diff
            wrong = {name: results[f"{name}_max_abs_diff"] for name in others
                     if "int8" not in name and not results[f"{name}_max_abs_diff"] <= PARITY_MAX_ABS_DIFF}
            if wrong:
                raise EdgeError(f"logits differ from PyTorch eager by more than {PARITY_MAX_ABS_DIFF:g}: {wrong}")
            for name, times in latencies_ms(variants, image, runs).items():
                p50, p95 = np.percentile(times, [50, 95])
                results[f"{name}_p50_ms"], results[f"{name}_p95_ms"] = round(float(p50), 4), round(float(p95), 4)
            for key, rate in throughputs(jobs, images, seconds).items():
                results[key] = round(rate, 1)
        for name in variants:
            print(f"{name:28s} p50 {results[f'{name}_p50_ms']:6.3f} ms  p95 {results[f'{name}_p95_ms']:6.3f} ms  "
                  f"batch {BATCH}: {results[f'{name}_batch{BATCH}_img_per_s']:7.1f} img/s")
        print("onnx_fp32 by batch size: " + ", ".join(
            f"{batch}: {results[f'onnx_fp32_batch{batch}_img_per_s']:.0f}" for batch in sweep) + " img/s")
        for node, micros in profile_nodes(fp32, image, folder, runs=20 if quick else 200).items():
            results[f"onnx_fp32_node_{_key(node)}_us"] = micros
        results["benchmark_seconds"] = round(time.perf_counter() - started, 1)
        results.update(predict_end_to_end(checkpoint, folder / "predict", rounds=3))
    steps = " + ".join(f"{step} {results[f'predict_{step}_per_image_ms']:.3f}"
                        for step in ("read", "decode_resize", "normalize"))
    print(f"edgemri predict of {PREDICT_IMAGES} JPEGs: {steps} ms/image, "
          f"model {results['predict_model_per_image_ms']:.3f} ms/image; in-process {results['predict_total_s']:.3f} s "
          f"({results['predict_img_per_s']:.0f} img/s), the command {results['predict_cli_wall_s']:.2f} s "
          f"(start and imports alone {results['predict_cli_imports_s']:.2f} s)")

    baseline = "onnx_fp32_default_session"
    results["speedup_p50_onnx_fp32_vs_default_session"] = round(
        results[f"{baseline}_p50_ms"] / results["onnx_fp32_p50_ms"], 2)
    results[f"speedup_batch{BATCH}_onnx_fp32_vs_default_session"] = round(
        results[f"onnx_fp32_batch{BATCH}_img_per_s"] / results[f"{baseline}_batch{BATCH}_img_per_s"], 2)
    results["fastest_p50_variant"] = min(variants, key=lambda name: results[f"{name}_p50_ms"])
    results[f"fastest_batch{BATCH}_variant"] = max(variants, key=lambda name: results[f"{name}_batch{BATCH}_img_per_s"])
    results.update({
        "machine_platform": platform.platform(),
        **cpu_description(),
        "machine_cpu_count": os.cpu_count(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "onnxruntime_version": ort.__version__,
        "onnx_version": onnx.__version__,
        "numpy_version": np.__version__,
        "measured_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
