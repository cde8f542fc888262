"""``python -m pneumo_utils.site_shift``: the command of :mod:`pneumo_utils.evaluation.site_shift`."""

import sys

from pneumo_utils.evaluation.site_shift import main

if __name__ == "__main__":
    sys.exit(main())
