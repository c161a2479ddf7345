"""`python -m catrt`, the same as the `catrt` console script (for an environment whose scripts folder is not on PATH)."""

import sys

from catrt.cli import main

sys.exit(main())
