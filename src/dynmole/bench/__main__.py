"""``python -m dynmole.bench``: the same as ``dynmole bench``."""

import sys

from .._console import quiet_third_party
from .command import main

quiet_third_party()

sys.exit(main())
