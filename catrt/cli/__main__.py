"""`python -m catrt.cli`, as the `catrt` console script runs."""

import sys

from catrt.cli import main

sys.exit(main())
