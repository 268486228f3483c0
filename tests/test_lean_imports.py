"""A device's ClientApp process imports only what a round needs (issue 15: every message starts one)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_client_app_imports_no_plotting_torchvision_teacher_stack_or_opacus() -> None:
    heavy = ("torchvision", "opacus", "scipy", "sympy", "torch._dynamo", "matplotlib")
    code = ("import json, sys; import edgemri.clients.client_app; "
            f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    assert loaded == []


def test_the_accountant_names_are_opacus_own() -> None:
    from opacus.accountants import create_accountant

    from edgemri.core.privacy.dp import ACCOUNTANTS

    for name in ACCOUNTANTS:
        assert create_accountant(name).mechanism() == name
