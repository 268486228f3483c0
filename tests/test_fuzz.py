"""Property-based fuzzing of every reader of untrusted bytes: the result is a valid object or the reader's one
error class (an EdgemriError), never another exception, and never more than a stated amount of memory.

Inputs are random bytes and, more usefully, valid files with bytes flipped, cut or repeated. The fast run here
takes well under a minute; ``EDGEMRI_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py`` runs a long one.
"""

from __future__ import annotations

import io
import json
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgemri.core.config import DPTierConfig
from edgemri.core.data.images import CLASS_NAMES
from edgemri.core.data.partition import LOCAL_SPLITS, read_manifest
from edgemri.core.errors import EdgemriError
from edgemri.core.federation import protocol as p
from edgemri.core.io import load_npz
from edgemri.core.privacy.dp import plan_dp
from edgemri.core.privacy.ledger import Ledger
from edgemri.core.registries import REGISTRIES, load_config
from edgemri.core.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from edgemri.core.untrusted import parse_json
from edgemri.deploy.warm import parse_request
from edgemri.edge.contract import check_metadata
from edgemri.models import build_model

EXAMPLES = int(os.environ.get("EDGEMRI_FUZZ_EXAMPLES", "25"))
MAX_PEAK_BYTES = 64 * 2**20  # no reader may need more than this for inputs of a few kB
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@st.composite
def _mutations(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` with a byte flipped, a slice cut out or repeated, or random bytes of similar size."""
    where = draw(st.integers(0, max(len(valid) - 1, 0)))
    span = draw(st.integers(1, 64))
    how = draw(st.sampled_from(["flip", "cut", "repeat", "random"]))
    if how == "flip" and valid:
        return valid[:where] + bytes([valid[where] ^ draw(st.integers(1, 255))]) + valid[where + 1:]
    if how == "cut":
        return valid[:where] + valid[where + span:]
    if how == "repeat":
        return valid[:where] + valid[where:where + span] * draw(st.integers(2, 50)) + valid[where:]
    return draw(st.binary(max_size=len(valid) + 64))


def _bounded(read: Callable[[], Any]) -> None:
    """``read()`` gives an object or an EdgemriError, within MAX_PEAK_BYTES."""
    tracemalloc.start()
    try:
        read()
    except EdgemriError as err:
        assert str(err) and "\n" not in str(err).strip()  # one line
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= MAX_PEAK_BYTES


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


VALID_CONFIG = (CONFIGS / "quickstart.yaml").read_bytes()


@FUZZ
@given(data=_mutations(VALID_CONFIG))
def test_config_files(tmp_path: Path, data: bytes) -> None:
    _bounded(lambda: load_config(_file(tmp_path, "config.yaml", data)))


@FUZZ
@given(key=st.sampled_from(["seed", "federation.rounds", "distill.compare", "privacy.tiers.phone", "data"]),
       value=st.text(max_size=200))
def test_config_overrides(key: str, value: str) -> None:
    _bounded(lambda: load_config(CONFIGS / "quickstart.yaml", [f"{key}={value}"]))


def _valid_manifest() -> bytes:
    files = [{"path": f"Training/glioma/{i}.jpg", "sha256": "0" * 64, "label": 0, "split": "train"} for i in range(3)]
    return json.dumps({"format": "edgemri.manifest/2", "client": "hospital-1", "kind": "hospital", "site": "a",
                       "seed": 0, "config": {}, "files": files, "num_examples": 3,
                       "class_counts": {split: {name: 3 if (split, name) == ("train", "glioma") else 0
                                                for name in CLASS_NAMES} for split in LOCAL_SPLITS}}).encode()


@FUZZ
@given(data=_mutations(_valid_manifest()))
def test_manifests(tmp_path: Path, data: bytes) -> None:
    _bounded(lambda: read_manifest(_file(tmp_path, "client.json", data)))


def _valid_ledger(folder: Path) -> tuple[bytes, bytes]:
    path = folder / "privacy-ledger.jsonl"
    plan = plan_dp(DPTierConfig(enabled=True, noise_multiplier=1.2, budget_epsilon=50.0), n=40, batch_size=8,
                   local_epochs=1, rounds=5, accountant="rdp")
    ledger = Ledger.open(path, "phone-1")
    ledger.append(1, plan, plan.steps_per_round)
    return path.read_bytes(), path.with_suffix(".head").read_bytes()


@FUZZ
@given(data=st.data())
def test_ledgers_and_heads(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    ledger, head = _valid_ledger(tmp_path_factory.mktemp("valid"))
    folder = tmp_path_factory.mktemp("fuzzed")
    _file(folder, "privacy-ledger.jsonl", data.draw(_mutations(ledger)))
    _file(folder, "privacy-ledger.head", data.draw(_mutations(head)))
    _bounded(lambda: Ledger.open(folder / "privacy-ledger.jsonl", "phone-1"))


def _valid_checkpoint(folder: Path) -> bytes:
    path = save_checkpoint(folder / "student.pt", Checkpoint(model="student",
                                                             state_dict=build_model("student").state_dict()))
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_checkpoints(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    valid = _valid_checkpoint(tmp_path_factory.mktemp("valid"))
    path = _file(tmp_path_factory.mktemp("fuzzed"), "student.pt", data.draw(_mutations(valid)))
    _bounded(lambda: load_checkpoint(path))


def _valid_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, images=np.zeros((4, 3, 8, 8), np.uint8), labels=np.arange(4), files=np.array(["a", "b"]))
    return buffer.getvalue()


@FUZZ
@given(data=_mutations(_valid_npz()))
def test_npz_caches_and_states(tmp_path: Path, data: bytes) -> None:
    _bounded(lambda: load_npz(_file(tmp_path, "cache.npz", data)))


VALID_REFERENCES = json.dumps({"key": "k", "clients": {"phone-1": {"accuracy@pooled": 0.5}}}).encode()


@FUZZ
@given(data=_mutations(VALID_REFERENCES))
def test_run_folder_json(data: bytes) -> None:
    _bounded(lambda: p.parse_references(parse_json(data, "references.json", p.ProtocolError, nonfinite=True)))


VALID_METADATA = json.dumps({"class_names": ["glioma", "meningioma", "notumor", "pituitary"],
                             "preprocessing": {"resize": [128, 128], "interpolation": "bilinear", "color": "RGB",
                                               "scale": "1/255", "mean": [0.485, 0.456, 0.406],
                                               "std": [0.229, 0.224, 0.225]},
                             "temperature": 1.5}).encode()


@FUZZ
@given(data=_mutations(VALID_METADATA))
def test_exported_model_metadata(data: bytes) -> None:
    from edgemri.edge.errors import EdgeError

    def read() -> Any:
        meta = parse_json(data, "model.onnx's edgemri metadata", EdgeError, nonfinite=True)
        if not isinstance(meta, dict):
            raise EdgeError("not an object")
        return check_metadata(meta, "model.onnx")
    _bounded(read)


VALID_REQUEST = json.dumps({"argv": ["flwr-clientapp", "--token", "x"], "cwd": "/tmp", "env": {"A": "1"}}).encode()


@FUZZ
@given(data=_mutations(VALID_REQUEST))
def test_warm_launcher_requests(data: bytes) -> None:
    _bounded(lambda: parse_request(data))


@FUZZ
@given(info=st.dictionaries(st.sampled_from(["kind", "site", "client"]),
                            st.one_of(st.text(max_size=80), st.integers(), st.none()), max_size=3),
       metrics=st.dictionaries(st.sampled_from([p.NUM_EXAMPLES, "epsilon", "accuracy"]),
                               st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(),
                                         st.booleans()), max_size=3))
def test_a_clients_discovery_reply(info: dict[str, Any], metrics: dict[str, Any]) -> None:
    _bounded(lambda: p.ClientInfo.from_record(info, metrics, ("hospital", "phone")))


VALID_INSTRUCTIONS = p.RoundInstructions.for_tier(load_config(CONFIGS / "quickstart.yaml"), "phone", 1).to_config()


@FUZZ
@given(key=st.sampled_from(sorted(VALID_INSTRUCTIONS)), data=st.data())
def test_the_servers_round_instructions(key: str, data: st.DataObject) -> None:
    record = dict(VALID_INSTRUCTIONS)
    value = record[key]
    record[key] = data.draw(_mutations(value.encode())).decode("utf-8", "replace") if isinstance(value, str) \
        else data.draw(st.one_of(st.integers(), st.floats(), st.text(max_size=20)))
    _bounded(lambda: p.RoundInstructions.from_config(record, REGISTRIES))


def test_the_unmutated_inputs_are_valid(tmp_path: Path) -> None:
    """The fuzzed inputs start from valid ones, so every reader's success path is exercised too."""
    assert read_manifest(_file(tmp_path, "client.json", _valid_manifest())).client == "hospital-1"
    assert set(load_npz(_file(tmp_path, "cache.npz", _valid_npz()))) == {"images", "labels", "files"}
    assert check_metadata(json.loads(VALID_METADATA), "x")[2] == 1.5
    assert parse_request(VALID_REQUEST).argv[0] == "flwr-clientapp"
    assert p.parse_references(json.loads(VALID_REFERENCES)) == {"phone-1": {"accuracy@pooled": 0.5}}
    assert p.RoundInstructions.from_config(dict(VALID_INSTRUCTIONS), REGISTRIES).server_round == 1
    assert load_checkpoint(_file(tmp_path, "s.pt", _valid_checkpoint(tmp_path))).model == "student"
