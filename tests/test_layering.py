"""The package's floors: every import (module-level or inside a function) points down or across.

Floors, lowest first: the ground floor (``pneumo_utils`` itself, ``files``, ``sidecar``,
``probability``, ``cli`` and the command modules), ``data``, ``model``, ``evaluation``,
``explain``, ``deploy``, ``scale``. ``runner`` reads the ground floor, ``data.fetch`` (where the
data sets are) and ``data.tasks`` (task names and titles for the index page), and runs the rest
as commands in their own processes.
"""

import ast
from pathlib import Path

import pneumo_utils

PACKAGE = Path(pneumo_utils.__file__).parent
FLOORS = {"": 0, "data": 1, "model": 2, "evaluation": 3, "explain": 4, "deploy": 5, "scale": 6}
RUNNER_READS = {"pneumo_utils.data.fetch", "pneumo_utils.data.tasks"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, name: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``pneumo_utils`` import in ``tree``, relative ones resolved;
    ``from pneumo_utils.x import y`` counts as ``pneumo_utils.x.y`` when ``y`` is a module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or (
                    PACKAGE.parent / Path(*sub.split("."))).is_dir()
                found.append((node.lineno, sub if is_module else base))
    return [(line, m) for line, m in found if m == "pneumo_utils" or m.startswith("pneumo_utils.")]


def floor(module: str) -> str:
    """The floor a module stands on: its folder below ``pneumo_utils``, or ``""``."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()):
        return parts[1]
    return ""


def is_command(tree: ast.Module) -> bool:
    """Whether a top-level module is a command: ``from pneumo_utils.<folder>.<x> import main``
    and nothing else of the package."""
    found = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             and (node.module or "").startswith("pneumo_utils.")]
    return len(found) == 1 and [alias.name for alias in found[0].names] == ["main"]


def upward_arrows() -> list[str]:
    arrows, commands = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        own = floor(name)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        if own == "" and is_command(tree):
            commands.add(name)
        for line, target in imported(tree, name, path.name == "__init__.py"):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if own == "runner":
                if floor(target) not in ("runner", "") and target not in RUNNER_READS:
                    arrows.append(f"{where}: {name} -> {target} (runner reads data.fetch and data.tasks)")
                continue
            if own == "" and name in commands:
                continue  # python -m pneumo_utils.X runs the main of a module in a folder
            there = floor(target)
            if there == "runner" or FLOORS[there] > FLOORS[own]:
                arrows.append(f"{where}: {name} ({own or 'ground'}) -> {target} ({there or 'ground'})")
    return sorted(set(arrows))


def test_no_module_imports_a_floor_above_its_own():
    arrows = upward_arrows()
    assert not arrows, "imports that climb the floors:\n" + "\n".join(arrows)


def test_the_check_sees_in_function_and_relative_imports():
    source = "def f():\n    from pneumo_utils.deploy.predict import main\n\nfrom . import saving\n"
    found = imported(ast.parse(source), "pneumo_utils.model.features", is_package=False)
    assert sorted(found) == [(2, "pneumo_utils.deploy.predict"), (4, "pneumo_utils.model.saving")]
    assert floor("pneumo_utils.deploy.predict") == "deploy"
    assert floor("pneumo_utils.sidecar") == ""
