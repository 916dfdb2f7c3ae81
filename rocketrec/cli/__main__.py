"""`python -m rocketrec.cli ...` = the `rocketrec` command."""

import sys

from rocketrec.cli import main

sys.exit(main())
