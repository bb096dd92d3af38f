"""``python -m dynmole.bench``: the same as ``dynmole bench``."""

import sys

from .command import main

sys.exit(main())
