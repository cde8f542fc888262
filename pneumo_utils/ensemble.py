"""``python -m pneumo_utils.ensemble``: the command of :mod:`pneumo_utils.evaluation.ensemble`."""

import sys

from pneumo_utils.evaluation.ensemble import main

if __name__ == "__main__":
    sys.exit(main())
