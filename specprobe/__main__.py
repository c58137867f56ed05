"""`python -m specprobe ...`: the same as the `specprobe` command."""

import sys

from .commands.main import main

sys.exit(main())
