"""The project's registries handed to the config: the one place that knows every registry.

``core/config.py`` is a leaf (it checks names against the ``Registries`` it is given); this module sits above
the registries' owners, so the config loader never imports them and no import cycle is possible.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from edgemri.core import config
from edgemri.core.config import Config, Registries
from edgemri.core.data.partition import CLIENT_KINDS
from edgemri.core.data.splits import SCENARIOS
from edgemri.core.data.synth import PRESETS
from edgemri.core.federation.personalize import METHODS
from edgemri.core.privacy.dp import ACCOUNTANTS
from edgemri.models import MODEL_NAMES, model_spec

REGISTRIES = Registries(
    teachers=tuple(n for n in MODEL_NAMES if model_spec(n).role == "teacher"),
    synth_presets=tuple(PRESETS),
    scenarios=tuple(SCENARIOS),
    client_kinds=tuple(CLIENT_KINDS),
    methods=tuple(METHODS),
    after_round_methods=tuple(name for name, method in METHODS.items() if not method.keeps_personal_state),
    accountants=tuple(ACCOUNTANTS),
)


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read and validate a YAML config (then ``overrides``, ``dotted.key=value``) against the project's registries."""
    return config.load_config(path, REGISTRIES, overrides)


def parse_config(data: Any) -> Config:
    """A validated Config from plain data (a checkpoint's or a report's copy) against the project's registries."""
    return config.parse_config(data, REGISTRIES)
