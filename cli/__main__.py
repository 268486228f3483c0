import sys

from edgemri.main import main

sys.exit(main())
