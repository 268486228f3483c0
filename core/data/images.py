"""One image in, one uint8 array out: safe decoding, the paper's preprocessing (128 x 128, bilinear, RGB)
and the normalization a model applies on the fly (ImageNet mean/std, or a model's own calibrated ones).

An image file is untrusted input: sizes are bounded before decoding (no decompression bombs), and a file that
cannot be decoded is a one-line BadImageError.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from edgemri.core.config import HEAD_STEPS
from edgemri.core.errors import EdgemriError

CLASS_NAMES: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")
IMAGE_SIZE = 128
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MIN_SIDE_PX = 16  # smaller than this is no MRI slice: a thumbnail or an icon
MAX_PIXELS = 64_000_000  # larger is treated as a decompression bomb, before decoding
MAX_FILE_BYTES = 256 * 2**20  # an MRI slice is kilobytes; a bigger file is not read into memory
PREPROCESSING = {
    "resize": [IMAGE_SIZE, IMAGE_SIZE],
    "interpolation": "bilinear",
    "color": "RGB",
    "scale": "1/255",
    "mean": list(MEAN),
    "std": list(STD),
}


class DataError(EdgemriError):
    """A data folder cannot be used as given; the message names the path."""


class BadImageError(EdgemriError):
    """One file cannot be used as an image; the message says why."""


class UnreadableFileError(BadImageError):
    """The file could not be read (permissions, I/O): a property of the moment, not of its content."""


def is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates
        return False
    return True


# ---------------------------------------------------------------- one image


def _to_8bit(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit grey (single-channel sources) or RGB, without clipping or inventing colour.

    Grey stays one channel until after the resize (``preprocess``): resizing one channel and copying it is
    bit-identical to resizing three equal ones, and a third of the work."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit and float images: scale the full range down, never clip at 255.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F" and array.max() <= 1.0:
            top = 1.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L")
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Transparent areas become black, the background of an MRI slice.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("L", "1"):
        return image.convert("L")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGB


def read_image_bytes(path: str | Path) -> bytes:
    """The raw bytes of one image file.

    I/O failures raise UnreadableFileError (worth retrying later); an empty or oversized
    file raises BadImageError (a property of the file).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            raise BadImageError("empty file (0 bytes)")
        if size > MAX_FILE_BYTES:
            raise BadImageError(f"file of {size:,} bytes exceeds the {MAX_FILE_BYTES:,}-byte limit")
        return path.read_bytes()
    except OSError as err:
        raise UnreadableFileError(f"cannot read the file: {err.strerror or err}") from None


def _decode(data: bytes) -> Image.Image:
    """Decode one image file's bytes as upright 8-bit grey or RGB, or raise BadImageError with the reason."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise BadImageError(
                    f"{width}x{height} pixels exceeds the {MAX_PIXELS:,}-pixel limit (decompression bomb?)"
                )
            if min(width, height) < MIN_SIDE_PX:
                raise BadImageError(f"too small: {width}x{height} px (minimum side {MIN_SIDE_PX} px)")
            image.load()
            upright = ImageOps.exif_transpose(image)
            return _to_8bit(upright)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError("not an image (unrecognized format)") from None
    except Image.DecompressionBombError as err:
        raise BadImageError(f"decompression bomb: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        # The bytes are in memory: PIL's OSError here means truncated data, SyntaxError a broken header.
        raise BadImageError(f"corrupt or truncated image: {err}") from None


def open_image(path: str | Path) -> Image.Image:
    """Open one image file as upright 8-bit RGB (as training decodes it), or raise BadImageError with the reason."""
    image = _decode(read_image_bytes(path))
    return image if image.mode == "RGB" else image.convert("RGB")


def preprocess(image: Image.Image) -> np.ndarray:
    """Resize to 128 x 128 bilinear (as torchvision's Resize on PIL) -> uint8 (3, H, W); grey: 3 equal channels."""
    resized = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)
    if resized.ndim == 2:
        return np.ascontiguousarray(np.broadcast_to(resized, (3, IMAGE_SIZE, IMAGE_SIZE)))
    return np.ascontiguousarray(resized.transpose(2, 0, 1))


def image_uint8(data: bytes) -> np.ndarray:
    """Decode and preprocess one file's bytes: what train, predict and export all use."""
    return preprocess(_decode(data))


def load_image_uint8(path: str | Path) -> np.ndarray:
    """Decode and preprocess one file: the single entry point for train, predict, export."""
    return image_uint8(read_image_bytes(path))


def _per_channel_255(values: Sequence[float]) -> Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1) * 255.0


_MEAN_T = _per_channel_255(MEAN)
_STD_T = _per_channel_255(STD)


