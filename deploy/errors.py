"""The deployment error: every bad value given to ``edgemri deploy`` or the local launcher."""

from __future__ import annotations

from edgemri.core.errors import EdgemriError


class DeployError(EdgemriError):
    """A deployment step cannot work as asked; the message names the bad value and the fix."""
