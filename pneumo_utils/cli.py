"""The ``pneumo`` command (``python -m pneumo_utils`` where scripts are not on the PATH), and
how every command answers bad input: one line, no traceback.

``pneumo COMMAND ARGS...`` runs the ``main`` of the module that owns the command; the module
is imported only then, so ``pneumo --help`` and a wrong command name load no TensorFlow.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "predict": ("pneumo_utils.deploy.predict", "classify images with a saved model"),
    "evaluate": ("pneumo_utils.evaluation.evaluate", "score a saved model on a labelled folder"),
    "calibrate": ("pneumo_utils.evaluation.calibrate",
                  "fit a copy's threshold and temperature on a site's labelled images"),
    "site-shift": ("pneumo_utils.evaluation.site_shift",
                   "how far a site's images are from the training images"),
    "ensemble": ("pneumo_utils.evaluation.ensemble", "average saved models of one task"),
    "export": ("pneumo_utils.deploy.export", "export to LiteRT, ONNX or SavedModel"),
    "fetch": ("pneumo_utils.data.fetch", "find or download the data sets"),
    "shards": ("pneumo_utils.scale.shard_command", "write or verify TFRecord shards"),
    "run": ("pneumo_utils.runner.engine", "run the notebooks and render the reports"),
}
"""Command name -> (module whose ``main(argv)`` runs it, one-line description)."""


def usage() -> str:
    """The list of commands, as ``pneumo --help`` prints it."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return ("usage: pneumo COMMAND [ARGS...]   (or: python -m pneumo_utils COMMAND ...)\n\n"
            "commands:\n" + "\n".join(lines) + "\n\n'pneumo COMMAND --help' describes one command.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pneumo COMMAND ARGS...``; returns the command's exit status (2 for a wrong command)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        return fail(f"unknown command {name!r}; one of: {', '.join(COMMANDS)} (pneumo --help)")
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


def fail(exc: Exception | str) -> int:
    """Print ``error: <message>`` as one line on stderr (no traceback) and return exit status 2:
    how every command answers bad input (a file, a folder, an option), so a user reads what is
    wrong and what to do, never a stack trace."""
    print("error: " + " ".join(str(exc).split()), file=sys.stderr)
    return 2
