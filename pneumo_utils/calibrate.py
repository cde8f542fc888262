"""``python -m pneumo_utils.calibrate``: the command of :mod:`pneumo_utils.evaluation.calibrate`."""

import sys

from pneumo_utils.evaluation.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
