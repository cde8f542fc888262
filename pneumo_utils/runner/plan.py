"""The notebooks a run executes, the profiles and their parameters.

A profile's ``runs:`` section names extra runs of a notebook with parameters of their own;
parameters are checked against each notebook's parameters cell (see :mod:`pneumo_utils.runner`).
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import importlib.resources
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROFILES = importlib.resources.files("pneumo_utils.runner") / "profiles"
"""The shipped profiles (``full.yaml``, ``smoke.yaml``): package data, in the wheel too."""


NOTEBOOK_PATTERNS = ("[0-9][0-9]_*.py", "[0-9][0-9]_*.ipynb")


RUN_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")
"""A run's name becomes file names: letters, digits, ``_``, ``.`` and ``-``."""


RUNNER_FILES = ("index.html", "summary.json", "best.json", "best.*.json")
"""Files the runner writes beside the reports and models (:func:`run_files` must not match)."""


RUNNER_KEYS = {"reports_dir": "reports", "record_best": False}
"""A profile's ``runner:`` section: where reports go, and whether the run sets ``best.json``."""


VALUE_RULES: dict[str, tuple[str, Any]] = {
    "epochs": ("an integer >= 1", lambda v: _int(v) and v >= 1),
    "fine_tune_epochs": ("an integer >= 0", lambda v: _int(v) and v >= 0),
    "scratch_epochs": ("an integer >= 1", lambda v: _int(v) and v >= 1),
    "image_size": ("an integer from 32 to 512 (pixels)", lambda v: _int(v) and 32 <= v <= 512),
    "scratch_image_size": ("an integer from 32 to 512 (pixels)", lambda v: _int(v) and 32 <= v <= 512),
    "batch_size": ("an integer from 1 to 4096", lambda v: _int(v) and 1 <= v <= 4096),
    "n_boot": ("an integer from 1 to 100000", lambda v: _int(v) and 1 <= v <= 100_000),
    "cue_images": ("an integer >= 2", lambda v: _int(v) and v >= 2),
    "patience": ("an integer >= 1", lambda v: _int(v) and v >= 1),
    "max_images_per_class": ("null or an integer >= 2", lambda v: v is None or (_int(v) and v >= 2)),
    "images_per_epoch": ("null or an integer >= 1", lambda v: v is None or (_int(v) and v >= 1)),
    "unfreeze_layers": ("null or an integer >= 1", lambda v: v is None or (_int(v) and v >= 1)),
    "learning_rate": ("a number above 0 and at most 1", lambda v: _number(v) and 0 < v <= 1),
    "fine_tune_learning_rate": ("a number above 0 and at most 1", lambda v: _number(v) and 0 < v <= 1),
    "val_fraction": ("a number above 0 and below 1", lambda v: _number(v) and 0 < v < 1),
    "test_fraction": ("a number above 0 and below 1", lambda v: _number(v) and 0 < v < 1),
    "stretch": ("a number from 0 to 0.9", lambda v: _number(v) and 0 <= v <= 0.9),
    "label_smoothing": ("a number from 0 to below 1", lambda v: _number(v) and 0 <= v < 1),
    "seed": ("an integer from 0 to 2**32 - 1", lambda v: _int(v) and 0 <= v < 2**32),
    "remove_cues": ("true or false", lambda v: isinstance(v, bool)),
    "ema_momentum": ("null or a number from 0.5 to below 1", lambda v: v is None or (_number(v) and 0.5 <= v < 1)),
    "ensemble_members": ("a list of model names", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "ensemble_keep": ("if_better or always", lambda v: v in ("if_better", "always")),
}
"""The ranges of the notebooks' numeric and true/false parameters, checked before any kernel
starts: a value outside them fails inside a notebook with a Keras traceback, or silently trains
nothing (``"false"``, a string, is true)."""

FOLDER_PARAMETERS = ("reports_dir", "models_dir", "cache_dir", "shards_dir")
"""Parameters that name a folder a notebook writes into: an existing file there is refused."""


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    import math

    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def value_problem(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be notebook parameter ``key`` (``None`` when it can)."""
    if key in VALUE_RULES and not VALUE_RULES[key][1](value):
        return f"{key} is {value!r}, expected {VALUE_RULES[key][0]}"
    if key in FOLDER_PARAMETERS and value is not None:
        if not isinstance(value, str):
            return f"{key} is {value!r}, expected a folder path"
        if Path(value).expanduser().exists() and not Path(value).expanduser().is_dir():
            return f"{key} is {value}, which is a file, not a folder"
    return None


class UsageError(ValueError):
    """A bad command line, profile or missing data set: one message, exit status 2."""


@dataclass
class Notebook:
    """One notebook, or one profile run of a notebook (``of`` names that notebook): its source,
    declared parameters, the merged values and what happened."""

    name: str
    path: Path
    node: Any
    declared: dict[str, dict]
    parameters: dict[str, Any] = field(default_factory=dict)
    of: str | None = None
    status: str = "pending"
    seconds: float = 0.0
    error: str | None = None
    metrics: dict | None = None
    metrics_problem: str | None = None

    def default(self, key: str) -> Any:
        """The notebook's own value of parameter ``key`` (None when not a literal)."""
        try:
            return ast.literal_eval(self.declared[key]["default"])
        except (KeyError, ValueError, SyntaxError):
            return None

    def value(self, key: str) -> Any:
        """The value parameter ``key`` has in this run."""
        return self.parameters[key] if key in self.parameters else self.default(key)

    def selected_by(self, selector: str) -> bool:
        """True when ``selector`` names this notebook, or this run or the notebook it runs."""
        return matches(self.name, selector) or (self.of is not None and matches(self.of, selector))


def load_profile(name: str) -> dict[str, dict[str, Any]]:
    """:data:`PROFILES` ``/<name>.yaml`` or a YAML path as ``{section: parameters}``;
    ``"none"`` -> {}."""
    if name.lower() == "none":
        return {}
    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILES / f"{name}.yaml"
    if not path.is_file():
        raise UsageError(f"profile {name!r} not found (looked for {path})")
    try:
        data = read_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UsageError(yaml_problem(exc, str(path))) from None
    if not isinstance(data, dict) or not all(isinstance(v, dict | None) for v in data.values()):
        raise UsageError(f"profile {path} must map 'default', notebook names and 'runs' to parameters")
    return {
        str(section): {str(k): literal(v, f"profile {path.name}: {section}.{k}") for k, v in (params or {}).items()}
        for section, params in data.items()
    }


class ProfileLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors, aliases and duplicate keys.

    An alias shares a node, so 382 bytes of nested aliases ("billion laughs") expand to
    gigabytes once :func:`literal` copies them; a profile never needs one, so the first
    anchor or alias is refused where the parser meets it, before anything is built. A key
    given twice would silently keep the last value (two runs of one name: one never runs).
    """

    def compose_node(self, parent, index):
        """Refuse an anchor (``&name``) or an alias (``*name``)."""
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, f"anchors and aliases (&{event.anchor}, *{event.anchor}) are not allowed; "
                "write each value out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        """The mapping of ``node``, refusing a key given twice."""
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in lines
                except TypeError:
                    continue  # an unhashable key: SafeLoader refuses it below
                if seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice (first on line {lines[key]}); keep one",
                        key_node.start_mark)
                lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(text: str) -> Any:
    """``text`` parsed by :class:`ProfileLoader`; a nesting too deep to parse is a YAML error."""
    try:
        return yaml.load(text, Loader=ProfileLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deeply; parameters are plain values a few levels deep") from None


def yaml_problem(exc: yaml.YAMLError, where: str) -> str:
    """``WHERE:LINE: problem`` in one line, for a YAML error in a profile or ``--set`` value."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = f":{mark.line + 1}" if mark is not None and not where.startswith("--set") else ""
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    if "constructor for the tag" in problem:
        problem += "; values are plain numbers, strings, true/false, null, lists and mappings"
    elif isinstance(exc, yaml.scanner.ScannerError | yaml.parser.ParserError):
        problem += "; fix the YAML there"
    return f"{where}{line}: {problem}"


def literal(value: Any, where: str) -> Any:
    """``value`` if it is a literal papermill can write (number, string, bool, None, list, dict)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [literal(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: literal(v, where) for k, v in value.items()}
    raise UsageError(f"{where}: {value!r} is not a number, string, true/false, null, list or mapping")


def parse_sets(items: Sequence[str]) -> list[tuple[str | None, str, Any]]:
    """``--set [NB.]KEY=VALUE`` items as ``(notebook selector or None, key, value)``."""
    parsed = []
    for item in items:
        target, sep, raw = item.partition("=")
        selector, dot, key = target.strip().rpartition(".")
        if not sep or not key.isidentifier():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE or NB.KEY=VALUE with KEY a name")
        try:
            value = read_yaml(raw) if raw else ""
        except (yaml.scanner.ScannerError, yaml.parser.ParserError):
            value = raw  # not YAML at all: the text itself, a string
        except yaml.YAMLError as exc:
            raise UsageError(yaml_problem(exc, f"--set {item!r}")) from None
        parsed.append((selector if dot else None, key, literal(value, f"--set {item!r}")))
    return parsed


def matches(name: str, selector: str) -> bool:
    """True when notebook ``name`` is selected by ``selector`` (a prefix, name or file name)."""
    selector = Path(selector).name.removesuffix(".ipynb").removesuffix(".py")
    return bool(selector) and name.startswith(selector)


def read_notebooks(folder: Path) -> list[Notebook]:
    """Every ``NN_*.py`` (else ``.ipynb``) in ``folder``, read with jupytext, sorted by name."""
    import jupytext
    import papermill

    paths: dict[str, Path] = {}
    for pattern in reversed(NOTEBOOK_PATTERNS):  # the .py wins over its paired .ipynb
        paths.update({p.stem: p for p in Path(folder).glob(pattern)})
    if not paths:
        raise UsageError(f"no notebooks named NN_*.py or NN_*.ipynb in {folder}")
    notebooks = []
    for name, path in sorted(paths.items()):
        node = jupytext.read(path)
        try:
            declared = settings_of(node) | papermill.inspect_notebook(node)
        except ValueError as exc:  # no kernelspec: papermill cannot tell the language
            raise UsageError(f"{path}: {exc}; add one with: jupytext --set-kernel python3 {path}") from None
        notebooks.append(Notebook(name, path, node, declared))
    return notebooks


def settings_of(node: Any) -> dict[str, dict]:
    """The parameters a notebook declares in cells tagged ``settings`` (the run's folders,
    strategy and seed), as ``papermill.inspect_notebook`` gives those of its ``parameters``
    cell (the story's). Settings cells come before the ``parameters`` cell, so the values
    papermill injects after that cell replace them too.
    """
    from papermill.translators import papermill_translators
    from papermill.utils import nb_kernel_name, nb_language

    translator = papermill_translators.find_translator(nb_kernel_name(node), nb_language(node))
    tags = [cell.get("metadata", {}).get("tags", []) for cell in node.cells]
    first = next((i for i, cell in enumerate(tags) if "parameters" in cell), len(tags))
    if any("settings" in cell for cell in tags[first:]):
        raise ValueError("a cell tagged settings comes after the parameters cell, where papermill's values "
                         "would be overwritten; move it before")
    return {p.name: p._asdict() for cell, cell_tags in zip(node.cells, tags, strict=True) if "settings" in cell_tags
            for p in translator.inspect(cell)}


def add_runs(notebooks: Sequence[Notebook], runs: dict[str, Any]) -> list[Notebook]:
    """``notebooks`` with each of a profile's ``runs`` right after the notebook it runs.

    A run shares its notebook's source and declared parameters; its keys other than
    ``notebook`` are checked by :func:`assign_parameters`.
    """
    names = [nb.name for nb in notebooks]
    extra: dict[str, list[Notebook]] = {}
    for name, keys in runs.items():
        where = f"profile runs.{name}"
        if not RUN_NAME.fullmatch(name) or name in names:
            raise UsageError(f"{where}: a run needs a name of its own made of letters, digits, _ . -")
        taken = [f for f in run_files(name) if any(fnmatch.fnmatch(f, p) for p in RUNNER_FILES)]
        taken += [f"{other}'s {f}" for other in [*names, *runs] if other != name
                  for f in set(run_files(name)) & set(run_files(other))]
        if taken:
            raise UsageError(f"{where}: its outputs would overwrite {', '.join(sorted(taken))}; "
                             "give the run another name")
        target = keys.get("notebook") if isinstance(keys, dict) else None
        if isinstance(target, str) and (os.sep in target or "/" in target):
            folder = notebooks[0].path.parent.resolve()
            if Path(target).expanduser().resolve().parent != folder:
                raise UsageError(f"{where}: 'notebook:' {target} is not in the notebooks folder {folder}; "
                                 f"name one of {', '.join(names)}")
        hits = [nb for nb in notebooks if isinstance(target, str) and matches(nb.name, target)]
        if len(hits) != 1:
            raise UsageError(f"{where}: 'notebook:' must name one notebook ({', '.join(names)}); got {target!r}")
        nb = hits[0]
        extra.setdefault(nb.name, []).append(Notebook(name, nb.path, nb.node, nb.declared, of=nb.name))
    return [x for nb in notebooks for x in (nb, *extra.get(nb.name, []))]


def run_files(name: str) -> list[str]:
    """The file names a run called ``name`` writes (reports, metrics, model, sidecar, card),
    lower-cased since folders may not tell case apart."""
    return [f"{name}{suffix}".lower()
            for suffix in (".html", ".code.html", ".ipynb", ".metrics.json", ".keras", ".json", ".md")]


def assign_parameters(
    notebooks: Sequence[Notebook],
    profile: dict[str, dict[str, Any]],
    sets: Sequence[tuple[str | None, str, Any]],
    data: dict[str, Path],
) -> None:
    """Merge data folder, profile and ``--set`` values into each notebook's and run's
    ``parameters`` (precedence in the module docstring); a run's ``run_name`` is its name.

    Raises :class:`UsageError` naming the known parameters when a key is not declared.
    """
    runs = profile.get("runs") or {}
    profile = {k: v for k, v in profile.items() if k not in ("runner", "runs")}
    names = [nb.name for nb in notebooks]
    plain = [nb.name for nb in notebooks if nb.of is None]
    everywhere = sorted(set().union(*(nb.declared for nb in notebooks)))
    for section in profile:
        if section != "default" and section not in plain:
            raise UsageError(f"profile section {section!r} matches no notebook (have: {', '.join(plain)})")
    shared = [(key, f"profile default.{key}") for key in profile.get("default", {})]
    shared += [(key, f"--set {key}") for nb, key, _ in sets if nb is None]
    for key, where in shared:
        if key not in everywhere:
            raise UsageError(f"{where}: no notebook declares {key!r}; known: {', '.join(everywhere)}")
    for selector, key, _ in sets:
        if selector is not None and not any(matches(n, selector) for n in names):
            raise UsageError(f"--set {selector}.{key}: {selector!r} matches no notebook or run ({', '.join(names)})")
    for nb in notebooks:
        home = nb.of or nb.name
        mine = {k: v for k, v in (runs.get(nb.name) or {}).items() if k != "notebook"} if nb.of else {}
        via = [(s, k, v) for s, k, v in sets if s is not None and matches(home, s)]
        direct = [(s, k, v) for s, k, v in sets if s is not None and nb.of and matches(nb.name, s)]
        own = [(key, f"profile {home}.{key}") for key in profile.get(home, {})]
        own += [(key, f"profile runs.{nb.name}.{key}") for key in mine]
        own += [("run_name", f"profile runs.{nb.name} (a run's outputs are named by run_name)")] if nb.of else []
        own += [(key, f"--set {s}.{key}") for s, key, _ in via + direct]
        for key, where in own:
            if key not in nb.declared:
                raise UsageError(
                    f"{where}: {home} declares no {key!r}; known: {', '.join(nb.declared)}"
                )
        params: dict[str, Any] = {}
        if "data_dir" in nb.declared and need_of(nb) in data:
            params["data_dir"] = str(data[need_of(nb)])
        if "external_dir" in nb.declared and "external" in data:
            params["external_dir"] = str(data["external"])
        params.update(profile.get("default", {}))
        params.update(profile.get(home, {}))
        params.update(mine)
        params.update({k: v for s, k, v in sets if s is None})
        params.update({k: v for _, k, v in via + direct})
        if nb.of:
            params["run_name"] = nb.name
        for key, value in params.items():
            problem = value_problem(key, value) if key in nb.declared else None
            if problem:
                raise UsageError(f"{nb.name}: {problem}; fix the profile or --set value")
        if params.get("run_name") is not None and not RUN_NAME.fullmatch(str(params["run_name"])):
            raise UsageError(f"{nb.name}: run_name {params['run_name']!r} must be a plain name of letters, "
                             "digits, _ . - (it names files in saved_models/ and reports/; no folders)")
        nb.parameters = {k: v for k, v in params.items() if k in nb.declared}


def need_of(nb: Notebook) -> str:
    """Which data set a notebook (or its run) reads: ``"nih"`` for notebooks named ``*nih*``, else Kermany."""
    return "nih" if "nih" in (nb.of or nb.name).lower() else "kermany"


def outputs(nb: Notebook, reports_dir: Path) -> dict[str, Path]:
    """The files a notebook's run leaves in ``reports_dir``."""
    run_name = str(nb.value("run_name") or nb.name)
    return {
        "ipynb": reports_dir / f"{nb.name}.ipynb",
        "html": reports_dir / f"{nb.name}.html",
        "code_html": reports_dir / f"{nb.name}.code.html",
        "metrics": reports_dir / f"{run_name}.metrics.json",
    }
