"""``python -m fastdd``: the command line (see :mod:`fastdd.cli`)."""
import sys

from .cli import main

sys.exit(main())
