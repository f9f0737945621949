"""``python -m tda_explorer`` runs the command line."""

import sys

from tda_explorer.cli import main

sys.exit(main())
