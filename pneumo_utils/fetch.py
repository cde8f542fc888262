"""``python -m pneumo_utils.fetch``: the command of :mod:`pneumo_utils.data.fetch`."""

import sys

from pneumo_utils.data.fetch import main

if __name__ == "__main__":
    sys.exit(main())
