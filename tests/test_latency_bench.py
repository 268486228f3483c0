"""benchmarks/latency.py --quick (issue 15 §3): every explored variant timed and parity-checked, `edgemri predict`
timed end to end, and the static-batch ONNX export it measures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch

from edgemri.core.training.checkpoint import Checkpoint
from edgemri.edge.errors import EdgeError
from edgemri.edge.onnx import onnx_bytes
from edgemri.models import Student

ROOT = Path(__file__).resolve().parents[1]
NEW_VARIANTS = ("onnx_fp32_ort_format", "onnx_fp32_static")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One --quick run in its own process, as `make bench` runs it (it pins itself to one core and thread)."""
    out = tmp_path_factory.mktemp("latency") / "latency.json"
    subprocess.run([sys.executable, "-m", "benchmarks.latency", "--quick", "--out", str(out)], cwd=ROOT,
                   check=True, capture_output=True, timeout=180)
    return json.loads(out.read_text())


def test_every_explored_variant_has_its_p50_p95_and_batch_throughput(quick: dict[str, Any]) -> None:
    assert set(NEW_VARIANTS) <= set(quick["explored_variants"])
    for name in quick["explored_variants"]:
        assert 0 < quick[f"{name}_p50_ms"] <= quick[f"{name}_p95_ms"], name
        assert quick[f"{name}_batch64_img_per_s"] > 0, name
    assert quick["fastest_p50_variant"] in quick["explored_variants"]
    assert quick["fastest_batch64_variant"] in quick["explored_variants"]
    ort_file = quick["onnx_fp32_ort_format_file_bytes"]
    assert ort_file > 0 and ort_file != quick["onnx_fp32_file_bytes"]  # a flatbuffer, not the ONNX copied
    assert quick["onnx_fp32_static_batch1_file_bytes"] > 0 and quick["onnx_fp32_static_batch64_file_bytes"] > 0


def test_fp32_variants_match_pytorch_eager_and_int8_is_recorded(quick: dict[str, Any]) -> None:
    for name in quick["explored_variants"]:
        if name == "pytorch_eager":
            continue
        diff = quick[f"{name}_max_abs_diff"]
        if "int8" in name:
            assert diff > 0, name  # quantized logits: a zero would mean the fp32 model was timed
        else:
            assert 0 <= diff < 1e-4, name


def test_predict_is_timed_end_to_end_and_split_into_its_steps(quick: dict[str, Any]) -> None:
    assert quick["predict_images"] == 100
    steps = ("read", "decode_resize", "normalize")
    for key in [f"predict_{s}_per_image_ms" for s in steps] + ["predict_model_per_image_ms", "predict_model_load_ms",
                                                                   "predict_cli_imports_s"]:
        assert quick[key] > 0, key
    parts = sum(quick[f"predict_{s}_per_image_ms"] for s in steps)
    assert quick["predict_decode_preprocess_per_image_ms"] == pytest.approx(parts, abs=1e-3)
    assert quick["predict_img_per_s"] == pytest.approx(100 / quick["predict_total_s"], rel=0.01)
    assert quick["predict_cli_wall_s"] > quick["predict_total_s"]  # the command also starts Python and loads
    assert quick["predict_cli_img_per_s"] == pytest.approx(100 / quick["predict_cli_wall_s"], rel=0.01)


def test_the_earlier_keys_are_kept(quick: dict[str, Any]) -> None:
    kept = ("onnx_fp32_p50_ms", "onnx_fp32_default_session_batch64_img_per_s", "onnx_fp32_batch1_img_per_s",
            "executorch_xnnpack_file_bytes", "speedup_p50_onnx_fp32_vs_default_session", "benchmark_seconds")
    assert all(key in quick for key in kept)
    assert any(key.startswith("onnx_fp32_node_") and key.endswith("_us") for key in quick)


def test_a_static_batch_export_fixes_the_batch_dimension_and_the_default_stays_dynamic() -> None:
    torch.manual_seed(0)
    checkpoint = Checkpoint(model="student", state_dict=Student().state_dict(), role="random (test)")

    def input_dims(model: bytes) -> list[int | str]:
        dims = onnx.load_from_string(model).graph.input[0].type.tensor_type.shape.dim
        return [d.dim_param or d.dim_value for d in dims]

    assert input_dims(onnx_bytes(checkpoint)) == ["batch", 3, 128, 128]
    assert input_dims(onnx_bytes(checkpoint, static_batch=2)) == [2, 3, 128, 128]
    for bad in (0, 257, True, 1.5):
        with pytest.raises(EdgeError, match="static batch"):
            onnx_bytes(checkpoint, static_batch=bad)
