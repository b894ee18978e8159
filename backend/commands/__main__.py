"""`python -m backend.commands ...`: the `grounded-sam` command without its console script."""

import sys

from backend.commands.main import main

sys.exit(main())
