"""``python -m pneumo_utils.shards``: the command of :mod:`pneumo_utils.scale.shard_command`."""

import sys

from pneumo_utils.scale.shard_command import main

if __name__ == "__main__":
    sys.exit(main())
