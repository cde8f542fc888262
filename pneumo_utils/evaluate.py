"""``python -m pneumo_utils.evaluate``: the command of :mod:`pneumo_utils.evaluation.evaluate`."""

import sys

from pneumo_utils.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
