"""``python -m dynmole.bench``: the same as ``dynmole bench``."""

import sys

from . import main

sys.exit(main())
