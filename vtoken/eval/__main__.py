"""``python -m vtoken.eval`` (and ``accelerate launch -m vtoken.eval``)."""

import sys

from vtoken.eval.cli import main

sys.exit(main())
