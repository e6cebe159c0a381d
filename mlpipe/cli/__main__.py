"""``python -m mlpipe.cli``: the same as the ``mlpipe`` command."""

import sys

from mlpipe.cli import main

sys.exit(main())
