"""`python -m pop` is the `pop` command."""

import sys

from pop.cli import main

sys.exit(main())
