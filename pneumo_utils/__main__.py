"""``python -m pneumo_utils COMMAND ...``: the ``pneumo`` command (:mod:`pneumo_utils.cli`)."""

import sys

from pneumo_utils.cli import main

sys.exit(main())
