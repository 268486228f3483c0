"""Single-image latency and batch throughput of the student on ONE CPU thread.

Runs PyTorch eager (NCHW and channels-last), TorchScript, and ONNX Runtime fp32 and
int8 with its default session and with edgemri's (the NCHWc layout pass off), sweeps
the batch size, profiles where the fp32 time goes per node, and writes one flat JSON
(units in key names) to benchmarks/results/latency.json. Accuracy is not measured here:
the images are random. Usage: python benchmarks/latency.py [CHECKPOINT] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor

from edgemri.core.checkpoint import Checkpoint
from edgemri.core.data import IMAGE_SIZE, normalize
from edgemri.core.io import write_json
from edgemri.edge.contract import INPUT_NAME, load_student
from edgemri.edge.executorch import executorch_bytes, load_executorch
from edgemri.edge.int8 import calibration_sample, quantize
from edgemri.edge.onnx import onnx_bytes
from edgemri.edge.runtime import ORT_DISABLED_OPTIMIZERS, onnx_session, run_onnx
from edgemri.edge.torchscript import load_torchscript, torchscript_bytes
from edgemri.models import Student

RESULTS = Path(__file__).resolve().parent / "results" / "latency.json"
BATCH = 64
SWEEP = (1, 8, 32, 64, 256)
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
    parser.add_argument("--images", type=int, default=256, help="synthetic 128 px images (default: 256)")
    parser.add_argument("--runs", type=int, default=500, help="timed single-image calls per variant")
    parser.add_argument("--seconds", type=float, default=1.5, help="seconds per throughput measurement")
    args = parser.parse_args(argv)

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
    uint8 = torch.randint(0, 256, (args.images, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    images = normalize(uint8)
    image = images[:1]

    with tempfile.TemporaryDirectory(prefix="edgemri-bench.") as tmp:
        folder = Path(tmp)
        fp32 = onnx_bytes(checkpoint)
        int8 = quantize(fp32, calibration_sample(uint8))
        offline = offline_optimized(fp32, folder)
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
            "onnx_int8_default_session": ort_runner(default_session(int8)),
            "onnx_int8": ort_runner(onnx_session(int8, threads=1)),
            "executorch_xnnpack": executorch_run,
        }
        results: dict[str, object] = {
            "model_source": args.checkpoint or "random student (seed 0)",
            "threads": 1,
            "cores": 1,
            "image_size_px": IMAGE_SIZE,
            "single_image_runs": args.runs,
            "state_dict_file_bytes": len(state.getvalue()),
            "torchscript_file_bytes": (folder / "student.torchscript.pt").stat().st_size,
            "onnx_fp32_file_bytes": len(fp32),
            "onnx_fp32_offline_optimized_file_bytes": len(offline),
            "onnx_int8_file_bytes": len(int8),
            "executorch_xnnpack_file_bytes": len(pte),
        }
        started = time.perf_counter()
        jobs = {f"{name}_batch{BATCH}_img_per_s": (run, BATCH) for name, run in variants.items()}
        jobs.update({f"onnx_fp32_batch{batch}_img_per_s": (variants["onnx_fp32"], batch) for batch in SWEEP})
        with torch.inference_mode():
            for name, times in latencies_ms(variants, image, args.runs).items():
                p50, p95 = np.percentile(times, [50, 95])
                results[f"{name}_p50_ms"], results[f"{name}_p95_ms"] = round(float(p50), 4), round(float(p95), 4)
            for key, rate in throughputs(jobs, images, args.seconds).items():
                results[key] = round(rate, 1)
        for name in variants:
            print(f"{name:28s} p50 {results[f'{name}_p50_ms']:6.3f} ms  p95 {results[f'{name}_p95_ms']:6.3f} ms  "
                  f"batch {BATCH}: {results[f'{name}_batch{BATCH}_img_per_s']:7.1f} img/s")
        print("onnx_fp32 by batch size: " + ", ".join(
            f"{batch}: {results[f'onnx_fp32_batch{batch}_img_per_s']:.0f}" for batch in SWEEP) + " img/s")
        for node, micros in profile_nodes(fp32, image, folder).items():
            results[f"onnx_fp32_node_{_key(node)}_us"] = micros
        results["benchmark_seconds"] = round(time.perf_counter() - started, 1)

    baseline = "onnx_fp32_default_session"
    results["speedup_p50_onnx_fp32_vs_default_session"] = round(
        results[f"{baseline}_p50_ms"] / results["onnx_fp32_p50_ms"], 2)
    results[f"speedup_batch{BATCH}_onnx_fp32_vs_default_session"] = round(
        results[f"onnx_fp32_batch{BATCH}_img_per_s"] / results[f"{baseline}_batch{BATCH}_img_per_s"], 2)
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
