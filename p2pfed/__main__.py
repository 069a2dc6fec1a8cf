"""``python -m p2pfed``: the same as the ``p2pfed`` command."""

import sys

from p2pfed.cli import main

sys.exit(main())
