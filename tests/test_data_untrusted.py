"""A data folder, its cache and its manifests are untrusted input: no code runs from them, nothing escapes the
data root, and every bad file is a clear error or a skip with a reason, never a traceback."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_kaggle_folder

from edgemri.core.data import partition as partition_module
from edgemri.core.data.dataset import (
    cache_path,
    describe_folder,
    load_dataset,
    load_pools,
    load_unlabeled,
    scan_folder,
)
from edgemri.core.data.images import CLASS_NAMES, DataError
from edgemri.core.data.partition import (
    LOCAL_SPLITS,
    MANIFEST_FORMAT,
    ManifestError,
    load_local_data,
    load_local_data_cache,
    read_manifest,
    save_local_data,
)
from edgemri.core.io import save_npz

pytestmark = pytest.mark.usefixtures("user_cache")  # each test decodes into its own cache folder


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return make_kaggle_folder(tmp_path / "data", {"Training": 3, "Testing": 2})


class _Payload:
    """Unpickling this runs a shell command: what a planted cache would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------- the decoded cache


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_a_planted_pickle_cache_is_never_unpickled(folder: Path, tmp_path: Path, container: str) -> None:
    marker = tmp_path / "payload-ran"
    payload = {"split": _Payload(marker), "skipped": []}
    buffer = io.BytesIO()
    if container == "torch-zip":
        torch.save(payload, buffer)
    else:
        pickle.dump(payload, buffer)
    scan = scan_folder(folder)
    for split in ("Training", "Testing"):
        old_name = folder / ".edgemri-cache" / f"{split.lower()}-{scan.cache_key(split)[:20]}.pt"
        for place in (old_name, cache_path(scan, split)):
            place.parent.mkdir(parents=True, exist_ok=True)
            place.write_bytes(buffer.getvalue())
    dataset = load_dataset(folder)
    info = describe_folder(folder)
    assert not marker.exists(), "the planted pickle ran"
    assert dataset.train.class_counts() == dict.fromkeys(CLASS_NAMES, 3)
    assert info["total"] == 4 * 3 + 4 * 2


