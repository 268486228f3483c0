"""Atomic file writes: every artefact is written to a temp file, then renamed.

A crash or Ctrl-C leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import fcntl
import io
import itertools
import json
import logging
import os
import stat
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from edgemri.core.errors import EdgemriError

log = logging.getLogger(__name__)
_LOCK_POLL_S = 0.5


class ArtefactError(EdgemriError):
    """An artefact file cannot be read back as what it claims to be; the message names the file."""


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _atomic(path: Path, write: Callable[[BinaryIO], None], mode: int | None = None) -> Path:
    """Write through a temp file in the same folder, fsync, then rename over ``path``.

    mkstemp creates files readable by the owner only, so the mode is set before the rename:
    without ``mode``, 0o666 less the umask (as ``open`` would); a ``mode`` given is set exactly,
    whatever the umask (a private key 0o600 under ``umask 000``, a certificate 0o644 under ``umask 077``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def private_folder(folder: Path, error: type[EdgemriError], *, tighten: bool = True) -> Path:
    """``folder`` for keys, certificates or a socket: this user's, mode 0700 whatever the umask.

    A missing folder is created so, and so are its missing parents: one left 0777 (``umask 000``)
    would let anyone rename the folder away and put their own in its place. An existing folder must
    be this user's; one that others may use is tightened to owner-only (``tighten``) or refused.
    Raises ``error`` in one line (OSError where the file system refuses).
    """
    folder = Path(folder)
    for path in reversed([p for p in (folder, *folder.parents) if not p.exists()]):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made meanwhile by another process: ``folder`` is checked below like any existing one
        os.chmod(path, 0o700)  # mkdir's mode is less the umask, which may take the owner's own bits
    info = folder.stat()
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise error(f"{folder} must be a folder of this user's (uid {os.getuid()}); it is "
                    f"{'a folder' if stat.S_ISDIR(info.st_mode) else 'not a folder'} of uid {info.st_uid}")
    if mode & 0o077 and not tighten:
        raise error(f"{folder} is mode {mode:o}, open to other users; make it mode 0700 or choose another folder")
    if mode & 0o077:
        os.chmod(folder, mode & 0o700)
    return folder


@contextmanager
def owner_lock(path: Path, error: type[EdgemriError], holder: str = "edgemri command",
               wait_s: float = 0.0) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` while a command owns a run folder.

    A second command on the same folder waits up to ``wait_s`` for the first to end, then is refused with
    ``error``; and the processes the command started can tell when it is gone (``owner_gone``): the kernel
    drops the lock when its holder dies, however it dies (Ctrl-C, SIGKILL, a closed terminal). The
    descriptor is not inherited by child processes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    with path.open("a") as fh:
        for attempt in itertools.count():
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    waited = f" (waited {wait_s:g} s)" if wait_s else ""
                    raise error(f"another {holder} is working in {path.parent} (it holds {path.name}){waited}; "
                                f"wait for it to end or stop it first") from None
                if attempt == 0:
                    log.info("another %s holds %s: waiting up to %g s for it to end", holder, path, wait_s)
                time.sleep(_LOCK_POLL_S)
        yield path


def owner_gone(path: Path) -> bool:
    """Whether nobody holds ``path``'s ``owner_lock`` any more (a missing file: nobody). Opens read-only, so a
    path named by someone else is never created."""
    try:
        with path.open("rb") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # got it: its holder is gone (closing releases it)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def write_bytes(path: Path, data: bytes, mode: int | None = None) -> Path:
    return _atomic(path, lambda fh: fh.write(data), mode)


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def save_torch(path: Path, obj: Any) -> Path:
    """torch.save through an in-memory buffer, then an atomic rename."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getvalue())


def save_figure(path: Path, figure: Any, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically as PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return write_bytes(path, buffer.getvalue())


def save_npz(path: Path, arrays: Mapping[str, np.ndarray], mode: int | None = None) -> Path:
    """Plain numeric and string arrays as one uncompressed .npz, atomically; object arrays are refused."""
    for name, array in arrays.items():
        if np.asarray(array).dtype.hasobject:
            raise TypeError(f"array {name!r} holds Python objects; only plain arrays are saved")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_bytes(path, buffer.getvalue(), mode)


MAX_NPZ_MEMBERS = 1_000  # an edgemri .npz holds a few arrays


def _check_npz_members(path: Path) -> None:
    """Refuse, before numpy allocates anything, an .npz whose arrays could need more memory than its own bytes:
    members that are compressed (a zip bomb; ``save_npz`` never compresses) or whose header declares a shape
    larger than the data stored behind it (numpy would allocate the declared size first)."""
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        if len(members) > MAX_NPZ_MEMBERS:
            raise ValueError(f"{len(members):,} members; allowed: at most {MAX_NPZ_MEMBERS:,}")
        for info in members:
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                raise ValueError(f"member {info.filename[:60]!r} is compressed; edgemri writes stored arrays only")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise ValueError(f"member {info.filename[:60]!r} has .npy format version {version}")
                shape, _, dtype = read_header(member, max_header_size=10_000)
                declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if declared > info.file_size:
                    raise ValueError(f"member {info.filename[:60]!r} declares {declared:,} bytes of data but "
                                     f"stores {info.file_size:,}")


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz, read with ``allow_pickle=False``: a planted pickle is an error, never code.

    Raises ArtefactError naming the file when it is missing, truncated, not an npz, holds objects, or declares
    arrays larger than the bytes it stores (checked before any array is allocated).
    """
    try:
        _check_npz_members(path)
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, EOFError, ValueError, KeyError, NotImplementedError, zipfile.BadZipFile) as err:
        # ValueError: object arrays (allow_pickle=False), pickles and malformed headers.
        raise ArtefactError(f"{path} is not a readable .npz of plain arrays ({type(err).__name__}: {err})") from None
    strays = [name for name, value in arrays.items() if not isinstance(value, np.ndarray)]
    if strays:  # a zip with members other than .npy arrays (a torch checkpoint, say)
        raise ArtefactError(f"{path} is not a plain .npz: member {strays[0]!r} is not an array")
    return arrays
