"""``python -m edgemri``: the same command line as ``edgemri``."""

import sys

from edgemri.main import main

sys.exit(main())