def normalize(images: Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> Tensor:
    """uint8 (N, 3, H, W) -> float32 ``(images / 255 - mean) / std`` per channel; by default the ImageNet mean/std.

    A model may carry its own per-channel constants (``parse_preprocessing``, ``calibrated_preprocessing``);
    the defaults use tensors built once, as this runs on every training batch.
    """
    mean_t = _MEAN_T if mean is MEAN else _per_channel_255(mean)
    std_t = _STD_T if std is STD else _per_channel_255(std)
    return (images.float() - mean_t) / std_t


NORMALIZATION_BOUND = 10.0  # a model's own |mean| and std: far beyond any calibration, and no overflow
_PER_MODEL_KEYS = ("mean", "std")  # the preprocessing a model may carry its own of; the rest is edgemri's
# An optional step on the decoded 128 px scan, before normalization (``preprocessing["head"]``, ``data.head``):
# standardize-crop stretches the head's intensities to a fixed range on a black background and crops the frame
# to the head (core/training/shortcut.py), which takes away what identifies a scan's source collection. Absent: none.
HEAD_KEY = "head"


class PreprocessingError(EdgemriError):
    """Preprocessing constants that edgemri cannot apply; the message names the bad value."""


def _channel_values(preprocessing: Mapping[str, Any], name: str, where: str) -> list[float]:
    """3 finite numbers within the bounds of ``name`` (mean: [-B, B], std: (0, B]), as floats."""
    values = preprocessing[name]
    allowed = (f"[{-NORMALIZATION_BOUND:g}, {NORMALIZATION_BOUND:g}]" if name == "mean"
               else f"(0, {NORMALIZATION_BOUND:g}]")
    if not (isinstance(values, list | tuple) and len(values) == 3
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)):
        raise PreprocessingError(f"{where}: preprocessing {name} is {repr(values)[:120]}; "
                                 f"allowed: 3 numbers in {allowed}, one per RGB channel")
    low = -NORMALIZATION_BOUND if name == "mean" else 0.0
    # Chained comparisons are False for NaN; infinities and huge ints fail the bound before float() sees them.
    fits = all((low <= v if name == "mean" else low < v) and v <= NORMALIZATION_BOUND for v in values)
    if not fits:
        raise PreprocessingError(f"{where}: preprocessing {name} {list(values)} is not allowed; "
                                 f"allowed: 3 finite numbers in {allowed}")
    return [float(v) for v in values]


def parse_preprocessing(preprocessing: object, where: str) -> dict[str, Any]:
    """``preprocessing`` as a fresh dict if edgemri can apply it: ``PREPROCESSING`` up to its own per-channel
    ``mean`` and ``std`` (3 finite numbers each, mean in [-10, 10], std in (0, 10]); the decoder and the
    decoded cache apply only ``PREPROCESSING``'s size, resize and colour, so those must match exactly.

    Raises PreprocessingError (message starting with ``where``).
    """
    fixed = {k: v for k, v in PREPROCESSING.items() if k not in _PER_MODEL_KEYS}
    if not isinstance(preprocessing, Mapping):
        raise PreprocessingError(f"{where}: preprocessing is a {type(preprocessing).__name__}, "
                                 f"expected a mapping such as {PREPROCESSING}")
    rest = {k: v for k, v in preprocessing.items() if k not in (*_PER_MODEL_KEYS, HEAD_KEY)}
    head = preprocessing.get(HEAD_KEY, "none")
    if not (isinstance(head, str) and head in HEAD_STEPS):
        raise PreprocessingError(f"{where}: preprocessing head {repr(head)[:80]} is not allowed; allowed: "
                                 f"{', '.join(HEAD_STEPS)}")
    try:
        same = json.dumps(rest, sort_keys=True) == json.dumps(fixed, sort_keys=True)
    except (TypeError, ValueError):  # tensors, objects, circular data: nothing edgemri wrote
        same = False
    if not same or any(k not in preprocessing for k in _PER_MODEL_KEYS):
        raise PreprocessingError(f"{where} expects preprocessing {repr(dict(preprocessing))[:300]}, but edgemri "
                                 f"applies {fixed} with a per-channel mean and std")
    return {**fixed, **{name: _channel_values(preprocessing, name, where) for name in _PER_MODEL_KEYS},
            **({HEAD_KEY: head} if head != "none" else {})}


def calibrated_preprocessing(scale: Sequence[float] | Tensor, shift: Sequence[float] | Tensor,
                             base: Mapping[str, Any] = PREPROCESSING) -> dict[str, Any]:
    """The preprocessing whose normalized input is ``scale * x + shift`` per channel, ``x`` normalized by ``base``.

    With x = (u / 255 - mean) / std, scale * x + shift = (u / 255 - mean') / std' for std' = std / scale and
    mean' = mean - shift * std / scale: an input calibration trained on normalized images folds into the
    constants exactly, and the model that uses them stays the plain student. ``scale`` and ``shift`` hold 3
    values each (a tensor of any shape with 3 elements, e.g. (1, 3, 1, 1)); ``scale`` must be > 0.

    Raises PreprocessingError for a bad scale or shift, or constants out of ``parse_preprocessing``'s bounds.
    """
    factors = []
    for name, values, rule in (("scale", scale, " > 0"), ("shift", shift, "")):
        flat = torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()
        fits = flat.numel() == 3 and bool(torch.isfinite(flat).all()) and (not rule or bool((flat > 0).all()))
        if not fits:
            raise PreprocessingError(f"calibration {name} {flat.tolist()[:6]} is not allowed; allowed: 3 finite "
                                     f"numbers{rule}, one per RGB channel")
        factors.append(flat)
    scale_64, shift_64 = factors
    start = parse_preprocessing(base, "the base preprocessing")
    mean, std = (torch.tensor(start[k], dtype=torch.float64) for k in _PER_MODEL_KEYS)
    calibrated = {**start, "mean": (mean - shift_64 * std / scale_64).tolist(), "std": (std / scale_64).tolist()}
    return parse_preprocessing(calibrated, f"calibration scale {scale_64.tolist()}, shift {shift_64.tolist()}")
