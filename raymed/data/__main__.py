"""``python -m raymed.data``: see :mod:`raymed.data.cli`."""

import sys

from raymed.data.cli import main

sys.exit(main())
