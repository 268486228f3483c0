"""The edge errors, and the one gate to the optional onnx and onnxruntime packages.

Everything in edgemri.edge that a user can cause (a bad checkpoint, file, option or
output path) raises ``EdgeError`` with a one-line message; the command line prints it.
"""

from __future__ import annotations

from types import ModuleType

from edgemri.core.errors import EdgemriError

INSTALL_HINT = "pip install 'edgemri[edge]'"


class EdgeError(EdgemriError):
    """A model cannot be exported or used for prediction as asked; the message says why."""


class EdgeDependencyError(EdgeError):
    """onnx or onnxruntime is not installed; the message says how to install them."""


def require_onnx() -> tuple[ModuleType, ModuleType]:
    """Import onnx and onnxruntime, or raise EdgeDependencyError naming the install command."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise EdgeDependencyError(
            f"ONNX export and ONNX models need onnx and onnxruntime ({err.name or err} is missing): "
            f"{INSTALL_HINT}"
        ) from None
    return onnx, onnxruntime


def first_line(err: BaseException) -> str:
    """The first line of a foreign library's error, for a one-line message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else err.__class__.__name__

