"""`python -m specprobe ...`: the same as the `specprobe` command."""

import sys

from .cli import main

sys.exit(main())
