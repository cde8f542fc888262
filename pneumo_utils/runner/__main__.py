"""``python -m pneumo_utils.runner``: run the notebooks (see :mod:`pneumo_utils.runner.engine`)."""

import sys

from pneumo_utils.runner.engine import main

sys.exit(main())
