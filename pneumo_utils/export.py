"""``python -m pneumo_utils.export``: the command of :mod:`pneumo_utils.deploy.export`."""

import sys

from pneumo_utils.deploy.export import main

if __name__ == "__main__":
    sys.exit(main())
