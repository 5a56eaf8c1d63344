"""``python -m fusedopt``: the same command line as the ``fusedopt`` console script."""

import sys

from .cli import main

sys.exit(main())
