"""`python -m raymed.eval`: the same as `raymed eval` (see `raymed.eval.evaluate`)."""

import sys

from raymed.eval.evaluate import main

sys.exit(main())
