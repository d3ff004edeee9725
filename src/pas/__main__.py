"""`python -m pas` = the `pas` command (pas.cli)."""

import sys

from pas.cli import main

sys.exit(main())
