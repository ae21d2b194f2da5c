"""``python -m hvpmtl`` runs the command line (see :mod:`hvpmtl.cli`)."""

import sys

from hvpmtl.cli import main

sys.exit(main())
