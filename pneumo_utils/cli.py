"""How every command answers bad input: one line, no traceback."""

from __future__ import annotations

import sys


def fail(exc: Exception | str) -> int:
    """Print ``error: <message>`` as one line on stderr (no traceback) and return exit status 2:
    how every command answers bad input (a file, a folder, an option), so a user reads what is
    wrong and what to do, never a stack trace."""
    print("error: " + " ".join(str(exc).split()), file=sys.stderr)
    return 2
