"""``python -m pneumo_utils.predict``: the command of :mod:`pneumo_utils.deploy.predict`."""

import sys

from pneumo_utils.deploy.predict import main

if __name__ == "__main__":
    sys.exit(main())