def test_the_default_cache_is_the_users_not_the_data_folders(folder: Path, user_cache: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    load_dataset(folder)
    assert not (folder / ".edgemri-cache").exists()
    written = sorted(user_cache.rglob("*.npz"))
    assert [p.name.split("-")[0] for p in written] == ["testing", "training"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in written), "decoded scans are readable by others"
    # Without the override: $XDG_CACHE_HOME/edgemri; data.cache_dir still wins over both.
    monkeypatch.delenv("EDGEMRI_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_dataset(folder)
    assert len(list((tmp_path / "xdg" / "edgemri").rglob("*.npz"))) == 2
    load_dataset(folder, cache_dir=tmp_path / "chosen")
    assert len(list((tmp_path / "chosen").rglob("*.npz"))) == 2


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _wrong_shape(path: Path) -> None:
    arrays = dict(np.load(path))
    arrays["images"] = arrays["images"][:, :, :64, :64].copy()
    save_npz(path, arrays)


def _wrong_labels(path: Path) -> None:
    arrays = dict(np.load(path))
    arrays["labels"] = (arrays["labels"] + 1) % len(CLASS_NAMES)
    save_npz(path, arrays)


@pytest.mark.parametrize("corrupt", [_truncate, _wrong_shape, _wrong_labels, lambda p: p.write_bytes(b"junk")],
                         ids=["truncated", "wrong-shape", "wrong-labels", "not-a-zip"])
def test_a_corrupt_cache_is_rebuilt_with_a_warning(folder: Path, corrupt: Any,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    first = load_dataset(folder)
    path = cache_path(scan_folder(folder), "Training")
    corrupt(path)
    with caplog.at_level(logging.WARNING):
        again = load_dataset(folder)
    assert any("ignoring the decoded cache" in r.message for r in caplog.records)
    assert torch.equal(again.train.images, first.train.images)
    assert torch.equal(again.train.labels, first.train.labels)
    np.load(path)["images"]  # rebuilt: a valid npz again


def test_a_file_that_could_not_be_read_is_tried_again_next_time(folder: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    target = folder / "Training" / "glioma" / "Tr-gl_0001.jpg"
    real_open = builtins.open

    def denying_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | os.PathLike) and os.fspath(file) == str(target):
            raise PermissionError(13, "Permission denied", str(target))
        return real_open(file, *args, **kwargs)

    with monkeypatch.context() as patch:  # a transient EACCES, as root cannot be denied by chmod
        patch.setattr(builtins, "open", denying_open)
        patch.setattr(io, "open", denying_open)
        first = load_dataset(folder)
    assert [Path(s.path).name for s in first.skipped] == [target.name]
    assert "cannot read" in first.skipped[0].reason
    again = load_dataset(folder)
    assert again.skipped == [] and again.train.class_counts()["glioma"] == 3


def test_a_file_name_that_is_not_utf8_is_skipped_with_a_printable_reason(folder: Path) -> None:
    good = folder / "Training" / "glioma" / "Tr-gl_0000.jpg"
    odd = folder / "Training" / "glioma" / os.fsdecode(b"scan-\xff.jpg")
    try:
        odd.write_bytes(good.read_bytes())
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses file names that are not UTF-8")
    dataset = load_dataset(folder)
    (skip,) = dataset.skipped
    assert "not valid UTF-8" in skip.reason and skip.path.endswith("scan-\\xff.jpg")
    skip.path.encode("utf-8")  # printable, loggable, JSON-able
    result = subprocess.run([sys.executable, "-m", "edgemri", "data", "info", str(folder)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert "scan-\\xff.jpg: file name is not valid UTF-8" in result.stdout


def test_unlabeled_names_that_are_not_utf8_are_skipped_with_a_printable_reason(folder: Path,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    transfer = folder / "Unlabeled" / "site-a"
    transfer.mkdir(parents=True)
    good = (folder / "Training" / "glioma" / "Tr-gl_0000.jpg").read_bytes()
    (transfer / "u0.jpg").write_bytes(good)
    try:
        (transfer / os.fsdecode(b"scan-\xff.jpg")).write_bytes(good)
        (transfer / os.fsdecode(b"dir-\xfe")).mkdir()
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses file names that are not UTF-8")
    (transfer / os.fsdecode(b"dir-\xfe") / "u1.jpg").write_bytes(good)
    with caplog.at_level(logging.WARNING):
        assert load_unlabeled(folder / "Unlabeled").files == ["site-a/u0.jpg"]
    skipped = sorted(r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage())
    assert len(skipped) == 2 and skipped[0].endswith("dir-\\xfe: name is not valid UTF-8; rename it")
    assert "scan-\\xff.jpg" in skipped[1]


def test_a_class_folder_that_cannot_be_listed_is_a_clear_error(folder: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    locked = folder / "Training" / "meningioma"
    real_iterdir = Path.iterdir

    def iterdir(self: Path) -> Any:
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(DataError, match=re.escape(f"cannot read {locked}: Permission denied")):
        load_dataset(folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a folder whatever its permissions")
def test_a_class_folder_without_read_permission_is_a_clear_error(folder: Path) -> None:
    locked = folder / "Training" / "meningioma"
    locked.chmod(0)
    try:
        with pytest.raises(DataError, match=re.escape(f"cannot read {locked}")):
            scan_folder(folder)
    finally:
        locked.chmod(0o755)


def test_a_class_with_no_usable_training_image_is_refused(folder: Path) -> None:
    for path in (folder / "Training" / "meningioma").iterdir():
        path.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="meningioma has no usable image.*at least one readable image in Training"):
        load_dataset(folder)
    # Testing may lack a class: the metrics report it as absent, nothing is learned from it.
    for path in (folder / "Testing" / "meningioma").iterdir():
        path.write_bytes(b"not a jpeg")
    for path in (folder / "Training" / "meningioma").iterdir():
        path.unlink()
    make_kaggle_folder(folder, {"Training": 1})
    assert load_dataset(folder).test.class_counts()["meningioma"] == 0


# ---------------------------------------------------------------- links out of the data root

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def _edgemri(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgemri", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def _link_out(folder: Path, outside: Path, link: str, target: str = "Training/glioma/Tr-gl_0000.jpg") -> None:
    """``link`` (below the data root; a folder there is replaced) pointing at ``target`` in a folder outside it,
    a small Kaggle-layout set plus a text file like /etc/passwd."""
    make_kaggle_folder(outside, {"Training": 1, "Testing": 1})
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    path = folder / link
    if path.is_dir():
        shutil.rmtree(path)
    path.symlink_to(outside / target, target_is_directory=(outside / target).is_dir())


@pytest.mark.parametrize(("link", "target"), [
    ("Training/glioma/outside.jpg", "Training/glioma/Tr-gl_0000.jpg"),  # was counted as a Training image
    ("Training/glioma/passwd.jpg", "passwd"),  # was opened (and skipped as no image)
    ("Training/glioma/passwd", "passwd"),  # no image extension: refused all the same, never listed as a skip
    ("Training/meningioma/more", "Training/glioma"),  # a folder outside, inside a class folder
    ("Training/notumor", "Training/notumor"),  # a class folder
    ("Testing", "Testing"),  # a split folder
    ("metadata.csv", "passwd"),  # the sites file
])
def test_a_link_out_of_the_data_root_is_refused_before_any_file_is_opened(
        folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, link: str, target: str) -> None:
    outside = tmp_path / "outside"
    _link_out(folder, outside, link, target)
    opened: list[Path] = []
    real_open = builtins.open

    def recording_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | os.PathLike):
            opened.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(io, "open", recording_open)
    with pytest.raises(DataError) as err:
        describe_folder(folder)
    assert str(err.value) == (f"{link} leaves the data root {folder} (a symbolic link that resolves outside the data "
                              f"root); links may only point inside it, so copy the file in instead")
    assert not [path for path in opened if path.is_relative_to(outside)]


def test_links_out_of_the_pools_are_refused_and_links_inside_the_root_are_followed(folder: Path,
                                                                                 tmp_path: Path) -> None:
    (folder / "Training" / "glioma" / "alias.jpg").symlink_to(Path("Tr-gl_0000.jpg"))
    (folder / "Testing" / "glioma" / "from-training.jpg").symlink_to(folder / "Training" / "glioma" / "Tr-gl_0001.jpg")
    dataset = load_dataset(folder)
    assert dataset.train.class_counts()["glioma"] == 4 and dataset.test.class_counts()["glioma"] == 3
    site = folder / "Pools" / "site-a"
    make_kaggle_folder(tmp_path / "pool", {"site-a": 1})
    (folder / "Pools").mkdir()
    site.symlink_to(tmp_path / "pool" / "site-a", target_is_directory=True)
    with pytest.raises(DataError, match="^Pools/site-a leaves the data root"):
        load_pools(folder)


def test_data_info_and_partition_refuse_a_link_out_in_one_line(folder: Path, tmp_path: Path) -> None:
    """The commands as a user runs them: exit 2, one line naming the link, no manifest written."""
    _link_out(folder, tmp_path / "outside", "Training/glioma/outside.jpg")
    expected = f"edgemri: error: Training/glioma/outside.jpg leaves the data root {folder} ("
    info = _edgemri("data", "info", folder)
    partition = _edgemri("data", "partition", "--config", QUICKSTART, "--data-root", folder, "--out", tmp_path / "m")
    for done in (info, partition):
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), done.stderr
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------- names that would drive the terminal

FORGED = "forged\nedgemri: all clients passed\x1b[31m\x1b]0;owned\x07"  # a newline, a colour and an OSC title


def test_data_info_escapes_file_names(folder: Path) -> None:
    """A skipped file, a label conflict and an error each print the name escaped, never raw."""
    (folder / "Training" / "notumor" / f"{FORGED}.jpg").write_bytes(b"not a jpeg")
    copy = (folder / "Training" / "glioma" / "Tr-gl_0000.jpg").read_bytes()
    (folder / "Training" / "meningioma" / f"{FORGED}-copy.jpg").write_bytes(copy)  # a label conflict
    done = _edgemri("data", "info", folder)
    assert done.returncode == 0, done.stderr
    escaped = "forged\\nedgemri: all clients passed\\x1b[31m\\x1b]0;owned\\x07"
    for stream in (done.stdout, done.stderr):
        assert "\x1b" not in stream and "\x07" not in stream
        assert not [line for line in stream.splitlines() if line.startswith("edgemri: all clients")]
    assert f"{escaped}.jpg: not an image" in done.stdout
    assert f"Training/meningioma/{escaped}-copy.jpg (meningioma)" in done.stdout
    assert json.loads(_edgemri("data", "info", folder, "--json").stdout)["skipped"][0]["path"].endswith(
        f"{escaped}.jpg")

    (folder / "Training" / "glioma" / f"{FORGED}.jpg").symlink_to("/etc/passwd")
    done = _edgemri("data", "info", folder)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "\x1b" not in done.stderr
    assert done.stderr.startswith(f"edgemri: error: Training/glioma/{escaped}.jpg leaves the data root")


# ---------------------------------------------------------------- manifests


def _manifest(root: Path, rels: list[str]) -> dict[str, Any]:
    """A valid manifest for these files (all in train but the last, in test)."""
    files = [{"path": rel, "sha256": hashlib.sha256((root / rel).read_bytes()).hexdigest(),
              "label": CLASS_NAMES.index(Path(rel).parent.name) if Path(rel).parent.name in CLASS_NAMES else 0,
              "split": "test" if k == len(rels) - 1 else "train"} for k, rel in enumerate(rels)]
    counts = {split: dict.fromkeys(CLASS_NAMES, 0) for split in LOCAL_SPLITS}
    for f in files:
        counts[f["split"]][CLASS_NAMES[f["label"]]] += 1
    return {"format": MANIFEST_FORMAT, "client": "hospital-site1", "kind": "hospital", "site": "site1",
            "seed": 0, "num_examples": len(files), "class_counts": counts, "files": files, "config": {}}


def _write(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj))
    return path


GOOD = ["Training/glioma/Tr-gl_0000.jpg", "Training/notumor/Tr-no_0000.jpg", "Training/pituitary/Tr-pi_0000.jpg"]


@pytest.mark.parametrize("escape", ["../outside.jpg", "absolute"])
def test_a_manifest_path_outside_the_data_root_is_refused(folder: Path, tmp_path: Path, escape: str) -> None:
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((folder / GOOD[0]).read_bytes())
    manifest = _manifest(folder, GOOD)
    manifest["files"][0]["path"] = str(outside) if escape == "absolute" else escape
    path = _write(tmp_path / "m.json", manifest)
    with pytest.raises(ManifestError, match=r"m\.json: key 'files\[0\]\.path'"):
        load_local_data(read_manifest(path), folder)


@pytest.mark.parametrize("rel", ["Training/glioma/link.jpg", "Training/glioma/folder-link/outside.jpg"])
def test_a_symlink_out_of_the_data_root_is_refused(folder: Path, tmp_path: Path, rel: str) -> None:
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((folder / GOOD[0]).read_bytes())
    (folder / "Training" / "glioma" / "link.jpg").symlink_to(outside)
    (folder / "Training" / "glioma" / "folder-link").symlink_to(tmp_path, target_is_directory=True)
    manifest = read_manifest(_write(tmp_path / "m.json", _manifest(folder, [rel, *GOOD])))
    with pytest.raises(ManifestError, match=f"^hospital-site1: a file its manifest lists: {rel} leaves the data root "
                                            f".* resolves outside the data root"):
        load_local_data(manifest, folder)


def _set(field: str, value: Any) -> Any:
    def change(m: dict[str, Any]) -> None:
        m[field] = value
    return change


def _set_file(field: str, value: Any) -> Any:
    def change(m: dict[str, Any]) -> None:
        m["files"][0][field] = value
    return change


@pytest.mark.parametrize(("change", "field"), [
    (_set_file("label", 7), "files[0].label"),
    (_set_file("label", "0"), "files[0].label"),
    (_set_file("label", True), "files[0].label"),
    (_set_file("split", "holdout"), "files[0].split"),
    (_set_file("sha256", "abc"), "files[0].sha256"),
    (_set_file("path", "Training/./glioma/Tr-gl_0000.jpg"), "files[0].path"),
    (_set("kind", "server"), "kind"),
    (_set("client", "../evil"), "client"),
    (_set("client", "hospital\n"), "client"),
    (_set("client", "h" * 65), "client"),
    (_set("site", "a/b"), "site"),
    (_set("seed", -1), "seed"),
    (_set("num_examples", 10**9), "num_examples"),
    (_set("config", []), "config"),
    (lambda m: m["class_counts"]["train"].update(glioma=500), "class_counts"),
    (lambda m: m["files"].append(dict(m["files"][0])), "files"),
    (_set("extra", 1), "extra"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_every_manifest_field_is_validated(folder: Path, tmp_path: Path, change: Any, field: str) -> None:
    manifest = _manifest(folder, GOOD)
    change(manifest)
    with pytest.raises(ManifestError, match=r"m\.json") as err:
        read_manifest(_write(tmp_path / "m.json", manifest))
    assert field in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content", [
    lambda m: b"\xff\xfe" + json.dumps(m).encode(),
    lambda m: json.dumps(m)[:-1].encode() + b', "kind": "phone"}',  # a second "kind" would win silently
    lambda m: json.dumps([m]).encode(),
], ids=["not-utf8", "duplicate-key", "a-list"])
def test_a_manifest_that_is_not_one_json_object_is_a_manifest_error(folder: Path, tmp_path: Path,
                                                                    content: Any) -> None:
    path = tmp_path / "m.json"
    path.write_bytes(content(_manifest(folder, GOOD)))
    with pytest.raises(ManifestError, match=r"m\.json"):
        read_manifest(path)


def test_an_oversized_manifest_is_refused(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partition_module, "MAX_MANIFEST_BYTES", 200)
    with pytest.raises(ManifestError, match=r"m\.json: .* bytes is over the 200-byte limit"):
        read_manifest(_write(tmp_path / "m.json", _manifest(folder, GOOD)))


# ---------------------------------------------------------------- a client's decoded data


def test_the_local_data_cache_is_plain_arrays_checked_against_the_manifest(folder: Path, tmp_path: Path) -> None:
    manifest = read_manifest(_write(tmp_path / "m.json", _manifest(folder, GOOD)))
    local = load_local_data(manifest, folder)
    assert local.train.files == GOOD[:2] and local.test.files == GOOD[2:]
    cache = save_local_data(tmp_path / "state" / "local-data.npz", local)
    back = load_local_data_cache(cache, manifest)
    assert back is not None and torch.equal(back.train.images, local.train.images) and back.test.files == GOOD[2:]
    assert load_local_data_cache(tmp_path / "missing.npz", manifest) is None
    other = read_manifest(_write(tmp_path / "o.json", _manifest(folder, GOOD[1:])))
    assert load_local_data_cache(cache, other) is None  # another manifest's files
    marker = tmp_path / "payload-ran"
    cache.write_bytes(pickle.dumps(_Payload(marker)))
    assert load_local_data_cache(cache, manifest) is None and not marker.exists()
    torch.save({"train": _Payload(marker)}, cache)
    assert load_local_data_cache(cache, manifest) is None and not marker.exists()
