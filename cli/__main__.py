"""``python -m edgemri``: the same command line as ``edgemri``."""

from edgemri.entry import run

run()
