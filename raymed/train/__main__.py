"""`python -m raymed.train`: the same as `raymed train` (see `raymed.train.launch`)."""

import sys

from raymed.train.launch import main

sys.exit(main())
