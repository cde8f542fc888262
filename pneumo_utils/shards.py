"""``python -m pneumo_utils.shards``: the command of :mod:`pneumo_utils.scale.shards`."""

import sys

from pneumo_utils.scale.shards import main

if __name__ == "__main__":
    sys.exit(main())
