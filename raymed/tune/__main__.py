"""`python -m raymed.tune`: the same as `raymed tune` (see `raymed.tune.sweep`)."""

import sys

from raymed.tune.sweep import main

sys.exit(main())
